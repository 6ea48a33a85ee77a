//! Mark-and-sweep garbage collection.
//!
//! Marks everything an image row reaches (its manifest, index, config and layer blobs, the
//! layers' file views, the merged file index, and every chunk those name), then removes all
//! other blob rows, layer rows and chunk files, plus temporary files and partial downloads.
//! It runs under the store's exclusive lock, so no import is between writing a chunk and
//! committing the image that needs it.

use std::collections::HashSet;

use fd_chunker::ChunkId;

use crate::index::{self, LayerIndex, LayerOp};
use crate::{Result, Store};

/// What a collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub blobs_removed: u64,
    pub layers_removed: u64,
    pub temp_files_removed: u64,
    /// Bytes of chunk files, temp files and partial downloads removed.
    pub bytes_freed: u64,
}

/// Collects garbage. With `wait == false` and another `fd` process writing to the store,
/// returns `Ok(None)` instead of waiting for it.
pub fn collect(store: &Store, wait: bool) -> Result<Option<GcReport>> {
    let Some(_lock) = store.exclusive_lock(wait)? else {
        return Ok(None);
    };
    let mut report = GcReport::default();

    // Mark: blob keys and layers reachable from images.
    let mut live_blobs: HashSet<String> = HashSet::new();
    let mut live_layers: HashSet<String> = HashSet::new();
    for img in store.images()? {
        // An image's prefetch profile (written by lazyfs): `profiles/<manifest hex>` holds the
        // key of its object.
        let hex = img.manifest_digest.rsplit(':').next().unwrap_or_default();
        if let Ok(key) = std::fs::read_to_string(store.root().join("profiles").join(hex)) {
            live_blobs.insert(key.trim().to_string());
        }
        live_blobs.extend([img.manifest_digest, img.config_digest, img.file_index]);
        live_blobs.extend(img.index_digest);
        for digest in img.layers {
            if let Some(layer) = store.layer(&digest)? {
                live_blobs.insert(layer.index_key);
            }
            live_blobs.insert(digest.clone());
            live_layers.insert(digest);
        }
    }

    // Mark: blobs pinned by a long-running holder (the registry mirror pins what it serves).
    live_blobs.extend(store.pinned_blobs()?);

    // Mark: chunks of live blobs, and of every file the live layer indexes name (a file that
    // an upper layer hides is still part of its own layer, which other images may reuse).
    let mut live_chunks: HashSet<ChunkId> = HashSet::new();
    let mut dead_blobs = Vec::new();
    for (key, recipe) in store.all_blobs()? {
        if live_blobs.contains(&key) {
            live_chunks.extend(recipe.0.iter().map(|c| c.id));
        } else {
            dead_blobs.push(key);
        }
    }
    let mut dead_layers = Vec::new();
    for layer in store.all_layers()? {
        if !live_layers.contains(&layer.digest) {
            dead_layers.push(layer.digest);
            continue;
        }
        let bytes = store.read_blob(&layer.index_key)?;
        let index: LayerIndex = index::decode(&layer.index_key, &bytes)?;
        for op in &index.ops {
            if let LayerOp::Put(e) = op {
                live_chunks.extend(e.chunks.iter().map(|c| c.id));
            }
        }
    }

    // Sweep rows first: a crash after this leaves only unreferenced chunk files.
    store.delete_blob_rows(&dead_blobs)?;
    store.delete_layer_rows(&dead_layers)?;
    report.blobs_removed = dead_blobs.len() as u64;
    report.layers_removed = dead_layers.len() as u64;

    // Sweep chunk files.
    for shard in read_dir(&store.root().join("chunks"))? {
        for file in read_dir(&shard)? {
            let keep = file
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| ChunkId::from_hex(n).ok())
                .is_some_and(|id| live_chunks.contains(&id));
            if !keep {
                report.bytes_freed += remove(&file)?;
                report.chunks_removed += 1;
            }
        }
    }

    // Temp files and partial downloads belong to processes that are gone: writers hold the
    // shared lock, and we hold it exclusively.
    for dir in ["tmp", "downloads"] {
        for file in read_dir(&store.root().join(dir))? {
            report.bytes_freed += remove(&file)?;
            report.temp_files_removed += 1;
        }
    }
    Ok(Some(report))
}

fn read_dir(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in fs_err::read_dir(dir)? {
        out.push(entry?.path());
    }
    Ok(out)
}

fn remove(path: &std::path::Path) -> Result<u64> {
    let meta = fs_err::symlink_metadata(path)?;
    if meta.is_dir() {
        fs_err::remove_dir_all(path)?;
    } else {
        fs_err::remove_file(path)?;
    }
    Ok(meta.len())
}
