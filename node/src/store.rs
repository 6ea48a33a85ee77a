//! The content-addressed store: chunk files, blob recipes, layer records and image records.
//!
//! Layout under the store root:
//!
//! ```text
//! chunks/ab/abcdef…   one file per chunk, named by the BLAKE3 hex of its bytes
//! tmp/                temporary files; a chunk is written here, then renamed into chunks/
//! downloads/          partial blob downloads, kept so an interrupted pull can resume
//! fd.db               metadata (see the db module)
//! lock                advisory lock: writers share it, gc takes it alone
//! ```
//!
//! A chunk's existence is a `stat`: the rename is atomic, so a name always holds a whole chunk.
//! Chunk writes are not fsynced one by one (thousands per image); instead an import calls
//! [`Store::sync`] once before it commits the image row, so every chunk a committed image needs
//! is durable. A chunk left unsynced by a crash is not referenced by any image and is checked by
//! size whenever it is reused.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use fd_chunker::{ChunkId, ChunkerConfig};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{NodeError, Result, db};

/// One chunk of a recipe or file: its id and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ChunkRef {
    /// Raw 32 bytes in stored indexes (half the size of the hex form).
    #[serde(with = "raw_id")]
    pub id: ChunkId,
    pub len: u32,
}

mod raw_id {
    use fd_chunker::ChunkId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(id: &ChunkId, s: S) -> Result<S::Ok, S::Error> {
        id.0.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        <[u8; 32]>::deserialize(d).map(ChunkId)
    }
}

/// The chunks that rebuild a blob, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recipe(pub Vec<ChunkRef>);

impl Recipe {
    /// Total bytes the recipe rebuilds.
    pub fn size(&self) -> u64 {
        self.0.iter().map(|c| u64::from(c.len)).sum()
    }

    /// Compact encoding: 32 id bytes then the length as 4 little-endian bytes, per chunk.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 36);
        for c in &self.0 {
            out.extend_from_slice(&c.id.0);
            out.extend_from_slice(&c.len.to_le_bytes());
        }
        out
    }

    fn decode(key: &str, bytes: &[u8]) -> Result<Recipe> {
        if !bytes.len().is_multiple_of(36) {
            return Err(NodeError::Decode {
                what: format!("recipe of {key}"),
                reason: format!("length {} is not a multiple of 36", bytes.len()),
            });
        }
        let chunks = bytes
            .chunks_exact(36)
            .map(|b| {
                let mut id = [0u8; 32];
                id.copy_from_slice(&b[..32]);
                let mut len = [0u8; 4];
                len.copy_from_slice(&b[32..]);
                ChunkRef {
                    id: ChunkId(id),
                    len: u32::from_le_bytes(len),
                }
            })
            .collect();
        Ok(Recipe(chunks))
    }
}

/// What `fd images` lists about an image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageRecord {
    /// Canonical reference, e.g. `127.0.0.1:5000/debian-python:bookworm`.
    pub reference: String,
    pub manifest_digest: String,
    /// The image index the reference pointed at, when it pointed at one.
    pub index_digest: Option<String>,
    pub config_digest: String,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// `blake3:` key of the merged file index.
    pub file_index: String,
    /// Bytes of file contents in the merged tree.
    pub size: u64,
    /// Bytes of the compressed layer blobs.
    pub blob_size: u64,
    /// Distinct chunks the file view uses.
    pub chunks: u64,
    /// Unix seconds of the pull.
    pub pulled: i64,
    /// Present lazily: only the metadata (manifest, config, index, file index) is stored, not
    /// the layers; file contents are fetched from team peers on first read, and whatever was
    /// fetched is kept. `false` means the image is complete.
    pub lazy: bool,
}

/// The file view of one layer as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    pub digest: String,
    pub diff_id: String,
    pub index_key: String,
    pub files: u64,
    pub unpacked: u64,
}

