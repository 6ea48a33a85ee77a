//! The asking side: rebuild blobs and single chunks from team peers, verified.
//!
//! A blob's holders are found by asking every connected peer `Have` at once, its chunk list
//! learned with `Recipe`, and its chunks fetched in batches with `Chunks` by [`gather`], which
//! keeps several batches in flight over every peer that can answer:
//!
//! - **spread**: each batch goes to the eligible peer with the fewest requests in flight (then
//!   the best ranked), at most [`PER_PEER_IN_FLIGHT`] per peer counted over the whole process
//!   (every layer of a pull and every lazy read share them), so a fast peer naturally takes
//!   more batches, no single peer carries a whole fleet, and one process never runs into the
//!   peer's upload cap by itself;
//! - **hedged**: a batch still unanswered after a few times the typical batch time is asked
//!   again of another peer; the first verified answer wins;
//! - **serve while fetching**: peers that do not hold the whole blob (another node still
//!   pulling it) are asked when the holders are busy; whatever verified chunks they already
//!   have count, misses make them wait longer before the next try;
//! - **verified**: every answer is checked group by group ([`proto::verify_answer`]); a bad
//!   group ends that answer, lowers the peer's rank and excludes it for the rest of the blob.
//!
//! Verified chunks go into the store at once, and the blob's bytes are written strictly in
//! order, so whatever was written is a prefix the caller can resume from (the registry client
//! resumes a partial download with a Range request); batches fetched ahead of the write
//! position are bounded ([`WINDOW_BATCHES`]) to bound memory. The blob's own digest is checked
//! by the caller, as for any download.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use fd_chunker::ChunkId;
use fd_node::fetch::ChunkSource;
use fd_node::{NodeError, Store};
use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::PeerId;

use crate::net::PeerNet;
use crate::proto::{self, ChunkWant, MAX_CHUNKS_PER_REQUEST, Request, Response};
use crate::{P2pError, Result};

/// Bytes asked for in one `Chunks` request at most (besides the protocol's count limit). Small
/// enough that several batches of one layer are in flight at once and a hedged batch costs
/// little, large enough that per-request overhead stays small.
const MAX_BATCH_BYTES: u64 = 2 << 20;
/// Batch requests this process has in flight to one peer at most: four hide the round trip
/// and the peer's disk and hashing time; they are a quarter of a node's default upload cap
/// ([`crate::NetConfig::max_uploads`]), which leaves room for lazy single-chunk reads and for
/// other askers, so one asker alone is never answered `Busy`.
pub const PER_PEER_IN_FLIGHT: usize = 4;

/// Requests this process has in flight to each peer, over every blob and every lazy read:
/// spreading and the per-peer cap look at the whole process, not one blob.
static IN_FLIGHT: std::sync::LazyLock<std::sync::Mutex<HashMap<PeerId, usize>>> =
    std::sync::LazyLock::new(Default::default);

fn in_flight_map() -> std::sync::MutexGuard<'static, HashMap<PeerId, usize>> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Requests in flight to `peer` from this process.
fn in_flight(peer: &PeerId) -> usize {
    in_flight_map().get(peer).copied().unwrap_or(0)
}

/// One request in flight, counted in [`IN_FLIGHT`] until dropped.
struct Slot(PeerId);

impl Slot {
    fn take(peer: PeerId) -> Slot {
        *in_flight_map().entry(peer).or_default() += 1;
        Slot(peer)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut map = in_flight_map();
            if let Some(n) = map.get_mut(&self.0) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.0);
                }
            }
        }
        SLOT_FREED.notify_waiters();
    }
}

/// Woken whenever a [`Slot`] ends: a blob waiting only for a peer's slot asks again.
static SLOT_FREED: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// Batches fetched ahead of the write position at most (each up to [`MAX_BATCH_BYTES`]).
pub const WINDOW_BATCHES: usize = 16;
/// A batch unanswered after this many times the typical batch time is hedged to another peer.
const HEDGE_FACTOR: u32 = 3;
/// Never hedge sooner than this: below it a duplicate costs more than the wait.
const HEDGE_FLOOR: Duration = Duration::from_millis(300);
/// Hedge delay before any batch time was measured.
const HEDGE_INITIAL: Duration = Duration::from_secs(1);
/// How often in-flight batches are checked for hedging.
const HEDGE_TICK: Duration = Duration::from_millis(50);
/// How many `Busy` answers a batch takes from one peer before that peer is given up for it.
const MAX_BUSY_ROUNDS: u32 = 200;
/// Pause before asking a peer again after it answered `Busy`.
const BUSY_PAUSE: Duration = Duration::from_millis(100);
/// Longest wait for one `Have` answer when looking for holders.
const HAVE_TIMEOUT: Duration = Duration::from_secs(3);
/// Back-off step for a peer that does not hold the blob after it had none of a batch.
const MISS_BACKOFF: Duration = Duration::from_millis(250);
/// Longest back-off for such a peer.
const MISS_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What a blob fetch from peers achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobFromPeers {
    /// Verified bytes that came over the network from peers.
    pub bytes_from_peers: u64,
    /// Bytes written to the destination (a prefix of the blob).
    pub written: u64,
    /// True when the whole blob was written.
    pub complete: bool,
}

