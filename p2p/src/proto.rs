//! The wire protocol `/fd/chunks/1`: messages, framing and membership proofs.
//!
//! Each message is one frame: a version byte, a 4-byte big-endian length and a postcard body.
//! A frame of an unknown version or above [`MAX_FRAME`] is refused before its body is read,
//! so a peer cannot make us allocate without bound.
//!
//! Evolving the messages: postcard encodes an enum variant by its position, so variants are
//! only ever appended (`Image` came after the first four). An older node cannot decode a
//! request it does not know and drops that one stream; the asker sees a failed request and
//! moves on to other peers, and every other request keeps working, so the frame version
//! stays 1.
//!
//! Every request and every answer carries a proof of team membership: a keyed BLAKE3 (under
//! the team key) of the direction and both peer ids. The peer ids are those QUIC's TLS
//! authenticated, so a proof is useless to anyone else and on any other connection. A node
//! outside the team gets [`Response::Denied`] to everything, not even `Have` answers.

use std::io;
use std::ops::Range;

use fd_chunker::{ChunkId, RangeDecoder};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use crate::keys::TeamKey;

/// The protocol name negotiated on each stream.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/fd/chunks/1");
/// The frame format version this build reads and writes.
pub const FRAME_VERSION: u8 = 1;
/// Largest frame accepted: a full `Chunks` answer plus its bao tree with room to spare.
pub const MAX_FRAME: usize = 24 << 20;
/// Most chunks one `Chunks` request may ask for (at most 256 KiB each).
pub const MAX_CHUNKS_PER_REQUEST: usize = 32;
/// Most keys one `Have` request may ask about.
pub const MAX_KEYS_PER_HAVE: usize = 512;

/// One chunk asked for: its id, its full length, and optionally a byte range of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkWant {
    pub id: [u8; 32],
    pub len: u32,
    /// `None` asks for the whole chunk.
    pub range: Option<(u64, u64)>,
}

impl ChunkWant {
    /// The byte range asked for, clamped to the chunk.
    pub fn byte_range(&self) -> Range<u64> {
        let len = u64::from(self.len);
        match self.range {
            Some((start, end)) => start.min(len)..end.min(len).max(start.min(len)),
            None => 0..len,
        }
    }
}

/// What one node asks another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Which of these blob keys (`sha256:…` OCI blobs, `blake3:…` fd objects) do you hold?
    Have { keys: Vec<String> },
    /// The chunk list and media type of one blob.
    Recipe { key: String },
    /// Bao-encoded ranges of chunks.
    Chunks { wants: Vec<ChunkWant> },
    /// The manifest digest your store records for this image reference.
    Tag { reference: String },
    /// What you record for the complete image with this manifest: the key of its merged file
    /// index (and of its prefetch profile), so an asker can mount it before fetching layers.
    Image { manifest_digest: String },
}

/// A peer's record of a complete image, as the answer to [`Request::Image`]. The asker checks
/// what it can: the layers against the manifest it trusts, the file index and profile against
/// these `blake3:` keys as it fetches them (with `Recipe` and `Chunks`). That the file index
/// is the merge of those layers is taken on the word of a team member, as a tag is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageAnswer {
    /// `blake3:` key of the merged file index.
    pub file_index: String,
    /// Layer blob digests, lowest first.
    pub layers: Vec<String>,
    /// `blake3:` key of the image's prefetch profile, when the peer has one stored.
    pub profile: Option<String>,
}

/// A blob's recipe as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeAnswer {
    pub media_type: String,
    pub chunks: Vec<([u8; 32], u32)>,
}

/// The answer for one [`ChunkWant`], in the order asked. `None`: not held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAnswer {
    pub encoded: Option<WireBytes>,
}

/// Bytes sent as one length-prefixed run rather than element by element (serde's default for
/// `Vec<u8>`), which makes encoding megabytes of chunk data a copy instead of a loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireBytes(pub Vec<u8>);

