//! The fetch policy: where a chunk comes from when a reader needs one the store lacks.
//!
//! A [`Fetcher`] answers a chunk from the local store first, then asks its [`ChunkSource`]s in
//! order. Every answer is checked against the chunk id (BLAKE3 of the bytes) and length before
//! anyone sees it, so a source never has to be trusted: a corrupt answer is dropped, that source
//! is marked down for a while, and the next one is asked. What a source gives is written to the
//! store, so each chunk crosses the network at most once per machine.
//!
//! Many readers often want one chunk at the same moment (a lazily mounted file read by several
//! processes, a prefetch racing a read). Only one fetch per chunk is ever in flight: the first
//! caller leads, later callers wait for its answer ("single flight").
//!
//! Waiting is bounded. Each source is asked on a helper thread and given only what is left of
//! the caller's time budget ([`FetchPolicy::timeout`]), so a source that never answers costs
//! at most that long; the error then names the chunk and what every source said.
//!
//! Sources are deliberately narrow (a name and "give me this chunk") so that peers and
//! upstream registries can be added without touching the policy. [`StoreSource`] is the first:
//! another fd store on this machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fd_chunker::ChunkId;

use crate::{NodeError, Result, Store};

/// Somewhere a chunk can come from. Implementations need not verify what they return: the
/// [`Fetcher`] checks every answer against the id.
pub trait ChunkSource: Send + Sync {
    /// A short name for logs and error messages (e.g. a store path or a peer id).
    fn name(&self) -> String;
    /// The bytes of chunk `id`, which is `len` bytes long. [`NodeError::Missing`] means "I do
    /// not have it" (not a fault); any other error counts against the source.
    fn fetch(&self, id: &ChunkId, len: u32) -> Result<Vec<u8>>;
}

/// Time limits of a [`Fetcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Longest a caller waits for one chunk, over all sources together.
    pub timeout: Duration,
    /// How long a source that gave a corrupt answer, failed, or did not answer in time is
    /// tried only after the others.
    pub down_for: Duration,
}

impl FetchPolicy {
    /// The default total wait per chunk.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
    /// Variable that overrides [`FetchPolicy::timeout`], in milliseconds (tests use it to
    /// make failures quick).
    pub const TIMEOUT_ENV: &'static str = "FD_FETCH_TIMEOUT_MS";

    /// The defaults, with the timeout taken from `FD_FETCH_TIMEOUT_MS` when it is set to a
    /// number.
    pub fn from_env() -> FetchPolicy {
        let mut policy = FetchPolicy::default();
        if let Some(ms) = std::env::var(Self::TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            policy.timeout = Duration::from_millis(ms);
        }
        policy
    }
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            timeout: Self::DEFAULT_TIMEOUT,
            down_for: Duration::from_secs(30),
        }
    }
}

/// Counters of what a [`Fetcher`] did, for status lines and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Chunks answered from the local store.
    pub local: u64,
    /// Chunks fetched from a source (each counted once, however many callers waited).
    pub fetched: u64,
    /// Bytes of those chunks.
    pub fetched_bytes: u64,
    /// Callers that waited for a fetch another caller had started.
    pub joined: u64,
    /// Answers dropped because they did not match the chunk id.
    pub corrupt: u64,
    /// Chunks no source could provide in time.
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    local: AtomicU64,
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    joined: AtomicU64,
    corrupt: AtomicU64,
    failed: AtomicU64,
}

struct SourceSlot {
    source: Arc<dyn ChunkSource>,
    name: String,
    /// Until when the source is tried last, and why.
    down: Mutex<Option<(Instant, String)>>,
}

impl SourceSlot {
    fn down_reason(&self, now: Instant) -> Option<String> {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.as_ref()
            .filter(|(until, _)| *until > now)
            .map(|(_, why)| why.clone())
    }

    fn mark_down(&self, until: Instant, why: &str) {
        tracing::warn!(source = %self.name, reason = why, "chunk source marked down");
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = Some((until, why.to_string()));
    }
}

/// The answer of one fetch, shared with everyone who waited for it.
type Shared = std::result::Result<Arc<Vec<u8>>, String>;

/// One fetch in flight; waiters sleep on `ready` until `result` is set.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Shared>>,
    ready: Condvar,
}

/// Gets chunks: local store first, then sources, one fetch per chunk in flight. See the
/// module docs. Share it between threads by reference or in an `Arc`.
pub struct Fetcher {
    store: Arc<Store>,
    sources: Vec<SourceSlot>,
    inflight: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    policy: FetchPolicy,
    counters: Counters,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("store", &self.store.root())
            .field(
                "sources",
                &self.sources.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("policy", &self.policy)
            .finish()
    }
}