/// The connected peers that hold blob `key`, best ranked first, all asked at once.
pub async fn find_holders(net: &PeerNet, key: &str) -> Vec<PeerId> {
    // The team DHT is asked at the same time as the connected peers. It may name holders
    // this node is not connected to (they are dialed). When a connected peer already holds
    // the blob, the lookup is used only if it has already finished: every blob of a cold
    // start goes through here, and a wait here would be paid by each of them.
    const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
    let lookup = net.providers(key, LOOKUP_TIMEOUT);
    tokio::pin!(lookup);
    let candidates = net.candidates();
    // join_all keeps the candidates' order, which is the rank order.
    let asks = futures::future::join_all(candidates.iter().map(|&p| holds(net, p, key)));
    tokio::pin!(asks);
    let (answers, providers) = tokio::select! {
        answers = &mut asks => (answers, None),
        found = &mut lookup => (asks.await, Some(found)),
    };
    let mut holders: Vec<PeerId> = answers.into_iter().flatten().collect();
    let providers = match providers {
        Some(found) => found,
        None if holders.is_empty() => lookup.await,
        None => futures::FutureExt::now_or_never(lookup).unwrap_or_default(),
    };
    // A provider record is only a claim, and anyone who can connect may make one: the
    // providers not asked yet are asked like the others, which also checks they are of the
    // team. They come after the connected holders, whose rank is known.
    let new = providers.into_iter().filter(|p| !candidates.contains(p));
    let confirmed = futures::future::join_all(new.map(|p| holds(net, p, key))).await;
    for peer in confirmed.into_iter().flatten() {
        if !holders.contains(&peer) {
            tracing::debug!(%peer, key, "holder found through the DHT");
            holders.push(peer);
        }
    }
    holders
}

/// `Some(peer)` when `peer` answers that it holds blob `key`.
async fn holds(net: &PeerNet, peer: PeerId, key: &str) -> Option<PeerId> {
    let have = tokio::time::timeout(
        HAVE_TIMEOUT,
        net.request(
            peer,
            Request::Have {
                keys: vec![key.to_string()],
            },
        ),
    )
    .await;
    match have {
        Ok(Ok(Response::Have { keys })) if keys.iter().any(|k| k == key) => Some(peer),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "Have failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "Have timed out");
            None
        }
    }
}

/// Finds the holders of `key` and the recipe of one of them, best ranked first. With `size`,
/// a recipe of any other total size is ignored.
pub async fn find_recipe(
    net: &PeerNet,
    key: &str,
    size: Option<u64>,
) -> Option<(Vec<PeerId>, proto::RecipeAnswer)> {
    let holders = find_holders(net, key).await;
    for &peer in &holders {
        match net
            .request(
                peer,
                Request::Recipe {
                    key: key.to_string(),
                },
            )
            .await
        {
            Ok(Response::Recipe(Some(r))) => {
                let total: u64 = r.chunks.iter().map(|(_, l)| u64::from(*l)).sum();
                if size.is_some_and(|s| s != total) {
                    tracing::warn!(%peer, key, total, "peer's recipe has the wrong size");
                    continue;
                }
                return Some((holders, r));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "Recipe failed"),
        }
    }
    None
}

/// One batch of consecutive chunks of the recipe.
struct Batch {
    /// Index of its first chunk in the recipe.
    first: usize,
    /// The chunks' bytes, filled as verified answers arrive (or from the store).
    data: Vec<Option<Vec<u8>>>,
    /// Whether the store was asked for its chunks yet ([`load`]).
    loaded: bool,
    /// Peers that lacked part of it, failed it or stayed busy: not asked for it again.
    tried: HashSet<PeerId>,
    /// Peers asked for it right now (two while hedged).
    running: Vec<PeerId>,
    /// When the current attempt was sent (hedging measures from here).
    since: Option<Instant>,
    busy_rounds: u32,
}

impl Batch {
    fn done(&self) -> bool {
        self.data.iter().all(Option::is_some)
    }
}

/// What one gather knows of one peer.
#[derive(Default)]
struct PeerState {
    /// Answered `Have` for the blob (or no holder list was given).
    holder: bool,
    /// Failed a request or sent a bad answer: not asked again for this blob.
    failed: bool,
    /// Answered `Busy`: not asked before this.
    busy_until: Option<Instant>,
    /// Consecutive answers that had none of the chunks asked for.
    misses: u32,
    /// After misses: not asked before this.
    retry_at: Option<Instant>,
}

impl PeerState {
    fn ready(&self, peer: &PeerId, now: Instant) -> bool {
        !self.failed
            && in_flight(peer) < PER_PEER_IN_FLIGHT
            && self.busy_until.is_none_or(|t| now >= t)
            && self.retry_at.is_none_or(|t| now >= t)
    }
}

/// Typical time of one batch, for the hedge delay (moving average).
struct BatchTime(Option<Duration>);

impl BatchTime {
    fn observe(&mut self, took: Duration) {
        self.0 = Some(match self.0 {
            None => took,
            Some(avg) => avg.mul_f64(0.8) + took.mul_f64(0.2),
        });
    }

    fn hedge_after(&self) -> Duration {
        match self.0 {
            None => HEDGE_INITIAL,
            Some(avg) => (avg * HEDGE_FACTOR).max(HEDGE_FLOOR),
        }
    }
}

