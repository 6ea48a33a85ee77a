//! `fd mount` and `fd umount`: an image's root file system on a directory, read-only, with
//! file contents fetched on first read (the work is in `fd-lazyfs`).
//!
//! `fd mount` stays in the foreground until Ctrl-C, SIGTERM or `fd umount`, then unmounts and
//! saves the image's prefetch profile. With `--from OTHER_FD_HOME`, another store on this
//! machine is a chunk source; an image only that store has is brought over as metadata alone
//! (image row, manifest, config, file index), so mounting needs nothing else up front.
//!
//! In a store that belongs to a team, an image that neither this store nor a `--from` store
//! has is streamed from team peers: its metadata is fetched and recorded as a lazy image, and
//! the peers are the fetcher's last source (see `pull::open_image`). A lazy image already in
//! the store is mounted with the peers as a source too. `fd mount` never pulls a whole image.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use fd_lazyfs::idmap::{IdMap, IdRange};
use fd_lazyfs::{MountOptions, Prefetch};
use fd_node::fetch::{ChunkSource, FetchPolicy, Fetcher, StoreSource};
use fd_node::{ImageRecord, Store};

use crate::pull::{self, IfMissing, RegistryArgs};
use crate::{images, output};

#[derive(Debug, Args)]
pub(crate) struct MountArgs {
    /// Image reference or digest prefix.
    reference: String,
    /// Existing directory to mount on.
    dir: PathBuf,
    /// What to fetch in the background: the chunks the image's earlier mounts read first
    /// (its prefetch profile), everything (profile first), or nothing.
    #[arg(long, value_enum, default_value_t = PrefetchArg::Profile)]
    prefetch: PrefetchArg,
    /// Another fd store (an FD_HOME directory) to take chunks from, and the image's metadata
    /// when this store lacks the image. Repeat to add more; they are asked in order.
    #[arg(long = "from", value_name = "FD_HOME")]
    from: Vec<PathBuf>,
    /// Let other users read the mount (a container in a user namespace needs this).
    #[arg(long)]
    allow_other: bool,
    /// Present owners as a user namespace with this uid map line sees them
    /// (INSIDE:OUTSIDE:COUNT, as in /proc/PID/uid_map); repeatable.
    #[arg(long = "uid-map", value_name = "IN:OUT:COUNT", value_parser = parse_range)]
    uid_map: Vec<IdRange>,
    /// Like --uid-map, for group ids.
    #[arg(long = "gid-map", value_name = "IN:OUT:COUNT", value_parser = parse_range)]
    gid_map: Vec<IdRange>,
    /// Registry and team-peer options, for an image streamed from team peers.
    #[command(flatten)]
    registry: RegistryArgs,
}

