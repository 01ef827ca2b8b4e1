//! WebSocket tunnels: once a route with `websocket: true` admitted the
//! handshake and the backend answered 101, the client's connection (hyper's
//! upgraded IO) and the backend's (the upstream layer's, never pooled) are
//! joined, and bytes are copied both ways until both sides closed, one
//! failed, neither sent a byte for the route's `websocket_idle_timeout`,
//! or the node closes its tunnels at the end of a drain.

use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::upstream::Stream;

/// How much one read of either side may carry.
const CHUNK: usize = 16 << 10;

/// How long a tunnel's close (a TLS close_notify, a FIN) may take.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// One worker's open tunnels: each holds a receiver of `close`, so the
/// worker can close them all and wait until they have ended.
pub struct Tunnels {
    close: watch::Sender<bool>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels { close: watch::channel(false).0 }
    }
}

impl Tunnels {
    /// Tunnels open now.
    pub fn open(&self) -> usize {
        self.close.receiver_count()
    }

    /// Closes every tunnel (both sides' connections) and waits at most
    /// `wait` for them to have ended.
    pub async fn close_all(&self, wait: Duration) {
        if self.open() == 0 {
            return;
        }
        self.close.send_replace(true);
        if tokio::time::timeout(wait, self.close.closed()).await.is_err() {
            tracing::warn!(open = self.open(), "tunnels still closing after {wait:?}");
        }
    }

    /// Joins the client's upgraded connection to `backend` on a task of
    /// this worker; `rest` is what the backend sent past its 101. `hold`
    /// is dropped when the tunnel ends (it keeps the client connection out
    /// of its idle and head timers).
    pub fn spawn(&self, client: OnUpgrade, backend: Stream, rest: Bytes, idle: Duration, hold: impl Send + 'static) {
        let close = self.close.subscribe();
        tokio::spawn(async move {
            let _hold = hold;
            let client = match client.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => {
                    tracing::debug!(error = %e, "the client's connection was not handed over for its tunnel");
                    return;
                }
            };
            let ended = join(client, backend, rest, idle, close).await;
            tracing::debug!(ended, "websocket tunnel closed");
        });
    }
}

/// Copies both ways until the tunnel ends; says why it ended.
async fn join<C, B>(mut client: C, mut backend: B, rest: Bytes, idle: Duration, mut close: watch::Receiver<bool>) -> &'static str
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let ended = 'copy: {
        if !rest.is_empty() && !matches!(tokio::time::timeout(idle, client.write_all(&rest)).await, Ok(Ok(()))) {
            break 'copy "client write failed";
        }
        let (mut from_client, mut from_backend) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let (mut client_open, mut backend_open) = (true, true);
        let timer = tokio::time::sleep(idle);
        tokio::pin!(timer);
        loop {
            tokio::select! {
                read = client.read(&mut from_client), if client_open => match read {
                    Ok(0) => {
                        // Half-closed: the backend is told, and may still answer.
                        client_open = false;
                        let _ = tokio::time::timeout(SHUTDOWN_WAIT, backend.shutdown()).await;
                    }
                    Ok(n) => {
                        if !matches!(tokio::time::timeout(idle, backend.write_all(&from_client[..n])).await, Ok(Ok(()))) {
                            break 'copy "backend write failed";
                        }
                        timer.as_mut().reset(Instant::now() + idle);
                    }
                    Err(_) => break 'copy "client read failed",
                },
                read = backend.read(&mut from_backend), if backend_open => match read {
                    Ok(0) => {
                        backend_open = false;
                        let _ = tokio::time::timeout(SHUTDOWN_WAIT, client.shutdown()).await;
                    }
                    Ok(n) => {
                        if !matches!(tokio::time::timeout(idle, client.write_all(&from_backend[..n])).await, Ok(Ok(()))) {
                            break 'copy "client write failed";
                        }
                        timer.as_mut().reset(Instant::now() + idle);
                    }
                    Err(_) => break 'copy "backend read failed",
                },
                _ = &mut timer => break 'copy "idle timeout",
                // Set at the end of a drain (or the worker is gone).
                _ = closing(&mut close) => break 'copy "node shutting down",
            }
            if !client_open && !backend_open {
                break 'copy "both sides closed";
            }
        }
    };
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, async { tokio::join!(client.shutdown(), backend.shutdown()) }).await;
    ended
}

/// Resolves once the worker closes its tunnels (or is gone).
async fn closing(close: &mut watch::Receiver<bool>) {
    let _ = close.wait_for(|c| *c).await;
}
