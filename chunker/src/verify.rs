//! Bao outboards and verified range streaming, built on `bao-tree`'s sync `io` module.
//!
//! Every chunk has a bao tree over 16 KiB groups ([`GROUP_SIZE`]). Its root is the plain
//! BLAKE3 hash of the chunk, i.e. its [`ChunkId`]: chunk groups only decide which hashes
//! are kept in the outboard and sent on the wire, not the root. A sender holding the chunk
//! and its [`Outboard`] encodes any byte range with [`encode_range`]; a receiver that knows
//! only the `ChunkId` and the chunk's length checks the stream with [`RangeDecoder`] (or
//! [`decode_range`]) and gets each 16 KiB group back as soon as it is proven.
//!
//! Wire format: exactly `bao-tree`'s response encoding for the requested chunk ranges at
//! block size 16 KiB (`BlockSize::from_chunk_log(4)`), with no size prefix: hash pairs
//! (64 bytes) and group data interleaved in pre-order. Byte ranges are widened to whole
//! groups, so data comes in whole groups (the last group of a chunk may be short).

use std::io::{self, Read};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use bao_tree::io::outboard::PreOrderMemOutboard;
use bao_tree::io::sync::{DecodeResponseIter, encode_ranges_validated};
use bao_tree::io::{BaoContentItem, DecodeError, Leaf};
use bao_tree::iter::{BaoChunk, ResponseIter};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};

use crate::ChunkId;

/// Size of a bao chunk group: the unit that outboards keep hashes for and that range
/// streams are verified in. `bao_tree::BlockSize::from_chunk_log(4)` (16 × 1 KiB BLAKE3
/// chunks).
pub const GROUP_SIZE: u64 = 16 * 1024;

const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(4);
const CHUNKS_PER_GROUP: u64 = GROUP_SIZE / 1024;
const ROOT_LEN: usize = 32;

fn tree(size: u64) -> BaoTree {
    BaoTree::new(size, BLOCK_SIZE)
}

/// Number of 16 KiB groups in a chunk of `size` bytes (0 for an empty chunk).
fn groups(size: u64) -> u64 {
    size.div_ceil(GROUP_SIZE)
}

// ---------------------------------------------------------------------------------------
// Outboard
// ---------------------------------------------------------------------------------------

/// The bao outboard of one chunk at 16 KiB groups, plus its root.
///
/// Serialized form ([`as_bytes`](Self::as_bytes) / [`from_bytes`](Self::from_bytes)):
/// the 32-byte root (== the chunk's [`ChunkId`]) followed by the tree's hash pairs in
/// pre-order (`bao-tree`'s `PreOrderMemOutboard` layout, no size prefix): 64 bytes for each
/// of the `groups - 1` parent nodes, so [`outboard_len`]`(size)` bytes in all — 32 bytes for
/// a chunk of at most 16 KiB, 992 bytes for 256 KiB. The chunk size is not included; the
/// store knows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Outboard {
    size: u64,
    /// root ‖ pre-order hash pairs
    bytes: Vec<u8>,
}

/// Why bytes are not a valid [`Outboard`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboardError {
    /// The length does not fit the chunk size.
    #[error("outboard for a {size}-byte chunk must be {expected} bytes, got {got}")]
    Length {
        /// Chunk size the outboard was read for.
        size: u64,
        /// [`outboard_len`] of that size.
        expected: u64,
        /// Length of the given bytes.
        got: u64,
    },
    /// The top hash pair does not hash to the stored root.
    #[error("outboard of chunk {} is corrupt: its top hash pair gives root {}", root.short(), got.short())]
    RootMismatch {
        /// The stored root.
        root: ChunkId,
        /// What the top hash pair hashes to.
        got: ChunkId,
    },
}

/// Length of the serialized [`Outboard`] of a chunk of `size` bytes.
pub fn outboard_len(size: u64) -> u64 {
    ROOT_LEN as u64 + tree(size).outboard_size()
}

