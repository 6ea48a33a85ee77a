//! `fd serve`: the foreground node of a machine, until SIGINT or SIGTERM.
//!
//! What it runs depends on the store and the flags:
//!
//! - the peer node, when the store is in a team: it answers team peers from the store over
//!   QUIC and announces the complete images it holds in the team's DHT (see `fd-p2p`);
//! - the registry mirror, with `--mirror ADDR`: pulls by docker, containerd and podman are
//!   served from the store first, then from team peers when the peer node runs too (the blob
//!   is brought into the store, verified), and from the upstream registry otherwise (see
//!   `fd_gateway::mirror` for the sources, the access policy and what is kept);
//! - a Prometheus `/metrics` page, with `--metrics ADDR`.
//!
//! All of them share one process and one shutdown: a signal stops every part, and the
//! command exits 0 once they have all stopped. `fd share` is an older name of this command.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use fd_gateway::mirror::{Mirror, MirrorConfig, PeerBlobs};
use fd_node::{ImageImport, Store};
use fd_p2p::{Metrics, NetConfig, PeerNet, TeamKey};
use futures::future::BoxFuture;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::output;
use crate::peer::{mdns_enabled, parse_addrs};

/// Longest wait for the mirror's and the metrics page's open connections after a signal;
/// a client that keeps a download open does not hold the node up for longer.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Peer node: address to listen on, as a multiaddr (repeatable).
    #[arg(
        long,
        value_name = "MULTIADDR",
        default_value = "/ip4/0.0.0.0/udp/7700/quic-v1"
    )]
    listen: Vec<String>,
    /// Peer node: a peer to connect to, as a multiaddr (repeatable).
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<String>,
    /// Peer node: do not look for peers with mDNS (also FD_MDNS=0).
    #[arg(long)]
    no_mdns: bool,
    /// Answer as a registry mirror on this address, e.g. 127.0.0.1:5001.
    #[arg(long, value_name = "ADDR")]
    mirror: Option<String>,
    /// Mirror: upstream registry (HOST[:PORT]) for clients that do not name one with `ns=`.
    #[arg(long, value_name = "HOST", requires = "mirror")]
    upstream: Option<String>,
    /// Mirror: another upstream clients may name with `ns=` (containerd does); repeatable.
    #[arg(long = "allow-upstream", value_name = "HOST", requires = "mirror")]
    allow_upstreams: Vec<String>,
    /// Mirror: allow plain HTTP to this registry (HOST or HOST:PORT). Loopback registries
    /// always are.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    /// Mirror: seconds to wait for a connection to the upstream before treating it as down.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    connect_timeout: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
}

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    let store = Arc::new(Store::open_default().context("opening the store")?);
    let in_team = TeamKey::load(store.root())
        .context("reading the team key")?
        .is_some();
    if !in_team && args.mirror.is_none() {
        bail!(
            "nothing to serve: this store is in no team, so there is no peer node to run. \
             Run `fd team init` (or `fd team join TOKEN`) to share with team peers, or pass \
             --mirror ADDR (e.g. --mirror 127.0.0.1:5001) to answer as a registry mirror"
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(store, args, in_team))
}

async fn serve(store: Arc<Store>, args: ServeArgs, in_team: bool) -> Result<()> {
    let metrics = Metrics::new();
    // One signal stops every part: each waits on its own receiver of this flag. The handlers
    // are installed here, before anything is printed, so that a signal sent as soon as the
    // node reports its addresses is never met by the default action (death by signal).
    let (stop_tx, stop_rx) = watch::channel(false);
    let signals = shutdown_signal().context("installing the SIGINT and SIGTERM handlers")?;
    tokio::spawn(async move {
        signals.await;
        info!("stopping");
        let _ = stop_tx.send(true);
    });

    let net = if in_team {
        Some(start_peer_node(&store, &args, metrics.clone()).await?)
    } else {
        output::status(
            "Skipping",
            "the peer node: this store is in no team (see `fd team`)",
        );
        None
    };
    // Whatever fails from here on must not leave the peer node running.
    let peers = net.as_ref().map(|net| {
        Arc::new(TeamPeers {
            net: net.clone(),
            store: store.clone(),
        }) as Arc<dyn PeerBlobs>
    });
    let result = serve_http(&store, &args, metrics, peers, stop_rx).await;
    if let Some(net) = net {
        net.shutdown().await;
        output::status("Stopped", "the peer node");
    }
    result
}

