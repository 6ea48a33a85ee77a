//! Support code for fd's end-to-end tests: locating the `fd` binary, building and caching the
//! test images (`tests/images/build.sh`), running a real registry on 127.0.0.1, giving each test
//! a private fd store, running fd processes with a time limit or in the background, and
//! describing a directory tree exactly so that fd's view of an image can be compared with a
//! reference unpack made by `umoci`.
//!
//! Everything here shells out to Debian's tools (docker-registry, skopeo, umoci, curl) rather
//! than reimplementing them: the point of these tests is to check fd against independent
//! implementations. Every helper returns `anyhow::Result` with the failing command's output in
//! the error.

mod env;
mod images;
mod proc;
mod registry;
mod relay;
mod tree;

pub use env::{FdEnv, fd_bin, fd_no_mdns, try_fd_bin};
pub use images::{ImageCache, debian_paths, images, manifest, manifest_digest, umoci_unpack};
pub use proc::{Proc, output, spawn, text};
pub use registry::Registry;
pub use relay::Relay;
pub use tree::{FileFacts, FileKind, TreeManifest, diff_manifests, tree_manifest};

use std::path::PathBuf;

/// The root of the fd workspace (the directory holding the top-level `Cargo.toml`).
pub fn repo_root() -> PathBuf {
    // This crate lives in `<repo>/tests`; the path is fixed at compile time, which is what we
    // want: tests always belong to the checkout they were built from.
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match manifest_dir.parent() {
        Some(parent) => parent.to_path_buf(),
        None => manifest_dir,
    }
}
