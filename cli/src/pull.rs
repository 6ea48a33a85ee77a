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
use fd_node::fetch::{ChunkSource, Fetcher};
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
    // With mDNS on, the node also listens (on a port of the system's choosing) so that LAN
    // peers fetching the same image can take the chunks this pull has already verified: a cold
    // fleet then fans out instead of every node asking one source. Without mDNS nobody could
    // learn that port, so a node that only asks listens on nothing.
    let listen = if cfg_mdns {
        vec![
            "/ip4/0.0.0.0/udp/0/quic-v1"
                .parse()
                .context("the pull's listen address")?,
        ]
    } else {
        Vec::new()
    };
    let cfg = fd_p2p::NetConfig {
        listen,
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
    let stats = Arc::new(PullStats::default());
    let resolved = resolve_with_peers(store, client, reference, peers, &stats).await?;
    pull_resolved(store, client, reference, &resolved, peers, stats, started).await
}

/// Resolves `reference` to one image manifest: at its registry, which is the authority for a
/// tag, else through team peers (when `peers` is given).
async fn resolve_with_peers(
    store: &Arc<Store>,
    client: &RegistryClient,
    reference: &ImageRef,
    peers: Option<&fd_p2p::PeerNet>,
    stats: &PullStats,
) -> Result<fd_gateway::Resolved> {
    let name = reference.to_string();
    // The registry is the authority for a tag; peers stand in only when it cannot answer.
    Ok(match client.resolve(reference).await {
        Ok(r) => {
            let docs = r.index.iter().chain(std::iter::once(&r.manifest));
            let n: usize = docs.map(|d| d.bytes.len()).sum();
            stats.from_registry.fetch_add(n as u64, Ordering::Relaxed);
            r
        }
        Err(e) => match peers {
            Some(net) => crate::peer::resolve_from_peers(net, store, reference, stats)
                .await
                .with_context(|| format!("resolving {name} (registry: {e})"))?,
            None => return Err(e).with_context(|| format!("resolving {name}")),
        },
    })
}

/// Pulls the image `reference` resolved to.
async fn pull_resolved(
    store: &Arc<Store>,
    client: &RegistryClient,
    reference: &ImageRef,
    resolved: &fd_gateway::Resolved,
    peers: Option<&fd_p2p::PeerNet>,
    stats: Arc<PullStats>,
    started: Instant,
) -> Result<ImageRecord> {
    let name = reference.to_string();
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

// # Streaming from team peers (`fd run` and `fd mount` of an image the store lacks)
//
// When a team peer holds an image completely, `fd run` and `fd mount` do not pull it: they
// fetch its metadata alone (manifest, config, index, merged file index, prefetch profile),
// record it as a *lazy* image (`ImageRecord::lazy`), and mount it with the peers as the
// fetcher's chunk source, so each file's chunks arrive on first read. The peer node keeps
// running for as long as the mount (a [`Streaming`]). Trust: the manifest comes from the
// registry (or, when it cannot answer, through a team peer's tag, as for a pull); the config
// is checked against the manifest, the file index and profile against their `blake3:` keys,
// every chunk against its id. That the file index is the merge of the manifest's layers is
// the word of a team member; a later `fd pull` of the image checks it in full.

/// Largest file index or prefetch profile taken from a peer.
const MAX_PEER_INDEX: u64 = 256 << 20;
/// Largest config taken from a peer.
const MAX_PEER_CONFIG: u64 = 4 << 20;

/// What [`open_image`] does when neither the store nor a team peer has the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IfMissing {
    /// Pull it (`fd run`).
    Pull,
    /// Fail (`fd mount`, which never pulls).
    Fail,
}