/// Starts the peer node and prints its id and addresses (on stdout: scripts read them).
async fn start_peer_node(
    store: &Arc<Store>,
    args: &ServeArgs,
    metrics: Arc<Metrics>,
) -> Result<PeerNet> {
    let cfg = NetConfig {
        listen: parse_addrs(&args.listen)?,
        peers: parse_addrs(&args.peers)?,
        mdns: mdns_enabled(args.no_mdns),
        ..NetConfig::default()
    };
    let net = PeerNet::start_with_metrics(store.clone(), cfg, metrics)
        .await
        .context("starting the peer node")?;
    // Listen addresses appear once the sockets are bound.
    for _ in 0..40 {
        if !net.listen_addrs().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("peer id {}", net.local_peer_id());
    for addr in net.listen_addrs() {
        println!("listening on {addr}/p2p/{}", net.local_peer_id());
    }
    output::status("Sharing", "this store with team peers; Ctrl-C stops");
    Ok(net)
}

/// Runs the mirror and the metrics page, as asked, until the stop flag is raised.
async fn serve_http(
    store: &Arc<Store>,
    args: &ServeArgs,
    metrics: Arc<Metrics>,
    peers: Option<Arc<dyn PeerBlobs>>,
    stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut parts = tokio::task::JoinSet::new();
    if let Some(addr) = &args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        let local = listener
            .local_addr()
            .context("reading the metrics address")?;
        println!("metrics on http://{local}/metrics");
        let (metrics, stop) = (metrics.clone(), stop.clone());
        parts.spawn(async move {
            fd_p2p::metrics::serve(listener, metrics, stopped(stop))
                .await
                .context("serving metrics")
        });
    }
    if let Some(addr) = &args.mirror {
        let config = MirrorConfig {
            default_upstream: args.upstream.clone(),
            allowed_upstreams: args.allow_upstreams.clone(),
            insecure_registries: args.insecure_registries.clone(),
            connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
            peers,
        };
        let mirror = Mirror::new(store.clone(), config).context("setting up the mirror")?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener
            .local_addr()
            .context("reading the listening address")?;
        output::status(
            "Serving",
            format!(
                "registry mirror on http://{local} (store {}, upstream {})",
                store.root().display(),
                args.upstream.as_deref().unwrap_or("from ns= only")
            ),
        );
        let stop = stop.clone();
        if args.metrics.is_some() {
            // Same routes, with the bytes of the answers counted for the metrics page.
            let app = fd_p2p::metrics::count_bytes(mirror.router(), metrics);
            parts.spawn(async move {
                fd_p2p::metrics::serve_app(listener, app, stopped(stop))
                    .await
                    .context("serving the mirror")
            });
        } else {
            parts.spawn(async move {
                mirror
                    .serve(listener, stopped(stop))
                    .await
                    .context("serving the mirror")
            });
        }
    }

    // Until the signal, a part that ends has failed: stop the others and report it.
    let mut stop_wait = stop.clone();
    let mut failure = None;
    tokio::select! {
        _ = stop_wait.wait_for(|s| *s) => {}
        Some(ended) = parts.join_next() => {
            // Both branches can be ready at once after a signal (a part stops as soon as the
            // flag is raised, and select! picks at random): a clean end while stopping is no
            // failure.
            let stopping = *stop.borrow();
            failure = match ended {
                Ok(Ok(())) if stopping => None,
                Ok(Ok(())) => Some(anyhow::anyhow!("a part of the node stopped on its own")),
                Ok(Err(e)) => Some(e),
                Err(e) => Some(anyhow::Error::new(e).context("a part of the node crashed")),
            };
        }
    }
    if failure.is_some() {
        parts.abort_all();
    }
    // Graceful stop of what is left, bounded.
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while let Some(ended) = parts.join_next().await {
            match ended {
                Ok(Err(e)) if failure.is_none() => failure = Some(e),
                _ => {}
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("open connections did not close in time; dropping them");
        parts.abort_all();
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The team peers as the mirror's second source: a blob is gathered from them chunk by chunk
/// (each chunk verified against its id), checked whole against its sha256 digest, then
/// recorded and pinned like a blob the mirror fetched upstream.
struct TeamPeers {
    net: PeerNet,
    store: Arc<Store>,
}

impl PeerBlobs for TeamPeers {
    fn fetch_blob<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.fetch(digest).await {
                Ok(stored) => stored,
                Err(e) => {
                    warn!(%digest, error = %format!("{e:#}"), "peers could not give the blob; asking the upstream");
                    false
                }
            }
        })
    }
}