/// Computes the outboard of one chunk. `outboard(data).root() == ChunkId::of(data)`.
pub fn outboard(data: &[u8]) -> Outboard {
    let size = data.len() as u64;
    let tree = tree(size);
    let mut bytes = vec![0u8; outboard_len(size) as usize];
    let mut bao = PreOrderMemOutboard {
        root: blake3::Hash::from_bytes([0; 32]),
        tree,
        data: &mut bytes[ROOT_LEN..],
    };
    let root = bao_tree::io::sync::outboard(data, tree, &mut bao)
        .expect("hashing an in-memory slice into a buffer of the right size cannot fail");
    bytes[..ROOT_LEN].copy_from_slice(root.as_bytes());
    Outboard { size, bytes }
}

impl Outboard {
    /// Root of the tree: the [`ChunkId`] of the chunk it was computed from.
    pub fn root(&self) -> ChunkId {
        let mut root = [0u8; 32];
        root.copy_from_slice(&self.bytes[..ROOT_LEN]);
        ChunkId(root)
    }

    /// Size of the chunk in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Serialized form (see [`Outboard`]).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Serialized form (see [`Outboard`]), without copying.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Reads the serialized form for a chunk of `size` bytes.
    ///
    /// Checks the length and that the top hash pair hashes to the stored root; the other
    /// pairs are checked whenever a range is encoded ([`try_encode_range`]).
    pub fn from_bytes(size: u64, bytes: impl Into<Vec<u8>>) -> Result<Outboard, OutboardError> {
        let bytes = bytes.into();
        let expected = outboard_len(size);
        if bytes.len() as u64 != expected {
            return Err(OutboardError::Length {
                size,
                expected,
                got: bytes.len() as u64,
            });
        }
        let ob = Outboard { size, bytes };
        if groups(size) > 1 {
            let pair = &ob.bytes[ROOT_LEN..ROOT_LEN + 64];
            let got = root_of_pair(pair);
            if got != ob.root() {
                return Err(OutboardError::RootMismatch {
                    root: ob.root(),
                    got,
                });
            }
        }
        Ok(ob)
    }

    fn bao(&self) -> PreOrderMemOutboard<&[u8]> {
        PreOrderMemOutboard {
            root: self.root().into(),
            tree: tree(self.size),
            data: &self.bytes[ROOT_LEN..],
        }
    }
}

impl std::fmt::Debug for Outboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outboard")
            .field("root", &self.root())
            .field("size", &self.size)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// The root a 64-byte hash pair hashes to (as the root node).
fn root_of_pair(pair: &[u8]) -> ChunkId {
    let mut l = [0u8; 32];
    let mut r = [0u8; 32];
    l.copy_from_slice(&pair[..32]);
    r.copy_from_slice(&pair[32..64]);
    blake3::hazmat::merge_subtrees_root(&l, &r, blake3::hazmat::Mode::Hash).into()
}

// ---------------------------------------------------------------------------------------
// Ranges
// ---------------------------------------------------------------------------------------

/// The part of `range` inside a chunk of `size` bytes, and the bao chunk ranges that cover
/// it in whole groups. An empty (or entirely out-of-bounds) range requests nothing: its
/// stream is empty and proves nothing.
///
/// The chunk ranges are already in the canonical form that `bao-tree` truncates requests
/// to (a range reaching the last group is open-ended), so iterating them with
/// `ResponseIter` gives exactly the items that `DecodeResponseIter` and
/// `encode_ranges_validated` process.
fn request(size: u64, range: &Range<u64>) -> (Range<u64>, ChunkRanges) {
    let end = range.end.min(size);
    let start = range.start.min(end);
    if start == end {
        return (start..end, ChunkRanges::empty());
    }
    let first = ChunkNum(start / GROUP_SIZE * CHUNKS_PER_GROUP);
    let end_group = end.div_ceil(GROUP_SIZE);
    let ranges = if end_group >= groups(size) {
        ChunkRanges::from(first..)
    } else {
        ChunkRanges::from(first..ChunkNum(end_group * CHUNKS_PER_GROUP))
    };
    (start..end, ranges)
}

/// Length of the stream [`encode_range`] produces for `range` of a chunk of `chunk_size`
/// bytes (hash pairs plus group data), known to both sides in advance.
pub fn encoded_len(chunk_size: u64, range: Range<u64>) -> u64 {
    let (_, ranges) = request(chunk_size, &range);
    ResponseIter::new(tree(chunk_size), ranges)
        .map(|item| item.size() as u64)
        .sum()
}

