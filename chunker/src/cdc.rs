//! Content-defined chunk boundaries (FastCDC 2020) and chunk naming.

use std::io::{self, Read};
use std::iter::FusedIterator;

use fastcdc::v2020;

use crate::{ChunkId, Outboard, outboard};

/// FastCDC size parameters, in bytes.
///
/// FastCDC places a boundary where a rolling hash of the content matches a mask, so an
/// insertion or deletion only moves the boundaries next to it; chunks are never shorter
/// than `min_size` (except the last chunk of a stream) nor longer than `max_size`, and
/// average about `avg_size`.
///
/// Limits (those of the `fastcdc` crate): `64 <= min_size <= 1 MiB`,
/// `256 <= avg_size <= 4 MiB`, `1 KiB <= max_size <= 16 MiB`, all even, and
/// `min_size <= avg_size <= max_size`. See [`validate`](Self::validate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ChunkerConfig {
    /// No chunk but the last of a stream is shorter than this.
    pub min_size: u32,
    /// Target average chunk size.
    pub avg_size: u32,
    /// No chunk is longer than this.
    pub max_size: u32,
}

impl Default for ChunkerConfig {
    /// 16 KiB / 64 KiB / 256 KiB.
    ///
    /// Why these numbers:
    /// - **64 KiB average** is the usual dedup sweet spot for file-system images: small
    ///   enough that an edited file in a layer only costs a few new chunks, large enough
    ///   that a multi-GiB image is tens of thousands of chunks rather than millions (every
    ///   chunk is an index row, an outboard and possibly a network request).
    /// - **16 KiB minimum** equals one bao verification group ([`GROUP_SIZE`](crate::GROUP_SIZE)):
    ///   a chunk is never smaller than the unit a range request is proven in, so no
    ///   request verifies less than a full group.
    /// - **256 KiB maximum** (16 groups) bounds the damage of runs without boundaries
    ///   (zero-filled regions, already-compressed data): any chunk fits in one request,
    ///   its outboard is at most 15 hash pairs (960 bytes), and a reader buffers at most
    ///   256 KiB.
    fn default() -> Self {
        ChunkerConfig {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        }
    }
}

/// Why a [`ChunkerConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid chunker config {min}/{avg}/{max}: {reason}",
    min = config.min_size,
    avg = config.avg_size,
    max = config.max_size
)]
pub struct ConfigError {
    /// The rejected configuration.
    pub config: ChunkerConfig,
    /// Which rule it breaks.
    pub reason: &'static str,
}

impl ChunkerConfig {
    /// Checks the limits listed on [`ChunkerConfig`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (min, avg, max) = (
            self.min_size as usize,
            self.avg_size as usize,
            self.max_size as usize,
        );
        let reason = if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min) {
            "min_size must be within 64 B..=1 MiB"
        } else if !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg) {
            "avg_size must be within 256 B..=4 MiB"
        } else if !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max) {
            "max_size must be within 1 KiB..=16 MiB"
        } else if min % 2 != 0 || avg % 2 != 0 || max % 2 != 0 {
            "sizes must be even"
        } else if !(min <= avg && avg <= max) {
            "need min_size <= avg_size <= max_size"
        } else {
            return Ok(());
        };
        Err(ConfigError {
            config: *self,
            reason,
        })
    }
}

/// A chunk read from a stream, with its bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Position of the first byte in the stream.
    pub offset: u64,
    /// `ChunkId::of(&data)`.
    pub id: ChunkId,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

impl Chunk {
    /// The chunk without its bytes.
    pub fn span(&self) -> ChunkSpan {
        ChunkSpan {
            offset: self.offset,
            // Chunks are at most `max_size` (<= 16 MiB) long.
            len: self.data.len() as u32,
            id: self.id,
        }
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .field("id", &self.id)
            .finish()
    }
}

/// Where a chunk lies in its input, and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ChunkSpan {
    /// Position of the first byte in the input.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// BLAKE3 of the chunk's bytes.
    pub id: ChunkId,
}

impl ChunkSpan {
    /// `offset + len`.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// Streams chunks out of any reader with bounded memory.
///
/// The chunker keeps one read buffer of `2 * cfg.max_size` bytes (512 KiB by default;
/// twice the largest chunk so that the unread tail is moved to the front at most once per
/// `max_size` of input, instead of after every chunk); each yielded [`Chunk`] owns a copy of
/// its bytes (at most `max_size`). Reads may return any number of bytes (short reads are
/// fine, [`io::ErrorKind::Interrupted`] is retried); the chunks depend only on the content,
/// never on how reads were split, and equal [`chunk_slice`]'s.
///
/// Errors: an invalid `cfg` yields one [`io::ErrorKind::InvalidInput`] error; a read
/// error is yielded as is. Either ends the iteration.
///
/// To also build each chunk's [`Outboard`] in the same pass, use
/// [`ChunkReader::with_outboards`].
pub fn chunk_reader<R: Read>(reader: R, cfg: &ChunkerConfig) -> ChunkReader<R> {
    ChunkReader {
        cutter: Cutter::new(reader, cfg),
    }
}

/// Iterator returned by [`chunk_reader`].
pub struct ChunkReader<R: Read> {
    cutter: Cutter<R>,
}

impl<R: Read> ChunkReader<R> {
    /// Yields each chunk with its bao [`Outboard`], hashing every byte once: the chunk id
    /// is the outboard's root (equal to [`ChunkId::of`] the data).
    pub fn with_outboards(self) -> ChunkOutboards<R> {
        ChunkOutboards {
            cutter: self.cutter,
        }
    }
}

impl<R: Read> Iterator for ChunkReader<R> {
    type Item = io::Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.cutter.next_raw()?.map(|(offset, data)| Chunk {
            offset,
            id: ChunkId::of(&data),
            data,
        }))
    }
}