impl TeamPeers {
    async fn fetch(&self, digest: &str) -> Result<bool> {
        // The per-blob lock keeps another fd process (a pull) from fetching the same blob at
        // the same time: whoever comes second finds it stored. The import holds the store's
        // writer lock, so gc leaves the new chunks alone until the blob is recorded and pinned.
        let (store, key) = (self.store.clone(), digest.to_string());
        let (lock, import) = tokio::task::spawn_blocking(move || -> Result<_> {
            let lock = store.blob_lock(&key).context("locking the blob")?;
            let import = ImageImport::begin(store).context("locking the store")?;
            Ok((lock, import))
        })
        .await
        .context("waiting for the blob lock")??;
        if self.store.has_blob(digest)? {
            return Ok(true);
        }
        let Some((holders, recipe)) = fd_p2p::fetch::find_recipe(&self.net, digest, None).await
        else {
            info!(%digest, "no team peer holds the blob");
            return Ok(false);
        };
        let size: u64 = recipe.chunks.iter().map(|(_, len)| u64::from(*len)).sum();
        info!(%digest, size, holders = holders.len(), "fetching blob from team peers");
        let path = self.store.download_path(digest);
        let gathered = async {
            let mut file = std::io::BufWriter::new(
                fs_err::File::create(&path).context("creating the download file")?,
            );
            let (written, from_peers) = fd_p2p::fetch::gather_from(
                &self.net,
                &self.store,
                &recipe.chunks,
                Some(&holders),
                &mut file,
                &|_| {},
            )
            .await
            .context("gathering chunks from peers")?;
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            anyhow::Ok((written, from_peers))
        }
        .await;
        let (written, from_peers) = match gathered {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        if written != size {
            let _ = std::fs::remove_file(&path);
            info!(%digest, written, size, "team peers gave only part of the blob");
            return Ok(false);
        }
        // The media type is the holder's word, kept only when it looks like one.
        let media_type = if is_media_type(&recipe.media_type) {
            recipe.media_type
        } else {
            "application/octet-stream".to_string()
        };
        let (store, key) = (self.store.clone(), digest.to_string());
        tokio::task::spawn_blocking(move || -> Result<()> {
            // Checks the whole blob against its digest and size; nothing is recorded otherwise.
            let stored = import
                .put_blob_file(&key, size, &media_type, &path)
                .and_then(|()| store.pin_blob(&key));
            // Removed before the lock goes: the next holder may write this path.
            let _ = std::fs::remove_file(&path);
            drop(import);
            drop(lock);
            stored.context("storing the blob from peers")
        })
        .await
        .context("storing the blob")??;
        info!(%digest, size, from_peers, "blob stored from team peers");
        Ok(true)
    }
}

/// A plausible media type (`type/subtype+suffix`, no spaces or control characters).
fn is_media_type(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.contains('/') && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Completes once the stop flag is raised (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Installs the handlers at once; the future completes on SIGINT or SIGTERM.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
