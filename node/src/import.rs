//! Bringing a whole image into the store, from any source (a registry, an archive on disk).
//!
//! An [`ImageImport`] holds the store's shared lock for its life, takes each blob as the source
//! delivers it, and makes the image visible only in [`ImageImport::commit`], after the merged
//! file index is stored and the store is synced. A crash at any earlier point leaves only
//! unreferenced chunks and blob rows, which `fd gc` removes, and no image that looks whole.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use sha2::Digest;

use crate::index::{self, FILE_INDEX_MEDIA_TYPE, LAYER_INDEX_MEDIA_TYPE, LayerIndex};
use crate::ingest::{self, Limits};
use crate::lock::FileLock;
use crate::store::{LayerRecord, now};
use crate::{ImageRecord, NodeError, Result, Store};

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// What the caller knows about the image it is committing.
#[derive(Debug, Clone)]
pub struct ImageMeta {
    pub reference: String,
    pub manifest_digest: String,
    pub index_digest: Option<String>,
    pub config_digest: String,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// Sum of the compressed layer sizes.
    pub blob_size: u64,
}

/// An import in progress. See the module docs. Clones share one import (and its lock), so
/// layers can be ingested from several threads.
#[derive(Clone)]
pub struct ImageImport {
    store: Arc<Store>,
    limits: Limits,
    _lock: Arc<FileLock>,
}

