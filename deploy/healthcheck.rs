//! `manifold-healthcheck`: the container image's HEALTHCHECK. Exits 0 when the
//! gateway's admin API answers 200 on `GET /status/ready`, 1 otherwise.
//!
//! The final image (distroless) has no shell and no curl, so the Dockerfile
//! compiles this one file with plain `rustc` (std only, no crates) next to
//! the gateway. It asks the admin listener of the gateway in the same
//! container: the address is its first argument, else MANIFOLD_ADMIN_LISTEN
//! (as the gateway reads it), else 127.0.0.1:8001. An unspecified address
//! (0.0.0.0, [::]) is reached through loopback. `/status/ready` needs no
//! admin token, so none is sent.
//!
//!   rustc --edition 2021 -O deploy/healthcheck.rs -o manifold-healthcheck

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    match check() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("manifold-healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check() -> Result<(), String> {
    let listen = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("MANIFOLD_ADMIN_LISTEN").ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "127.0.0.1:8001".to_string());
    let mut addr: SocketAddr = listen.trim().parse().map_err(|e| format!("admin address {listen:?}: {e}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /status/ready HTTP/1.1\r\nHost: localhost\r\nUser-Agent: manifold-healthcheck\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;

    // Only the status line matters: read until its end, at most 1 KiB.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream.read(&mut buf).map_err(|e| format!("read from {addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or("");
    let status = status_line.split_whitespace().nth(1).unwrap_or("");
    if status_line.starts_with("HTTP/1.") && status == "200" {
        Ok(())
    } else {
        Err(format!("http://{addr}/status/ready answered {status_line:?}"))
    }
}
