//! A TCP relay between fd and a registry, on 127.0.0.1: it can slow the link down (so a test
//! can kill a pull halfway) and it records what crossed it (request lines and bytes), so a test
//! can prove how often each blob was fetched.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What crossed the relay so far.
#[derive(Debug, Default)]
struct Shared {
    /// Bytes sent from the registry to the client.
    down: AtomicU64,
    /// Bytes per second each connection may carry downstream; 0 = unlimited.
    rate: AtomicU64,
    /// Request lines (`GET /v2/... HTTP/1.1`) seen from clients.
    requests: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// A running relay; stops and joins its threads on drop.
pub struct Relay {
    addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay to `upstream` (`host:port`), limited to `rate` bytes per second per
    /// connection when given.
    pub fn start(upstream: &str, rate: Option<u64>) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the relay")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?.to_string();
        let shared = Arc::new(Shared::default());
        shared.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
        let upstream = upstream.to_string();
        let s = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(listener, &upstream, &s));
        Ok(Relay {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// `127.0.0.1:PORT` of the relay: use it as the registry address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Changes the rate limit for new reads (0 = unlimited).
    pub fn set_rate(&self, rate: Option<u64>) {
        self.shared.rate.store(rate.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn bytes_down(&self) -> u64 {
        self.shared.down.load(Ordering::Relaxed)
    }

    /// Request lines seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// How many `GET` requests asked for the blob with this digest.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest}");
        self.requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains(&needle))
            .count()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: &str, shared: &Arc<Shared>) {
    let mut workers = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                for s in [&client, &server] {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                }
                let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => (c, s),
                    _ => continue,
                };
                let up = shared.clone();
                workers.push(std::thread::spawn(move || pump(client, server, &up, false)));
                let down = shared.clone();
                workers.push(std::thread::spawn(move || pump(s2, c2, &down, true)));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    for w in workers {
        let _ = w.join();
    }
}

/// Copies `from` to `to` until either side closes or the relay stops.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, downstream: bool) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut text = String::new();
    let started = Instant::now();
    let mut sent = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        if downstream {
            // Pace the connection: never ahead of `rate` bytes per second since it opened.
            let rate = shared.rate.load(Ordering::Relaxed);
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            shared.down.fetch_add(n as u64, Ordering::Relaxed);
            sent += n as u64;
        } else {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(end) = text.find("\r\n") {
                let line: String = text.drain(..end + 2).collect();
                if (line.starts_with("GET ") || line.starts_with("HEAD "))
                    && let Ok(mut r) = shared.requests.lock()
                {
                    r.push(line.trim_end().to_string());
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