/// First group and end group (exclusive) that a stream item covers.
fn item_groups(item: &BaoChunk, size: u64) -> Range<u64> {
    match item {
        BaoChunk::Parent { node, .. } => {
            let chunks = node.chunk_range();
            let first = chunks.start.0 / CHUNKS_PER_GROUP;
            let end = chunks.end.0.div_ceil(CHUNKS_PER_GROUP).min(groups(size));
            first..end.max(first + 1)
        }
        BaoChunk::Leaf { start_chunk, .. } => {
            let g = start_chunk.0 / CHUNKS_PER_GROUP;
            g..g + 1
        }
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Why [`try_encode_range`] refused to send data: the local copy is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// Data and outboard are for different sizes.
    #[error("chunk {}: data is {data_len} bytes but the outboard is for {outboard_size}", id.short())]
    SizeMismatch {
        /// Root of the outboard.
        id: ChunkId,
        /// Size the outboard was made for.
        outboard_size: u64,
        /// Length of the data.
        data_len: u64,
    },
    /// A group of the stored data does not match the outboard.
    #[error("chunk {}: stored data of group {group} (bytes {offset}..) does not match its outboard", id.short())]
    DataCorrupt {
        /// Root of the outboard.
        id: ChunkId,
        /// Index of the bad group.
        group: u64,
        /// Its byte offset in the chunk.
        offset: u64,
    },
    /// A hash pair of the outboard does not hash to its parent (or to the root).
    #[error("chunk {}: outboard hash pair over groups {}..{} does not verify", id.short(), groups.start, groups.end)]
    OutboardCorrupt {
        /// Root of the outboard.
        id: ChunkId,
        /// Groups below the bad pair.
        groups: Range<u64>,
    },
    /// I/O error from `bao-tree` (not expected for in-memory data).
    #[error("chunk {}: {source}", id.short())]
    Io {
        /// Root of the outboard.
        id: ChunkId,
        /// The error.
        source: io::Error,
    },
}

/// Encodes a verified stream of the byte range `range` of `data` (widened to whole
/// 16 KiB groups and clamped to the chunk), using its outboard.
///
/// The data is checked against the outboard while encoding (`bao-tree`'s
/// `encode_ranges_validated`), so corrupt local data is never sent: if a group or hash
/// pair does not verify, the stream stops before it and the receiver reports a truncated
/// stream. Use [`try_encode_range`] to learn about such corruption.
pub fn encode_range(data: &[u8], outboard: &Outboard, range: Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    // On error `out` holds the verified prefix; see the doc comment.
    let _ = encode_into(data, outboard, range, &mut out);
    out
}

/// Like [`encode_range`], but reports inconsistent data or outboard instead of sending a
/// truncated stream.
pub fn try_encode_range(
    data: &[u8],
    outboard: &Outboard,
    range: Range<u64>,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(data, outboard, range, &mut out)?;
    Ok(out)
}

fn encode_into(
    data: &[u8],
    outboard: &Outboard,
    range: Range<u64>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    let id = outboard.root();
    if data.len() as u64 != outboard.size {
        return Err(EncodeError::SizeMismatch {
            id,
            outboard_size: outboard.size,
            data_len: data.len() as u64,
        });
    }
    let (_, ranges) = request(outboard.size, &range);
    out.reserve(encoded_len(outboard.size, range) as usize);
    encode_ranges_validated(data, outboard.bao(), &ranges, &mut *out).map_err(|e| match e {
        bao_tree::io::EncodeError::LeafHashMismatch(chunk) => EncodeError::DataCorrupt {
            id,
            group: chunk.0 / CHUNKS_PER_GROUP,
            offset: chunk.to_bytes(),
        },
        bao_tree::io::EncodeError::ParentHashMismatch(node) => {
            let item = BaoChunk::Parent {
                node,
                is_root: false,
                left: false,
                right: false,
                ranges: (),
            };
            EncodeError::OutboardCorrupt {
                id,
                groups: item_groups(&item, outboard.size),
            }
        }
        bao_tree::io::EncodeError::SizeMismatch => EncodeError::SizeMismatch {
            id,
            outboard_size: outboard.size,
            data_len: data.len() as u64,
        },
        other => EncodeError::Io {
            id,
            source: other.into(),
        },
    })
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// Why a range stream was rejected. Every variant names the chunk; `Display` shows its
/// short id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The top of the stream does not hash to the chunk id: the stream is for other data,
    /// or the chunk size given to the decoder is wrong.
    #[error(
        "chunk {}: stream root is {} instead (wrong chunk, or chunk size {size} is wrong)",
        id.short(), got.short()
    )]
    RootMismatch {
        /// The chunk id the decoder was given (expected root).
        id: ChunkId,
        /// The root the stream's first hash pair (or, for a one-group chunk, its data)
        /// hashes to.
        got: ChunkId,
        /// The chunk size the decoder was given.
        size: u64,
    },
    /// A hash pair inside the tree does not hash to its parent.
    #[error(
        "chunk {}: hash pair over groups {}..{} (bytes {offset}..) does not verify",
        id.short(), groups.start, groups.end
    )]
    ParentMismatch {
        /// The chunk.
        id: ChunkId,
        /// Groups below the bad pair; nothing from them has been returned.
        groups: Range<u64>,
        /// Byte offset of the first of those groups.
        offset: u64,
    },
    /// The data of one group does not hash to what the tree says.
    #[error(
        "chunk {}: data of group {group} (bytes {offset}..{}) does not verify",
        id.short(), offset + len
    )]
    GroupMismatch {
        /// The chunk.
        id: ChunkId,
        /// Index of the bad group (byte offset / 16 KiB).
        group: u64,
        /// Its byte offset in the chunk.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The stream ended before all requested groups were proven.
    #[error(
        "chunk {}: stream ended after {received} of {expected} bytes, in the part for group {group} \
         (truncated, or chunk size is wrong)",
        id.short()
    )]
    Truncated {
        /// The chunk.
        id: ChunkId,
        /// Stream bytes received.
        received: u64,
        /// Stream bytes expected ([`encoded_len`]).
        expected: u64,
        /// First group of the incomplete item.
        group: u64,
    },
    /// Bytes arrived after the stream was complete.
    #[error("chunk {}: {extra} bytes after the end of the {expected}-byte stream", id.short())]
    TrailingBytes {
        /// The chunk.
        id: ChunkId,
        /// Expected stream length.
        expected: u64,
        /// How many bytes too many arrived in the failing call.
        extra: u64,
    },
}

