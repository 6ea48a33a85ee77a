//! `fd pull`: resolve a reference at its registry and bring the image into the store.
//!
//! Layers download in parallel into the store's `downloads/` folder (so an interrupted pull
//! resumes where it stopped), then each is checked, chunked into the blob view and unpacked
//! into the file view on a blocking thread while other layers still download. A per-blob lock
//! makes parallel pulls of one image (in separate processes) fetch each blob once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use fd_gateway::{BlobDesc, ClientOptions, ImageRef, Platform, RegistryClient};
use fd_node::{Compression, ImageImport, ImageMeta, ImageRecord, Store};
use futures::{StreamExt, TryStreamExt};

use crate::output;

/// Layers fetched at once: enough to fill a LAN link, few enough not to thrash 2-core machines
/// that unpack what they fetch.
const PARALLEL_LAYERS: usize = 4;

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// Image reference, e.g. `127.0.0.1:5000/debian-python:bookworm` or `REPO@sha256:…`.
    pub(crate) reference: String,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
}

fn parse_platform(s: &str) -> Result<Platform, String> {
    Platform::parse(s).map_err(|e| format!("{e} (expected OS/ARCH[/VARIANT], e.g. linux/amd64)"))
}

/// Options for commands that talk to registries.
#[derive(Debug, Clone, Args)]
pub(crate) struct RegistryArgs {
    /// Platform to choose from a multi-platform image, as OS/ARCH[/VARIANT] (default: this host).
    #[arg(long, value_parser = parse_platform)]
    pub(crate) platform: Option<Platform>,
    /// Allow plain HTTP to this registry (HOST or HOST:PORT). Loopback registries always are.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub(crate) insecure_registries: Vec<String>,
    // Peer options: team peers are asked before the registry (see `pull_with_peers`).
    /// A team peer to ask first, as a multiaddr (repeatable).
    #[arg(long = "peer", value_name = "MULTIADDR")]
    pub(crate) peers: Vec<String>,
    /// Do not look for peers with mDNS (also FD_MDNS=0).
    #[arg(long)]
    pub(crate) no_mdns: bool,
}

impl RegistryArgs {
    pub(crate) fn client(&self) -> Result<RegistryClient> {
        let platform = self.platform.clone();
        let opts = ClientOptions {
            insecure_registries: self.insecure_registries.clone(),
            platform,
            auth_files: None,
            plain_http_only: false,
        };
        Ok(RegistryClient::new(opts)?)
    }
}

pub(crate) fn run(args: PullArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let store = Arc::new(Store::open_default().context("opening the store")?);
    runtime.block_on(pull_as_asked(&store, &args.registry, &args.reference))?;
    Ok(())
}

/// Pulls what the user named, with the user's registry and peer options: team peers first
/// (only for a store in a team; members alone answer each other), then the registry.
pub(crate) async fn pull_as_asked(
    store: &Arc<Store>,
    args: &RegistryArgs,
    reference: &str,
) -> Result<ImageRecord> {
    let reference = ImageRef::parse(reference)?;
    let client = args.client()?;
    let net = start_peers(store, args).await?;
    let result = pull_with_peers(store, &client, &reference, net.as_ref()).await;
    if let Some(net) = net {
        net.shutdown().await;
    }
    result
}

/// How long a pull waits for a first peer when none was named with `--peer`: enough for
/// remembered peers and an mDNS answer on a LAN, short enough not to slow a lone machine.
const PEER_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Starts the peer node for a pull when the store belongs to a team.
async fn start_peers(store: &Arc<Store>, args: &RegistryArgs) -> Result<Option<fd_p2p::PeerNet>> {
    if fd_p2p::TeamKey::load(store.root())?.is_none() {
        if !args.peers.is_empty() {
            output::status(
                "Skipping",
                "--peer: this store is in no team (see `fd team`)",
            );
        }
        return Ok(None);
    }
    let cfg_mdns = crate::peer::mdns_enabled(args.no_mdns);
    let cfg = fd_p2p::NetConfig {
        peers: crate::peer::parse_addrs(&args.peers)?,
        mdns: cfg_mdns,
        ..Default::default()
    };
    let net = fd_p2p::PeerNet::start(store.clone(), cfg)
        .await
        .context("starting the peer node")?;
    // Nobody to wait for: no peer named, none remembered, no mDNS.
    let nobody = args.peers.is_empty() && !cfg_mdns && net.book().peers.is_empty();
    let wait = if nobody {
        std::time::Duration::ZERO
    } else if args.peers.is_empty() {
        PEER_WAIT
    } else {
        PEER_WAIT * 4
    };
    net.wait_for_peers(wait).await;
    Ok(Some(net))
}

/// What a pull fetched, for the summary line.
#[derive(Debug, Default)]
pub(crate) struct PullStats {
    pub(crate) from_registry: AtomicU64,
    pub(crate) from_peers: AtomicU64,
}