impl Fetcher {
    /// A fetcher that stores what it fetches in `store` and asks `sources` in this order.
    pub fn new(store: Arc<Store>, sources: Vec<Arc<dyn ChunkSource>>, policy: FetchPolicy) -> Self {
        let sources = sources
            .into_iter()
            .map(|source| SourceSlot {
                name: source.name(),
                source,
                down: Mutex::new(None),
            })
            .collect();
        Fetcher {
            store,
            sources,
            inflight: Mutex::new(HashMap::new()),
            policy,
            counters: Counters::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn policy(&self) -> FetchPolicy {
        self.policy
    }

    /// Names of the sources, in the order they are asked.
    pub fn source_names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name.clone()).collect()
    }

    pub fn stats(&self) -> FetchStats {
        let c = &self.counters;
        FetchStats {
            local: c.local.load(Ordering::Relaxed),
            fetched: c.fetched.load(Ordering::Relaxed),
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            joined: c.joined.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Makes sure the chunk is in the local store, fetching it if needed; returns true when it
    /// had to be fetched. Cheaper than [`Fetcher::get`] for a chunk already local (one `stat`).
    pub fn ensure_local(&self, id: &ChunkId, len: u32) -> Result<bool> {
        if self.store.has_chunk(id, len) {
            return Ok(false);
        }
        let before = self.counters.fetched.load(Ordering::Relaxed);
        self.get(id, len)?;
        Ok(self.counters.fetched.load(Ordering::Relaxed) != before)
    }

    /// The verified bytes of chunk `id` (`len` bytes long).
    pub fn get(&self, id: &ChunkId, len: u32) -> Result<Arc<Vec<u8>>> {
        if let Some(data) = self.read_local(id, len) {
            self.counters.local.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::new(data));
        }
        let started = Instant::now();
        let (flight, leader) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(id) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Arc::new(Flight::default());
                    inflight.insert(*id, f.clone());
                    (f, true)
                }
            }
        };
        if leader {
            self.lead(id, len, &flight)
        } else {
            self.counters.joined.fetch_add(1, Ordering::Relaxed);
            self.wait(id, &flight, started)
        }
    }

    /// Fetches for everyone waiting on `flight`, then publishes the answer.
    fn lead(&self, id: &ChunkId, len: u32, flight: &Arc<Flight>) -> Result<Arc<Vec<u8>>> {
        // Clears the flight even if a source panics, so waiters get an answer and later
        // callers can try again.
        struct Publish<'a> {
            fetcher: &'a Fetcher,
            id: ChunkId,
            flight: &'a Flight,
            result: Option<Shared>,
        }
        impl Drop for Publish<'_> {
            fn drop(&mut self) {
                let result = self
                    .result
                    .take()
                    .unwrap_or_else(|| Err("the fetch was abandoned".into()));
                *self.flight.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
                self.flight.ready.notify_all();
                let mut inflight = self
                    .fetcher
                    .inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                inflight.remove(&self.id);
            }
        }
        let mut publish = Publish {
            fetcher: self,
            id: *id,
            flight,
            result: None,
        };

        // Another leader may have finished between our local check and taking the lead.
        let result = match self.read_local(id, len) {
            Some(data) => {
                self.counters.local.fetch_add(1, Ordering::Relaxed);
                Ok(Arc::new(data))
            }
            None => self.fetch_from_sources(id, len).map(Arc::new),
        };
        publish.result = Some(match &result {
            Ok(data) => Ok(data.clone()),
            Err(e) => Err(e.to_string()),
        });
        drop(publish);
        result
    }

    fn wait(&self, id: &ChunkId, flight: &Flight, started: Instant) -> Result<Arc<Vec<u8>>> {
        // The leader gives up within the same budget; the margin covers its bookkeeping.
        let deadline = started + self.policy.timeout + Duration::from_millis(100);
        let mut result = flight.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(answer) = result.as_ref() {
                return answer.clone().map_err(|reasons| NodeError::Unavailable {
                    what: chunk_what(id),
                    reasons,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NodeError::Unavailable {
                    what: chunk_what(id),
                    reasons: format!(
                        "waited {} ms for a fetch already in flight",
                        self.policy.timeout.as_millis()
                    ),
                });
            }
            result = flight
                .ready
                .wait_timeout(result, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Reads a local chunk; None when it is absent, short, or corrupt (a corrupt file is
    /// removed so the fetched copy can take its place).
    fn read_local(&self, id: &ChunkId, len: u32) -> Option<Vec<u8>> {
        let path = self.store.chunk_path(id);
        let data = std::fs::read(&path).ok()?;
        if data.len() != len as usize {
            return None;
        }
        if ChunkId::of(&data) != *id {
            tracing::warn!(chunk = %id.short(), path = %path.display(), "removing corrupt chunk file");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(data)
    }

    fn fetch_from_sources(&self, id: &ChunkId, len: u32) -> Result<Vec<u8>> {
        let started = Instant::now();
        let deadline = started + self.policy.timeout;
        if self.sources.is_empty() {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(NodeError::Unavailable {
                what: chunk_what(id),
                reasons: "not in the local store and no other source is configured".into(),
            });
        }
        // Sources marked down go last: still worth a try when nothing else has the chunk.
        let mut order: Vec<(&SourceSlot, Option<String>)> = self
            .sources
            .iter()
            .map(|s| (s, s.down_reason(started)))
            .collect();
        order.sort_by_key(|(_, down)| down.is_some());

        let mut reasons = Vec::new();
        for (slot, down) in order {
            let now = Instant::now();
            if now >= deadline {
                reasons.push(format!("{}: not asked, time limit reached", slot.name));
                continue;
            }
            let remaining = deadline - now;
            let outcome = match ask(slot, id, len, remaining) {
                Ok(data) if data.len() != len as usize => Err((
                    format!("answered {} bytes instead of {len}", data.len()),
                    true,
                )),
                Ok(data) if ChunkId::of(&data) != *id => {
                    self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    Err((
                        "answered bytes that do not match the chunk id".to_string(),
                        true,
                    ))
                }
                Ok(data) => Ok(data),
                Err(AskError::Missing) => Err(("does not have it".to_string(), false)),
                Err(AskError::Failed(e)) => Err((e, true)),
                Err(AskError::TimedOut) => Err((
                    format!("no answer within {} ms", remaining.as_millis()),
                    true,
                )),
            };
            match outcome {
                Ok(data) => {
                    if let Err(e) = self.store.put_chunk(id, &data) {
                        // The caller still gets the verified bytes; only the copy is lost.
                        tracing::warn!(chunk = %id.short(), error = %e, "cannot store fetched chunk");
                    }
                    self.counters.fetched.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .fetched_bytes
                        .fetch_add(u64::from(len), Ordering::Relaxed);
                    tracing::debug!(chunk = %id.short(), source = %slot.name, len,
                        ms = started.elapsed().as_millis() as u64, "fetched chunk");
                    return Ok(data);
                }
                Err((why, counts_against)) => {
                    if counts_against {
                        slot.mark_down(Instant::now() + self.policy.down_for, &why);
                    }
                    let why = match down {
                        Some(earlier) if counts_against => {
                            format!("{why} (down before: {earlier})")
                        }
                        _ => why,
                    };
                    reasons.push(format!("{}: {why}", slot.name));
                }
            }
        }
        self.counters.failed.fetch_add(1, Ordering::Relaxed);
        Err(NodeError::Unavailable {
            what: chunk_what(id),
            reasons: reasons.join("; "),
        })
    }
}

fn chunk_what(id: &ChunkId) -> String {
    format!("chunk {}", id.to_hex())
}

enum AskError {
    Missing,
    Failed(String),
    TimedOut,
}

/// Asks one source on a helper thread so a source that hangs costs at most `limit`. A thread
/// left behind by a timeout finishes on its own; its answer is dropped.
fn ask(
    slot: &SourceSlot,
    id: &ChunkId,
    len: u32,
    limit: Duration,
) -> std::result::Result<Vec<u8>, AskError> {
    let (tx, rx) = mpsc::sync_channel(1);
    let source = slot.source.clone();
    let id = *id;
    let spawned = std::thread::Builder::new()
        .name("fd-fetch".into())
        .spawn(move || {
            let _ = tx.send(source.fetch(&id, len));
        });
    if let Err(e) = spawned {
        return Err(AskError::Failed(format!(
            "cannot start a fetch thread: {e}"
        )));
    }
    match rx.recv_timeout(limit) {
        Ok(Ok(data)) => Ok(data),
        Ok(Err(NodeError::Missing { .. })) => Err(AskError::Missing),
        Ok(Err(e)) => Err(AskError::Failed(e.to_string())),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(AskError::TimedOut),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(AskError::Failed("the fetch thread panicked".into()))
        }
    }
}

/// Another fd store on this machine (another `FD_HOME`) as a chunk source.
#[derive(Debug)]
pub struct StoreSource {
    store: Store,
    root: PathBuf,
}

impl StoreSource {
    /// Opens the store at `root`, which must already exist (it is never created here).
    pub fn open(root: impl AsRef<Path>) -> Result<StoreSource> {
        let root = root.as_ref().to_path_buf();
        if !root.join("fd.db").is_file() {
            return Err(NodeError::StoreUnusable {
                path: root,
                reason: "no fd store here (no fd.db)".into(),
            });
        }
        Ok(StoreSource {
            store: Store::open(&root)?,
            root,
        })
    }

    /// The store, for reading its images and metadata.
    pub fn store(&self) -> &Store {
        &self.store
    }
}

impl ChunkSource for StoreSource {
    fn name(&self) -> String {
        format!("store {}", self.root.display())
    }

    fn fetch(&self, id: &ChunkId, _len: u32) -> Result<Vec<u8>> {
        // No hashing here: the fetcher verifies every answer anyway.
        match std::fs::read(self.store.chunk_path(id)) {
            Ok(data) => Ok(data),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(NodeError::Missing {
                what: chunk_what(id),
            }),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::sync::atomic::AtomicUsize;

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path().join("fd")).expect("open store"));
        (dir, store)
    }

    fn chunk(seed: u8, len: usize) -> (ChunkId, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        (ChunkId::of(&data), data)
    }

    fn policy(ms: u64) -> FetchPolicy {
        FetchPolicy {
            timeout: Duration::from_millis(ms),
            down_for: Duration::from_secs(60),
        }
    }

    /// A source that counts requests, optionally sleeps, and answers from a map (possibly
    /// with wrong bytes).
    struct Fake {
        name: &'static str,
        chunks: HashMap<ChunkId, Vec<u8>>,
        delay: Duration,
        corrupt: bool,
        calls: AtomicUsize,
    }

    impl Fake {
        fn new(name: &'static str, chunks: &[(ChunkId, Vec<u8>)]) -> Fake {
            Fake {
                name,
                chunks: chunks.iter().cloned().collect(),
                delay: Duration::ZERO,
                corrupt: false,
                calls: AtomicUsize::new(0),
            }
        }
    }

    impl ChunkSource for Fake {
        fn name(&self) -> String {
            self.name.into()
        }
        fn fetch(&self, id: &ChunkId, _len: u32) -> Result<Vec<u8>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            let mut data = self
                .chunks
                .get(id)
                .cloned()
                .ok_or_else(|| NodeError::Missing {
                    what: "chunk".into(),
                })?;
            if self.corrupt {
                data[0] ^= 0xff;
            }
            Ok(data)
        }
    }

    #[test]
    fn local_chunk_needs_no_source() -> Result<()> {
        let (_d, store) = store();
        let (id, data) = chunk(1, 5000);
        store.put_chunk(&id, &data)?;
        let fake = Arc::new(Fake::new("fake", &[]));
        let f = Fetcher::new(store, vec![fake.clone()], policy(1000));
        assert_eq!(*f.get(&id, 5000)?, data);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
        assert_eq!(f.stats().local, 1);
        Ok(())
    }

    #[test]
    fn many_readers_cause_one_fetch() -> Result<()> {
        let (_d, store) = store();
        let (id, data) = chunk(2, 70_000);
        let mut fake = Fake::new("slow", &[(id, data.clone())]);
        fake.delay = Duration::from_millis(200);
        let fake = Arc::new(fake);
        let f = Fetcher::new(store.clone(), vec![fake.clone()], policy(5000));
        let barrier = Barrier::new(16);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        f.get(&id, 70_000)
                    })
                })
                .collect();
            for h in handles {
                let got = h.join().expect("reader thread").expect("chunk");
                assert_eq!(*got, data);
            }
        });
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            1,
            "one fetch for 16 readers"
        );
        let stats = f.stats();
        assert_eq!(stats.fetched, 1);
        assert_eq!(stats.joined + stats.local, 15);
        assert!(store.has_chunk(&id, 70_000), "the fetched chunk is stored");
        assert_eq!(store.read_chunk(&id)?, data);
        Ok(())
    }

    #[test]
    fn corrupt_source_is_skipped_and_marked_down() -> Result<()> {
        let (_d, store) = store();
        let (id, data) = chunk(3, 1000);
        let (id2, data2) = chunk(4, 1000);
        let mut bad = Fake::new("bad", &[(id, data.clone()), (id2, data2.clone())]);
        bad.corrupt = true;
        let bad = Arc::new(bad);
        let good = Arc::new(Fake::new(
            "good",
            &[(id, data.clone()), (id2, data2.clone())],
        ));
        let f = Fetcher::new(store.clone(), vec![bad.clone(), good.clone()], policy(2000));
        assert_eq!(*f.get(&id, 1000)?, data);
        assert_eq!(bad.calls.load(Ordering::SeqCst), 1);
        assert_eq!(good.calls.load(Ordering::SeqCst), 1);
        assert_eq!(f.stats().corrupt, 1);
        assert_eq!(
            store.read_chunk(&id)?,
            data,
            "only the verified bytes are stored"
        );

        // Marked down: the good source is asked first now.
        assert_eq!(*f.get(&id2, 1000)?, data2);
        assert_eq!(bad.calls.load(Ordering::SeqCst), 1);
        assert_eq!(good.calls.load(Ordering::SeqCst), 2);
        Ok(())
    }

    #[test]
    fn all_sources_failing_is_a_bounded_error_naming_each() -> Result<()> {
        let (_d, store) = store();
        let (id, data) = chunk(5, 1000);
        let mut stuck = Fake::new("stuck", &[(id, data.clone())]);
        stuck.delay = Duration::from_secs(5);
        let mut corrupt = Fake::new("corrupt", &[(id, data)]);
        corrupt.corrupt = true;
        let empty = Fake::new("empty", &[]);
        let f = Fetcher::new(
            store.clone(),
            vec![Arc::new(corrupt), Arc::new(empty), Arc::new(stuck)],
            policy(300),
        );
        let started = Instant::now();
        let err = match f.get(&id, 1000) {
            Ok(_) => panic!("no source can give this chunk"),
            Err(e) => e.to_string(),
        };
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "bounded wait, took {took:?}"
        );
        assert!(err.contains(&id.to_hex()), "{err}");
        assert!(
            err.contains("corrupt: answered bytes that do not match"),
            "{err}"
        );
        assert!(err.contains("empty: does not have it"), "{err}");
        assert!(err.contains("stuck: no answer within"), "{err}");
        assert!(!store.has_chunk(&id, 1000));
        assert_eq!(f.stats().failed, 1);
        Ok(())
    }

    #[test]
    fn no_sources_fails_at_once() {
        let (_d, store) = store();
        let (id, _) = chunk(6, 10);
        let f = Fetcher::new(store, vec![], policy(10_000));
        let started = Instant::now();
        assert!(matches!(f.get(&id, 10), Err(NodeError::Unavailable { .. })));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn waiters_share_a_failure() {
        let (_d, store) = store();
        let (id, _) = chunk(7, 10);
        let mut slow_empty = Fake::new("slow-empty", &[]);
        slow_empty.delay = Duration::from_millis(150);
        let slow_empty = Arc::new(slow_empty);
        let f = Fetcher::new(store, vec![slow_empty.clone()], policy(2000));
        std::thread::scope(|s| {
            let a = s.spawn(|| f.get(&id, 10).is_err());
            let b = s.spawn(|| f.get(&id, 10).is_err());
            assert!(a.join().expect("thread a"));
            assert!(b.join().expect("thread b"));
        });
        assert_eq!(slow_empty.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn store_source_serves_another_store() -> Result<()> {
        let (_d1, a) = store();
        let (_d2, b) = store();
        let (id, data) = chunk(8, 20_000);
        a.put_chunk(&id, &data)?;
        let src = Arc::new(StoreSource::open(a.root())?);
        let f = Fetcher::new(b.clone(), vec![src], policy(2000));
        assert!(f.ensure_local(&id, 20_000)?);
        assert!(!f.ensure_local(&id, 20_000)?, "second time it is local");
        assert_eq!(b.read_chunk(&id)?, data);
        let missing = ChunkId::of(b"nobody has this");
        let err = f
            .get(&missing, 15)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("does not have it"), "{err}");
        Ok(())
    }

    #[test]
    fn store_source_refuses_a_directory_without_a_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(StoreSource::open(dir.path()).is_err());
        assert!(!dir.path().join("fd.db").exists(), "nothing was created");
    }

    #[test]
    fn corrupt_local_chunk_is_refetched() -> Result<()> {
        let (_d, store) = store();
        let (id, data) = chunk(9, 4096);
        let mut wrong = data.clone();
        wrong[10] ^= 1;
        std::fs::create_dir_all(store.chunk_path(&id).parent().expect("parent"))?;
        std::fs::write(store.chunk_path(&id), &wrong)?;
        let fake = Arc::new(Fake::new("fake", &[(id, data.clone())]));
        let f = Fetcher::new(store.clone(), vec![fake], policy(2000));
        assert_eq!(*f.get(&id, 4096)?, data);
        assert_eq!(store.read_chunk(&id)?, data);
        Ok(())
    }
}
