//! `fd peers` and `fd team`: this store's part in the team's peer network, and the helpers
//! `fd pull` uses to take images from team peers.
//!
//! `fd peers` asks the reachable team peers which images they hold (for a moment, bounded)
//! and prints every peer the store remembers; `fd team` creates, joins and shows the
//! team whose members may fetch from each other. The node that answers peers is `fd serve`
//! (see `serve.rs`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fd_node::Store;
use fd_p2p::{PeerBook, PeerNet, TeamKey};

use crate::output;

/// Variable that turns mDNS discovery off (`0`), for machines where multicast must stay quiet.
pub(crate) const MDNS_ENV: &str = "FD_MDNS";

#[derive(Debug, Args)]
pub(crate) struct PeersArgs {
    /// Only print what the store remembers; do not contact any peer.
    #[arg(long)]
    offline: bool,
    /// A peer to ask as well, as a multiaddr (repeatable).
    #[arg(long = "peer", value_name = "MULTIADDR")]
    peers: Vec<String>,
    /// Do not look for peers with mDNS (also FD_MDNS=0).
    #[arg(long)]
    no_mdns: bool,
}

/// How long `fd peers` waits for peers to connect before asking them.
const PROBE_CONNECT: std::time::Duration = std::time::Duration::from_millis(1500);
/// How long it waits for each peer's list of images.
const PROBE_ANSWER: std::time::Duration = std::time::Duration::from_secs(2);

/// Connects to the team peers it can reach (remembered, named, or found by mDNS) and asks
/// each which images it holds; the answers land in the store's peer book.
fn probe(store: std::sync::Arc<Store>, args: &PeersArgs) -> Result<()> {
    let cfg = fd_p2p::NetConfig {
        peers: parse_addrs(&args.peers)?,
        mdns: mdns_enabled(args.no_mdns),
        ..fd_p2p::NetConfig::default()
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let net = PeerNet::start(store, cfg)
            .await
            .context("starting the peer node")?;
        // Give every remembered or named peer the same moment to connect, not just the first.
        tokio::time::sleep(PROBE_CONNECT).await;
        let asks = net.candidates().into_iter().map(|peer| {
            let net = net.clone();
            async move {
                let answer = tokio::time::timeout(
                    PROBE_ANSWER,
                    net.request(peer, fd_p2p::proto::Request::Images),
                )
                .await;
                if let Ok(Ok(fd_p2p::proto::Response::Images(images))) = answer {
                    net.holds_images(&peer, images);
                }
            }
        });
        futures::future::join_all(asks).await;
        net.shutdown().await;
        Ok(())
    })
}

#[derive(Debug, Args)]
pub(crate) struct TeamArgs {
    #[command(subcommand)]
    command: TeamCommand,
}

#[derive(Debug, Subcommand)]
enum TeamCommand {
    /// Create a new team secret in this store and print its token.
    Init,
    /// Join the team of TOKEN (printed by `fd team init` or `fd team show --token`).
    Join { token: String },
    /// Show this store's team and node id.
    Show {
        /// Also print the secret token (give it only to team machines).
        #[arg(long)]
        token: bool,
    },
}

/// Whether mDNS should run: on unless disabled by flag or `FD_MDNS=0`.
pub(crate) fn mdns_enabled(no_mdns_flag: bool) -> bool {
    !no_mdns_flag && std::env::var(MDNS_ENV).map(|v| v != "0").unwrap_or(true)
}

/// Parses multiaddrs given on the command line.
pub(crate) fn parse_addrs(addrs: &[String]) -> Result<Vec<fd_p2p::Multiaddr>> {
    addrs
        .iter()
        .map(|a| {
            a.parse().with_context(|| {
                format!("{a} is not a multiaddr (e.g. /ip4/10.0.0.2/udp/7700/quic-v1)")
            })
        })
        .collect()
}