impl VerifyError {
    /// The chunk the failing stream was for.
    pub fn id(&self) -> ChunkId {
        match self {
            VerifyError::RootMismatch { id, .. }
            | VerifyError::ParentMismatch { id, .. }
            | VerifyError::GroupMismatch { id, .. }
            | VerifyError::Truncated { id, .. }
            | VerifyError::TrailingBytes { id, .. } => *id,
        }
    }

    /// The (first) group where verification stopped. Every piece returned as verified
    /// before the error lies in earlier groups. `None` for [`VerifyError::TrailingBytes`].
    pub fn group(&self) -> Option<u64> {
        match self {
            VerifyError::RootMismatch { .. } => Some(0),
            VerifyError::ParentMismatch { groups, .. } => Some(groups.start),
            VerifyError::GroupMismatch { group, .. } | VerifyError::Truncated { group, .. } => {
                Some(*group)
            }
            VerifyError::TrailingBytes { .. } => None,
        }
    }
}

/// Bytes pushed but not yet handed to the decoder; shared with the reader the decoder
/// pulls from.
#[derive(Default)]
struct Feed {
    buf: Vec<u8>,
    pos: usize,
}

impl Feed {
    fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }
}

struct FeedReader(Arc<Mutex<Feed>>);

impl Read for FeedReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut feed = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = out.len().min(feed.pending());
        let pos = feed.pos;
        out[..n].copy_from_slice(&feed.buf[pos..pos + n]);
        feed.pos += n;
        if feed.pos == feed.buf.len() {
            feed.buf.clear();
            feed.pos = 0;
        }
        Ok(n)
    }
}

type Decoder<'a> = DecodeResponseIter<'a, FeedReader>;