/// Splits `recipe` into batches bounded in count and bytes. Nothing is read yet: a batch takes
/// what the store has when it comes within the window ([`load`]), so a blob that is mostly
/// stored is never held in memory whole.
fn plan(recipe: &[([u8; 32], u32)]) -> Vec<Batch> {
    let mut batches = Vec::new();
    let mut i = 0;
    while i < recipe.len() {
        let mut end = i;
        let mut bytes = 0u64;
        while end < recipe.len() && end - i < MAX_CHUNKS_PER_REQUEST && bytes < MAX_BATCH_BYTES {
            bytes += u64::from(recipe[end].1);
            end += 1;
        }
        batches.push(Batch {
            first: i,
            data: vec![None; end - i],
            loaded: false,
            tried: HashSet::new(),
            running: Vec::new(),
            since: None,
            busy_rounds: 0,
        });
        i = end;
    }
    batches
}

/// Fills `batch` with the chunks the store already has, once.
fn load(store: &Store, recipe: &[([u8; 32], u32)], batch: &mut Batch) {
    if std::mem::replace(&mut batch.loaded, true) {
        return;
    }
    for (k, slot) in batch.data.iter_mut().enumerate() {
        let (id, len) = recipe[batch.first + k];
        let id = ChunkId(id);
        if slot.is_none() && store.has_chunk(&id, len) {
            *slot = store.read_chunk(&id).ok();
        }
    }
}

/// The best peer to ask for `batch` now: holders before peers still fetching, then fewest
/// requests in flight, then rank (the order of `candidates`).
fn pick(
    candidates: &[PeerId],
    peers: &HashMap<PeerId, PeerState>,
    batch: &Batch,
    now: Instant,
) -> Option<PeerId> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, p)| !batch.tried.contains(p) && !batch.running.contains(p))
        .filter_map(|(order, p)| {
            let s = peers.get(p)?;
            s.ready(p, now)
                .then_some((!s.holder, in_flight(p), order, *p))
        })
        .min()
        .map(|(_, _, _, p)| p)
}

/// One answered request: batch index, peer, the recipe indices asked, the answer, when sent.
type Answer = (usize, PeerId, Vec<usize>, Result<Response>, Instant);