impl<R: Read> FusedIterator for ChunkReader<R> {}

impl<R: Read> std::fmt::Debug for ChunkReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkReader")
            .field("offset", &self.cutter.offset)
            .field("done", &self.cutter.done)
            .finish_non_exhaustive()
    }
}

/// Iterator returned by [`ChunkReader::with_outboards`]: chunks and their outboards.
pub struct ChunkOutboards<R: Read> {
    cutter: Cutter<R>,
}

impl<R: Read> Iterator for ChunkOutboards<R> {
    type Item = io::Result<(Chunk, Outboard)>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.cutter.next_raw()?.map(|(offset, data)| {
            let ob = outboard(&data);
            let chunk = Chunk {
                offset,
                id: ob.root(),
                data,
            };
            (chunk, ob)
        }))
    }
}

impl<R: Read> FusedIterator for ChunkOutboards<R> {}

impl<R: Read> std::fmt::Debug for ChunkOutboards<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkOutboards")
            .field("offset", &self.cutter.offset)
            .field("done", &self.cutter.done)
            .finish_non_exhaustive()
    }
}

/// FastCDC over a reader: the same `fastcdc::v2020::cut` calls as `FastCDC` makes over a
/// slice (each sees at least `max_size` bytes, or everything left at the end of the
/// stream), so the boundaries are identical.
struct Cutter<R> {
    reader: R,
    /// `2 * max_size` bytes; `buf[start..end]` is read but not yet chunked.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    eof: bool,
    done: bool,
    config_error: Option<ConfigError>,
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl<R: Read> Cutter<R> {
    fn new(reader: R, cfg: &ChunkerConfig) -> Self {
        let config_error = cfg.validate().err();
        let (mask_s, mask_l) = if config_error.is_none() {
            v2020::select_masks(cfg.avg_size as usize, v2020::Normalization::Level1)
        } else {
            (0, 0)
        };
        let max = cfg.max_size as usize;
        Cutter {
            reader,
            buf: if config_error.is_none() {
                vec![0u8; 2 * max]
            } else {
                Vec::new()
            },
            start: 0,
            end: 0,
            offset: 0,
            eof: false,
            done: false,
            config_error,
            min: cfg.min_size as usize,
            avg: cfg.avg_size as usize,
            max,
            mask_s,
            mask_l,
        }
    }

    /// Fills the buffer until it holds at least `max` unchunked bytes or the stream ends.
    fn fill(&mut self) -> io::Result<()> {
        while !self.eof && self.end - self.start < self.max {
            if self.end == self.buf.len() {
                // Less than `max` left and no room behind it: move the tail to the front.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn next_raw(&mut self) -> Option<io::Result<(u64, Vec<u8>)>> {
        if self.done {
            return None;
        }
        if let Some(e) = self.config_error.take() {
            self.done = true;
            return Some(Err(io::Error::new(io::ErrorKind::InvalidInput, e)));
        }
        if let Err(e) = self.fill() {
            self.done = true;
            return Some(Err(e));
        }
        if self.start == self.end {
            self.done = true;
            return None;
        }
        let (_, len) = v2020::cut(
            &self.buf[self.start..self.end],
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        // `cut` returns at least one byte for non-empty input; guard against a zero
        // anyway so the loop cannot spin.
        let len = len.clamp(1, self.end - self.start);
        let data = self.buf[self.start..self.start + len].to_vec();
        let offset = self.offset;
        self.start += len;
        self.offset += len as u64;
        Some(Ok((offset, data)))
    }
}

/// Chunk boundaries and names for data already in memory. Same boundaries as
/// [`chunk_reader`] over the same bytes.
///
/// # Panics
/// If `cfg` is invalid (see [`ChunkerConfig::validate`]).
pub fn chunk_slice(data: &[u8], cfg: &ChunkerConfig) -> Vec<ChunkSpan> {
    if let Err(e) = cfg.validate() {
        panic!("chunk_slice: {e}");
    }
    v2020::FastCDC::new(
        data,
        cfg.min_size as usize,
        cfg.avg_size as usize,
        cfg.max_size as usize,
    )
    .map(|c| ChunkSpan {
        offset: c.offset as u64,
        len: c.length as u32,
        id: ChunkId::of(&data[c.offset..c.offset + c.length]),
    })
    .collect()
}