impl Serialize for WireBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for WireBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WireBytes, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = WireBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<WireBytes, E> {
                Ok(WireBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<WireBytes, E> {
                Ok(WireBytes(v))
            }
        }
        d.deserialize_byte_buf(Visit)
    }
}

/// What a node answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Have {
        keys: Vec<String>,
    },
    Recipe(Option<RecipeAnswer>),
    Chunks(Vec<ChunkAnswer>),
    Tag(Option<String>),
    /// Too many uploads in progress: ask someone else or later.
    Busy,
    /// The request carried no valid team proof. Unsigned: the sender is not a member.
    Denied,
    /// The node failed to answer (its store is unreadable, say).
    Failed(String),
    /// The answer to [`Request::Image`]; `None`: no complete image with that manifest here.
    Image(Option<ImageAnswer>),
}

/// A message with its membership proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    pub proof: [u8; 32],
    pub body: T,
}

/// Which way a proof goes, so a request's proof cannot be replayed as an answer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// The proof that `from`, talking to `to`, holds the team key.
pub fn proof(team: &TeamKey, dir: Direction, from: &PeerId, to: &PeerId) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(team.as_bytes());
    h.update(match dir {
        Direction::Request => b"fd-p2p/1 request ",
        Direction::Response => b"fd-p2p/1 answer  ",
    });
    let (f, t) = (from.to_bytes(), to.to_bytes());
    h.update(&(f.len() as u32).to_le_bytes());
    h.update(&f);
    h.update(&t);
    *h.finalize().as_bytes()
}

/// Checks a proof in constant time.
pub fn check_proof(
    team: &TeamKey,
    dir: Direction,
    from: &PeerId,
    to: &PeerId,
    got: &[u8; 32],
) -> bool {
    blake3::Hash::from_bytes(proof(team, dir, from, to)) == blake3::Hash::from_bytes(*got)
}

/// Encodes a message as one frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let body =
        postcard::to_stdvec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message of {} bytes is over the {MAX_FRAME}-byte frame limit",
                body.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(FRAME_VERSION);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes the body of a frame whose header was already checked.
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<T> {
    postcard::from_bytes(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Checks a frame header and returns the body length.
pub fn check_header(header: [u8; 5]) -> io::Result<usize> {
    if header[0] != FRAME_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "frame version {} (this fd speaks {FRAME_VERSION})",
                header[0]
            ),
        ));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    Ok(len)
}

async fn read_frame<T, R>(io: &mut R) -> io::Result<T>
where
    T: for<'de> Deserialize<'de>,
    R: AsyncRead + Unpin + Send,
{
    let mut header = [0u8; 5];
    io.read_exact(&mut header).await?;
    let len = check_header(header)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    decode_body(&body)
}

async fn write_frame<T, W>(io: &mut W, msg: &T) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    let frame = encode_frame(msg)?;
    io.write_all(&frame).await?;
    io.close().await
}

/// The request-response codec of [`PROTOCOL`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Codec;

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Signed<Request>;
    type Response = Signed<Response>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Self::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Self::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Self::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Self::Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res).await
    }
}

/// Encodes the answer for one want from the chunk's bytes (already checked against its id):
/// the bao stream of the range, verifiable group by group against the id alone.
pub fn encode_answer(data: &[u8], want: &ChunkWant) -> Vec<u8> {
    let ob = fd_chunker::outboard(data);
    fd_chunker::encode_range(data, &ob, want.byte_range())
}