/// Writes the chunks of `recipe` in order into `out`, taking what the store has and asking
/// the connected peers for the rest (any of them may hold some chunks). Returns (bytes
/// written, bytes from peers). Stops early, leaving a verified prefix, when no peer can give
/// the next chunk.
pub async fn gather(
    net: &PeerNet,
    store: &Store,
    recipe: &[([u8; 32], u32)],
    out: &mut (dyn Write + Send),
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(u64, u64)> {
    gather_from(net, store, recipe, None, out, progress).await
}

/// [`gather`] with the peers known to hold the whole blob (`holders`): they are asked first,
/// the other connected peers only when the holders are busy. `None`: every peer is a holder.
pub async fn gather_from(
    net: &PeerNet,
    store: &Store,
    recipe: &[([u8; 32], u32)],
    holders: Option<&[PeerId]>,
    out: &mut (dyn Write + Send),
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(u64, u64)> {
    let mut batches = plan(recipe);
    let mut peers: HashMap<PeerId, PeerState> = HashMap::new();
    let mut requests = FuturesUnordered::new();
    let mut batch_time = BatchTime(None);
    let (mut cursor, mut written, mut from_peers) = (0usize, 0u64, 0u64);

    loop {
        // Write the finished prefix, in order, and free it.
        while cursor < batches.len() && {
            load(store, recipe, &mut batches[cursor]);
            batches[cursor].done()
        } {
            for data in batches[cursor].data.iter_mut() {
                if let Some(data) = data.take() {
                    out.write_all(&data)?;
                    written += data.len() as u64;
                }
                *data = Some(Vec::new());
            }
            cursor += 1;
            progress(written);
        }
        if cursor == batches.len() {
            break;
        }

        // Send what can be sent: new batches within the window, and hedges of slow ones.
        let now = Instant::now();
        let candidates = net.candidates();
        for p in &candidates {
            peers.entry(*p).or_insert_with(|| PeerState {
                holder: holders.is_none_or(|h| h.contains(p)),
                ..Default::default()
            });
        }
        let hedge_after = batch_time.hedge_after();
        let limit = (cursor + WINDOW_BATCHES).min(batches.len());
        for (index, batch) in batches.iter_mut().enumerate().take(limit).skip(cursor) {
            load(store, recipe, batch);
            if batch.done() {
                continue;
            }
            if !batch.running.is_empty() {
                let slow = batch.since.is_some_and(|t| now - t >= hedge_after);
                if batch.running.len() >= 2 || !slow {
                    continue;
                }
            }
            let Some(peer) = pick(&candidates, &peers, batch, now) else {
                continue;
            };
            let asked: Vec<usize> = (0..batch.data.len())
                .filter(|&i| batch.data[i].is_none())
                .collect();
            let wants: Vec<ChunkWant> = asked
                .iter()
                .map(|&i| {
                    let (id, len) = recipe[batch.first + i];
                    ChunkWant {
                        id,
                        len,
                        range: None,
                    }
                })
                .collect();
            if batch.running.is_empty() {
                batch.since = Some(now);
            } else {
                tracing::debug!(%peer, batch = index, "hedging a slow batch");
            }
            batch.running.push(peer);
            let slot = Slot::take(peer);
            let net = net.clone();
            requests.push(async move {
                let _slot = slot;
                let answer = net.request(peer, Request::Chunks { wants }).await;
                (index, peer, asked, answer, now)
            });
        }

        if requests.is_empty() {
            // Nothing running for this blob. If the next batch to write can still be asked of
            // someone once a pause ends or once another blob's request to that peer ends, wait
            // for that; otherwise no peer can give it: stop at the prefix.
            let batch = &batches[cursor];
            let usable: Vec<(&PeerId, &PeerState)> = candidates
                .iter()
                .filter(|p| !batch.tried.contains(p))
                .filter_map(|p| Some((p, peers.get(p)?)))
                .filter(|(_, s)| !s.failed)
                .collect();
            if usable.is_empty() {
                break;
            }
            let wake = usable
                .iter()
                .filter_map(|(_, s)| s.busy_until.max(s.retry_at))
                .filter(|t| *t > now)
                .min()
                .map_or(HEDGE_TICK, |t| (t - now).min(HEDGE_TICK));
            if usable
                .iter()
                .any(|(p, _)| in_flight(p) >= PER_PEER_IN_FLIGHT)
            {
                let _ = tokio::time::timeout(wake, SLOT_FREED.notified()).await;
            } else {
                tokio::time::sleep(wake).await;
            }
            continue;
        }

        let answered = tokio::select! {
            Some(answer) = requests.next() => answer,
            _ = tokio::time::sleep(HEDGE_TICK) => continue,
        };
        let took = on_answer(
            net,
            store,
            recipe,
            &mut batches,
            &mut peers,
            answered,
            &mut from_peers,
        )?;
        if let Some(took) = took {
            batch_time.observe(took);
        }
    }
    out.flush()?;
    Ok((written, from_peers))
}

/// Takes one answer into its batch. Returns the batch time when the peer gave everything.
fn on_answer(
    net: &PeerNet,
    store: &Store,
    recipe: &[([u8; 32], u32)],
    batches: &mut [Batch],
    peers: &mut HashMap<PeerId, PeerState>,
    (index, peer, asked, answer, sent): Answer,
    from_peers: &mut u64,
) -> Result<Option<Duration>> {
    let now = Instant::now();
    let batch = &mut batches[index];
    batch.running.retain(|p| *p != peer);
    if batch.running.is_empty() {
        batch.since = None;
    }
    let Some(state) = peers.get_mut(&peer) else {
        return Ok(None);
    };
    let mut took = None;
    match answer {
        Ok(Response::Verified(answers)) if answers.len() == asked.len() => {
            batch.busy_rounds = 0;
            let (mut got, mut missing) = (0usize, false);
            for (&i, ans) in asked.iter().zip(answers) {
                let (id, len) = recipe[batch.first + i];
                if ans.want.id != id || ans.want.len != len || ans.want.range.is_some() {
                    // Proven bytes, but of something not asked: the peer is not playing fair.
                    tracing::warn!(%peer, "peer answered for chunks it was not asked");
                    net.penalize(&peer);
                    state.failed = true;
                    return Ok(None);
                }
                if batch.data[i].is_some() {
                    // The other half of a hedge brought it first.
                    continue;
                }
                let Some(data) = ans.data else {
                    missing = true;
                    continue;
                };
                // Proven against the id group by group as it was read (proto::read_verified).
                let data = data.0;
                store.put_chunk(&ChunkId(id), &data)?;
                *from_peers += data.len() as u64;
                net.received(&peer, data.len() as u64, now - sent);
                batch.data[i] = Some(data);
                got += 1;
            }
            if missing {
                // Someone else must give the rest of this batch; a peer that had nothing at
                // all waits longer each time before it is asked again.
                batch.tried.insert(peer);
                if got == 0 {
                    state.misses += 1;
                    let backoff = (MISS_BACKOFF * state.misses).min(MISS_BACKOFF_MAX);
                    state.retry_at = Some(now + backoff);
                } else {
                    state.misses = 0;
                }
            } else {
                state.misses = 0;
                took = Some(now - sent);
            }
        }
        Ok(Response::Busy) => {
            batch.busy_rounds += 1;
            state.busy_until = Some(now + BUSY_PAUSE);
            if batch.busy_rounds > MAX_BUSY_ROUNDS {
                batch.tried.insert(peer);
            }
        }
        Ok(other) => {
            tracing::debug!(%peer, ?other, "unexpected answer to Chunks");
            state.failed = true;
        }
        Err(e) if proto::is_bad_answer(&e) => {
            tracing::warn!(%peer, error = %e, "peer sent a chunk that failed verification");
            net.penalize(&peer);
            state.failed = true;
        }
        Err(e) => {
            tracing::info!(%peer, error = %e, "peer failed; trying others");
            state.failed = true;
        }
    }
    Ok(took)
}

/// Rebuilds blob `key` of `size` bytes from peers into `dest` (replacing its contents).
/// Returns what was achieved; a partial result leaves a verified prefix in `dest`.
pub async fn fetch_blob_to_file(
    net: &PeerNet,
    store: &Store,
    key: &str,
    size: u64,
    dest: &Path,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<BlobFromPeers> {
    let Some((holders, recipe)) = find_recipe(net, key, Some(size)).await else {
        return Ok(BlobFromPeers::default());
    };
    tracing::debug!(
        key,
        holders = holders.len(),
        chunks = recipe.chunks.len(),
        "fetching blob from peers"
    );
    let mut file = std::io::BufWriter::new(fs_err::File::create(dest)?);
    let (written, from_peers) = gather_from(
        net,
        store,
        &recipe.chunks,
        Some(&holders),
        &mut file,
        progress,
    )
    .await?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(BlobFromPeers {
        bytes_from_peers: from_peers,
        written,
        complete: written == size,
    })
}

/// Fetches a small blob (manifest, config) from peers into memory and checks it against its
/// key. Returns the bytes, the media type and the bytes that came from peers.
pub async fn fetch_blob_bytes(
    net: &PeerNet,
    store: &Store,
    key: &str,
    max: u64,
) -> Result<Option<(Vec<u8>, String, u64)>> {
    let Some((holders, recipe)) = find_recipe(net, key, None).await else {
        return Ok(None);
    };
    let total: u64 = recipe.chunks.iter().map(|(_, l)| u64::from(*l)).sum();
    if total > max {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(total as usize);
    let (written, from_peers) = gather_from(
        net,
        store,
        &recipe.chunks,
        Some(&holders),
        &mut bytes,
        &|_| {},
    )
    .await?;
    if written != total || fd_node::store::digest_of(key, &bytes) != key {
        return Ok(None);
    }
    Ok(Some((bytes, recipe.media_type, from_peers)))
}

/// Asks peers, best first, which manifest digest they recorded for `reference`.
pub async fn resolve_tag(net: &PeerNet, reference: &str) -> Option<(PeerId, String)> {
    for peer in net.candidates() {
        if let Ok(Response::Tag(Some(digest))) = net
            .request(
                peer,
                Request::Tag {
                    reference: reference.to_string(),
                },
            )
            .await
        {
            return Some((peer, digest));
        }
    }
    None
}

/// Asks peers, best first, for their record of the complete image whose manifest is
/// `manifest_digest` (see [`Request::Image`]). Peers that do not know the request (older
/// nodes) or do not hold the image are skipped.
pub async fn find_image(
    net: &PeerNet,
    manifest_digest: &str,
) -> Option<(PeerId, proto::ImageAnswer)> {
    for peer in net.candidates() {
        match net
            .request(
                peer,
                Request::Image {
                    manifest_digest: manifest_digest.to_string(),
                },
            )
            .await
        {
            Ok(Response::Image(Some(answer))) => return Some((peer, answer)),
            Ok(_) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "Image failed"),
        }
    }
    None
}

/// How long one chunk request through a [`PeerSource`] keeps retrying while every peer that
/// has the chunk answers `Busy` (the fetcher's own time limit usually ends it first).
const SOURCE_BUSY_PATIENCE: Duration = Duration::from_secs(20);
/// Pause between rounds of `Busy` answers for a single chunk: one chunk is quick to serve.
const SOURCE_BUSY_PAUSE: Duration = Duration::from_millis(20);
/// Never hedge a single chunk sooner than this.
const SOURCE_HEDGE_FLOOR: Duration = Duration::from_millis(150);

/// A [`ChunkSource`] that asks team peers: lets the node's fetcher (and so lazyfs) stream
/// chunks from peers. Must be called from outside the runtime that runs the node (the
/// fetcher calls sources on helper threads, several at once).
///
/// Each chunk goes first to the connected peer with the fewest of this source's requests in
/// flight (then the best ranked), so concurrent reads spread over every peer; a peer that has
/// not answered after a few times the typical chunk time gets company: the next peer is asked
/// too and the first verified answer wins. A peer that does not hold the chunk is skipped, one
/// whose answer fails verification is ranked down. When the only peers that could answer are
/// busy (at their upload cap), the request waits briefly and asks again, so a read is not
/// failed for a moment of load.
pub struct PeerSource {
    net: PeerNet,
    runtime: tokio::runtime::Handle,
    /// Typical time of one chunk request, for the hedge delay (moving average).
    chunk_time: std::sync::Mutex<Option<Duration>>,
}

impl PeerSource {
    /// A source over `net`, driving requests on `runtime`.
    pub fn new(net: PeerNet, runtime: tokio::runtime::Handle) -> PeerSource {
        PeerSource {
            net,
            runtime,
            chunk_time: Default::default(),
        }
    }

    fn chunk_time(&self) -> std::sync::MutexGuard<'_, Option<Duration>> {
        self.chunk_time.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connected peers, least loaded first, then by rank.
    fn ordered_peers(&self) -> Vec<PeerId> {
        let mut order: Vec<(usize, usize, PeerId)> = self
            .net
            .candidates()
            .into_iter()
            .enumerate()
            .map(|(rank, p)| (in_flight(&p), rank, p))
            .collect();
        order.sort();
        order.into_iter().map(|(_, _, p)| p).collect()
    }

    fn hedge_after(&self) -> Duration {
        match *self.chunk_time() {
            None => HEDGE_INITIAL,
            Some(t) => (t * HEDGE_FACTOR).max(SOURCE_HEDGE_FLOOR),
        }
    }

    fn record(&self, took: Duration) {
        let mut avg = self.chunk_time();
        *avg = Some(match *avg {
            None => took,
            Some(avg) => avg.mul_f64(0.8) + took.mul_f64(0.2),
        });
    }

    /// Sends one chunk request on the runtime; its answer arrives on `tx`.
    fn send(&self, peer: PeerId, want: &ChunkWant, tx: &std::sync::mpsc::Sender<Asked>) {
        let flight = Flight {
            _slot: Slot::take(peer),
            peer,
            tx: Some(tx.clone()),
        };
        let net = self.net.clone();
        let wants = vec![want.clone()];
        // A runtime that is shutting down drops the task unrun; the flight then reports the
        // request as failed, so the asking thread never waits for it.
        self.runtime.spawn(async move {
            let sent = Instant::now();
            let answer = net.request(peer, Request::Chunks { wants }).await;
            flight.answer(answer, sent.elapsed());
        });
    }

    /// One round over the peers for one chunk, hedging a slow answer with the next peer.
    /// Waits on a plain channel with a timeout rather than on the runtime's timer, which may
    /// already be gone when a mount's last prefetch ends.
    fn ask_once(&self, want: &ChunkWant) -> Round {
        let (tx, rx) = std::sync::mpsc::channel::<Asked>();
        let mut queue = self.ordered_peers().into_iter().peekable();
        let hedge_after = self.hedge_after();
        let (mut out, mut busy) = (0usize, false);
        loop {
            if out == 0 {
                let Some(peer) = queue.next() else { break };
                self.send(peer, want, &tx);
                out += 1;
            }
            let wait = if out < 2 && queue.peek().is_some() {
                hedge_after
            } else {
                // Every request carries the node's own timeout; this only bounds a lost answer.
                Duration::from_secs(120)
            };
            let (peer, answer, took) = match rx.recv_timeout(wait) {
                Ok(asked) => asked,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if wait == hedge_after => {
                    // Slow: ask the next peer as well (the wait above ensures there is one).
                    if let Some(peer) = queue.next() {
                        tracing::debug!(%peer, "hedging a slow chunk");
                        self.send(peer, want, &tx);
                        out += 1;
                    }
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            };
            out -= 1;
            match answer {
                Ok(Response::Verified(mut a)) if a.len() == 1 => {
                    let Some(answer) = a.pop() else { continue };
                    if answer.want != *want {
                        tracing::warn!(%peer, "peer answered for a chunk it was not asked");
                        self.net.penalize(&peer);
                        continue;
                    }
                    // Proven against the id as it was read (proto::read_verified).
                    let Some(data) = answer.data else { continue };
                    self.record(took);
                    self.net.received(&peer, data.0.len() as u64, took);
                    // Requests still out finish in the background; their answers are
                    // dropped with the channel.
                    return Round::Got(data.0);
                }
                Err(e) if proto::is_bad_answer(&e) => {
                    tracing::warn!(%peer, error = %e, "peer sent a chunk that failed verification");
                    self.net.penalize(&peer);
                }
                Ok(Response::Busy) => busy = true,
                Ok(other) => tracing::debug!(%peer, ?other, "unexpected answer to Chunks"),
                Err(e) => tracing::debug!(%peer, error = %e, "Chunks failed"),
            }
        }
        if busy { Round::Busy } else { Round::Nobody }
    }
}

/// One answered chunk request of a [`PeerSource`]: peer, answer, time taken.
type Asked = (PeerId, Result<Response>, Duration);

/// A chunk request of a [`PeerSource`] in flight: counted in [`IN_FLIGHT`] until it ends,
/// and always reported on its channel, as failed if its task never ran.
struct Flight {
    _slot: Slot,
    peer: PeerId,
    tx: Option<std::sync::mpsc::Sender<Asked>>,
}

impl Flight {
    fn answer(mut self, answer: Result<Response>, took: Duration) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.peer, answer, took));
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.peer, Err(P2pError::Stopped), Duration::ZERO));
        }
    }
}