impl ImageImport {
    /// Starts an import; waits while a gc holds the store.
    pub fn begin(store: Arc<Store>) -> Result<Self> {
        let lock = Arc::new(store.writer_lock()?);
        Ok(ImageImport {
            store,
            limits: Limits::default(),
            _lock: lock,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// True when the blob and, for a layer, its file view are already stored: nothing to fetch.
    pub fn has_layer(&self, digest: &str) -> Result<bool> {
        let Some(layer) = self.store.layer(digest)? else {
            return Ok(false);
        };
        Ok(self.store.has_blob(digest)? && self.store.has_blob(&layer.index_key)?)
    }

    /// Stores a small blob (manifest, index, config) after checking it against its digest.
    pub fn put_verified_bytes(&self, digest: &str, media_type: &str, bytes: &[u8]) -> Result<()> {
        check_digest("blob", digest, bytes)?;
        self.store.put_blob_from_reader(digest, media_type, bytes)?;
        Ok(())
    }

    /// Stores the exact bytes of a blob file as its blob view, checking digest and size as it
    /// streams. On mismatch nothing is recorded.
    pub fn put_blob_file(
        &self,
        digest: &str,
        size: u64,
        media_type: &str,
        path: &Path,
    ) -> Result<()> {
        let file = fs_err::File::open(path)?;
        let mut hashing = HashingReader {
            inner: file,
            hasher: sha2::Sha256::new(),
            count: 0,
        };
        let recipe = self.store.write_chunks(&mut hashing)?;
        let computed = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if computed != digest {
            return Err(NodeError::DigestMismatch {
                what: format!("blob {}", path.display()),
                expected: digest.into(),
                computed,
            });
        }
        if hashing.count != size {
            return Err(NodeError::SizeMismatch {
                what: format!("blob {digest}"),
                expected: size,
                got: hashing.count,
            });
        }
        self.store.record_blob(digest, media_type, &recipe)
    }

    /// Builds the file view of a layer from its blob bytes and records it. `diff_id` (from the
    /// image config) is checked against the decompressed stream when given.
    pub fn ingest_layer(
        &self,
        digest: &str,
        compression: Compression,
        blob: impl Read,
        diff_id: Option<&str>,
    ) -> Result<LayerRecord> {
        let layer = ingest::ingest_layer(&self.store, digest, compression, blob, self.limits)?;
        if let Some(expected) = diff_id
            && expected != layer.diff_id
        {
            return Err(NodeError::DigestMismatch {
                what: format!("layer {digest} (uncompressed, config diff_id)"),
                expected: expected.into(),
                computed: layer.diff_id,
            });
        }
        let index_key = self
            .store
            .put_object(LAYER_INDEX_MEDIA_TYPE, &index::encode(&layer.index)?)?;
        let record = LayerRecord {
            digest: digest.to_string(),
            diff_id: layer.diff_id,
            index_key,
            files: layer.files,
            unpacked: layer.unpacked,
        };
        self.store.record_layer(&record)?;
        Ok(record)
    }

    /// Merges the layers' file views, stores the merged index, syncs, and writes the image row.
    pub fn commit(self, meta: ImageMeta) -> Result<ImageRecord> {
        let mut layer_indexes: Vec<(String, LayerIndex)> = Vec::new();
        for digest in &meta.layers {
            let layer = self
                .store
                .layer(digest)?
                .ok_or_else(|| NodeError::Missing {
                    what: format!("file view of layer {digest}"),
                })?;
            let bytes = self.store.read_blob(&layer.index_key)?;
            layer_indexes.push((digest.clone(), index::decode(&layer.index_key, &bytes)?));
        }
        for key in [
            Some(&meta.manifest_digest),
            Some(&meta.config_digest),
            meta.index_digest.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !self.store.has_blob(key)? {
                return Err(NodeError::Missing {
                    what: format!("blob {key}"),
                });
            }
        }
        let merged = index::merge_layers(layer_indexes.iter().map(|(d, l)| (d.as_str(), l)))?;
        let file_index = self
            .store
            .put_object(FILE_INDEX_MEDIA_TYPE, &index::encode(&merged)?)?;

        let record = ImageRecord {
            reference: meta.reference,
            manifest_digest: meta.manifest_digest,
            index_digest: meta.index_digest,
            config_digest: meta.config_digest,
            layers: meta.layers,
            file_index,
            size: merged.content_bytes(),
            blob_size: meta.blob_size,
            chunks: merged.distinct_chunks().len() as u64,
            pulled: now(),
            lazy: false,
        };
        self.store.sync()?;
        self.store.put_image(&record)?;
        Ok(record)
    }

    /// Records a *lazy* image ([`ImageRecord::lazy`]): one whose layers stay with team peers.
    /// Its manifest, config (and index) blobs and its merged file index `file_index` must
    /// already be stored, each checked against its key by the caller; the layers named in
    /// `meta` need not be. The file index is read back (checked against its `blake3:` key) and
    /// decoded, so a malformed one is refused here rather than at mount; then the store is
    /// synced and the row is written with its lazy mark, in one transaction.
    ///
    /// An image already complete under this reference and manifest is left as it is (a
    /// concurrent full pull won the race) and returned.
    pub fn commit_lazy(self, meta: ImageMeta, file_index: &str) -> Result<ImageRecord> {
        if let Some(existing) = self.store.image(&meta.reference)?
            && !existing.lazy
            && existing.manifest_digest == meta.manifest_digest
        {
            return Ok(existing);
        }
        for key in [
            Some(&meta.manifest_digest),
            Some(&meta.config_digest),
            meta.index_digest.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !self.store.has_blob(key)? {
                return Err(NodeError::Missing {
                    what: format!("blob {key}"),
                });
            }
        }
        let bytes = self.store.read_blob(file_index)?;
        let merged: index::FileIndex = index::decode(file_index, &bytes)?;
        let record = ImageRecord {
            reference: meta.reference,
            manifest_digest: meta.manifest_digest,
            index_digest: meta.index_digest,
            config_digest: meta.config_digest,
            layers: meta.layers,
            file_index: file_index.to_string(),
            size: merged.content_bytes(),
            blob_size: meta.blob_size,
            chunks: merged.distinct_chunks().len() as u64,
            pulled: now(),
            lazy: true,
        };
        self.store.sync()?;
        self.store.put_image(&record)?;
        Ok(record)
    }
}

/// Loads an image's merged file index.
pub fn load_file_index(store: &Store, image: &ImageRecord) -> Result<index::FileIndex> {
    let bytes = store.read_blob(&image.file_index)?;
    index::decode(&image.file_index, &bytes)
}

fn check_digest(what: &str, digest: &str, bytes: &[u8]) -> Result<()> {
    let computed = crate::store::digest_of(digest, bytes);
    if computed != digest {
        return Err(NodeError::DigestMismatch {
            what: what.into(),
            expected: digest.into(),
            computed,
        });
    }
    Ok(())
}

struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}
