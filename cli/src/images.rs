//! `fd images`, `fd inspect`, `fd rmi` and `fd gc`: looking at and pruning the store.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use fd_node::{ImageRecord, Store, load_file_index};

use crate::output;

#[derive(Debug, Args)]
pub(crate) struct ImagesArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Image reference or digest prefix.
    reference: String,
    /// Print the merged file index instead, one JSON object per path.
    #[arg(long)]
    files: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RmiArgs {
    /// Image references or digest prefixes.
    #[arg(required = true)]
    references: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    /// Fail at once instead of waiting when another fd process is writing to the store.
    #[arg(long)]
    no_wait: bool,
}

fn open_store() -> Result<Store> {
    Store::open_default().context("opening the store")
}

/// Finds an image by what the user typed: a full reference, a short one (`busybox` means
/// `docker.io/library/busybox:latest`, as docker reads it) or a digest prefix.
pub(crate) fn find(store: &Store, query: &str) -> Result<ImageRecord> {
    if let Ok(parsed) = fd_gateway::ImageRef::parse(query)
        && let Some(img) = store.image(&parsed.to_string())?
    {
        return Ok(img);
    }
    Ok(store.find_image(query)?)
}

pub(crate) fn list(args: ImagesArgs) -> Result<()> {
    let store = open_store()?;
    let images = store.images()?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &images)?;
        writeln!(out)?;
        return Ok(());
    }
    let width = images
        .iter()
        .map(|i| i.reference.len())
        .max()
        .unwrap_or(0)
        .max(3);
    writeln!(
        out,
        "{:width$}  {:12}  {:>10}  {:>7}  PULLED",
        "REF", "DIGEST", "SIZE", "CHUNKS"
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for img in &images {
        writeln!(
            out,
            "{:width$}  {:12}  {:>10}  {:>7}  {}{}",
            img.reference,
            output::short_digest(&img.manifest_digest),
            output::bytes(img.size),
            img.chunks,
            ago(now - img.pulled),
            lazy_note(&store, img),
        )?;
    }
    Ok(())
}

/// For a lazy image (metadata only; contents stream from team peers on first read), a note
/// saying so and how much of its contents this store holds; empty for a complete image.
fn lazy_note(store: &Store, img: &ImageRecord) -> String {
    if !img.lazy {
        return String::new();
    }
    let stored = load_file_index(store, img).ok().map(|index| {
        let chunks = index.distinct_chunks();
        let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        let here: u64 = chunks
            .iter()
            .filter(|c| store.has_chunk(&c.id, c.len))
            .map(|c| u64::from(c.len))
            .sum();
        if total == 0 {
            100.0
        } else {
            here as f64 * 100.0 / total as f64
        }
    });
    match stored {
        Some(pct) => format!(" (lazy: {pct:.0}% of contents stored, the rest streams from peers)"),
        None => " (lazy: contents stream from peers)".into(),
    }
}

fn ago(secs: i64) -> String {
    match secs {
        s if s < 60 => "just now".into(),
        s if s < 3600 => format!("{} minutes ago", s / 60),
        s if s < 86400 => format!("{} hours ago", s / 3600),
        s => format!("{} days ago", s / 86400),
    }
}

