//! Chunk boundaries: reassembly, size limits, reader/slice agreement, read-split
//! independence and edit locality.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::io::{self, Read};

use fd_chunker::{ChunkId, ChunkSpan, ChunkerConfig, chunk_reader, chunk_slice, outboard};
use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

/// Small configurations so that inputs of a few hundred KiB have many chunks, plus the
/// default.
fn configs() -> impl Strategy<Value = ChunkerConfig> {
    prop_oneof![
        Just(cfg(64, 256, 1024)),
        Just(cfg(256, 1024, 4096)),
        Just(cfg(1024, 4096, 16 * 1024)),
        Just(cfg(2048, 8192, 65536)),
        Just(ChunkerConfig::default()),
    ]
}

fn cfg(min_size: u32, avg_size: u32, max_size: u32) -> ChunkerConfig {
    ChunkerConfig {
        min_size,
        avg_size,
        max_size,
    }
}

/// Input built from segments: random bytes, zero runs (which have no content-defined
/// boundaries, so they hit `max_size`) and repeated text.
fn inputs(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((0u8..3, 0usize..max_len / 4, any::<u64>()), 0..6).prop_map(
        move |segments| {
            let mut data = Vec::new();
            for (kind, len, seed) in segments {
                match kind {
                    0 => {
                        let mut buf = vec![0u8; len];
                        StdRng::seed_from_u64(seed).fill_bytes(&mut buf);
                        data.extend_from_slice(&buf);
                    }
                    1 => data.resize(data.len() + len, 0),
                    _ => {
                        let text = format!("usr/lib/file-{seed}.so -> target ");
                        data.extend(text.bytes().cycle().take(len));
                    }
                }
            }
            data.truncate(max_len);
            data
        },
    )
}

/// A reader that returns short reads of irregular sizes and sometimes `Interrupted`.
struct IrregularReader {
    data: Vec<u8>,
    pos: usize,
    rng: StdRng,
    max_read: usize,
}

impl Read for IrregularReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rng.random_ratio(1, 10) {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = self
            .rng
            .random_range(1..=self.max_read)
            .min(buf.len())
            .min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn spans_of_reader(reader: impl Read, cfg: &ChunkerConfig) -> Vec<ChunkSpan> {
    chunk_reader(reader, cfg)
        .map(|c| c.unwrap().span())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn reader_chunks_reassemble_and_respect_limits(
        data in inputs(300_000),
        cfg in configs(),
    ) {
        let chunks: Vec<_> = chunk_reader(&data[..], &cfg).collect::<io::Result<_>>().unwrap();
        // Reassembly.
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
        prop_assert_eq!(&joined, &data);
        // Contiguous offsets from 0; ids are the hash of the data; no empty chunks.
        let mut expected_offset = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            prop_assert_eq!(c.offset, expected_offset);
            prop_assert_eq!(c.id, ChunkId::of(&c.data));
            prop_assert!(!c.data.is_empty());
            prop_assert!(c.data.len() <= cfg.max_size as usize, "chunk {} too long", i);
            if i + 1 < chunks.len() {
                prop_assert!(c.data.len() >= cfg.min_size as usize, "chunk {} too short", i);
            }
            expected_offset += c.data.len() as u64;
        }
        prop_assert_eq!(expected_offset, data.len() as u64);
        prop_assert_eq!(chunks.is_empty(), data.is_empty());

        // chunk_slice agrees.
        let spans: Vec<ChunkSpan> = chunks.iter().map(|c| c.span()).collect();
        prop_assert_eq!(chunk_slice(&data, &cfg), spans);
    }

    #[test]
    fn irregular_reads_give_the_same_chunks(
        data in inputs(200_000),
        cfg in configs(),
        seed in any::<u64>(),
        max_read in prop_oneof![Just(1usize), 2usize..64, 64usize..100_000],
    ) {
        let expected = chunk_slice(&data, &cfg);
        let reader = IrregularReader {
            data: data.clone(),
            pos: 0,
            rng: StdRng::seed_from_u64(seed),
            max_read,
        };
        prop_assert_eq!(spans_of_reader(reader, &cfg), expected);
    }

    #[test]
    fn with_outboards_matches_separate_hashing(
        data in inputs(200_000),
        cfg in configs(),
        seed in any::<u64>(),
    ) {
        let reader = IrregularReader {
            data: data.clone(),
            pos: 0,
            rng: StdRng::seed_from_u64(seed),
            max_read: 5000,
        };
        let mut spans = Vec::new();
        for item in chunk_reader(reader, &cfg).with_outboards() {
            let (chunk, ob) = item.unwrap();
            prop_assert_eq!(chunk.id, ChunkId::of(&chunk.data));
            prop_assert_eq!(&ob, &outboard(&chunk.data));
            spans.push(chunk.span());
        }
        prop_assert_eq!(spans, chunk_slice(&data, &cfg));
    }
}

