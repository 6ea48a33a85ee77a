//! The node's error type. Variants carry the facts a user needs to act: the path, the layer and
//! tar entry, the digest expected and the one computed.

use std::path::PathBuf;

/// Shorthand for results in this crate.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// Everything that can go wrong in the store, the ingest or garbage collection.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A file-system operation failed; `fs_err` already names the path in the source.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// The metadata database failed.
    #[error("store database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// The store directory cannot be used (missing permissions, not a directory, ...).
    #[error("cannot use store at {path}: {reason}")]
    StoreUnusable { path: PathBuf, reason: String },

    /// A layer tar contains something fd refuses to import. `entry` is the path as written in
    /// the tar, so the user can find it.
    #[error("layer {layer}: entry {entry:?} rejected: {reason}")]
    HostileEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    /// A layer could not be read as a tar archive in the declared compression.
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },

    /// Bytes do not hash to the digest they were named by.
    #[error("{what}: digest mismatch: expected {expected}, computed {computed}")]
    DigestMismatch {
        what: String,
        expected: String,
        computed: String,
    },

    /// Bytes do not have the size they were declared with.
    #[error("{what}: size mismatch: expected {expected} bytes, got {got}")]
    SizeMismatch {
        what: String,
        expected: u64,
        got: u64,
    },

    /// Something the store should hold is not there.
    #[error("{what} is not in the store")]
    Missing { what: String },

    /// A chunk file exists but its bytes do not hash to its name (disk corruption, tampering).
    #[error("chunk {id} in the store is corrupt (file {path})")]
    CorruptChunk { id: String, path: PathBuf },

    /// No image with this reference is in the store.
    #[error("no image {reference:?} in the store (see `fd images`)")]
    NoSuchImage { reference: String },

    /// Stored metadata could not be decoded (a newer fd wrote it, or it was damaged).
    #[error("cannot decode {what}: {reason}")]
    Decode { what: String, reason: String },

    /// No source could provide something the store lacks (a chunk on first read); `reasons`
    /// names every source tried and why it failed.
    #[error("{what} is not available: {reasons}")]
    Unavailable { what: String, reasons: String },

    /// An input file (image archive, layout) is not what it claims to be.
    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },
}

impl NodeError {
    pub(crate) fn db(path: &std::path::Path, source: rusqlite::Error) -> Self {
        NodeError::Db {
            path: path.to_path_buf(),
            source,
        }
    }
}
