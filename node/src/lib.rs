//! The local node: everything fd keeps on this machine, and the rules for keeping it.
//!
//! A store (`$FD_HOME`) holds two things:
//!
//! - **chunk files**, named by the BLAKE3 hash of their bytes ([`store`]), written to a temporary
//!   name and renamed into place so that a crash never leaves half a chunk under a real name;
//! - **metadata** in SQLite ([`db`]): blob recipes (the chunks that rebuild an exact OCI blob or
//!   an fd object), per-layer and merged file indexes, and image records. SQLite in WAL mode lets
//!   several `fd` processes use one store at once, which an exclusive-lock database would not.
//!
//! Every image has two views. The *blob view* rebuilds each OCI blob byte for byte, so the store
//! can answer as a registry. The *file view* is the merged root filesystem: one [`index::Entry`]
//! per path with its metadata and the chunks of its contents, built by [`ingest`] from layer
//! tars with whiteouts and opaque directories already applied ([`index::merge_layers`]).
//!
//! Nothing becomes visible as an image until all of its blobs, chunks and indexes are durable:
//! [`import::ImageImport::commit`] syncs the store and then writes the image row in one
//! transaction. [`gc`] removes what no image needs, including whatever a killed pull left.
//!
//! The one exception is a *lazy* image ([`ImageRecord::lazy`], written by
//! [`import::ImageImport::commit_lazy`]): only its metadata (manifest, config, index, merged
//! file index) is stored, its layers stay with team peers and its file contents arrive chunk
//! by chunk as they are read. Its row carries the mark so nobody takes it for complete; gc
//! keeps its metadata and whatever of its chunks are stored.

pub mod error;
pub mod fetch;
pub mod gc;
pub mod import;
pub mod index;
pub mod ingest;
pub mod lock;
pub mod paths;
pub mod store;

mod db;

pub use error::{NodeError, Result};
pub use import::{Compression, ImageImport, ImageMeta, load_file_index};
pub use index::{Entry, FileIndex, Kind};
pub use store::{ImageRecord, Store};