#[test]
fn empty_input_has_no_chunks() {
    let cfg = ChunkerConfig::default();
    assert!(chunk_slice(&[], &cfg).is_empty());
    assert_eq!(chunk_reader(io::empty(), &cfg).count(), 0);
}

#[test]
fn zeros_are_cut_at_max_size() {
    let cfg = ChunkerConfig::default();
    let data = vec![0u8; 1024 * 1024 + 5];
    let spans = chunk_slice(&data, &cfg);
    assert_eq!(spans.len(), 5);
    assert!(spans[..4].iter().all(|s| s.len == cfg.max_size));
    assert_eq!(spans[4].len, 5);
    // identical content, identical name
    assert!(spans[..4].iter().all(|s| s.id == spans[0].id));
}

#[test]
fn default_config_is_valid_and_documented_sizes() {
    let cfg = ChunkerConfig::default();
    assert_eq!(
        (cfg.min_size, cfg.avg_size, cfg.max_size),
        (16 * 1024, 64 * 1024, 256 * 1024)
    );
    cfg.validate().unwrap();
}

#[test]
fn invalid_configs_are_rejected() {
    for bad in [
        cfg(32, 256, 1024),     // min too small
        cfg(64, 100, 1024),     // avg too small
        cfg(64, 256, 512),      // max too small
        cfg(65, 256, 1024),     // odd
        cfg(4096, 2048, 8192),  // min > avg
        cfg(1024, 8192, 4096),  // avg > max
        cfg(64, 256, 32 << 20), // max too large
    ] {
        assert!(bad.validate().is_err(), "{bad:?} accepted");
        let mut it = chunk_reader(&b"some data"[..], &bad);
        let err = it.next().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(it.next().is_none());
    }
}

#[test]
#[should_panic(expected = "invalid chunker config")]
fn chunk_slice_panics_on_invalid_config() {
    chunk_slice(b"data", &cfg(1, 2, 3));
}

#[test]
fn read_errors_are_reported_and_end_iteration() {
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.0).min(1000);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    let mut it = chunk_reader(Failing(10_000), &cfg(64, 256, 1024));
    let mut saw_error = false;
    for item in it.by_ref() {
        if let Err(e) = item {
            assert_eq!(e.to_string(), "disk on fire");
            saw_error = true;
            break;
        }
    }
    assert!(saw_error);
    assert!(it.next().is_none());
}

#[test]
fn reader_buffer_is_bounded_by_twice_max_size() {
    // A reader that records the largest buffer it is asked to fill.
    struct Probe {
        left: u64,
        largest: usize,
    }
    impl Read for Probe {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            let n = (buf.len() as u64).min(self.left) as usize;
            buf[..n].fill(0xAB);
            self.left -= n as u64;
            Ok(n)
        }
    }
    let cfg = ChunkerConfig::default();
    let mut probe = Probe {
        left: 8 << 20,
        largest: 0,
    };
    let mut n = 0;
    for chunk in chunk_reader(&mut probe, &cfg) {
        assert!(chunk.unwrap().data.len() <= cfg.max_size as usize);
        n += 1;
    }
    assert_eq!(n, 32);
    assert!(
        probe.largest <= 2 * cfg.max_size as usize,
        "asked for {}",
        probe.largest
    );
}

/// An insertion of a few bytes early in a large random input changes only the chunks
/// around it.
#[test]
fn small_insertion_changes_few_chunks() {
    let cfg = ChunkerConfig::default();
    let mut rng = StdRng::seed_from_u64(0xfd);
    let mut data = vec![0u8; 8 << 20];
    rng.fill_bytes(&mut data);
    let mut edited = data.clone();
    edited.splice(100_000..100_000, *b"hello!!");

    let before = chunk_slice(&data, &cfg);
    let after = chunk_slice(&edited, &cfg);
    let before_ids: HashSet<ChunkId> = before.iter().map(|s| s.id).collect();
    let shared = after.iter().filter(|s| before_ids.contains(&s.id)).count();
    assert!(before.len() > 64, "only {} chunks", before.len());
    let ratio = shared as f64 / before.len() as f64;
    assert!(
        ratio >= 0.9,
        "only {shared} of {} chunks shared ({ratio:.3})",
        before.len()
    );
    // In practice only the chunk containing the insertion (and maybe its neighbour) change.
    assert!(
        before.len() - shared <= 3,
        "{} chunks changed",
        before.len() - shared
    );
}
