//! Idle backend connections of one worker. The lock is never contended:
//! one worker's requests run on one thread, and the pool is never shared
//! with another worker (a connection stays on the runtime that opened it).
//! A `Mutex` rather than a `RefCell` only because answer bodies, which give
//! their connection back when they end, must be `Send` for hyper.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::uri::Authority;

use super::h1::Conn;

/// Idle connections kept per backend and worker (nginx's `keepalive`
/// counts the same way; Kong keeps 512 per pool). A burst (1,000
/// compositions of 3 calls at once opens 3,000 connections) must not stay
/// pooled, and memory with it, once it is over.
pub const MAX_IDLE_PER_ORIGIN: usize = 64;

/// An idle connection older than this is closed rather than reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections are kept per connector as well as per origin: two
/// upstreams to the same host and port with other client certificates or
/// other trust never share one.
struct Origin {
    connector: u64,
    tls: bool,
    authority: Authority,
    idle: Vec<(Conn, Instant)>,
}

#[derive(Default)]
pub struct Pool {
    origins: Mutex<Vec<Origin>>,
}

impl Pool {
    /// The most recently used idle connection to the origin that still
    /// looks alive; dead and expired ones are dropped on the way.
    pub fn take(&self, connector: u64, tls: bool, authority: &Authority) -> Option<Conn> {
        loop {
            let (mut conn, at) = {
                let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
                let o = origins.iter_mut().find(|o| o.connector == connector && o.tls == tls && o.authority == *authority)?;
                o.idle.pop()?
            };
            if at.elapsed() < IDLE_TIMEOUT && conn.is_reusable() {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request to its origin, within the cap.
    /// Connections idle past [`IDLE_TIMEOUT`] anywhere in the pool are
    /// closed now and then, so a backend no longer called does not keep
    /// its sockets open.
    pub fn put(&self, conn: Conn) {
        let now = Instant::now();
        let expired;
        {
            let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
            let i = match origins.iter().position(|o| o.connector == conn.connector && o.tls == conn.tls && o.authority == conn.authority) {
                Some(i) => i,
                None => {
                    origins.push(Origin { connector: conn.connector, tls: conn.tls, authority: conn.authority.clone(), idle: Vec::new() });
                    origins.len() - 1
                }
            };
            let o = &mut origins[i];
            if o.idle.len() >= MAX_IDLE_PER_ORIGIN {
                return;
            }
            // The oldest idle connection is first: when it expired, sweep.
            expired = o.idle.first().is_some_and(|(_, at)| now - *at > IDLE_TIMEOUT);
            o.idle.push((conn, now));
            if expired {
                for o in origins.iter_mut() {
                    o.idle.retain(|(_, at)| now - *at <= IDLE_TIMEOUT);
                }
                origins.retain(|o| !o.idle.is_empty());
            }
        }
    }

    /// Idle connections held now (for tests and metrics).
    pub fn idle(&self) -> usize {
        self.origins.lock().map_or(0, |o| o.iter().map(|o| o.idle.len()).sum())
    }
}