self_cell::self_cell! {
    /// `bao-tree`'s decoder together with the range set it borrows.
    struct DecodeCell {
        owner: ChunkRanges,
        #[not_covariant]
        dependent: Decoder,
    }
}

/// Verifies a range stream from [`encode_range`] incrementally as bytes arrive, knowing
/// only the [`ChunkId`] and the chunk size.
///
/// Verification is `bao-tree`'s `DecodeResponseIter`. The decoder walks the same
/// pre-order item list (`bao_tree::iter::ResponseIter`) to know how long the next item is
/// (a 64-byte hash pair or one group of data) and only hands an item to
/// `DecodeResponseIter` once all its bytes are here, so a push never blocks and never
/// fails for lack of bytes.
///
/// Memory: at most one unverified item is buffered — a 16 KiB group or a 64-byte hash
/// pair — plus `DecodeResponseIter`'s own 16 KiB group buffer and a stack of at most one
/// hash per tree level. Verified data is returned, not kept.
///
/// After an error the decoder is dead: every further `push` and `finish` returns the
/// same error.
pub struct RangeDecoder {
    id: ChunkId,
    size: u64,
    range: Range<u64>,
    cell: DecodeCell,
    feed: Arc<Mutex<Feed>>,
    /// Items still to come, in stream order; `next` is the one being filled.
    plan: ResponseIter,
    next: Option<BaoChunk>,
    received: u64,
    expected: u64,
    failed: Option<VerifyError>,
}

impl RangeDecoder {
    /// A decoder for the stream of `range` (clamped to the chunk, widened to whole groups
    /// on the wire) of the chunk named `id`, which is `chunk_size` bytes long. The
    /// verified pieces it returns cover exactly the clamped `range`.
    pub fn new(id: ChunkId, chunk_size: u64, range: Range<u64>) -> Self {
        let tree = tree(chunk_size);
        let (range, ranges) = request(chunk_size, &range);
        let expected = encoded_len(chunk_size, range.clone());
        let mut plan = ResponseIter::new(tree, ranges.clone());
        let next = plan.next();
        let feed = Arc::new(Mutex::new(Feed::default()));
        let reader = FeedReader(feed.clone());
        let cell = DecodeCell::new(ranges, |ranges| {
            DecodeResponseIter::new(id.into(), tree, reader, ranges)
        });
        RangeDecoder {
            id,
            size: chunk_size,
            range,
            cell,
            feed,
            plan,
            next,
            received: 0,
            expected,
            failed: None,
        }
    }