/// An open store. Cheap to share by reference across threads; the database connection is
/// behind a mutex because metadata writes are rare and short.
pub struct Store {
    root: PathBuf,
    db_path: PathBuf,
    db: Mutex<Connection>,
    tmp_counter: AtomicU64,
    chunker: ChunkerConfig,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

impl Store {
    /// Opens the store at `root`, creating it if needed.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for dir in ["chunks", "tmp", "downloads"] {
            fs_err::create_dir_all(root.join(dir)).map_err(|e| NodeError::StoreUnusable {
                path: root.clone(),
                reason: format!("{e}; set FD_HOME to a writable directory"),
            })?;
        }
        let db_path = root.join("fd.db");
        let db = db::open(&db_path)?;
        Ok(Store {
            root,
            db_path,
            db: Mutex::new(db),
            tmp_counter: AtomicU64::new(0),
            chunker: ChunkerConfig::default(),
        })
    }

    /// Opens the store at the default location ([`crate::paths::fd_home`]).
    pub fn open_default() -> Result<Store> {
        Store::open(crate::paths::fd_home())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Chunk boundaries used for everything this store writes.
    pub fn chunker(&self) -> &ChunkerConfig {
        &self.chunker
    }

    /// Where partial blob downloads are kept between attempts.
    pub fn download_path(&self, digest: &str) -> PathBuf {
        self.root.join("downloads").join(digest.replace(':', "-"))
    }

    /// A fresh path in the store's temp dir (same file system as the chunks, so renames work).
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    // # Chunks

    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// True when a whole chunk of this id and length is stored.
    pub fn has_chunk(&self, id: &ChunkId, len: u32) -> bool {
        match std::fs::metadata(self.chunk_path(id)) {
            Ok(m) => m.len() == u64::from(len),
            Err(_) => false,
        }
    }

    /// Stores a chunk whose id the caller computed from `data`. Returns true when it was new.
    /// Writers hold the store's shared lock ([`crate::lock`]), so gc cannot remove a chunk
    /// between this check and the commit that references it.
    pub fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        let path = self.chunk_path(id);
        if let Ok(m) = std::fs::metadata(&path) {
            if m.len() == data.len() as u64 {
                return Ok(false);
            }
            // A chunk of the wrong size can only be the remains of a crash before sync:
            // replace it below.
            tracing::warn!(chunk = %id.short(), "replacing chunk file of wrong size");
        }
        let tmp = self.tmp_path("chunk");
        {
            let mut f = fs_err::File::create(&tmp)?;
            f.write_all(data)?;
        }
        match fs_err::rename(&tmp, &path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs_err::create_dir_all(path.parent().unwrap_or(&self.root))?;
                fs_err::rename(&tmp, &path)?;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        }
        Ok(true)
    }

    /// Reads a chunk and checks it against its id.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let data = self.read_chunk_unchecked(id)?;
        if ChunkId::of(&data) != *id {
            return Err(NodeError::CorruptChunk {
                id: id.to_hex(),
                path: self.chunk_path(id),
            });
        }
        Ok(data)
    }

    /// Reads a chunk file without checking it: for a caller that hashes the bytes anyway and
    /// compares the result with `id` itself (serving a peer computes the chunk's bao tree,
    /// whose root is the id), so the bytes are hashed once rather than twice.
    pub fn read_chunk_unchecked(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let path = self.chunk_path(id);
        match std::fs::read(&path) {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(NodeError::Missing {
                what: format!("chunk {}", id.short()),
            }),
            Err(e) => Err(fs_err_wrap(e, &path)),
        }
    }

    /// Makes every file written so far durable (one `syncfs` for the whole store).
    pub fn sync(&self) -> Result<()> {
        let dir = fs_err::File::open(&self.root)?;
        // SAFETY: the descriptor is valid for the life of `dir`.
        let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
        if rc != 0 {
            return Err(fs_err_wrap(std::io::Error::last_os_error(), &self.root));
        }
        Ok(())
    }

    // # Blobs and objects

    /// Chunks everything `reader` yields into the store and records it as blob `key`.
    /// The caller is responsible for having verified the bytes against `key` (or for computing
    /// `key` from them, see [`Store::put_object`]).
    pub fn put_blob_from_reader(
        &self,
        key: &str,
        media_type: &str,
        reader: impl Read,
    ) -> Result<Recipe> {
        let recipe = self.write_chunks(reader)?;
        self.record_blob(key, media_type, &recipe)?;
        Ok(recipe)
    }

    /// Chunks a stream into the store and returns the recipe, without recording a blob row.
    pub fn write_chunks(&self, reader: impl Read) -> Result<Recipe> {
        let mut recipe = Vec::new();
        for chunk in fd_chunker::chunk_reader(reader, &self.chunker) {
            let chunk = chunk?;
            self.put_chunk(&chunk.id, &chunk.data)?;
            recipe.push(ChunkRef {
                id: chunk.id,
                len: chunk.data.len() as u32,
            });
        }
        Ok(Recipe(recipe))
    }

    /// Records a blob row for chunks already stored.
    pub fn record_blob(&self, key: &str, media_type: &str, recipe: &Recipe) -> Result<()> {
        let db = self.db()?;
        db.execute(
            "INSERT INTO blobs (key, size, media_type, recipe, added) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(key) DO UPDATE SET added = excluded.added",
            params![
                key,
                recipe.size() as i64,
                media_type,
                recipe.encode(),
                now()
            ],
        )
        .map_err(|e| NodeError::db(&self.db_path, e))?;
        Ok(())
    }

    /// Stores a small fd object (an index) under `blake3:<hash of its bytes>` and returns the key.
    pub fn put_object(&self, media_type: &str, bytes: &[u8]) -> Result<String> {
        let key = format!("blake3:{}", ChunkId::of(bytes).to_hex());
        if !self.has_blob(&key)? {
            self.put_blob_from_reader(&key, media_type, bytes)?;
        }
        Ok(key)
    }

    /// The recipe and media type of a stored blob, if any.
    pub fn blob(&self, key: &str) -> Result<Option<(Recipe, String)>> {
        let db = self.db()?;
        let row: Option<(Vec<u8>, String)> = db
            .query_row(
                "SELECT recipe, media_type FROM blobs WHERE key = ?1",
                [key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        row.map(|(r, m)| Ok((Recipe::decode(key, &r)?, m)))
            .transpose()
    }

    /// True when the blob row exists and every chunk of it is present.
    pub fn has_blob(&self, key: &str) -> Result<bool> {
        Ok(match self.blob(key)? {
            Some((recipe, _)) => recipe.0.iter().all(|c| self.has_chunk(&c.id, c.len)),
            None => false,
        })
    }

    /// Reads a whole blob into memory, checking it against its key (sha256 or blake3).
    /// Meant for manifests, configs and indexes; large layers are read with [`Store::open_blob`].
    pub fn read_blob(&self, key: &str) -> Result<Vec<u8>> {
        let (recipe, _) = self.blob(key)?.ok_or_else(|| NodeError::Missing {
            what: format!("blob {key}"),
        })?;
        let mut out = Vec::with_capacity(recipe.size() as usize);
        for c in &recipe.0 {
            out.extend_from_slice(&self.read_chunk(&c.id)?);
        }
        let computed = digest_of(key, &out);
        if computed != key {
            return Err(NodeError::DigestMismatch {
                what: "stored blob".into(),
                expected: key.into(),
                computed,
            });
        }
        Ok(out)
    }

    /// Streams a blob chunk by chunk; each chunk is checked against its id as it is read.
    pub fn open_blob(&self, key: &str) -> Result<BlobReader<'_>> {
        let (recipe, _) = self.blob(key)?.ok_or_else(|| NodeError::Missing {
            what: format!("blob {key}"),
        })?;
        Ok(BlobReader {
            store: self,
            chunks: recipe.0.into_iter(),
            current: Vec::new(),
            pos: 0,
        })
    }

    /// Pins a blob: `fd gc` keeps it (and its chunks) even though no image row names it.
    /// Call while holding the writer lock, after the blob is recorded, so gc sees either
    /// neither or both.
    pub fn pin_blob(&self, key: &str) -> Result<()> {
        let dir = self.root.join("pins");
        fs_err::create_dir_all(&dir)?;
        let path = dir.join(key.replace(':', "-"));
        if !path.exists() {
            fs_err::write(&path, key.as_bytes())?;
        }
        Ok(())
    }

    /// Removes a pin set by [`Store::pin_blob`]; the blob goes at the next `fd gc` unless an
    /// image still names it.
    pub fn unpin_blob(&self, key: &str) -> Result<()> {
        match fs_err::remove_file(self.root.join("pins").join(key.replace(':', "-"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every pinned blob key.
    pub fn pinned_blobs(&self) -> Result<Vec<String>> {
        let dir = self.root.join("pins");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(fs_err_wrap(e, &dir)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| fs_err_wrap(e, &dir))?;
            // The file holds the key itself: names cannot hold ':' portably.
            if let Ok(key) = std::fs::read_to_string(entry.path()) {
                out.push(key.trim().to_string());
            }
        }
        Ok(out)
    }

    // # Layers

    pub fn layer(&self, digest: &str) -> Result<Option<LayerRecord>> {
        let db = self.db()?;
        db.query_row(
            "SELECT digest, diff_id, index_key, files, unpacked FROM layers WHERE digest = ?1",
            [digest],
            |r| {
                Ok(LayerRecord {
                    digest: r.get(0)?,
                    diff_id: r.get(1)?,
                    index_key: r.get(2)?,
                    files: r.get::<_, i64>(3)? as u64,
                    unpacked: r.get::<_, i64>(4)? as u64,
                })
            },
        )
        .optional()
        .map_err(|e| NodeError::db(&self.db_path, e))
    }

    pub fn record_layer(&self, l: &LayerRecord) -> Result<()> {
        let db = self.db()?;
        db.execute(
            "INSERT OR REPLACE INTO layers (digest, diff_id, index_key, files, unpacked)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                l.digest,
                l.diff_id,
                l.index_key,
                l.files as i64,
                l.unpacked as i64
            ],
        )
        .map_err(|e| NodeError::db(&self.db_path, e))?;
        Ok(())
    }

    // # Images

    /// Writes an image row. Call only after every blob, layer and index it names is stored and
    /// [`Store::sync`] has run: this row is what makes the image visible. For a lazy image
    /// ([`ImageRecord::lazy`]) only the manifest, config, index and file index need be stored.
    /// The lazy mark is set or cleared in the same transaction, so a full pull over a lazy
    /// image makes it complete at once.
    pub fn put_image(&self, img: &ImageRecord) -> Result<()> {
        let layers = serde_json::to_string(&img.layers).map_err(|e| NodeError::Decode {
            what: "layer list".into(),
            reason: e.to_string(),
        })?;
        let mut db = self.db()?;
        let tx = db
            .transaction()
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        tx.execute(
            "INSERT OR REPLACE INTO images (reference, manifest_digest, index_digest,
                config_digest, layers, file_index, size, blob_size, chunks, pulled)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                img.reference,
                img.manifest_digest,
                img.index_digest,
                img.config_digest,
                layers,
                img.file_index,
                img.size as i64,
                img.blob_size as i64,
                img.chunks as i64,
                img.pulled
            ],
        )
        .map_err(|e| NodeError::db(&self.db_path, e))?;
        let mark = if img.lazy {
            "INSERT OR IGNORE INTO lazy_images (reference) VALUES (?1)"
        } else {
            "DELETE FROM lazy_images WHERE reference = ?1"
        };
        tx.execute(mark, [&img.reference])
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        tx.commit().map_err(|e| NodeError::db(&self.db_path, e))
    }

    /// Complete images (not lazy ones) whose manifest is `manifest_digest`, under any name.
    pub fn complete_images_with_manifest(&self, manifest_digest: &str) -> Result<Vec<ImageRecord>> {
        Ok(self
            .query_images("manifest_digest = ?1", &[&manifest_digest])?
            .into_iter()
            .filter(|i| !i.lazy)
            .collect())
    }

    /// The object key of the image's prefetch profile, if one was saved (lazyfs writes the
    /// pointer file `profiles/<hex of the manifest digest>`). The object itself may be gone.
    pub fn profile_key(&self, manifest_digest: &str) -> Option<String> {
        let hex = manifest_digest
            .rsplit(':')
            .next()
            .unwrap_or(manifest_digest);
        std::fs::read_to_string(self.root.join("profiles").join(hex))
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        self.query_images("1 = 1", &[])
    }

    /// The image with exactly this canonical reference.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>> {
        Ok(self
            .query_images("reference = ?1", &[&reference])?
            .into_iter()
            .next())
    }

    /// Finds an image by canonical reference or by a prefix (at least 6 hex digits) of its
    /// manifest digest, as `docker rmi` accepts. Several matches by prefix are an error.
    pub fn find_image(&self, query: &str) -> Result<ImageRecord> {
        if let Some(img) = self.image(query)? {
            return Ok(img);
        }
        let hex = query.strip_prefix("sha256:").unwrap_or(query);
        if hex.len() >= 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let pattern = format!("sha256:{}%", hex.to_ascii_lowercase());
            let found = self.query_images("manifest_digest LIKE ?1", &[&pattern])?;
            let digests: HashSet<_> = found.iter().map(|i| i.manifest_digest.clone()).collect();
            match (found.len(), digests.len()) {
                (0, _) => {}
                (_, 1) => return Ok(found.into_iter().next().expect("non-empty")),
                _ => {
                    return Err(NodeError::Missing {
                        what: format!(
                            "a unique image for {query:?} ({} images match; give more digits)",
                            found.len()
                        ),
                    });
                }
            }
        }
        Err(NodeError::NoSuchImage {
            reference: query.to_string(),
        })
    }

    /// Removes an image row (and its lazy mark). Its chunks stay until `fd gc`.
    pub fn remove_image(&self, reference: &str) -> Result<bool> {
        let mut db = self.db()?;
        let tx = db
            .transaction()
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        let n = tx
            .execute("DELETE FROM images WHERE reference = ?1", [reference])
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        tx.execute("DELETE FROM lazy_images WHERE reference = ?1", [reference])
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        tx.commit().map_err(|e| NodeError::db(&self.db_path, e))?;
        Ok(n > 0)
    }

    fn query_images(
        &self,
        filter: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<ImageRecord>> {
        let db = self.db()?;
        let sql = format!(
            "SELECT reference, manifest_digest, index_digest, config_digest, layers, file_index,
                    size, blob_size, chunks, pulled,
                    EXISTS (SELECT 1 FROM lazy_images l WHERE l.reference = images.reference)
             FROM images WHERE {filter} ORDER BY reference"
        );
        let mut stmt = db
            .prepare(&sql)
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        let rows = stmt
            .query_map(args, |r| {
                let layers: String = r.get(4)?;
                Ok((
                    ImageRecord {
                        reference: r.get(0)?,
                        manifest_digest: r.get(1)?,
                        index_digest: r.get(2)?,
                        config_digest: r.get(3)?,
                        layers: Vec::new(),
                        file_index: r.get(5)?,
                        size: r.get::<_, i64>(6)? as u64,
                        blob_size: r.get::<_, i64>(7)? as u64,
                        chunks: r.get::<_, i64>(8)? as u64,
                        pulled: r.get(9)?,
                        lazy: r.get(10)?,
                    },
                    layers,
                ))
            })
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        let mut out = Vec::new();
        for row in rows {
            let (mut img, layers) = row.map_err(|e| NodeError::db(&self.db_path, e))?;
            img.layers = serde_json::from_str(&layers).map_err(|e| NodeError::Decode {
                what: format!("layer list of {}", img.reference),
                reason: e.to_string(),
            })?;
            out.push(img);
        }
        Ok(out)
    }

    // # Housekeeping (used by gc)

    /// Every blob key with its recipe.
    pub(crate) fn all_blobs(&self) -> Result<Vec<(String, Recipe)>> {
        let db = self.db()?;
        let mut stmt = db
            .prepare("SELECT key, recipe FROM blobs")
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        let mut out = Vec::new();
        for row in rows {
            let (key, recipe) = row.map_err(|e| NodeError::db(&self.db_path, e))?;
            let recipe = Recipe::decode(&key, &recipe)?;
            out.push((key, recipe));
        }
        Ok(out)
    }

    pub(crate) fn all_layers(&self) -> Result<Vec<LayerRecord>> {
        let db = self.db()?;
        let mut stmt = db
            .prepare("SELECT digest FROM layers")
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        let digests: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(|e| NodeError::db(&self.db_path, e))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        drop(stmt);
        drop(db);
        let mut out = Vec::new();
        for d in digests {
            if let Some(l) = self.layer(&d)? {
                out.push(l);
            }
        }
        Ok(out)
    }

    pub(crate) fn delete_blob_rows(&self, keys: &[String]) -> Result<()> {
        let mut db = self.db()?;
        let tx = db
            .transaction()
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        for k in keys {
            tx.execute("DELETE FROM blobs WHERE key = ?1", [k])
                .map_err(|e| NodeError::db(&self.db_path, e))?;
        }
        tx.commit().map_err(|e| NodeError::db(&self.db_path, e))
    }

    pub(crate) fn delete_layer_rows(&self, digests: &[String]) -> Result<()> {
        let mut db = self.db()?;
        let tx = db
            .transaction()
            .map_err(|e| NodeError::db(&self.db_path, e))?;
        for d in digests {
            tx.execute("DELETE FROM layers WHERE digest = ?1", [d])
                .map_err(|e| NodeError::db(&self.db_path, e))?;
        }
        tx.commit().map_err(|e| NodeError::db(&self.db_path, e))
    }

    fn db(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        // A panic while holding the lock cannot leave SQLite inconsistent (its own transactions
        // protect it), so a poisoned lock is still safe to use.
        Ok(self.db.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Reads a stored blob in order, verifying each chunk as it is loaded.
pub struct BlobReader<'a> {
    store: &'a Store,
    chunks: std::vec::IntoIter<ChunkRef>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for BlobReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            let Some(next) = self.chunks.next() else {
                return Ok(0);
            };
            self.current = self
                .store
                .read_chunk(&next.id)
                .map_err(std::io::Error::other)?;
            self.pos = 0;
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The digest of `bytes` in the same algorithm as `key` (`sha256:` or `blake3:`).
pub fn digest_of(key: &str, bytes: &[u8]) -> String {
    use sha2::Digest;
    if key.starts_with("blake3:") {
        format!("blake3:{}", ChunkId::of(bytes).to_hex())
    } else {
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
    }
}

pub(crate) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn fs_err_wrap(e: std::io::Error, path: &Path) -> NodeError {
    NodeError::Io(std::io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    ))
}