pub(crate) fn inspect(args: InspectArgs) -> Result<()> {
    let store = open_store()?;
    let img = find(&store, &args.reference)?;
    let index = load_file_index(&store, &img)?;
    let mut out = std::io::stdout().lock();
    if args.files {
        for e in &index.entries {
            let chunks: Vec<String> = e.chunks.iter().map(|c| c.id.to_hex()).collect();
            let xattrs: HashMap<String, String> = e
                .xattrs
                .iter()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), hex::encode(v)))
                .collect();
            let line = serde_json::json!({
                "path": e.path_lossy(),
                "kind": format!("{:?}", e.kind).to_lowercase(),
                "mode": format!("{:o}", e.mode),
                "uid": e.uid, "gid": e.gid, "size": e.size,
                "mtime": e.mtime, "nlink": e.nlink, "link_group": e.link_group,
                "target": String::from_utf8_lossy(&e.target),
                "rdev": [e.rdev_major, e.rdev_minor],
                "xattrs_hex": xattrs,
                "chunks": chunks,
            });
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }

    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&img.manifest_digest)?)?;
    let config: serde_json::Value = serde_json::from_slice(&store.read_blob(&img.config_digest)?)?;
    let mut layers = Vec::new();
    for digest in &img.layers {
        let layer = store.layer(digest)?;
        let size = store.blob(digest)?.map(|(r, _)| r.size()).unwrap_or(0);
        layers.push(serde_json::json!({
            "digest": digest,
            "size": size,
            "diff_id": layer.as_ref().map(|l| l.diff_id.clone()),
            "files": layer.as_ref().map(|l| l.files),
            "unpacked": layer.as_ref().map(|l| l.unpacked),
        }));
    }

    // Chunk statistics: how much the file view stores once that it uses several times, and
    // how much of it other images share.
    let logical: u64 = index
        .entries
        .iter()
        .flat_map(|e| &e.chunks)
        .map(|c| u64::from(c.len))
        .sum();
    let distinct = index.distinct_chunks();
    let stored: u64 = distinct.iter().map(|c| u64::from(c.len)).sum();
    let mut others: HashSet<fd_node::store::ChunkRef> = HashSet::new();
    for other in store
        .images()?
        .iter()
        .filter(|o| o.file_index != img.file_index)
    {
        others.extend(load_file_index(&store, other)?.distinct_chunks());
    }
    let shared: Vec<_> = distinct.iter().filter(|c| others.contains(c)).collect();
    let stats = serde_json::json!({
        "paths": index.entries.len(),
        "content_bytes": img.size,
        "chunk_refs": index.entries.iter().map(|e| e.chunks.len()).sum::<usize>(),
        "distinct_chunks": distinct.len(),
        "distinct_chunk_bytes": stored,
        "dedup_ratio": if stored == 0 { 1.0 } else { logical as f64 / stored as f64 },
        "chunks_shared_with_other_images": shared.len(),
        "bytes_shared_with_other_images": shared.iter().map(|c| u64::from(c.len)).sum::<u64>(),
    });
    let doc = serde_json::json!({
        "reference": img.reference,
        "digest": img.manifest_digest,
        "index_digest": img.index_digest,
        "file_index": img.file_index,
        "pulled": img.pulled,
        "lazy": img.lazy,
        "manifest": manifest,
        "config": config,
        "layers": layers,
        "chunks": stats,
    });
    serde_json::to_writer_pretty(&mut out, &doc)?;
    writeln!(out)?;
    Ok(())
}

pub(crate) fn rmi(args: RmiArgs) -> Result<()> {
    let store = open_store()?;
    // Every argument is tried, so one typo does not leave the others in place.
    let mut failures = Vec::new();
    for query in &args.references {
        match remove_one(&store, query) {
            Ok(img) => output::status(
                "Removed",
                format_args!(
                    "{} ({})",
                    img.reference,
                    output::short_digest(&img.manifest_digest)
                ),
            ),
            Err(err) => {
                output::error(&err);
                failures.push(query.as_str());
            }
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("could not remove {}", failures.join(", "));
    }
    Ok(())
}

fn remove_one(store: &Store, query: &str) -> Result<ImageRecord> {
    let img = find(store, query)?;
    // A digest names an image, not a tag: when several tags share it, removing one of them
    // at random would surprise, so the user names the tags instead.
    let by_digest = img
        .manifest_digest
        .trim_start_matches("sha256:")
        .starts_with(query.trim_start_matches("sha256:"));
    if by_digest {
        let tags: Vec<String> = store
            .images()?
            .into_iter()
            .filter(|i| i.manifest_digest == img.manifest_digest)
            .map(|i| i.reference)
            .collect();
        if tags.len() > 1 {
            anyhow::bail!(
                "{query} is the digest of {} tagged images ({}); remove them by name",
                tags.len(),
                tags.join(", ")
            );
        }
    }
    store.remove_image(&img.reference)?;
    Ok(img)
}

pub(crate) fn gc(args: GcArgs) -> Result<()> {
    let store = open_store()?;
    let started = std::time::Instant::now();
    let report = match fd_node::gc::collect(&store, false)? {
        Some(report) => report,
        None if args.no_wait => {
            anyhow::bail!(
                "another fd process is writing to the store; run `fd gc` again when it is done"
            )
        }
        None => {
            output::status(
                "Waiting",
                "for other fd processes to finish writing to the store",
            );
            fd_node::gc::collect(&store, true)?.context("could not lock the store")?
        }
    };
    output::status(
        "Freed",
        format_args!(
            "{} in {}: {} chunks, {} blobs, {} layers, {} temporary files",
            output::bytes(report.bytes_freed),
            output::duration(started.elapsed()),
            report.chunks_removed,
            report.blobs_removed,
            report.layers_removed,
            report.temp_files_removed,
        ),
    );
    Ok(())
}