    /// The byte range the verified pieces cover (the requested range clamped to the chunk).
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }

    /// Total stream length expected ([`encoded_len`]).
    pub fn encoded_len(&self) -> u64 {
        self.expected
    }

    /// Stream bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// True once every item of the stream has been verified.
    pub fn is_complete(&self) -> bool {
        self.failed.is_none() && self.next.is_none()
    }

    /// Feeds arriving bytes (split anywhere). Returns the verified data pieces as
    /// `(offset within the chunk, bytes)` as soon as each group is proven, trimmed to
    /// [`range`](Self::range), in order and contiguous.
    ///
    /// On error, pieces proven earlier in the same call are dropped; use
    /// [`push_into`](Self::push_into) to keep them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, VerifyError> {
        let mut out = Vec::new();
        self.push_into(bytes, &mut out)?;
        Ok(out)
    }

    /// Like [`push`](Self::push), but appends verified pieces to `out`, which keeps the
    /// pieces proven before an error in the same call.
    pub fn push_into(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<(), VerifyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut input = bytes;
        let res = self.drive(&mut input, out);
        if let Err(e) = &res {
            self.failed = Some(e.clone());
        }
        res
    }

    /// Ends the stream: an error if it was rejected or is incomplete.
    pub fn finish(mut self) -> Result<(), VerifyError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        // Settle any item that needs no further bytes (none in the layouts we request, but
        // cheap to be sure of) before deciding whether the stream is complete.
        let mut none: &[u8] = &[];
        let mut out = Vec::new();
        self.drive(&mut none, &mut out)?;
        match &self.next {
            None => Ok(()),
            Some(item) => Err(VerifyError::Truncated {
                id: self.id,
                received: self.received,
                expected: self.expected,
                group: item_groups(item, self.size).start,
            }),
        }
    }

    fn drive(
        &mut self,
        input: &mut &[u8],
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<(), VerifyError> {
        loop {
            let Some(item) = self.next else {
                if !input.is_empty() {
                    return Err(VerifyError::TrailingBytes {
                        id: self.id,
                        expected: self.expected,
                        extra: input.len() as u64,
                    });
                }
                return Ok(());
            };
            let need = item.size();
            // Top up the pending item; the root's bytes are kept for error reports.
            let root_bytes = {
                let mut feed = self.feed.lock().unwrap_or_else(PoisonError::into_inner);
                let take = (need - feed.pending()).min(input.len());
                feed.buf.extend_from_slice(&input[..take]);
                *input = &input[take..];
                self.received += take as u64;
                if feed.pending() < need {
                    return Ok(());
                }
                let is_root = matches!(
                    item,
                    BaoChunk::Parent { is_root: true, .. } | BaoChunk::Leaf { is_root: true, .. }
                );
                is_root.then(|| feed.buf[feed.pos..].to_vec())
            };
            let res = self.cell.with_dependent_mut(|_, decoder| decoder.next());
            self.next = self.plan.next();
            match res {
                Some(Ok(BaoContentItem::Leaf(leaf))) => self.emit(leaf, out),
                Some(Ok(BaoContentItem::Parent(_))) => {}
                Some(Err(e)) => return Err(self.error(e, &item, root_bytes)),
                // The decoder walks the same item list as `plan`, so it cannot end first.
                None => {
                    return Err(VerifyError::Truncated {
                        id: self.id,
                        received: self.received,
                        expected: self.expected,
                        group: item_groups(&item, self.size).start,
                    });
                }
            }
        }
    }

    fn emit(&self, leaf: Leaf, out: &mut Vec<(u64, Vec<u8>)>) {
        let lo = leaf.offset;
        let hi = lo + leaf.data.len() as u64;
        let start = lo.max(self.range.start);
        let end = hi.min(self.range.end);
        if start < end {
            out.push((
                start,
                leaf.data[(start - lo) as usize..(end - lo) as usize].to_vec(),
            ));
        }
    }

    fn error(&self, e: DecodeError, item: &BaoChunk, root_bytes: Option<Vec<u8>>) -> VerifyError {
        let id = self.id;
        let groups = item_groups(item, self.size);
        match (e, root_bytes) {
            (DecodeError::ParentHashMismatch(_), Some(pair)) => VerifyError::RootMismatch {
                id,
                got: root_of_pair(&pair),
                size: self.size,
            },
            (DecodeError::LeafHashMismatch(_), Some(data)) => VerifyError::RootMismatch {
                id,
                got: ChunkId::of(&data),
                size: self.size,
            },
            (DecodeError::ParentHashMismatch(_), None) => VerifyError::ParentMismatch {
                id,
                offset: groups.start * GROUP_SIZE,
                groups,
            },
            (DecodeError::LeafHashMismatch(_), None) => VerifyError::GroupMismatch {
                id,
                group: groups.start,
                offset: groups.start * GROUP_SIZE,
                len: item.size() as u64,
            },
            // Not expected: items are only decoded once all their bytes are buffered.
            (_, _) => VerifyError::Truncated {
                id,
                received: self.received,
                expected: self.expected,
                group: groups.start,
            },
        }
    }
}

impl std::fmt::Debug for RangeDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeDecoder")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("range", &self.range)
            .field("received", &self.received)
            .field("expected", &self.expected)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Verifies a whole encoded stream at once and returns the verified bytes of `range`
/// (clamped to the chunk), exactly `data[range]`.
pub fn decode_range(
    id: ChunkId,
    chunk_size: u64,
    range: Range<u64>,
    encoded: &[u8],
) -> Result<Vec<u8>, VerifyError> {
    let mut decoder = RangeDecoder::new(id, chunk_size, range);
    let want = decoder.range();
    let mut out = Vec::with_capacity((want.end - want.start) as usize);
    for (offset, piece) in decoder.push(encoded)? {
        debug_assert_eq!(offset, want.start + out.len() as u64);
        out.extend_from_slice(&piece);
    }
    decoder.finish()?;
    Ok(out)
}
