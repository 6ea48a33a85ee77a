//! lazyfs: an image's root file system, read-only over FUSE, usable as soon as its file index
//! is local. File contents arrive chunk by chunk on first read.
//!
//! This crate owns everything between the kernel and the store for a mounted image:
//!
//! - [`tree`](crate::tree): inode numbers, directory structure and `stat` attributes from the
//!   merged file index, and the mapping of a byte range onto chunks;
//! - the FUSE file system (fuser) that answers lookups, attributes, listings, symlinks and
//!   extended attributes from memory, and reads from chunk files or through the
//!   [`Fetcher`](fd_node::fetch::Fetcher) (the fetch policy itself lives in `fd-node`);
//! - prefetch profiles ([`profile`]): the order in which a mount first read its files, saved at
//!   unmount and replayed in the background at the next mount;
//! - whole-file read-ahead: the first read of a file that has to fetch queues the rest of that
//!   file for a few background threads, so reading a file costs about one round trip to a
//!   distant source rather than one per chunk;
//! - the mount life cycle ([`mount()`], [`Mounted`]) and mount records ([`records`]) that let
//!   any fd process unmount a mount and clean up after a killed one
//!   ([`clean_stale_mounts`]).
//!
//! What a path looks like through lazyfs is what `umoci unpack` writes to disk: type, mode
//! (with setuid, setgid and sticky bits), owner, size, modification time with nanoseconds,
//! symlink target, device numbers, extended attributes byte for byte, hardlinks as one inode
//! with the right link count, and directory link counts of 2 + subdirectories.
//!
//! # Ownership in rootless mode
//!
//! For a container in a user namespace, [`MountOptions::id_map`] takes the namespace's uid and
//! gid maps and the mount presents every owner already mapped ([`idmap`]): nothing is copied
//! or re-owned at start, ids outside the maps show as 65534 as the kernel shows them, and the
//! stored index stays unshifted. Not done yet: the root uid inside version-3
//! `security.capability` xattrs is not shifted. Such a mount needs `allow_other` so the
//! namespace's ids can read it.

mod fs;
pub mod idmap;
pub mod mount;
pub mod profile;
pub mod records;
mod tree;

use std::path::PathBuf;

pub use mount::{
    MountOptions, Mounted, UnmountReport, block_stop_signals, mount, wait_for_stop_signal,
};
pub use profile::{PROFILE_MEDIA_TYPE, Prefetch, Profile, load_profile, save_profile};
pub use records::{
    MountRecord, UnmountOutcome, clean_stale_mounts, clean_stale_mounts_default, is_fd_mount,
    process_start_time, read_records, unmount_dir,
};

/// Shorthand for results in this crate.
pub type Result<T, E = LazyError> = std::result::Result<T, E>;

/// Everything that can go wrong mounting, serving or unmounting an image.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The store failed (missing index, database, fetch).
    #[error(transparent)]
    Node(#[from] fd_node::NodeError),

    /// A file-system operation failed; `what` says which and on what path.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },

    /// The kernel refused the mount.
    #[error("cannot mount at {path}: {error} (FUSE needs /dev/fuse, and root or fusermount3)")]
    Mount {
        path: PathBuf,
        error: std::io::Error,
    },

    /// The file index cannot be presented as a tree.
    #[error("file index cannot be mounted: {reason}")]
    BadIndex { reason: String },

    /// A stored prefetch profile cannot be read.
    #[error("prefetch profile {key}: {reason}")]
    BadProfile { key: String, reason: String },

    /// Nothing of fd's is mounted at the path.
    #[error("{path} is not an fd mount (see `grep fuse.fd /proc/self/mounts`)")]
    NotMounted { path: PathBuf },

    /// Something else is mounted at the path.
    #[error("{path} is a {fstype} mount, not an fd mount; use umount")]
    NotFdMount { path: PathBuf, fstype: String },
}
