//! Mark-and-sweep garbage collection.
//!
//! Marks everything an image row reaches (its manifest, index, config and layer blobs, the
//! layers' file views, the merged file index, and every chunk those name), then removes all
//! other blob rows, layer rows and chunk files, plus temporary files and partial downloads.
//! A lazy image ([`crate::ImageRecord::lazy`]) has no layers here: its metadata is kept like
//! any image's, and so is every chunk of its file index that the store holds (what its mounts
//! fetched from peers), since no layer index names them.
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
    let mut lazy_indexes: Vec<String> = Vec::new();
    for img in store.images()? {
        // An image's prefetch profile (written by lazyfs): `profiles/<manifest hex>` holds the
        // key of its object.
        live_blobs.extend(store.profile_key(&img.manifest_digest));
        if img.lazy {
            lazy_indexes.push(img.file_index.clone());
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
    // Mark: whatever chunks of lazy images' file indexes are stored.
    for key in &lazy_indexes {
        let bytes = store.read_blob(key)?;
        let index: index::FileIndex = index::decode(key, &bytes)?;
        for e in &index.entries {
            live_chunks.extend(e.chunks.iter().map(|c| c.id));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Entry, FILE_INDEX_MEDIA_TYPE, FileIndex, Kind};
    use crate::store::ChunkRef;
    use crate::{ImageImport, ImageMeta, ImageRecord};

    fn chunk(store: &Store, seed: u8) -> ChunkRef {
        let data = vec![seed; 1000 + usize::from(seed)];
        let id = ChunkId::of(&data);
        store.put_chunk(&id, &data).expect("chunk");
        ChunkRef {
            id,
            len: data.len() as u32,
        }
    }

    #[test]
    fn a_lazy_image_keeps_its_metadata_and_fetched_chunks_until_pulled_or_removed() -> Result<()> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = std::sync::Arc::new(Store::open(dir.path())?);
        // Two chunks of the image's files were fetched; a third is still only at peers.
        let fetched = [chunk(&store, 1), chunk(&store, 2)];
        let absent = ChunkRef {
            id: ChunkId::of(b"not here"),
            len: 8,
        };
        let mut file = Entry::implied_dir(b"/f".to_vec());
        file.kind = Kind::File;
        file.chunks = vec![fetched[0], absent, fetched[1]];
        file.size = file.chunks.iter().map(|c| u64::from(c.len)).sum();
        let index = FileIndex {
            entries: vec![Entry::implied_dir(b"/".to_vec()), file],
        };
        let stray = chunk(&store, 3);

        let import = ImageImport::begin(store.clone())?;
        let (manifest, config) = (b"{\"m\":1}".as_slice(), b"{\"c\":1}".as_slice());
        let manifest_digest = crate::store::digest_of("sha256:", manifest);
        let config_digest = crate::store::digest_of("sha256:", config);
        import.put_verified_bytes(&manifest_digest, "application/json", manifest)?;
        import.put_verified_bytes(&config_digest, "application/json", config)?;
        let file_index = store.put_object(FILE_INDEX_MEDIA_TYPE, &crate::index::encode(&index)?)?;
        let meta = ImageMeta {
            reference: "r/lazy:1".into(),
            manifest_digest: manifest_digest.clone(),
            index_digest: None,
            config_digest,
            layers: vec!["sha256:layer-not-here".into()],
            blob_size: 0,
        };
        let img = import.commit_lazy(meta.clone(), &file_index)?;
        assert!(img.lazy);
        assert_eq!(img.size, index.content_bytes());
        assert_eq!(img.chunks, 3);
        assert_eq!(store.images()?, vec![img.clone()]);
        assert!(
            store
                .complete_images_with_manifest(&manifest_digest)?
                .is_empty()
        );

        let report = collect(&store, true)?.expect("gc");
        assert_eq!(report.chunks_removed, 1, "only the stray chunk goes");
        assert!(!store.has_chunk(&stray.id, stray.len));
        for c in &fetched {
            assert!(store.has_chunk(&c.id, c.len), "a fetched chunk was removed");
        }
        assert!(store.has_blob(&file_index)? && store.has_blob(&manifest_digest)?);
        assert_eq!(store.image("r/lazy:1")?, Some(img.clone()));

        // A complete row under the same name clears the mark in the same write.
        let complete = ImageRecord {
            lazy: false,
            ..img.clone()
        };
        store.put_image(&complete)?;
        assert!(!store.image("r/lazy:1")?.expect("row").lazy);
        assert_eq!(
            store.complete_images_with_manifest(&manifest_digest)?.len(),
            1
        );
        // A lazy commit racing a full pull of the same image leaves the complete row.
        let again = ImageImport::begin(store.clone())?.commit_lazy(meta, &file_index)?;
        assert!(!again.lazy && !store.image("r/lazy:1")?.expect("row").lazy);
        // Back to lazy and removed: the mark goes with the row.
        store.put_image(&img)?;
        assert!(store.image("r/lazy:1")?.expect("row").lazy);
        assert!(store.remove_image("r/lazy:1")?);
        assert!(store.images()?.is_empty());
        // Removed: everything goes.
        collect(&store, true)?.expect("gc");
        for c in &fetched {
            assert!(!store.has_chunk(&c.id, c.len));
        }
        Ok(())
    }
}