fn parse_range(s: &str) -> Result<IdRange, String> {
    IdRange::parse(s).ok_or_else(|| format!("{s:?} is not INSIDE:OUTSIDE:COUNT with COUNT > 0"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PrefetchArg {
    Profile,
    All,
    None,
}

#[derive(Debug, Args)]
pub(crate) struct UmountArgs {
    /// Directory an `fd mount` is mounted on.
    dir: PathBuf,
}

pub(crate) fn run(args: MountArgs) -> Result<()> {
    // Before any thread starts, so every thread inherits the mask and Ctrl-C reaches the
    // wait below instead of killing the process with the mount still up.
    fd_lazyfs::block_stop_signals()?;

    // Checked first so that a typo does not bring an image's metadata over for nothing.
    if !args.dir.is_dir() {
        bail!("{}: not a directory (create it first)", args.dir.display());
    }
    let store = Arc::new(Store::open_default().context("opening the store")?);
    let mut sources: Vec<Arc<StoreSource>> = Vec::new();
    for dir in &args.from {
        let source = StoreSource::open(dir)
            .with_context(|| format!("--from {}: not a usable fd store", dir.display()))?;
        sources.push(Arc::new(source));
    }
    let (image, streaming) = match resolve(&store, &sources, &args.reference) {
        Ok(image) if !image.lazy => (image, None),
        // Lazily present: its missing contents come from team peers.
        Ok(image) => pull::open_image(&store, &args.registry, &image.reference, IfMissing::Fail)?,
        Err(err) if fd_p2p::TeamKey::load(store.root())?.is_none() => return Err(err),
        Err(err) => pull::open_image(&store, &args.registry, &args.reference, IfMissing::Fail)
            .map_err(|e| anyhow!("{err:#}; {e:#}"))?,
    };

    let mut sources: Vec<Arc<dyn ChunkSource>> = sources
        .into_iter()
        .map(|s| s as Arc<dyn ChunkSource>)
        .collect();
    sources.extend(streaming.iter().map(|s| s.source()));
    let fetcher = Arc::new(Fetcher::new(
        store.clone(),
        sources,
        FetchPolicy::from_env(),
    ));
    if let Some(s) = &streaming {
        s.watch(&fetcher);
    }
    let options = MountOptions {
        prefetch: match args.prefetch {
            PrefetchArg::Profile => Prefetch::Profile,
            PrefetchArg::All => Prefetch::All,
            PrefetchArg::None => Prefetch::None,
        },
        allow_other: args.allow_other,
        id_map: IdMap {
            uids: args.uid_map.clone(),
            gids: args.gid_map.clone(),
        },
        ..MountOptions::default()
    };
    let mounted = fd_lazyfs::mount(fetcher, &image, &args.dir, &options)
        .with_context(|| format!("mounting {} at {}", image.reference, args.dir.display()))?;
    let background = match (options.prefetch, mounted.has_profile()) {
        (Prefetch::All, _) => ", prefetching all",
        (Prefetch::Profile, true) => ", prefetching its profile",
        _ => "",
    };
    let from = if streaming.is_some() {
        " from team peers"
    } else {
        ""
    };
    output::status(
        "Mounted",
        format_args!(
            "{} at {} ({} paths, contents on demand{from}{background})",
            image.reference,
            mounted.mountpoint().display(),
            thousands(mounted.paths() as u64),
        ),
    );

    loop {
        if fd_lazyfs::wait_for_stop_signal(Duration::from_millis(200)).is_some() {
            break;
        }
        if !mounted.is_alive() {
            // Someone unmounted the directory (`fd umount`, `umount`).
            break;
        }
    }
    let mountpoint = mounted.mountpoint().to_path_buf();
    let report = mounted.unmount().context("unmounting")?;
    let profile = if report.profile.is_some() {
        ", profile saved"
    } else {
        ""
    };
    output::status(
        "Unmounted",
        format_args!(
            "{}{}: {} files read, {} chunks fetched ({}){profile}",
            mountpoint.display(),
            if report.lazy {
                " (lazily: files were still open)"
            } else {
                ""
            },
            report.files_read,
            report.fetch.fetched,
            output::bytes(report.fetch.fetched_bytes),
        ),
    );
    if report.failed_reads > 0 {
        tracing::warn!(
            "{} reads failed because chunks could not be fetched (see the warnings above)",
            report.failed_reads
        );
    }
    Ok(())
}

pub(crate) fn umount(args: UmountArgs) -> Result<()> {
    let root = fd_node::paths::fd_home();
    let outcome = fd_lazyfs::unmount_dir(&root, &args.dir)?;
    let mut note = String::new();
    if outcome.lazy {
        note.push_str(" (detached: files are still open)");
    }
    if let Some((pid, false)) = outcome.stopped {
        note.push_str(&format!(" (process {pid} has not exited yet)"));
    }
    output::status(
        "Unmounted",
        format_args!("{}{note}", outcome.mountpoint.display()),
    );
    Ok(())
}

/// The image to mount: from this store, or else from the first `--from` store that has it,
/// bringing its metadata over.
fn resolve(store: &Store, sources: &[Arc<StoreSource>], reference: &str) -> Result<ImageRecord> {
    let local_err = match images::find(store, reference) {
        Ok(image) => return Ok(image),
        Err(e) => e,
    };
    for source in sources {
        if let Ok(image) = images::find(source.store(), reference) {
            copy_metadata(source.store(), store, &image).with_context(|| {
                format!(
                    "copying the metadata of {} from {}",
                    image.reference,
                    source.store().root().display()
                )
            })?;
            return Ok(image);
        }
    }
    if sources.is_empty() {
        Err(local_err)
    } else {
        Err(anyhow!("{local_err:#}; no --from store has it either"))
    }
}

/// Copies what mounting needs and nothing more: the manifest, config (and image index) blobs
/// and the merged file index, then the image row. Layer blobs stay behind; file contents come
/// chunk by chunk from the other store when read.
fn copy_metadata(from: &Store, to: &Store, image: &ImageRecord) -> Result<()> {
    // The writer lock keeps a concurrent gc from removing these blobs before the image row
    // that makes them live exists.
    let _lock = to.writer_lock()?;
    let keys = [
        Some(&image.manifest_digest),
        Some(&image.config_digest),
        image.index_digest.as_ref(),
    ]
    .into_iter()
    .flatten()
    .chain([&image.file_index]);
    for key in keys {
        if to.has_blob(key)? {
            continue;
        }
        // read_blob checks the bytes against the key (sha256 or blake3) before we copy them.
        let bytes = from.read_blob(key)?;
        let (_, media_type) = from
            .blob(key)?
            .with_context(|| format!("blob {key} vanished"))?;
        to.put_blob_from_reader(key, &media_type, bytes.as_slice())?;
    }
    // The blobs must be durable before the row that makes the image visible.
    to.sync()?;
    to.put_image(image)?;
    Ok(())
}

/// 12345 → "12,345".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }
}
