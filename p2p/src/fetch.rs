//! The asking side: rebuild blobs and single chunks from team peers, verified.
//!
//! A blob is found with `Have`, its chunk list learned with `Recipe`, and its chunks fetched
//! in batches with `Chunks`, best-ranked peer first. Every answer is checked group by group
//! ([`proto::verify_answer`]); a bad group ends that answer, lowers the peer's rank and moves
//! on to the next peer. Verified chunks go into the store at once, and the blob's bytes are
//! written strictly in order, so whatever was written is a prefix the caller can resume from
//! (the registry client resumes a partial download with a Range request). The blob's own
//! digest is checked by the caller, as for any download.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use fd_chunker::ChunkId;
use fd_node::fetch::ChunkSource;
use fd_node::{NodeError, Store};
use libp2p::PeerId;

use crate::net::PeerNet;
use crate::proto::{self, ChunkWant, MAX_CHUNKS_PER_REQUEST, Request, Response};
use crate::{P2pError, Result};

/// Bytes asked for in one `Chunks` request at most (besides the count limit).
const MAX_BATCH_BYTES: u64 = 4 << 20;
/// How many times in a row every peer may answer `Busy` before we give up on peers.
const MAX_BUSY_ROUNDS: u32 = 50;
/// Pause after a round of `Busy` answers.
const BUSY_PAUSE: Duration = Duration::from_millis(100);

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

/// Asks connected peers, best first, for the recipe of `key`. With `size`, a recipe of any
/// other total size is ignored.
pub async fn find_recipe(
    net: &PeerNet,
    key: &str,
    size: Option<u64>,
) -> Option<(PeerId, proto::RecipeAnswer)> {
    for peer in net.candidates() {
        let have = net
            .request(
                peer,
                Request::Have {
                    keys: vec![key.to_string()],
                },
            )
            .await;
        match have {
            Ok(Response::Have { keys }) if keys.iter().any(|k| k == key) => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "Have failed");
                continue;
            }
        }
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
                return Some((peer, r));
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(%peer, error = %e, "Recipe failed"),
        }
    }
    None
}

