//! Prefetch profiles: which files a mount read first, kept so the next mount of the image
//! fetches those chunks before anyone asks.
//!
//! While mounted, [`Recorder`] notes each file the first time it is read. At unmount the
//! order becomes a [`Profile`], stored as an fd object (media type
//! [`PROFILE_MEDIA_TYPE`]) and remembered for the image in a small pointer file:
//!
//! ```text
//! $FD_HOME/profiles/<hex of the manifest digest>   one line: the profile's object key
//! ```
//!
//! A file keyed by manifest digest rather than a database row keeps lazyfs out of the store's
//! schema; `fd gc` keeps the object of every image that still exists. A mount that read no file
//! leaves the previous profile in place (an `ls` says nothing about a workload).
//!
//! The next mount with `--prefetch profile` fetches the profile's chunks in order on a few
//! background threads; `--prefetch all` continues with every other chunk of the image. The
//! fetcher's single flight means a prefetch and a read of the same chunk never fetch twice.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fd_chunker::ChunkId;
use fd_node::store::ChunkRef;
use fd_node::{ImageRecord, Store};
use serde::{Deserialize, Serialize};

use crate::fs::Shared;
use crate::tree::Tree;
use crate::{LazyError, Result};

/// Media type of a stored prefetch profile.
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.fd.prefetch-profile.v1+json";

/// Background threads a prefetch uses. Each waits on one chunk at a time, so against a peer
/// tens of milliseconds away it is the number of round trips overlapped: sixteen keep a
/// 20 Mbit/s link busy at 40 ms with 64 KiB chunks, and a peer answers that many at once
/// (a node's default upload cap); a local source finishes them fast either way.
const PREFETCH_THREADS: usize = 16;

/// A prefetch gives up after this many chunks in a row fail (no source has them).
const MAX_FAILURES_IN_A_ROW: usize = 16;

/// Which chunks to fetch in the background after mounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// Nothing: every chunk is fetched on first read.
    None,
    /// The chunks of the image's prefetch profile, if it has one.
    #[default]
    Profile,
    /// The profile's chunks first, then every other chunk of the image.
    All,
}

/// Notes the order in which files are first read. Lock-free for every read after the first
/// of each file.
pub(crate) struct Recorder {
    seen: Vec<AtomicBool>,
    order: Mutex<Vec<u32>>,
}

impl Recorder {
    pub(crate) fn new(entries: usize) -> Recorder {
        Recorder {
            seen: (0..entries).map(|_| AtomicBool::new(false)).collect(),
            order: Mutex::default(),
        }
    }

    pub(crate) fn note_read(&self, entry: usize) {
        if let Some(flag) = self.seen.get(entry)
            && !flag.swap(true, Ordering::Relaxed)
        {
            self.order
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(entry as u32);
        }
    }

    /// Entries in first-read order.
    pub(crate) fn order(&self) -> Vec<u32> {
        self.order.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A stored prefetch profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Format version; this code writes and reads 1.
    pub version: u32,
    pub manifest_digest: String,
    pub file_index: String,
    /// Paths in first-read order, for people reading the profile (lossy for non-UTF-8 names).
    pub files: Vec<String>,
    /// Chunks in the order to fetch them: hex id and length.
    pub chunks: Vec<(String, u32)>,
}

impl Profile {
    /// The profile of a mount that read `order` (entry positions), or None if it read nothing.
    pub(crate) fn from_reads(tree: &Tree, image: &ImageRecord, order: &[u32]) -> Option<Profile> {
        if order.is_empty() {
            return None;
        }
        let mut seen = HashSet::new();
        let mut chunks = Vec::new();
        let mut files = Vec::new();
        for &i in order {
            let i = i as usize;
            files.push(tree.entry(i).path_lossy());
            for k in tree.file_chunks(i) {
                let c = tree.chunk(k);
                if seen.insert(c.id) {
                    chunks.push((c.id.to_hex(), c.len));
                }
            }
        }
        Some(Profile {
            version: 1,
            manifest_digest: image.manifest_digest.clone(),
            file_index: image.file_index.clone(),
            files,
            chunks,
        })
    }

    /// The chunks to fetch, skipping any entry that is not a well-formed id.
    pub fn chunk_refs(&self) -> Vec<ChunkRef> {
        self.chunks
            .iter()
            .filter_map(|(hex, len)| {
                ChunkId::from_hex(hex)
                    .ok()
                    .map(|id| ChunkRef { id, len: *len })
            })
            .collect()
    }
}

fn pointer_path(store: &Store, manifest_digest: &str) -> PathBuf {
    let hex = manifest_digest
        .rsplit(':')
        .next()
        .unwrap_or(manifest_digest);
    store.root().join("profiles").join(hex)
}

/// Stores `profile` and makes it the image's profile. Returns the object key.
pub fn save_profile(store: &Store, profile: &Profile) -> Result<String> {
    let bytes = serde_json::to_vec(profile).map_err(|e| LazyError::Io {
        what: "encoding the prefetch profile".into(),
        error: e.into(),
    })?;
    // The writer lock keeps a concurrent gc from removing the new object's chunks before the
    // pointer names it.
    let _lock = store.writer_lock()?;
    let key = store.put_object(PROFILE_MEDIA_TYPE, &bytes)?;
    store.sync()?;
    let path = pointer_path(store, &profile.manifest_digest);
    let io = |what: &str, source| LazyError::Io {
        what: format!("{what} {}", path.display()),
        error: source,
    };
    let dir = path.parent().unwrap_or(store.root());
    std::fs::create_dir_all(dir).map_err(|e| io("creating the folder of", e))?;
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    std::fs::write(&tmp, format!("{key}\n")).map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io("replacing", e))?;
    Ok(key)
}

