//! Outboards and range verification.
#![allow(clippy::unwrap_used)]

use std::ops::Range;

use fd_chunker::{
    ChunkId, EncodeError, GROUP_SIZE, Outboard, OutboardError, RangeDecoder, VerifyError,
    decode_range, encode_range, encoded_len, outboard, outboard_len, try_encode_range,
};
use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};

const G: u64 = GROUP_SIZE;

/// Sizes at the interesting edges, in bytes.
const EDGE_SIZES: &[u64] = &[
    0,
    1,
    1023,
    1024,
    1025,
    G - 1,
    G,
    G + 1,
    2 * G,
    3 * G + 77,
    5 * G,
    7 * G + 1,
    100_000,
    256 * 1024 - 1,
    256 * 1024,
];

fn random_data(len: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

fn clamp(size: u64, r: &Range<u64>) -> Range<u64> {
    let end = r.end.min(size);
    r.start.min(end)..end
}

// --- An independent model of the stream layout -------------------------------------------
//
// BLAKE3/bao tree over 16 KiB groups: a node over `n > 1` groups has a left subtree of the
// largest power of two `< n` groups. The stream is the pre-order walk of the nodes whose
// span meets the requested groups: a 64-byte hash pair per parent, the bytes of each leaf.

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Parent,
    Leaf,
}

#[derive(Debug, Clone)]
struct Item {
    kind: Kind,
    groups: Range<u64>,
    /// Position in the stream.
    at: usize,
    len: usize,
    is_root: bool,
}

fn layout(size: u64, range: &Range<u64>) -> Vec<Item> {
    let r = clamp(size, range);
    let mut items = Vec::new();
    if r.is_empty() {
        return items;
    }
    let want = r.start / G..r.end.div_ceil(G);
    let n = size.div_ceil(G);
    let mut at = 0;
    walk(size, 0..n, &want, true, &mut at, &mut items);
    items
}

fn walk(
    size: u64,
    span: Range<u64>,
    want: &Range<u64>,
    is_root: bool,
    at: &mut usize,
    out: &mut Vec<Item>,
) {
    if span.end <= want.start || want.end <= span.start {
        return;
    }
    let n = span.end - span.start;
    if n == 1 {
        let len = (size.min(span.end * G) - span.start * G) as usize;
        out.push(Item {
            kind: Kind::Leaf,
            groups: span,
            at: *at,
            len,
            is_root,
        });
        *at += len;
        return;
    }
    let left = 1u64 << (63 - (n - 1).leading_zeros());
    out.push(Item {
        kind: Kind::Parent,
        groups: span.clone(),
        at: *at,
        len: 64,
        is_root,
    });
    *at += 64;
    walk(size, span.start..span.start + left, want, false, at, out);
    walk(size, span.start + left..span.end, want, false, at, out);
}

/// The error a corrupted byte inside `item` must produce.
fn expected_error(id: ChunkId, size: u64, item: &Item) -> VerifyErrorShape {
    if item.is_root {
        VerifyErrorShape::Root
    } else if item.kind == Kind::Parent {
        VerifyErrorShape::Parent(item.groups.clone())
    } else {
        let _ = (id, size);
        VerifyErrorShape::Group(item.groups.start)
    }
}

#[derive(Debug, PartialEq)]
enum VerifyErrorShape {
    Root,
    Parent(Range<u64>),
    Group(u64),
}

fn shape(e: &VerifyError) -> Option<VerifyErrorShape> {
    match e {
        VerifyError::RootMismatch { .. } => Some(VerifyErrorShape::Root),
        VerifyError::ParentMismatch { groups, offset, .. } => {
            assert_eq!(*offset, groups.start * G);
            Some(VerifyErrorShape::Parent(groups.clone()))
        }
        VerifyError::GroupMismatch { group, offset, .. } => {
            assert_eq!(*offset, group * G);
            Some(VerifyErrorShape::Group(*group))
        }
        _ => None,
    }
}

type Pieces = Vec<(u64, Vec<u8>)>;

