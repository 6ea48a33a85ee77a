//! Advisory file locks that coordinate several `fd` processes on one store.
//!
//! - The store lock: every process that writes chunks holds it shared; `fd gc` takes it
//!   exclusively, so it never removes a chunk that an import is about to reference.
//! - Blob locks: one per blob digest, held while a process downloads and ingests that blob, so
//!   two parallel pulls of one image fetch each blob once; the second finds it stored.
//!
//! `flock` locks vanish with the process that held them, so `kill -9` never leaves a store
//! locked.

use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Result, Store};

/// A held lock; released on drop (or when the process dies).
#[derive(Debug)]
pub struct FileLock {
    _file: fs_err::File,
}

impl FileLock {
    fn acquire(path: &Path, op: libc::c_int) -> Result<Option<FileLock>> {
        let file = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        loop {
            // SAFETY: the descriptor is valid while `file` lives.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(None),
                _ => {
                    return Err(std::io::Error::new(
                        err.kind(),
                        format!("lock {}: {err}", path.display()),
                    )
                    .into());
                }
            }
        }
    }
}

impl Store {
    /// Shared store lock for a writer; waits while a gc runs.
    pub fn writer_lock(&self) -> Result<FileLock> {
        let lock = FileLock::acquire(&self.root().join("lock"), libc::LOCK_SH)?;
        Ok(lock.expect("blocking flock returns a lock or an error"))
    }

    /// Exclusive store lock for gc. With `wait == false`, returns None when writers are active.
    pub fn exclusive_lock(&self, wait: bool) -> Result<Option<FileLock>> {
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        FileLock::acquire(&self.root().join("lock"), op)
    }

    /// Per-blob lock; `try_blob_lock` does not wait.
    pub fn try_blob_lock(&self, digest: &str) -> Result<Option<FileLock>> {
        FileLock::acquire(&self.blob_lock_path(digest), libc::LOCK_EX | libc::LOCK_NB)
    }

    /// Per-blob lock; waits for whoever holds it.
    pub fn blob_lock(&self, digest: &str) -> Result<FileLock> {
        let lock = FileLock::acquire(&self.blob_lock_path(digest), libc::LOCK_EX)?;
        Ok(lock.expect("blocking flock returns a lock or an error"))
    }

    fn blob_lock_path(&self, digest: &str) -> std::path::PathBuf {
        self.root()
            .join("downloads")
            .join(format!("{}.lock", digest.replace(':', "-")))
    }
}