/// The image `reference` names, for mounting, and the peers its contents stream from when it
/// is lazily present:
///
/// - in the store and complete: as is, no peers;
/// - in the store and lazy: with the team's peers as its chunk source;
/// - not in the store, with a team peer holding it: its metadata from peers, recorded lazily,
///   and the peers as its chunk source;
/// - otherwise: pulled in full (peers first, then the registry), or an error with
///   [`IfMissing::Fail`].
pub(crate) fn open_image(
    store: &Arc<Store>,
    args: &RegistryArgs,
    reference: &str,
    if_missing: IfMissing,
) -> Result<(ImageRecord, Option<Streaming>)> {
    let local = crate::images::find(store, reference);
    if let Ok(image) = &local
        && !image.lazy
    {
        return Ok((image.clone(), None));
    }
    if let Ok(image) = &local
        && every_chunk_stored(store, image)?
    {
        // Lazy, but everything has been fetched already: no peer is needed.
        return Ok((image.clone(), None));
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    if let Ok(image) = local {
        let net = runtime.block_on(start_peers(store, args))?;
        let Some(net) = net.filter(|n| !n.candidates().is_empty()) else {
            tracing::warn!(
                "{} is only partly in this store and no team peer is reachable: contents not \
                 stored here cannot be read (`fd pull` makes the image complete)",
                image.reference
            );
            return Ok((image, None));
        };
        let streaming = Streaming::new(runtime, net, &image, 0);
        return Ok((image, Some(streaming)));
    }

    let parsed = ImageRef::parse(reference)?;
    let client = args.client()?;
    let Some(net) = runtime.block_on(start_peers(store, args))? else {
        if if_missing == IfMissing::Fail {
            return local.map(|i| (i, None));
        }
        let image = runtime.block_on(pull_with_peers(store, &client, &parsed, None))?;
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        return Ok((image, None));
    };
    let outcome = runtime.block_on(async {
        let started = Instant::now();
        let stats = Arc::new(PullStats::default());
        let resolved = resolve_with_peers(store, &client, &parsed, Some(&net), &stats).await?;
        let name = parsed.to_string();
        if let Some(image) = stream_metadata(store, &client, &name, &resolved, &net, &stats).await?
        {
            return Ok(Opened::Streamed(
                image,
                stats.from_peers.load(Ordering::Relaxed),
            ));
        }
        match if_missing {
            IfMissing::Fail => bail!(
                "{parsed} is not in this store and no team peer holds it ({})",
                output::short_digest(&resolved.manifest.digest)
            ),
            IfMissing::Pull => pull_resolved(
                store,
                &client,
                &parsed,
                &resolved,
                Some(&net),
                stats,
                started,
            )
            .await
            .map(Opened::Pulled),
        }
    });
    match outcome {
        Ok(Opened::Streamed(image, metadata_bytes)) => {
            let streaming = Streaming::new(runtime, net, &image, metadata_bytes);
            Ok((image, Some(streaming)))
        }
        other => {
            runtime.block_on(net.shutdown());
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            other.map(|o| match o {
                Opened::Streamed(image, _) | Opened::Pulled(image) => (image, None),
            })
        }
    }
}

/// True when the store holds every chunk of the image's file view.
fn every_chunk_stored(store: &Store, image: &ImageRecord) -> Result<bool> {
    let index = fd_node::load_file_index(store, image)?;
    Ok(index
        .distinct_chunks()
        .iter()
        .all(|c| store.has_chunk(&c.id, c.len)))
}

enum Opened {
    /// Recorded lazily; the number is the metadata bytes that came from peers.
    Streamed(ImageRecord, u64),
    Pulled(ImageRecord),
}

/// Fetches the metadata of the image `resolved` names from the team peers, checks it and
/// records the image lazily (see the section comment). `None` when no peer holds the image
/// completely, or what a peer gave fails a check (logged): the caller then pulls as usual.
async fn stream_metadata(
    store: &Arc<Store>,
    client: &RegistryClient,
    name: &str,
    resolved: &fd_gateway::Resolved,
    net: &fd_p2p::PeerNet,
    stats: &PullStats,
) -> Result<Option<ImageRecord>> {
    let manifest = &resolved.manifest.digest;
    let Some((peer, answer)) = fd_p2p::fetch::find_image(net, manifest).await else {
        tracing::info!(manifest, "no team peer holds the image; pulling it");
        return Ok(None);
    };
    let layers: Vec<String> = resolved.layers.iter().map(|l| l.digest.clone()).collect();
    if answer.layers != layers || !answer.file_index.starts_with("blake3:") {
        tracing::warn!(%peer, manifest, "a peer's image record does not match the manifest; pulling");
        return Ok(None);
    }
    let from_peers = |got: Option<(Vec<u8>, String, u64)>| {
        got.map(|(bytes, media_type, n)| {
            stats.from_peers.fetch_add(n, Ordering::Relaxed);
            (bytes, media_type)
        })
    };
    // Each is checked against its key (the config's comes from the trusted manifest).
    let blob = |key: &str, max: u64| {
        let key = key.to_string();
        async move {
            fd_p2p::fetch::fetch_blob_bytes(net, store, &key, max)
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, key, "peers could not give a blob");
                    None
                })
        }
    };
    let Some((config, _)) = from_peers(blob(&resolved.config.digest, MAX_PEER_CONFIG).await) else {
        tracing::warn!(manifest, "no peer gave the image's config; pulling");
        return Ok(None);
    };
    let Some((file_index, index_media_type)) =
        from_peers(blob(&answer.file_index, MAX_PEER_INDEX).await)
    else {
        tracing::warn!(manifest, "no peer gave the image's file index; pulling");
        return Ok(None);
    };
    diff_ids(&config, resolved.layers.len())?;
    check_platform(client, &config, name)?;
    // A profile is only a hint: one that cannot be had or read is left out.
    let profile = match &answer.profile {
        Some(key) => from_peers(blob(key, MAX_PEER_INDEX).await)
            .and_then(|(bytes, _)| serde_json::from_slice::<fd_lazyfs::Profile>(&bytes).ok())
            .filter(|p| {
                p.version == 1
                    && &p.manifest_digest == manifest
                    && p.file_index == answer.file_index
            }),
        None => None,
    };

    let (store2, resolved2, answer_index) =
        (store.clone(), resolved.clone(), answer.file_index.clone());
    let reference = name.to_string();
    let image = tokio::task::spawn_blocking(move || -> Result<ImageRecord> {
        let import = ImageImport::begin(store2)?;
        let r = &resolved2;
        import.put_verified_bytes(&r.config.digest, &r.config.media_type, &config)?;
        import.put_verified_bytes(&answer_index, &index_media_type, &file_index)?;
        for doc in r.index.iter().chain(std::iter::once(&r.manifest)) {
            import.put_verified_bytes(&doc.digest, &doc.media_type, &doc.bytes)?;
        }
        let meta = ImageMeta {
            reference,
            manifest_digest: r.manifest.digest.clone(),
            index_digest: r.index.as_ref().map(|i| i.digest.clone()),
            config_digest: r.config.digest.clone(),
            layers: r.layers.iter().map(|l| l.digest.clone()).collect(),
            blob_size: r.layers.iter().map(|l| l.size).sum(),
        };
        Ok(import.commit_lazy(meta, &answer_index)?)
    })
    .await??;
    if let Some(profile) = profile {
        // Ours now: the next mount here replays it, and replaces it with what it read.
        if let Err(e) = fd_lazyfs::save_profile(store, &profile) {
            tracing::warn!(error = %e, "cannot keep the peer's prefetch profile");
        }
    }
    tracing::info!(%peer, reference = %image.reference, "recorded lazily; contents stream from peers");
    Ok(Some(image))
}