/// The image's profile, if one was saved and its object is still in the store.
pub fn load_profile(store: &Store, manifest_digest: &str) -> Result<Option<Profile>> {
    let path = pointer_path(store, manifest_digest);
    let key = match std::fs::read_to_string(&path) {
        Ok(k) => k.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LazyError::Io {
                what: format!("reading {}", path.display()),
                error: source,
            });
        }
    };
    let bytes = match store.read_blob(&key) {
        Ok(b) => b,
        Err(fd_node::NodeError::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let profile: Profile = serde_json::from_slice(&bytes).map_err(|e| LazyError::BadProfile {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    if profile.version != 1 {
        return Err(LazyError::BadProfile {
            key,
            reason: format!("version {} is not 1", profile.version),
        });
    }
    Ok(Some(profile))
}

/// Starts the background prefetch; the threads end when done or when the mount stops.
pub(crate) fn start_prefetch(
    shared: &Arc<Shared>,
    mode: Prefetch,
    profile: Option<&Profile>,
) -> Vec<std::thread::JoinHandle<()>> {
    if mode == Prefetch::None {
        return Vec::new();
    }
    // Only chunks of this image: a profile is a hint, never a way to fetch something else.
    let all = shared.tree.all_chunks();
    let in_image: HashSet<ChunkId> = all.iter().map(|c| c.id).collect();
    let mut queued = HashSet::new();
    let mut queue: Vec<ChunkRef> = profile
        .map(Profile::chunk_refs)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| in_image.contains(&c.id) && queued.insert(c.id))
        .collect();
    let from_profile = queue.len();
    if mode == Prefetch::All {
        queue.extend(all.into_iter().filter(|c| queued.insert(c.id)));
    }
    if queue.is_empty() {
        return Vec::new();
    }
    tracing::debug!(chunks = queue.len(), from_profile, "prefetch starting");
    let job = Arc::new(PrefetchJob {
        queue,
        next: AtomicUsize::new(0),
        fetched: AtomicUsize::new(0),
        failures_in_a_row: AtomicUsize::new(0),
        started: Instant::now(),
        running: AtomicUsize::new(PREFETCH_THREADS),
    });
    (0..PREFETCH_THREADS)
        .filter_map(|n| {
            let shared = shared.clone();
            let job = job.clone();
            std::thread::Builder::new()
                .name(format!("fd-prefetch-{n}"))
                .spawn(move || job.run(&shared))
                .map_err(|e| tracing::warn!(error = %e, "cannot start a prefetch thread"))
                .ok()
        })
        .collect()
}

struct PrefetchJob {
    queue: Vec<ChunkRef>,
    next: AtomicUsize,
    fetched: AtomicUsize,
    failures_in_a_row: AtomicUsize,
    started: Instant,
    running: AtomicUsize,
}

impl PrefetchJob {
    fn run(&self, shared: &Shared) {
        while !shared.stopping.load(Ordering::Relaxed) {
            if self.failures_in_a_row.load(Ordering::Relaxed) >= MAX_FAILURES_IN_A_ROW {
                break;
            }
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(c) = self.queue.get(k) else { break };
            match shared.fetcher.ensure_local(&c.id, c.len) {
                Ok(fetched) => {
                    self.failures_in_a_row.store(0, Ordering::Relaxed);
                    if fetched {
                        self.fetched.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    let n = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::debug!(chunk = %c.id.short(), error = %e, "prefetch of a chunk failed");
                    if n == MAX_FAILURES_IN_A_ROW {
                        tracing::warn!(error = %e, "prefetch stopped: {n} chunks in a row could not be fetched");
                    }
                }
            }
        }
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            tracing::info!(
                fetched = self.fetched.load(Ordering::Relaxed),
                queued = self.queue.len(),
                ms = self.started.elapsed().as_millis() as u64,
                "prefetch finished"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_keeps_first_read_order_once() {
        let r = Recorder::new(10);
        for i in [3, 1, 3, 7, 1, 0] {
            r.note_read(i);
        }
        r.note_read(99);
        assert_eq!(r.order(), vec![3, 1, 7, 0]);
    }

    #[test]
    fn profile_round_trips_through_the_store() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| LazyError::Io {
            what: "tempdir".into(),
            error: e,
        })?;
        let store = Store::open(dir.path())?;
        let id = ChunkId::of(b"x");
        let profile = Profile {
            version: 1,
            manifest_digest: "sha256:abcd".into(),
            file_index: "blake3:ef".into(),
            files: vec!["/bin/sh".into()],
            chunks: vec![(id.to_hex(), 1), ("not hex".into(), 3)],
        };
        assert_eq!(load_profile(&store, "sha256:abcd")?, None);
        let key = save_profile(&store, &profile)?;
        assert!(key.starts_with("blake3:"));
        assert_eq!(
            store.blob(&key)?.map(|(_, m)| m),
            Some(PROFILE_MEDIA_TYPE.to_string())
        );
        let back = load_profile(&store, "sha256:abcd")?;
        assert_eq!(back.as_ref(), Some(&profile));
        assert_eq!(
            back.map(|p| p.chunk_refs()),
            Some(vec![ChunkRef { id, len: 1 }])
        );
        assert!(dir.path().join("profiles/abcd").is_file());
        Ok(())
    }
}
