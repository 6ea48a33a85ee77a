//! ChunkId formats.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use fd_chunker::{ChunkId, ChunkIdError};

#[test]
fn of_is_blake3() {
    let data = b"hello fd";
    assert_eq!(ChunkId::of(data).0, *blake3::hash(data).as_bytes());
    assert_eq!(ChunkId::of(data), ChunkId::from(blake3::hash(data)));
}

#[test]
fn hex_formats() {
    let id = ChunkId::of(b"x");
    let hex = id.to_hex();
    assert_eq!(hex.len(), 64);
    assert!(
        hex.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(hex, blake3::hash(b"x").to_hex().as_str());
    assert_eq!(id.to_string(), hex);
    assert_eq!(id.short(), hex[..12]);
    assert_eq!(format!("{id:?}"), format!("ChunkId({})", &hex[..12]));
    assert_eq!(ChunkId::from_hex(&hex).unwrap(), id);
    assert_eq!(hex.parse::<ChunkId>().unwrap(), id);
    assert_eq!(ChunkId::from_hex(&hex.to_uppercase()).unwrap(), id);
}

#[test]
fn from_hex_errors() {
    assert_eq!(
        ChunkId::from_hex("abc"),
        Err(ChunkIdError::InvalidLength { len: 3 })
    );
    assert_eq!(
        ChunkId::from_hex(""),
        Err(ChunkIdError::InvalidLength { len: 0 })
    );
    let mut bad = "0".repeat(64);
    bad.replace_range(10..11, "g");
    assert_eq!(
        ChunkId::from_hex(&bad),
        Err(ChunkIdError::InvalidChar { ch: 'g', index: 10 })
    );
    // 64 bytes but not 64 characters
    let multibyte = format!("é{}", "0".repeat(62));
    assert_eq!(multibyte.len(), 64);
    assert!(ChunkId::from_hex(&multibyte).is_err());
}

#[test]
fn serde_is_hex_string() {
    let id = ChunkId::of(b"serde");
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(json, format!("\"{}\"", id.to_hex()));
    let back: ChunkId = serde_json::from_str(&json).unwrap();
    assert_eq!(back, id);
    assert!(serde_json::from_str::<ChunkId>("\"nothex\"").is_err());
    assert!(serde_json::from_str::<ChunkId>("42").is_err());
    let ids: Vec<ChunkId> = serde_json::from_str(&format!("[{json},{json}]")).unwrap();
    assert_eq!(ids, vec![id, id]);
}

#[test]
fn ord_and_hash_follow_bytes() {
    let a = ChunkId([0; 32]);
    let mut b_bytes = [0; 32];
    b_bytes[0] = 1;
    let b = ChunkId(b_bytes);
    assert!(a < b);
    let set: BTreeSet<ChunkId> = [b, a, b].into_iter().collect();
    assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![a, b]);
}