/// The peer node behind a lazily present image, kept running while it is mounted: the chunk
/// source of the mount's fetcher ([`Streaming::source`], then [`Streaming::watch`] the
/// fetcher). When dropped, after the mount is gone, it prints one status line saying what
/// came from peers (only when something did) and stops the node.
pub(crate) struct Streaming {
    /// Runs the peer node; taken (and shut down) on drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    net: fd_p2p::PeerNet,
    reference: String,
    /// Bytes of file contents in the image.
    image_size: u64,
    /// Metadata bytes (manifest, config, file index, profile) this command took from peers.
    metadata_bytes: u64,
    fetcher: std::sync::OnceLock<Arc<Fetcher>>,
}

impl Streaming {
    fn new(
        runtime: tokio::runtime::Runtime,
        net: fd_p2p::PeerNet,
        image: &ImageRecord,
        metadata_bytes: u64,
    ) -> Streaming {
        Streaming {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            net,
            reference: image.reference.clone(),
            image_size: image.size,
            metadata_bytes,
            fetcher: std::sync::OnceLock::new(),
        }
    }

    /// The team's peers as a chunk source.
    pub(crate) fn source(&self) -> Arc<dyn ChunkSource> {
        Arc::new(fd_p2p::PeerSource::new(
            self.net.clone(),
            self.handle.clone(),
        ))
    }

    /// The fetcher whose counts the final status line reports.
    pub(crate) fn watch(&self, fetcher: &Arc<Fetcher>) {
        let _ = self.fetcher.set(fetcher.clone());
    }

    /// The status line: what came from peers, and which share of the image's contents.
    /// (With `fd mount --from` stores as well, chunks from those are counted in too.)
    fn summary(&self) -> Option<String> {
        let stats = self.fetcher.get().map(|f| f.stats()).unwrap_or_default();
        let others = self
            .fetcher
            .get()
            .is_some_and(|f| f.source_names().len() > 1);
        if stats.fetched_bytes == 0 && self.metadata_bytes == 0 {
            return None;
        }
        let share = if self.image_size == 0 {
            0.0
        } else {
            stats.fetched_bytes as f64 * 100.0 / self.image_size as f64
        };
        Some(format!(
            "{}: {} from peers{} ({} of file contents in {} chunks, {share:.1}% of the image's \
             {}; {} of metadata)",
            self.reference,
            output::bytes(stats.fetched_bytes + self.metadata_bytes),
            if others { " and --from stores" } else { "" },
            output::bytes(stats.fetched_bytes),
            stats.fetched,
            output::bytes(self.image_size),
            output::bytes(self.metadata_bytes),
        ))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if let Some(line) = self.summary() {
            output::status("Streamed", line);
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.block_on(self.net.shutdown());
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}