/// Feeds `encoded` in random pieces; returns the verified pieces and the first error.
fn feed(
    id: ChunkId,
    size: u64,
    range: Range<u64>,
    encoded: &[u8],
    rng: &mut StdRng,
) -> (Pieces, Result<(), VerifyError>) {
    let mut dec = RangeDecoder::new(id, size, range);
    let mut pieces = Vec::new();
    let mut rest = encoded;
    while !rest.is_empty() {
        let n = match rng.random_range(0..4) {
            0 => 1,
            1 => rng.random_range(1..=100),
            2 => rng.random_range(1..=20_000),
            _ => rest.len(),
        }
        .min(rest.len());
        let (now, later) = rest.split_at(n);
        rest = later;
        if let Err(e) = dec.push_into(now, &mut pieces) {
            // The decoder stays failed.
            assert_eq!(dec.push(b"more").unwrap_err(), e);
            return (pieces, Err(e));
        }
    }
    (pieces, dec.finish())
}

fn check_pieces(data: &[u8], range: &Range<u64>, pieces: &[(u64, Vec<u8>)]) {
    let mut next = range.start;
    for (off, bytes) in pieces {
        assert_eq!(*off, next, "pieces are contiguous");
        assert!(!bytes.is_empty());
        assert_eq!(
            &data[*off as usize..*off as usize + bytes.len()],
            &bytes[..],
            "verified bytes are the data"
        );
        next += bytes.len() as u64;
    }
    assert!(next <= range.end);
}

// --- Roots and outboards --------------------------------------------------------------

#[test]
fn outboard_root_is_plain_blake3() {
    for (i, &size) in EDGE_SIZES
        .iter()
        .chain(&[1 << 20, (1 << 20) + 12345])
        .enumerate()
    {
        let data = random_data(size, i as u64);
        let ob = outboard(&data);
        assert_eq!(ob.root(), ChunkId::of(&data), "size {size}");
        assert_eq!(ob.root().0, *blake3::hash(&data).as_bytes());
        assert_eq!(ob.size(), size);
        assert_eq!(ob.as_bytes().len() as u64, outboard_len(size));
        let groups = size.div_ceil(G).max(1);
        assert_eq!(outboard_len(size), 32 + 64 * (groups - 1));
    }
    assert_eq!(outboard_len(256 * 1024), 992);
}

#[test]
fn outboard_bytes_round_trip_and_are_checked() {
    let data = random_data(5 * G + 3, 7);
    let ob = outboard(&data);
    let back = Outboard::from_bytes(ob.size(), ob.as_bytes()).unwrap();
    assert_eq!(back, ob);
    assert_eq!(back.root(), ChunkId::of(&data));
    assert_eq!(
        Outboard::from_bytes(ob.size(), ob.clone().into_bytes()).unwrap(),
        ob
    );

    // Wrong size for these bytes.
    let err = Outboard::from_bytes(ob.size() + 10 * G, ob.as_bytes()).unwrap_err();
    assert!(matches!(err, OutboardError::Length { .. }), "{err}");
    // Corrupt top pair.
    let mut bad = ob.as_bytes().to_vec();
    bad[40] ^= 1;
    let err = Outboard::from_bytes(ob.size(), bad).unwrap_err();
    assert!(
        matches!(err, OutboardError::RootMismatch { root, .. } if root == ob.root()),
        "{err}"
    );

    // One-group chunks: the outboard is just the root.
    let small = outboard(b"tiny");
    assert_eq!(small.as_bytes(), ChunkId::of(b"tiny").as_bytes());
    assert_eq!(Outboard::from_bytes(4, small.as_bytes()).unwrap(), small);
}

// --- Round trips ----------------------------------------------------------------------

fn sizes() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => prop::sample::select(EDGE_SIZES),
        1 => 0u64..300_000,
    ]
}