pub(crate) fn peers(args: PeersArgs) -> Result<()> {
    let home = fd_node::paths::fd_home();
    if !args.offline && TeamKey::load(&home)?.is_some() {
        let store = std::sync::Arc::new(Store::open_default().context("opening the store")?);
        probe(store, &args)?;
    }
    let book = PeerBook::load(&home);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    println!(
        "{:<54} {:<40} {:>10} {:>9} {:>11} {:>5} {:>10}  IMAGES",
        "PEER", "ADDRESS", "LAST SEEN", "RTT", "THROUGHPUT", "RANK", "RECEIVED"
    );
    for (id, e) in &book.peers {
        let ago = now.saturating_sub(e.last_seen);
        let rtt = e
            .rtt_us
            .map(|us| format!("{:.1} ms", us as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let rate = e
            .throughput()
            .map(|r| format!("{}/s", output::bytes(r as u64)))
            .unwrap_or_else(|| "-".into());
        let images = if e.images.is_empty() {
            "-".to_string()
        } else {
            e.images.join(", ")
        };
        println!(
            "{:<54} {:<40} {:>10} {:>9} {:>11} {:>5} {:>10}  {}",
            id,
            e.addrs.first().map(String::as_str).unwrap_or("-"),
            format!("{ago} s ago"),
            rtt,
            rate,
            e.rank,
            output::bytes(e.bytes_from),
            images,
        );
    }
    Ok(())
}

pub(crate) fn team(args: TeamArgs) -> Result<()> {
    let home = fd_node::paths::fd_home();
    // Opening the store creates it, so a fresh FD_HOME works for `team init`.
    let _store = Store::open(&home).context("opening the store")?;
    match args.command {
        TeamCommand::Init => {
            let team = TeamKey::generate();
            team.save(&home).context("saving the team key")?;
            output::status("Created", format_args!("team {}", team.id()));
            println!("{}", team.token());
        }
        TeamCommand::Join { token } => {
            let team = TeamKey::from_token(&token)?;
            team.save(&home).context("saving the team key")?;
            output::status("Joined", format_args!("team {}", team.id()));
        }
        TeamCommand::Show { token } => {
            let key = fd_p2p::load_or_create_node_key(&home)?;
            println!("node {}", key.public().to_peer_id());
            match TeamKey::load(&home)? {
                Some(team) => {
                    println!("team {}", team.id());
                    if token {
                        println!("{}", team.token());
                    }
                }
                None => println!("team none (run `fd team init` or `fd team join TOKEN`)"),
            }
        }
    }
    Ok(())
}

// # Pulling from peers (used by `fd pull`)

/// Largest manifest or config taken from a peer.
const MAX_SMALL_BLOB: u64 = 4 << 20;

/// A small blob (config) from peers, checked against its digest; `None` when no peer has it.
pub(crate) async fn small_blob(
    net: &PeerNet,
    store: &Store,
    digest: &str,
    stats: &crate::pull::PullStats,
) -> Option<Vec<u8>> {
    match fd_p2p::fetch::fetch_blob_bytes(net, store, digest, MAX_SMALL_BLOB).await {
        Ok(Some((bytes, _, n))) => {
            stats
                .from_peers
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            Some(bytes)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, digest, "peers could not give a blob");
            None
        }
    }
}

/// Resolves a reference through team peers when the registry cannot answer: the manifest
/// digest comes from the reference itself or from a peer's `Tag` answer, and the manifest
/// bytes are checked against that digest.
pub(crate) async fn resolve_from_peers(
    net: &PeerNet,
    store: &Store,
    reference: &fd_gateway::ImageRef,
    stats: &crate::pull::PullStats,
) -> Result<fd_gateway::Resolved> {
    let digest = match &reference.digest {
        Some(d) => d.clone(),
        None => {
            let (peer, digest) = fd_p2p::fetch::resolve_tag(net, &reference.to_string())
                .await
                .context("no registry and no team peer knows this reference")?;
            output::status(
                "Resolved",
                format_args!(
                    "{reference} through peer {peer}: {}",
                    output::short_digest(&digest)
                ),
            );
            digest
        }
    };
    let (bytes, media_type, n) =
        fd_p2p::fetch::fetch_blob_bytes(net, store, &digest, MAX_SMALL_BLOB)
            .await?
            .with_context(|| format!("no team peer holds manifest {digest}"))?;
    stats
        .from_peers
        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).context("the peer's manifest is not JSON")?;
    let desc = |v: &serde_json::Value| -> Result<fd_gateway::BlobDesc> {
        Ok(fd_gateway::BlobDesc {
            digest: v["digest"]
                .as_str()
                .context("descriptor without digest")?
                .to_string(),
            size: v["size"].as_u64().context("descriptor without size")?,
            media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        })
    };
    let config = desc(&value["config"]).context("manifest without a config")?;
    let layers = value["layers"]
        .as_array()
        .context("manifest without layers (an index is not served by peers)")?
        .iter()
        .map(desc)
        .collect::<Result<Vec<_>>>()?;
    Ok(fd_gateway::Resolved {
        reference: reference.with_digest(&digest),
        index: None,
        manifest: fd_gateway::RawManifest {
            digest,
            media_type,
            bytes,
        },
        config,
        layers,
    })
}