/// What one round over the peers gave for one chunk.
enum Round {
    Got(Vec<u8>),
    /// Some peer was busy: worth another round.
    Busy,
    /// Nobody has it (or every answer failed).
    Nobody,
}

impl ChunkSource for PeerSource {
    fn name(&self) -> String {
        "peers".into()
    }

    fn fetch(&self, id: &ChunkId, len: u32) -> fd_node::Result<Vec<u8>> {
        let want = ChunkWant {
            id: id.0,
            len,
            range: None,
        };
        // Rounds are driven one by one and the pause is a plain sleep of this (helper) thread,
        // so no pause needs the runtime's timer, which may already be shutting down when a
        // mount's last prefetch ends.
        let deadline = std::time::Instant::now() + SOURCE_BUSY_PATIENCE;
        let result: Result<Option<Vec<u8>>> = loop {
            match self.ask_once(&want) {
                Round::Got(data) => break Ok(Some(data)),
                Round::Nobody => break Ok(None),
                Round::Busy if std::time::Instant::now() >= deadline => {
                    break Err(P2pError::Peer {
                        peer: "every peer holding it".into(),
                        reason: format!("busy for {} s", SOURCE_BUSY_PATIENCE.as_secs()),
                    });
                }
                Round::Busy => std::thread::sleep(SOURCE_BUSY_PAUSE),
            }
        };
        match result {
            Ok(Some(data)) => Ok(data),
            Ok(None) => Err(NodeError::Missing {
                what: format!("chunk {} at any peer", id.short()),
            }),
            Err(e) => Err(NodeError::Unavailable {
                what: format!("chunk {}", id.short()),
                reasons: e.to_string(),
            }),
        }
    }
}