/// A size and a range in `0..=size + 100` (so some ranges run past the end).
fn size_and_range() -> impl Strategy<Value = (u64, Range<u64>)> {
    sizes().prop_flat_map(|size| {
        (Just(size), 0..=size + 100, 0..=size + 100)
            .prop_map(|(size, a, b)| (size, a.min(b)..a.max(b)))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn encode_decode_round_trip((size, range) in size_and_range(), seed in any::<u64>()) {
        let data = random_data(size, seed);
        let id = ChunkId::of(&data);
        let ob = outboard(&data);
        let encoded = encode_range(&data, &ob, range.clone());
        prop_assert_eq!(&encoded, &try_encode_range(&data, &ob, range.clone()).unwrap());

        // Layout matches the model: hash pairs and whole groups, in pre-order.
        let items = layout(size, &range);
        let total: usize = items.iter().map(|i| i.len).sum();
        prop_assert_eq!(encoded.len(), total);
        prop_assert_eq!(encoded_len(size, range.clone()), total as u64);
        for item in items.iter().filter(|i| i.kind == Kind::Leaf) {
            let off = (item.groups.start * G) as usize;
            prop_assert_eq!(&encoded[item.at..item.at + item.len], &data[off..off + item.len]);
        }

        // Whole-stream decode returns exactly data[range].
        let want = clamp(size, &range);
        let decoded = decode_range(id, size, range.clone(), &encoded).unwrap();
        prop_assert_eq!(&decoded[..], &data[want.start as usize..want.end as usize]);

        // Incremental decode with random splits gives the same, contiguous pieces.
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let (pieces, res) = feed(id, size, range.clone(), &encoded, &mut rng);
        prop_assert!(res.is_ok(), "{:?}", res);
        check_pieces(&data, &want, &pieces);
        let joined: Vec<u8> = pieces.into_iter().flat_map(|(_, b)| b).collect();
        prop_assert_eq!(joined, decoded);
    }

    /// Each group is returned as soon as its last byte arrives (not later).
    #[test]
    fn groups_are_released_when_proven((size, range) in size_and_range(), seed in any::<u64>()) {
        let data = random_data(size, seed);
        let ob = outboard(&data);
        let encoded = encode_range(&data, &ob, range.clone());
        let want = clamp(size, &range);
        let mut dec = RangeDecoder::new(ChunkId::of(&data), size, range.clone());
        prop_assert_eq!(dec.range(), want.clone());
        prop_assert_eq!(dec.encoded_len(), encoded.len() as u64);
        let leaf_ends: Vec<(usize, u64)> = layout(size, &range)
            .into_iter()
            .filter(|i| i.kind == Kind::Leaf)
            .map(|i| (i.at + i.len, i.groups.start))
            .collect();
        for (pos, byte) in encoded.iter().enumerate() {
            let pieces = dec.push(std::slice::from_ref(byte)).unwrap();
            let finished_leaf = leaf_ends.iter().find(|(end, _)| *end == pos + 1);
            match finished_leaf {
                Some(&(_, group)) => {
                    let lo = (group * G).max(want.start);
                    let hi = ((group + 1) * G).min(want.end);
                    prop_assert_eq!(pieces.len(), usize::from(lo < hi));
                    if let Some((off, bytes)) = pieces.first() {
                        prop_assert_eq!(*off, lo);
                        prop_assert_eq!(&bytes[..], &data[lo as usize..hi as usize]);
                    }
                }
                None => prop_assert!(pieces.is_empty()),
            }
            prop_assert_eq!(dec.received(), pos as u64 + 1);
        }
        prop_assert!(dec.is_complete());
        dec.finish().unwrap();
    }
}

// --- Corruption -----------------------------------------------------------------------

/// Flips one bit at `pos` and checks: an error is raised while pushing, it names the
/// item's group, pieces returned before it lie in earlier groups, and every returned
/// byte is genuine.
fn check_flip(
    data: &[u8],
    range: &Range<u64>,
    encoded: &[u8],
    items: &[Item],
    pos: usize,
    rng: &mut StdRng,
) {
    let size = data.len() as u64;
    let id = ChunkId::of(data);
    let mut bad = encoded.to_vec();
    bad[pos] ^= 1 << rng.random_range(0..8);
    let (pieces, res) = feed(id, size, range.clone(), &bad, rng);
    let err = res.expect_err("flipped byte was not detected");
    assert_eq!(err.id(), id);
    let item = items
        .iter()
        .find(|i| i.at <= pos && pos < i.at + i.len)
        .unwrap();
    assert_eq!(
        shape(&err),
        Some(expected_error(id, size, item)),
        "flip at {pos} in {item:?}: {err}"
    );
    let group = err.group().unwrap();
    assert_eq!(group, item.groups.start);
    check_pieces(data, &clamp(size, range), &pieces);
    for (off, bytes) in &pieces {
        assert!(
            off + bytes.len() as u64 <= group * G,
            "piece at {off} returned before error in group {group}"
        );
    }
    // The message carries the short id.
    assert!(err.to_string().contains(&id.short()), "{err}");
}

#[test]
fn flipped_byte_anywhere_is_caught() {
    let mut rng = StdRng::seed_from_u64(1);
    let cases: Vec<(u64, Range<u64>)> = vec![
        (1, 0..1),
        (1000, 10..20),
        (G, 0..G),
        (G + 1, 0..G + 1),
        (G + 1, G..G + 1),
        (2 * G, 5..2 * G - 5),
        (3 * G + 77, 0..3 * G + 77),
        (7 * G + 1, 2 * G + 5..5 * G),
        (256 * 1024, 0..256 * 1024),
        (256 * 1024, 100_000..150_000),
        (200_000, 199_999..200_000),
    ];
    for (size, range) in cases {
        let data = random_data(size, size);
        let ob = outboard(&data);
        let encoded = encode_range(&data, &ob, range.clone());
        let items = layout(size, &range);
        // Every hash-pair byte, the first and last bytes of every group, and a sample of
        // the rest (every byte for short streams).
        let mut positions: Vec<usize> = Vec::new();
        for item in &items {
            if item.kind == Kind::Parent || item.len <= 64 {
                positions.extend(item.at..item.at + item.len);
            } else {
                positions.extend([item.at, item.at + 1, item.at + item.len - 1]);
                positions.extend((0..40).map(|_| item.at + rng.random_range(0..item.len)));
            }
        }
        if encoded.len() <= 4096 {
            positions = (0..encoded.len()).collect();
        }
        for pos in positions {
            check_flip(&data, &range, &encoded, &items, pos, &mut rng);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn flipped_byte_is_caught_prop((size, range) in size_and_range(), seed in any::<u64>(), pos in any::<prop::sample::Index>()) {
        let data = random_data(size, seed);
        let ob = outboard(&data);
        let encoded = encode_range(&data, &ob, range.clone());
        prop_assume!(!encoded.is_empty());
        let items = layout(size, &range);
        let mut rng = StdRng::seed_from_u64(seed);
        check_flip(&data, &range, &encoded, &items, pos.index(encoded.len()), &mut rng);
    }
}

#[test]
fn wrong_chunk_id_is_rejected_at_the_root() {
    for size in [1, 100, G, G + 1, 5 * G, 256 * 1024] {
        let data = random_data(size, 3);
        let ob = outboard(&data);
        let encoded = encode_range(&data, &ob, 0..size);
        let wrong = ChunkId::of(b"something else");
        let err = decode_range(wrong, size, 0..size, &encoded).unwrap_err();
        assert_eq!(
            err,
            VerifyError::RootMismatch {
                id: wrong,
                got: ChunkId::of(&data),
                size
            },
            "size {size}"
        );
        assert_eq!(err.group(), Some(0));
        assert!(err.to_string().contains(&wrong.short()));
        assert!(err.to_string().contains(&ChunkId::of(&data).short()));
        // Nothing is released for a wrong id, even byte by byte.
        let mut dec = RangeDecoder::new(wrong, size, 0..size);
        let mut pieces = Vec::new();
        let res: Result<(), VerifyError> = encoded
            .iter()
            .try_for_each(|b| dec.push_into(std::slice::from_ref(b), &mut pieces));
        assert!(res.is_err());
        assert!(pieces.is_empty());
    }
}

#[test]
fn wrong_chunk_size_is_rejected() {
    let size = 3 * G + 77;
    let data = random_data(size, 4);
    let id = ChunkId::of(&data);
    let encoded = encode_range(&data, &outboard(&data), 0..size);
    let mut rng = StdRng::seed_from_u64(4);
    for claimed in [0, 1, size - 1, size + 1, 2 * G, 4 * G, 10 * G] {
        assert!(
            decode_range(id, claimed, 0..claimed, &encoded).is_err(),
            "claimed {claimed}"
        );
        // Whatever is released before the error is genuine data (the tree still proves it).
        let (pieces, res) = feed(id, claimed, 0..claimed, &encoded, &mut rng);
        assert!(res.is_err(), "claimed {claimed}");
        check_pieces(&data, &(0..size), &pieces);
    }
}

#[test]
fn truncated_stream_fails_in_finish() {
    for (size, range) in [
        (G, 0..G),
        (5 * G + 1, 0..5 * G + 1),
        (5 * G + 1, G + 3..3 * G),
        (100, 0..1),
    ] {
        let data = random_data(size, 5);
        let id = ChunkId::of(&data);
        let encoded = encode_range(&data, &outboard(&data), range.clone());
        for cut in [0, 1, 63, 64, 65, encoded.len() / 2, encoded.len() - 1] {
            if cut >= encoded.len() {
                continue;
            }
            let mut dec = RangeDecoder::new(id, size, range.clone());
            let pieces = dec.push(&encoded[..cut]).unwrap();
            check_pieces(&data, &clamp(size, &range), &pieces);
            assert!(!dec.is_complete());
            let err = dec.finish().unwrap_err();
            match &err {
                VerifyError::Truncated {
                    received,
                    expected,
                    group,
                    ..
                } => {
                    assert_eq!(*received, cut as u64);
                    assert_eq!(*expected, encoded.len() as u64);
                    for (off, bytes) in &pieces {
                        assert!(off + bytes.len() as u64 <= group * G);
                    }
                }
                other => panic!("expected Truncated, got {other}"),
            }
            assert_eq!(
                decode_range(id, size, range.clone(), &encoded[..cut]).unwrap_err(),
                err
            );
        }
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let data = random_data(2 * G, 6);
    let id = ChunkId::of(&data);
    let mut encoded = encode_range(&data, &outboard(&data), 0..10);
    let n = encoded.len() as u64;
    encoded.extend_from_slice(b"junk");
    let err = decode_range(id, 2 * G, 0..10, &encoded).unwrap_err();
    assert_eq!(
        err,
        VerifyError::TrailingBytes {
            id,
            expected: n,
            extra: 4
        }
    );

    // Pieces proven before the junk, in the same call, are kept by push_into.
    let mut dec = RangeDecoder::new(id, 2 * G, 0..10);
    let mut pieces = Vec::new();
    assert!(dec.push_into(&encoded, &mut pieces).is_err());
    assert_eq!(pieces, vec![(0, data[..10].to_vec())]);
}

#[test]
fn empty_ranges_have_empty_streams() {
    let data = random_data(3 * G, 8);
    let ob = outboard(&data);
    let id = ob.root();
    let (ten, five) = (10, 5);
    for range in [5..5, ten..five, 3 * G..3 * G + 10, 10 * G..20 * G] {
        let encoded = encode_range(&data, &ob, range.clone());
        assert!(encoded.is_empty());
        assert_eq!(encoded_len(3 * G, range.clone()), 0);
        assert_eq!(
            decode_range(id, 3 * G, range.clone(), &encoded).unwrap(),
            Vec::<u8>::new()
        );
    }
    // Empty chunk.
    let empty = outboard(&[]);
    assert_eq!(empty.root(), ChunkId::of(&[]));
    assert!(encode_range(&[], &empty, 0..100).is_empty());
    assert!(
        decode_range(empty.root(), 0, 0..100, &[])
            .unwrap()
            .is_empty()
    );
}

#[test]
fn corrupt_local_data_is_never_sent() {
    let size = 6 * G;
    let data = random_data(size, 9);
    let ob = outboard(&data);
    let id = ob.root();
    let mut rotten = data.clone();
    rotten[(3 * G + 100) as usize] ^= 0x80;

    match try_encode_range(&rotten, &ob, 0..size) {
        Err(EncodeError::DataCorrupt {
            id: got_id,
            group,
            offset,
        }) => {
            assert_eq!((got_id, group, offset), (id, 3, 3 * G));
        }
        other => panic!("expected DataCorrupt, got {other:?}"),
    }
    // encode_range stops before the bad group; the receiver keeps groups 0..3 and reports
    // truncation at group 3.
    let encoded = encode_range(&rotten, &ob, 0..size);
    let mut dec = RangeDecoder::new(id, size, 0..size);
    let pieces = dec.push(&encoded).unwrap();
    let got: Vec<u8> = pieces.into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(got, data[..(3 * G) as usize]);
    assert!(matches!(
        dec.finish(),
        Err(VerifyError::Truncated { group: 3, .. })
    ));

    // Data and outboard of different sizes.
    assert!(matches!(
        try_encode_range(&data[..100], &ob, 0..10),
        Err(EncodeError::SizeMismatch { data_len: 100, .. })
    ));
    assert!(encode_range(&data[..100], &ob, 0..10).is_empty());

    // Corrupt outboard pair below the root.
    let mut ob_bytes = ob.as_bytes().to_vec();
    let last = ob_bytes.len() - 1;
    ob_bytes[last] ^= 1;
    let bad_ob = Outboard::from_bytes(size, ob_bytes).unwrap();
    let err = try_encode_range(&data, &bad_ob, 0..size).unwrap_err();
    assert!(matches!(err, EncodeError::OutboardCorrupt { .. }), "{err}");
}

#[test]
fn decoder_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RangeDecoder>();
    assert_send_sync::<Outboard>();
    assert_send_sync::<VerifyError>();
    assert_send_sync::<EncodeError>();
}