/// Verifies a chunk answer 16 KiB group by group, returning the proven bytes of the range.
/// The first bad group ends the answer with an error.
pub fn verify_answer(want: &ChunkWant, encoded: &[u8]) -> Result<Vec<u8>, fd_chunker::VerifyError> {
    let range = want.byte_range();
    let mut decoder = RangeDecoder::new(ChunkId(want.id), u64::from(want.len), range.clone());
    let mut out = Vec::with_capacity((range.end - range.start) as usize);
    // Feed in pieces of the size that arrives off the wire, so each group is proven on its own.
    for piece in encoded.chunks(fd_chunker::GROUP_SIZE as usize) {
        for (_, bytes) in decoder.push(piece)? {
            out.extend_from_slice(&bytes);
        }
    }
    decoder.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn frames_round_trip_and_refuse_bad_headers() {
        let msg = Signed {
            proof: [7; 32],
            body: Request::Chunks {
                wants: vec![ChunkWant {
                    id: [1; 32],
                    len: 99,
                    range: Some((3, 9)),
                }],
            },
        };
        let frame = encode_frame(&msg).expect("encode");
        let len = check_header(frame[..5].try_into().expect("header")).expect("header ok");
        assert_eq!(len, frame.len() - 5);
        let back: Signed<Request> = decode_body(&frame[5..]).expect("decode");
        assert_eq!(back, msg);

        let mut bad_version = frame.clone();
        bad_version[0] = 9;
        assert!(check_header(bad_version[..5].try_into().expect("h")).is_err());
        let mut huge = [FRAME_VERSION, 0, 0, 0, 0];
        huge[1..].copy_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(check_header(huge).is_err());
        assert!(decode_body::<Signed<Response>>(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn appended_variants_leave_older_encodings_unchanged() {
        // The first four requests encode as they did before `Image` was added (variant 0..3),
        // so nodes of either version still understand each other for those.
        let tag = postcard::to_stdvec(&Request::Tag {
            reference: "r".into(),
        })
        .expect("encode");
        assert_eq!(tag[0], 3);
        let image = Request::Image {
            manifest_digest: "sha256:ab".into(),
        };
        let bytes = postcard::to_stdvec(&image).expect("encode");
        assert_eq!(bytes[0], 4);
        assert_eq!(
            postcard::from_bytes::<Request>(&bytes).expect("decode"),
            image
        );
        let answer = Response::Image(Some(ImageAnswer {
            file_index: "blake3:00".into(),
            layers: vec!["sha256:11".into()],
            profile: None,
        }));
        let bytes = postcard::to_stdvec(&answer).expect("encode");
        assert_eq!(
            postcard::from_bytes::<Response>(&bytes).expect("decode"),
            answer
        );
        let failed = postcard::to_stdvec(&Response::Failed("x".into())).expect("encode");
        assert_eq!(failed[0], 6);
    }

    #[test]
    fn proofs_bind_team_direction_and_both_peers() {
        let team = TeamKey::generate();
        let other = TeamKey::generate();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let p = proof(&team, Direction::Request, &a, &b);
        assert!(check_proof(&team, Direction::Request, &a, &b, &p));
        assert!(!check_proof(&other, Direction::Request, &a, &b, &p));
        assert!(!check_proof(&team, Direction::Response, &a, &b, &p));
        assert!(!check_proof(&team, Direction::Request, &c, &b, &p));
        assert!(!check_proof(&team, Direction::Request, &a, &c, &p));
    }

    #[test]
    fn answers_verify_and_tampering_is_caught() {
        let data = sample(200_000);
        let id = ChunkId::of(&data);
        let whole = ChunkWant {
            id: id.0,
            len: data.len() as u32,
            range: None,
        };
        let enc = encode_answer(&data, &whole);
        assert_eq!(verify_answer(&whole, &enc).expect("verifies"), data);

        let part = ChunkWant {
            id: id.0,
            len: data.len() as u32,
            range: Some((40_000, 70_000)),
        };
        let enc_part = encode_answer(&data, &part);
        assert_eq!(
            verify_answer(&part, &enc_part).expect("range"),
            &data[40_000..70_000]
        );

        // One flipped byte deep in the stream: that group fails.
        let mut tampered = enc.clone();
        let at = tampered.len() - 5_000;
        tampered[at] ^= 0x40;
        assert!(verify_answer(&whole, &tampered).is_err());
        // A truncated answer fails too.
        assert!(verify_answer(&whole, &enc[..enc.len() - 1]).is_err());
        // Bytes of another chunk under this id fail at once.
        let other: Vec<u8> = data.iter().map(|b| b ^ 1).collect();
        let wrong = encode_answer(&other, &whole);
        assert!(verify_answer(&whole, &wrong).is_err());
    }
}
