//! Chunking, naming and verification of fd's content-addressed chunks.
//!
//! This crate owns the pure functions at the bottom of fd's chunk store; it does no I/O
//! except reading from a [`std::io::Read`] the caller hands to [`chunk_reader`].
//!
//! - **Boundaries**: image layers are cut with FastCDC (content-defined, so an edit only
//!   changes the chunks around it) — [`chunk_reader`] for streams with bounded memory,
//!   [`chunk_slice`] for bytes in memory, sizes from [`ChunkerConfig`].
//! - **Names**: a chunk is named by the BLAKE3 hash of its bytes, [`ChunkId`].
//! - **Outboards**: [`outboard`] computes a chunk's bao tree at 16 KiB groups
//!   ([`GROUP_SIZE`]); its root is the `ChunkId`.
//! - **Range verification**: [`encode_range`] turns any byte range of a chunk into a
//!   stream that [`RangeDecoder`] (incremental) or [`decode_range`] (all at once) check
//!   against nothing but the `ChunkId` and the chunk size, returning each group as soon as
//!   it is proven. Encoding and decoding are `bao-tree`'s.
//!
//! ```
//! use fd_chunker::{ChunkerConfig, RangeDecoder, chunk_reader, encode_range};
//!
//! let layer: Vec<u8> = (0..300_000u32).flat_map(|i| (i * 7919).to_le_bytes()).collect();
//! // Ingest: cut, name, and build outboards in one pass over the bytes.
//! let mut chunks = Vec::new();
//! for item in chunk_reader(&layer[..], &ChunkerConfig::default()).with_outboards() {
//!     chunks.push(item?);
//! }
//! let (chunk, ob) = &chunks[0];
//! assert_eq!(ob.root(), chunk.id);
//!
//! // Serve bytes 20_000..30_000 of the chunk; the peer knows only the id and the length.
//! let stream = encode_range(&chunk.data, ob, 20_000..30_000);
//! let mut decoder = RangeDecoder::new(chunk.id, chunk.data.len() as u64, 20_000..30_000);
//! let mut got = Vec::new();
//! for piece in stream.chunks(1500) {
//!     for (offset, bytes) in decoder.push(piece)? {
//!         assert_eq!(offset, 20_000 + got.len() as u64);
//!         got.extend(bytes);
//!     }
//! }
//! decoder.finish()?;
//! assert_eq!(got, &chunk.data[20_000..30_000]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cdc;
mod id;
mod verify;

pub use cdc::{
    Chunk, ChunkReader, ChunkSpan, ChunkerConfig, ConfigError, chunk_reader, chunk_slice,
};
pub use id::{ChunkId, ChunkIdError};
pub use verify::{
    EncodeError, GROUP_SIZE, Outboard, OutboardError, RangeDecoder, VerifyError, decode_range,
    encode_range, encoded_len, outboard, outboard_len, try_encode_range,
};