/// Writes the chunks of `recipe` in order into `out`, taking what the store has and asking
/// peers for the rest. Returns (bytes written, bytes from peers). Stops early, leaving a
/// verified prefix, when no peer can give the next chunk.
pub async fn gather(
    net: &PeerNet,
    store: &Store,
    recipe: &[([u8; 32], u32)],
    out: &mut dyn Write,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(u64, u64)> {
    let mut written = 0u64;
    let mut from_peers = 0u64;
    let mut failed: HashSet<PeerId> = HashSet::new();
    let mut busy_rounds = 0u32;
    let mut i = 0usize;
    while i < recipe.len() {
        // The next batch, bounded in count and bytes.
        let mut end = i;
        let mut bytes = 0u64;
        while end < recipe.len() && end - i < MAX_CHUNKS_PER_REQUEST && bytes < MAX_BATCH_BYTES {
            bytes += u64::from(recipe[end].1);
            end += 1;
        }
        let batch = &recipe[i..end];
        let mut got: Vec<Option<Vec<u8>>> = batch
            .iter()
            .map(|(id, len)| {
                let id = ChunkId(*id);
                if store.has_chunk(&id, *len) {
                    store.read_chunk(&id).ok()
                } else {
                    None
                }
            })
            .collect();
        let wants: Vec<ChunkWant> = batch
            .iter()
            .zip(&got)
            .filter(|(_, g)| g.is_none())
            .map(|((id, len), _)| ChunkWant {
                id: *id,
                len: *len,
                range: None,
            })
            .collect();

        if !wants.is_empty() {
            let Some(peer) = net.candidates().into_iter().find(|p| !failed.contains(p)) else {
                break;
            };
            match net
                .request(
                    peer,
                    Request::Chunks {
                        wants: wants.clone(),
                    },
                )
                .await
            {
                Ok(Response::Chunks(answers)) if answers.len() == wants.len() => {
                    busy_rounds = 0;
                    let mut slots = got.iter_mut().filter(|g| g.is_none());
                    for (want, ans) in wants.iter().zip(answers) {
                        let Some(encoded) = ans.encoded else {
                            // Not held there: someone else may have it.
                            failed.insert(peer);
                            break;
                        };
                        match proto::verify_answer(want, &encoded.0) {
                            Ok(data) => {
                                store.put_chunk(&ChunkId(want.id), &data)?;
                                from_peers += data.len() as u64;
                                net.received(&peer, data.len() as u64);
                                if let Some(slot) = slots.next() {
                                    *slot = Some(data);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(%peer, error = %e, "peer sent a chunk that failed verification");
                                net.penalize(&peer);
                                failed.insert(peer);
                                break;
                            }
                        }
                    }
                }
                Ok(Response::Busy) => {
                    busy_rounds += 1;
                    if busy_rounds > MAX_BUSY_ROUNDS {
                        failed.insert(peer);
                    }
                    tokio::time::sleep(BUSY_PAUSE).await;
                    continue;
                }
                Ok(other) => {
                    tracing::debug!(%peer, ?other, "unexpected answer to Chunks");
                    failed.insert(peer);
                }
                Err(e) => {
                    tracing::info!(%peer, error = %e, "peer failed; trying others");
                    failed.insert(peer);
                }
            }
        }
        // Write the prefix of the batch that is complete; the rest is asked again.
        let mut advanced = 0;
        for data in got.iter().take_while(|g| g.is_some()).flatten() {
            out.write_all(data)?;
            written += data.len() as u64;
            advanced += 1;
        }
        i += advanced;
        progress(written);
    }
    out.flush()?;
    Ok((written, from_peers))
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
    let Some((peer, recipe)) = find_recipe(net, key, Some(size)).await else {
        return Ok(BlobFromPeers::default());
    };
    tracing::debug!(%peer, key, chunks = recipe.chunks.len(), "fetching blob from peers");
    let mut file = std::io::BufWriter::new(fs_err::File::create(dest)?);
    let (written, from_peers) = gather(net, store, &recipe.chunks, &mut file, progress).await?;
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
    let Some((_, recipe)) = find_recipe(net, key, None).await else {
        return Ok(None);
    };
    let total: u64 = recipe.chunks.iter().map(|(_, l)| u64::from(*l)).sum();
    if total > max {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(total as usize);
    let (written, from_peers) = gather(net, store, &recipe.chunks, &mut bytes, &|_| {}).await?;
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

/// A [`ChunkSource`] that asks team peers: lets the node's fetcher (and so lazyfs) stream
/// chunks from peers. Must be called from outside the runtime that runs the node (the
/// fetcher calls sources on helper threads).
///
/// Each chunk is asked of the connected peers, best ranked first; a peer that does not hold it
/// is skipped, one whose answer fails verification is ranked down. When the only peers that
/// could answer are busy (at their upload cap), the request waits briefly and asks again,
/// so a read is not failed for a moment of load.
pub struct PeerSource {
    net: PeerNet,
    runtime: tokio::runtime::Handle,
}

impl PeerSource {
    /// A source over `net`, driving requests on `runtime`.
    pub fn new(net: PeerNet, runtime: tokio::runtime::Handle) -> PeerSource {
        PeerSource { net, runtime }
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

async fn ask_peers_once(net: &PeerNet, want: &ChunkWant) -> Round {
    let mut busy = false;
    for peer in net.candidates() {
        let answer = net
            .request(
                peer,
                Request::Chunks {
                    wants: vec![want.clone()],
                },
            )
            .await;
        match answer {
            Ok(Response::Chunks(mut a)) if a.len() == 1 => {
                let Some(enc) = a.pop().and_then(|a| a.encoded) else {
                    continue;
                };
                match proto::verify_answer(want, &enc.0) {
                    Ok(data) => {
                        net.received(&peer, data.len() as u64);
                        return Round::Got(data);
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "peer sent a chunk that failed verification");
                        net.penalize(&peer);
                    }
                }
            }
            Ok(Response::Busy) => busy = true,
            Ok(other) => tracing::debug!(%peer, ?other, "unexpected answer to Chunks"),
            Err(e) => tracing::debug!(%peer, error = %e, "Chunks failed"),
        }
    }
    if busy { Round::Busy } else { Round::Nobody }
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
        // so nothing here needs the runtime's timer, which may already be shutting down when a
        // mount's last prefetch ends.
        let deadline = std::time::Instant::now() + SOURCE_BUSY_PATIENCE;
        let result: Result<Option<Vec<u8>>> = loop {
            match self.runtime.block_on(ask_peers_once(&self.net, &want)) {
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