/// Pulls `reference`, asking team peers (when `peers` is given) before the registry.
pub(crate) async fn pull_with_peers(
    store: &Arc<Store>,
    client: &RegistryClient,
    reference: &ImageRef,
    peers: Option<&fd_p2p::PeerNet>,
) -> Result<ImageRecord> {
    let started = Instant::now();
    let name = reference.to_string();
    let stats = Arc::new(PullStats::default());
    // The registry is the authority for a tag; peers stand in only when it cannot answer.
    let resolved = match client.resolve(reference).await {
        Ok(r) => {
            let docs = r.index.iter().chain(std::iter::once(&r.manifest));
            let n: usize = docs.map(|d| d.bytes.len()).sum();
            stats.from_registry.fetch_add(n as u64, Ordering::Relaxed);
            r
        }
        Err(e) => match peers {
            Some(net) => crate::peer::resolve_from_peers(net, store, reference, &stats)
                .await
                .with_context(|| format!("resolving {name} (registry: {e})"))?,
            None => return Err(e).with_context(|| format!("resolving {name}")),
        },
    };

    // Already complete and current: nothing to do.
    if let Some(img) = store.image(&name)?
        && img.manifest_digest == resolved.manifest.digest
        && is_complete(store, &img)?
    {
        output::status(
            "Up to date",
            format_args!("{name} ({})", output::short_digest(&img.manifest_digest)),
        );
        return Ok(img);
    }

    let import = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || ImageImport::begin(store)).await??
    };

    // Config first: it carries the diff ids that check each unpacked layer.
    // Peers are asked first; their answer is checked against the digest.
    let from_peers = match peers {
        Some(net) => crate::peer::small_blob(net, store, &resolved.config.digest, &stats).await,
        None => None,
    };
    let config = match from_peers {
        Some(bytes) => bytes,
        None => {
            let config = client
                .fetch_small_blob(&resolved.reference, &resolved.config)
                .await
                .with_context(|| format!("fetching config {}", resolved.config.digest))?;
            stats
                .from_registry
                .fetch_add(config.len() as u64, Ordering::Relaxed);
            config
        }
    };
    let diff_ids = diff_ids(&config, resolved.layers.len())?;
    check_platform(client, &config, &name)?;
    import.put_verified_bytes(
        &resolved.config.digest,
        &resolved.config.media_type,
        &config,
    )?;

    // Layers: download and unpack in parallel.
    let progress = output::Progress::new();
    futures::stream::iter(resolved.layers.iter().zip(diff_ids.iter()))
        .map(|(desc, diff_id)| {
            let bar = progress.download(output::short_digest(&desc.digest), desc.size);
            fetch_layer(
                client,
                &resolved.reference,
                &import,
                desc,
                diff_id,
                bar,
                Sources {
                    stats: &stats,
                    peers,
                },
            )
        })
        .buffer_unordered(PARALLEL_LAYERS)
        .try_collect::<Vec<()>>()
        .await?;

    // Manifest documents last: storing them byte for byte lets the store answer as a registry.
    for doc in resolved
        .index
        .iter()
        .chain(std::iter::once(&resolved.manifest))
    {
        import.put_verified_bytes(&doc.digest, &doc.media_type, &doc.bytes)?;
    }
    let meta = ImageMeta {
        reference: name.clone(),
        manifest_digest: resolved.manifest.digest.clone(),
        index_digest: resolved.index.as_ref().map(|i| i.digest.clone()),
        config_digest: resolved.config.digest.clone(),
        layers: resolved.layers.iter().map(|l| l.digest.clone()).collect(),
        blob_size: resolved.layers.iter().map(|l| l.size).sum(),
    };
    let record = tokio::task::spawn_blocking(move || import.commit(meta)).await??;
    output::status(
        "Pulled",
        format_args!(
            "{name} in {}: {} from registry, {} from peers",
            output::duration(started.elapsed()),
            output::bytes(stats.from_registry.load(Ordering::Relaxed)),
            output::bytes(stats.from_peers.load(Ordering::Relaxed)),
        ),
    );
    Ok(record)
}

/// The pull's counters and its peers (when in a team), handed to each layer fetch.
#[derive(Clone, Copy)]
struct Sources<'a> {
    stats: &'a PullStats,
    peers: Option<&'a fd_p2p::PeerNet>,
}