impl From<P2pError> for std::io::Error {
    fn from(e: P2pError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::TeamKey;
    use crate::net::NetConfig;
    use crate::testutil::{bytes, client, empty_store, listen, store_with_blob};

    /// Bytes the client's book says came from `peer`.
    fn got_from(net: &PeerNet, peer: &PeerNet) -> u64 {
        net.book()
            .peers
            .get(&peer.local_peer_id().to_string())
            .map(|e| e.bytes_from)
            .unwrap_or(0)
    }

    /// The chunks of a recorded blob: (id, offset, len).
    fn chunks_of(store: &Store, key: &str) -> Vec<(ChunkId, usize, u32)> {
        let mut offset = 0usize;
        let (recipe, _) = store.blob(key).expect("blob").expect("recorded");
        recipe
            .0
            .iter()
            .map(|c| {
                let at = offset;
                offset += c.len as usize;
                (c.id, at, c.len)
            })
            .collect()
    }

    /// A config whose node holds every chunk answer for 5 s, to play a slow peer.
    fn slow() -> NetConfig {
        NetConfig {
            answer_delay: Duration::from_secs(5),
            ..NetConfig::default()
        }
    }

    /// Holders A (started with `a_cfg`) and B, and a client C connected to both.
    struct Holders {
        a: PeerNet,
        b: PeerNet,
        c: PeerNet,
        c_dir: tempfile::TempDir,
        c_store: std::sync::Arc<Store>,
        /// The holders' store dirs, when made here: kept until the nodes are dropped.
        _dirs: Vec<tempfile::TempDir>,
    }

    impl Holders {
        async fn start(
            team: &TeamKey,
            a_store: std::sync::Arc<Store>,
            a_cfg: NetConfig,
            b_store: std::sync::Arc<Store>,
        ) -> Holders {
            let (a, a_addr) = listen(a_store, a_cfg).await;
            let (b, b_addr) = listen(b_store, NetConfig::default()).await;
            let (c_dir, c_store, c) = client(team, vec![a_addr, b_addr]).await;
            Holders {
                a,
                b,
                c,
                c_dir,
                c_store,
                _dirs: Vec::new(),
            }
        }

        /// A and B both holding `data` as one blob; returns them with the blob's key.
        async fn of_blob(team: &TeamKey, data: &[u8], a_cfg: NetConfig) -> (Holders, String) {
            let (a_dir, a_store, key) = store_with_blob(team, data);
            let (b_dir, b_store, _) = store_with_blob(team, data);
            let mut nodes = Holders::start(team, a_store, a_cfg, b_store).await;
            nodes._dirs = vec![a_dir, b_dir];
            (nodes, key)
        }

        /// C fetches blob `key` into a file and checks that it is complete and exactly `data`.
        async fn fetch_whole(&self, key: &str, data: &[u8]) -> BlobFromPeers {
            let dest = self.c_dir.path().join("blob");
            let got = fetch_blob_to_file(
                &self.c,
                &self.c_store,
                key,
                data.len() as u64,
                &dest,
                &|_| {},
            )
            .await
            .expect("fetch");
            assert!(got.complete, "{got:?}");
            assert_eq!(std::fs::read(&dest).expect("read"), data);
            got
        }

        async fn shutdown(self) {
            for n in [self.a, self.b, self.c] {
                n.shutdown().await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_chunk_reads_spread_over_peers_and_hedge_a_slow_one() {
        let team = TeamKey::generate();
        let data = bytes(6 << 20);
        let (_a, a_store, key) = store_with_blob(&team, &data);
        let (_b, b_store, _) = store_with_blob(&team, &data);
        let (_s, s_store, _) = store_with_blob(&team, &data);
        let chunks = chunks_of(&a_store, &key);
        let (a, a_addr) = listen(a_store, NetConfig::default()).await;
        let (b, b_addr) = listen(b_store, NetConfig::default()).await;
        // S holds every chunk answer for 5 s.
        let (s, s_addr) = listen(s_store, slow()).await;

        // Concurrent readers on A and B: both serve.
        let (_c, _, c) = client(&team, vec![a_addr, b_addr.clone()]).await;
        let b_addr2 = b_addr;
        let source = std::sync::Arc::new(PeerSource::new(
            c.clone(),
            tokio::runtime::Handle::current(),
        ));
        let readers: Vec<_> = (0..4)
            .map(|r| {
                let (source, chunks, data) = (source.clone(), chunks.clone(), data.clone());
                tokio::task::spawn_blocking(move || {
                    for (id, at, len) in chunks.iter().skip(r).step_by(4) {
                        let got = source.fetch(id, *len).expect("chunk");
                        assert_eq!(got, data[*at..*at + *len as usize]);
                    }
                })
            })
            .collect();
        for r in readers {
            r.await.expect("reader");
        }
        let (from_a, from_b) = (got_from(&c, &a), got_from(&c, &b));
        assert!(
            from_a > 0 && from_b > 0,
            "concurrent reads should use both peers: {from_a} from A, {from_b} from B"
        );

        // A reader whose best-ranked peer is slow: the read is hedged to the other peer.
        let (_d, _, d) = client(&team, vec![s_addr, b_addr2]).await;
        d.penalize(&b.local_peer_id());
        assert_eq!(d.candidates()[0], s.local_peer_id(), "S ranks first");
        let source = PeerSource::new(d.clone(), tokio::runtime::Handle::current());
        let first = chunks[..3].to_vec();
        tokio::task::spawn_blocking(move || {
            for (id, at, len) in first {
                let got = source.fetch(&id, len).expect("chunk");
                assert_eq!(got, data[at..at + len as usize]);
            }
        })
        .await
        .expect("reads");
        assert_eq!(got_from(&d, &s), 0, "the read asked of S was hedged to B");
        assert!(got_from(&d, &b) > 0);
        for n in [a, b, s, c, d] {
            n.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_is_fetched_from_every_holder_at_once() {
        let team = TeamKey::generate();
        let data = bytes(24 << 20);
        let (nodes, key) = Holders::of_blob(&team, &data, NetConfig::default()).await;

        let got = nodes.fetch_whole(&key, &data).await;
        let (from_a, from_b) = (got_from(&nodes.c, &nodes.a), got_from(&nodes.c, &nodes.b));
        assert!(
            from_a > 0 && from_b > 0,
            "both holders should serve part: {from_a} from A, {from_b} from B"
        );
        assert_eq!(from_a + from_b, got.bytes_from_peers);
        nodes.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blobs_fetched_at_once_share_a_peer_without_giving_up() {
        // Three layers of one pull ask the same peer at once: together they want more
        // requests than the per-peer cap, and a blob waiting only for a free slot must wait
        // for it rather than give up on peers.
        let team = TeamKey::generate();
        let (_a, a_store) = empty_store(&team);
        let blobs: Vec<(String, Vec<u8>)> = (0..3u8)
            .map(|i| {
                let data: Vec<u8> = bytes(10 << 20).iter().map(|b| b ^ i).collect();
                let key = fd_node::store::digest_of("sha256:", &data);
                a_store
                    .put_blob_from_reader(&key, "application/octet-stream", &data[..])
                    .expect("blob");
                (key, data)
            })
            .collect();
        let (a, a_addr) = listen(a_store, NetConfig::default()).await;
        let (cdir, c_store, c) = client(&team, vec![a_addr]).await;
        let fetches = blobs.iter().enumerate().map(|(i, (key, data))| {
            let (c, c_store, dest) = (&c, &c_store, cdir.path().join(format!("blob{i}")));
            async move {
                let got = fetch_blob_to_file(c, c_store, key, data.len() as u64, &dest, &|_| {})
                    .await
                    .expect("fetch");
                (got, std::fs::read(&dest).expect("read") == *data)
            }
        });
        for (got, exact) in futures::future::join_all(fetches).await {
            assert!(got.complete && exact, "{got:?}");
        }
        for n in [a, c] {
            n.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_peer_is_hedged_to_a_faster_one() {
        let team = TeamKey::generate();
        let data = bytes(12 << 20);
        // A holds every chunk answer for 5 s: each batch it is given must be asked again of B.
        let (nodes, key) = Holders::of_blob(&team, &data, slow()).await;

        nodes.fetch_whole(&key, &data).await;
        assert_eq!(
            got_from(&nodes.c, &nodes.a),
            0,
            "every batch asked of A was hedged to B"
        );
        assert_eq!(got_from(&nodes.c, &nodes.b), data.len() as u64);
        nodes.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_come_from_a_peer_that_is_still_fetching() {
        let team = TeamKey::generate();
        let data = bytes(8 << 20);
        let (_a, a_store, key) = store_with_blob(&team, &data);
        let recipe: Vec<([u8; 32], u32)> = a_store
            .blob(&key)
            .expect("blob")
            .expect("recorded")
            .0
            .0
            .iter()
            .map(|c| (c.id.0, c.len))
            .collect();
        // B holds the first half of the chunks but no record of the blob, as a node part way
        // through its own pull; A holds everything but is slow.
        let (_b, b_store) = empty_store(&team);
        let mut offset = 0usize;
        for (id, len) in &recipe[..recipe.len() / 2] {
            let end = offset + *len as usize;
            b_store
                .put_chunk(&ChunkId(*id), &data[offset..end])
                .expect("chunk");
            offset = end;
        }
        let half = offset as u64;
        let nodes = Holders::start(&team, a_store, slow(), b_store).await;
        let (c, c_store) = (&nodes.c, &nodes.c_store);

        let holders = find_holders(c, &key).await;
        assert_eq!(
            holders,
            vec![nodes.a.local_peer_id()],
            "only A records the blob"
        );
        let mut out = Vec::new();
        let (written, _) = gather_from(c, c_store, &recipe, Some(&holders), &mut out, &|_| {})
            .await
            .expect("gather");
        assert_eq!(written, data.len() as u64);
        assert_eq!(out, data);
        assert_eq!(got_from(c, &nodes.b), half, "B gave every chunk it had");
        nodes.shutdown().await;
    }
}
