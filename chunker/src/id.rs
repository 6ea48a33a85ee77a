//! [`ChunkId`]: the BLAKE3 name of a chunk.

use std::fmt;
use std::str::FromStr;

/// The name of a chunk: the BLAKE3 hash of its bytes.
///
/// This is also the root of the chunk's bao tree (see [`crate::outboard`]), so a
/// `ChunkId` and the chunk's length are all a receiver needs to verify any byte range of
/// the chunk as it arrives.
///
/// Formats: [`Display`](fmt::Display) and [`to_hex`](Self::to_hex) give the full 64
/// lowercase hex digits, [`Debug`](fmt::Debug) gives `ChunkId(<first 12 hex digits>)`,
/// and serde (de)serializes it as the full hex string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

/// Why a string is not a [`ChunkId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkIdError {
    /// A chunk id is exactly 64 hex digits.
    #[error("a chunk id is 64 hex digits, got {len} characters")]
    InvalidLength {
        /// Length of the rejected string, in bytes.
        len: usize,
    },
    /// A character that is not a hex digit.
    #[error("invalid character {ch:?} at position {index} in chunk id")]
    InvalidChar {
        /// The offending character.
        ch: char,
        /// Its byte position in the string.
        index: usize,
    },
}

impl ChunkId {
    /// Length of [`to_hex`](Self::to_hex)'s output.
    pub const HEX_LEN: usize = 64;
    /// Length of [`short`](Self::short)'s output.
    pub const SHORT_LEN: usize = 12;

    /// The id of `data`: `blake3::hash(data)`.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for logs and error messages.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..Self::SHORT_LEN / 2])
    }

    /// Parses 64 hex digits (either case; [`to_hex`](Self::to_hex) always writes lowercase).
    pub fn from_hex(s: &str) -> Result<ChunkId, ChunkIdError> {
        if s.len() != Self::HEX_LEN {
            return Err(ChunkIdError::InvalidLength { len: s.len() });
        }
        let mut out = [0u8; 32];
        match hex::decode_to_slice(s, &mut out) {
            Ok(()) => Ok(ChunkId(out)),
            Err(hex::FromHexError::InvalidHexCharacter { c, index }) => {
                Err(ChunkIdError::InvalidChar { ch: c, index })
            }
            // Length was checked above, and a 64-byte string that `hex` calls odd-length or
            // wrong-length cannot exist; report it as a length error all the same.
            Err(_) => Err(ChunkIdError::InvalidLength { len: s.len() }),
        }
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        // Cannot fail: the buffer is exactly twice the input length.
        if hex::encode_to_slice(self.0, &mut buf).is_err() {
            return Err(fmt::Error);
        }
        // hex output is ASCII.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

impl FromStr for ChunkId {
    type Err = ChunkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChunkId::from_hex(s)
    }
}

impl From<blake3::Hash> for ChunkId {
    fn from(h: blake3::Hash) -> Self {
        ChunkId(*h.as_bytes())
    }
}

impl From<ChunkId> for blake3::Hash {
    fn from(id: ChunkId) -> Self {
        blake3::Hash::from_bytes(id.0)
    }
}

impl AsRef<[u8]> for ChunkId {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HexVisitor;
        impl serde::de::Visitor<'_> for HexVisitor {
            type Value = ChunkId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chunk id as 64 hex digits")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ChunkId, E> {
                ChunkId::from_hex(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(HexVisitor)
    }
}