/// Fetches one layer (unless the store has it) and builds both of its views.
async fn fetch_layer(
    client: &RegistryClient,
    reference: &ImageRef,
    import: &ImageImport,
    desc: &BlobDesc,
    diff_id: &str,
    bar: indicatif::ProgressBar,
    sources: Sources<'_>,
) -> Result<()> {
    let Sources { stats, peers } = sources;
    let compression = compression(&desc.media_type)?;
    let store = import.store();

    // One process at a time per blob; whoever comes second finds it stored.
    let lock = match store.try_blob_lock(&desc.digest)? {
        Some(lock) => lock,
        None => {
            bar.set_message("waiting for another fd process");
            let (import, digest) = (import.clone(), desc.digest.clone());
            tokio::task::spawn_blocking(move || import.store().blob_lock(&digest)).await??
        }
    };
    if import.has_layer(&desc.digest)? {
        let stored = store
            .blob(&desc.digest)?
            .map(|(r, _)| r.size())
            .unwrap_or(0);
        if stored != desc.size {
            bail!(
                "the manifest says layer {} has {} bytes, but that digest names {stored} bytes; \
                 the manifest is wrong",
                desc.digest,
                desc.size
            );
        }
        bar.finish_with_message("already stored");
        return Ok(());
    }

    let path = store.download_path(&desc.digest);
    let on_progress = {
        let bar = bar.clone();
        move |n: u64| bar.set_position(n)
    };
    // Peers first: a verified prefix (or the whole blob) lands in the download file, and the
    // registry download below resumes from wherever the peers stopped.
    let mut complete = false;
    if let Some(net) = peers {
        let got = fd_p2p::fetch::fetch_blob_to_file(
            net,
            store,
            &desc.digest,
            desc.size,
            &path,
            &on_progress,
        )
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, layer = %desc.digest, "peers failed; using the registry");
            fd_p2p::BlobFromPeers::default()
        });
        stats
            .from_peers
            .fetch_add(got.bytes_from_peers, Ordering::Relaxed);
        complete = got.complete;
    }
    if !complete {
        let fetched = client
            .fetch_blob(reference, desc, &path, &on_progress)
            .await
            .with_context(|| format!("downloading layer {}", desc.digest))?;
        stats
            .from_registry
            .fetch_add(fetched.bytes_downloaded, Ordering::Relaxed);
    }
    bar.set_message("unpacking");

    let (import, desc, diff_id) = (import.clone(), desc.clone(), diff_id.to_string());
    tokio::task::spawn_blocking(move || -> Result<()> {
        // The two views read the same downloaded file; building them on two threads keeps both
        // cores busy (the file is in the page cache, so it is read from disk once).
        std::thread::scope(|scope| -> Result<()> {
            let blob_view = scope
                .spawn(|| import.put_blob_file(&desc.digest, desc.size, &desc.media_type, &path));
            let file = fs_err::File::open(&path)?;
            let file_view = import.ingest_layer(
                &desc.digest,
                compression,
                std::io::BufReader::new(file),
                Some(&diff_id),
            );
            let blob_view = blob_view
                .join()
                .map_err(|_| anyhow::anyhow!("blob view thread panicked"))?;
            blob_view?;
            file_view?;
            Ok(())
        })?;
        fs_err::remove_file(&path)?;
        drop(lock);
        Ok(())
    })
    .await??;
    bar.finish_with_message("done");
    Ok(())
}

/// True when every blob and index an image row names is present.
fn is_complete(store: &Store, img: &ImageRecord) -> Result<bool> {
    let mut keys = vec![&img.manifest_digest, &img.config_digest, &img.file_index];
    keys.extend(img.layers.iter());
    for key in keys {
        if !store.has_blob(key)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A single-platform image is taken as it is unless the user asked for another platform, in
/// which case a mismatch is an error rather than a silent success with the wrong binaries.
fn check_platform(client: &RegistryClient, config: &[u8], name: &str) -> Result<()> {
    if !client.platform_requested() {
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_slice(config).unwrap_or_default();
    let os = value["os"].as_str().unwrap_or("");
    let arch = value["architecture"].as_str().unwrap_or("");
    let want = client.platform();
    if os != want.os || arch != want.architecture {
        bail!("{name} is a single-platform image for {os}/{arch}, not the requested {want}");
    }
    Ok(())
}

/// Maps a layer media type to the compression the ingest must undo.
pub(crate) fn compression(media_type: &str) -> Result<Compression> {
    Ok(match fd_gateway::layer_compression(media_type)? {
        fd_gateway::Compression::None => Compression::None,
        fd_gateway::Compression::Gzip => Compression::Gzip,
        fd_gateway::Compression::Zstd => Compression::Zstd,
    })
}

/// The config's `rootfs.diff_ids`, which must match the layers one to one.
pub(crate) fn diff_ids(config: &[u8], layers: usize) -> Result<Vec<String>> {
    let value: serde_json::Value =
        serde_json::from_slice(config).context("image config is not valid JSON")?;
    let ids: Vec<String> = value
        .pointer("/rootfs/diff_ids")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if ids.len() != layers {
        bail!(
            "image config lists {} diff_ids for {layers} layers; the image is malformed",
            ids.len()
        );
    }
    Ok(ids)
}
