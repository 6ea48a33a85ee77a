//! Counters of a serving node, rendered in the Prometheus text format for `fd serve --metrics`.
//!
//! The counters are plain atomics in one struct shared through an `Arc`: the swarm task, the
//! blocking threads that answer peers and the mirror's HTTP handlers bump them without locks.
//! The text format is written by hand rather than with `prometheus-client`: a dozen unlabelled
//! counters and gauges take a few lines to print, and the crate would add a registry, derive
//! macros and a second way of naming things for no gain here.
//!
//! [`serve`] answers `GET /metrics` with axum; [`count_bytes`] wraps another HTTP app (the
//! registry mirror) so that the bytes of its answers are counted too.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a node has done since it started. Counters only grow; `peers_connected` is a gauge.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Chunk bytes sent to team peers in `Chunks` answers (the chunk data, without framing).
    pub(crate) served_bytes: AtomicU64,
    /// `Chunks` requests answered with data or misses (not `Busy`, not denied).
    pub(crate) chunk_requests: AtomicU64,
    /// Chunks asked for that this store held and sent.
    pub(crate) chunks_hit: AtomicU64,
    /// Chunks asked for that this store did not hold (or held damaged).
    pub(crate) chunks_missed: AtomicU64,
    /// Requests of any kind from team peers.
    pub(crate) requests: AtomicU64,
    /// `Chunks` requests answered `Busy` because every upload slot was taken.
    pub(crate) busy: AtomicU64,
    /// Requests refused because they carried no valid team proof.
    pub(crate) denied: AtomicU64,
    /// Peers with an open connection now.
    pub(crate) peers_connected: AtomicU64,
    /// Verified bytes fetched from peers by this process.
    pub(crate) received_bytes: AtomicU64,
    /// Provider announcements started in the DHT (one per key and announcement round).
    pub(crate) provides: AtomicU64,
    /// Provider lookups run, and providers they found.
    pub(crate) provider_lookups: AtomicU64,
    pub(crate) providers_found: AtomicU64,
    /// Body bytes of successful registry mirror answers.
    pub(crate) mirror_served_bytes: AtomicU64,
}

/// One line of output: name, help, type and how to read the value.
struct Series {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    value: fn(&Metrics) -> &AtomicU64,
}

const SERIES: &[Series] = &[
    Series {
        name: "fd_peer_served_bytes_total",
        help: "Chunk bytes sent to team peers.",
        kind: "counter",
        value: |m| &m.served_bytes,
    },
    Series {
        name: "fd_peer_requests_total",
        help: "Requests received from team peers.",
        kind: "counter",
        value: |m| &m.requests,
    },
    Series {
        name: "fd_peer_chunk_requests_total",
        help: "Chunk requests from team peers that were answered.",
        kind: "counter",
        value: |m| &m.chunk_requests,
    },
    Series {
        name: "fd_peer_chunk_hits_total",
        help: "Chunks asked for by peers that this store held and sent.",
        kind: "counter",
        value: |m| &m.chunks_hit,
    },
    Series {
        name: "fd_peer_chunk_misses_total",
        help: "Chunks asked for by peers that this store did not hold.",
        kind: "counter",
        value: |m| &m.chunks_missed,
    },
    Series {
        name: "fd_peer_busy_total",
        help: "Chunk requests answered busy because every upload slot was taken.",
        kind: "counter",
        value: |m| &m.busy,
    },
    Series {
        name: "fd_peer_denied_total",
        help: "Requests refused for lacking a valid team proof.",
        kind: "counter",
        value: |m| &m.denied,
    },
    Series {
        name: "fd_peers_connected",
        help: "Peers with an open connection.",
        kind: "gauge",
        value: |m| &m.peers_connected,
    },
    Series {
        name: "fd_peer_received_bytes_total",
        help: "Verified bytes fetched from team peers.",
        kind: "counter",
        value: |m| &m.received_bytes,
    },
    Series {
        name: "fd_dht_provides_total",
        help: "Provider announcements started in the team DHT.",
        kind: "counter",
        value: |m| &m.provides,
    },
    Series {
        name: "fd_dht_provider_lookups_total",
        help: "Provider lookups run in the team DHT.",
        kind: "counter",
        value: |m| &m.provider_lookups,
    },
    Series {
        name: "fd_dht_providers_found_total",
        help: "Providers found by lookups in the team DHT.",
        kind: "counter",
        value: |m| &m.providers_found,
    },
    Series {
        name: "fd_mirror_served_bytes_total",
        help: "Body bytes of successful registry mirror answers.",
        kind: "counter",
        value: |m| &m.mirror_served_bytes,
    },
];

impl Metrics {
    /// Fresh counters, all zero.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes sent to peers so far.
    pub fn served_bytes(&self) -> u64 {
        self.served_bytes.load(Ordering::Relaxed)
    }

    /// Verified bytes received from peers so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }

    /// All series in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in SERIES {
            let v = (s.value)(self).load(Ordering::Relaxed);
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {} {}", s.name, s.help);
            let _ = writeln!(out, "# TYPE {} {}", s.name, s.kind);
            let _ = writeln!(out, "{} {v}", s.name);
        }
        out
    }
}

async fn metrics_page(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        metrics.render(),
    )
        .into_response()
}

/// Answers `GET /metrics` on `listener` until `shutdown` completes. Other paths get 404 and
/// other methods 405.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics_page))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves an HTTP app (such as one wrapped by [`count_bytes`]) on `listener` until
/// `shutdown` completes.
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Wraps an HTTP app so that the declared length of its successful answers to GET requests
/// is added to `fd_mirror_served_bytes_total`. Answers streamed without a length are not
/// counted (the mirror declares one for every blob and manifest).
pub fn count_bytes(app: axum::Router, metrics: Arc<Metrics>) -> axum::Router {
    app.layer(middleware::from_fn_with_state(metrics, count_answer))
}

async fn count_answer(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let is_get = req.method() == axum::http::Method::GET;
    let res = next.run(req).await;
    if is_get && res.status().is_success() {
        let len = res
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        Metrics::add(&metrics.mirror_served_bytes, len);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_series_with_its_value() {
        let m = Metrics::new();
        Metrics::add(&m.served_bytes, 1234);
        m.peers_connected.store(3, Ordering::Relaxed);
        let text = m.render();
        let value = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        };
        assert_eq!(value("fd_peer_served_bytes_total"), Some(1234));
        assert_eq!(value("fd_peers_connected"), Some(3));
        assert_eq!(value("fd_peer_denied_total"), Some(0));
        assert!(text.contains("# TYPE fd_peers_connected gauge"));
        assert!(text.contains("# TYPE fd_peer_served_bytes_total counter"));
        // Every series has its HELP, TYPE and value line, and nothing else is printed.
        assert_eq!(text.lines().count(), SERIES.len() * 3);
    }

    #[tokio::test]
    async fn metrics_are_served_over_http_and_only_on_get() {
        let m = Metrics::new();
        Metrics::add(&m.received_bytes, 42);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m.clone(), async {
            let _ = stopped.await;
        }));
        let get = raw_http(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(get.starts_with("HTTP/1.1 200"), "{get}");
        assert!(get.contains("text/plain; version=0.0.4"), "{get}");
        assert!(get.contains("\nfd_peer_received_bytes_total 42\n"), "{get}");
        let post = raw_http(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let other = raw_http(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let _ = stop.send(());
        server.await.expect("join").expect("serve");
    }

    async fn raw_http(addr: std::net::SocketAddr, req: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }
}
