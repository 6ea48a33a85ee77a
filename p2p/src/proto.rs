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
//! A `Chunks` answer is the exception to one frame per message: its frame holds only a head
//! ([`Response::ChunksHead`]: for each chunk asked, whether it is held and how many bao bytes
//! follow), and the bao streams follow it raw. The reading side verifies each stream 16 KiB
//! group by group as it comes off the connection ([`read_verified`]), hands on only proven
//! bytes ([`Response::Verified`]), and stops reading at the first group that fails: the rest
//! of a lying answer is never downloaded, and the failure names the answer as bad
//! ([`BAD_ANSWER`]) so the asker can rank the peer down.
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
    /// The references of the complete images you hold (for `fd peers`).
    Images,
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
    pub want: ChunkWant,
    pub encoded: Option<WireBytes>,
}

/// The head of one chunk's answer on the wire: what was asked (echoed, so the reader can
/// verify without knowing the request) and how many bao bytes follow (`None`: not held).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHead {
    pub want: ChunkWant,
    pub encoded: Option<u32>,
}

/// One chunk of an answer as the reader hands it on: the range asked and its proven bytes
/// (`None`: not held). Never sent; built by [`read_verified`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedChunk {
    pub want: ChunkWant,
    pub data: Option<WireBytes>,
}

/// Marks the error of an answer that failed verification as it was read.
pub const BAD_ANSWER: &str = "answer failed verification";

/// True when a request failed because the answer failed verification as it was read.
pub fn is_bad_answer(e: &crate::P2pError) -> bool {
    matches!(e, crate::P2pError::Peer { reason, .. } if reason.contains(BAD_ANSWER))
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
    /// How a `Chunks` answer goes on the wire: this head, then the bao bytes it announces.
    ChunksHead(Vec<ChunkHead>),
    /// A `Chunks` answer as read: every byte proven against its chunk id.
    Verified(Vec<VerifiedChunk>),
    /// The answer to [`Request::Images`]: references of complete images, at most
    /// [`MAX_IMAGES_LISTED`].
    Images(Vec<String>),
}

/// Most image references one `Images` answer lists.
pub const MAX_IMAGES_LISTED: usize = 256;

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
        let msg: Signed<Response> = read_frame(io).await?;
        match msg.body {
            Response::ChunksHead(heads) => Ok(Signed {
                proof: msg.proof,
                body: Response::Verified(read_verified(io, heads).await?),
            }),
            // Only the reader makes these: a peer sending one is not speaking the protocol.
            Response::Verified(_) | Response::Chunks(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a chunk answer without its head",
            )),
            body => Ok(Signed {
                proof: msg.proof,
                body,
            }),
        }
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
        let Signed { proof, body } = res;
        let Response::Chunks(answers) = body else {
            return write_frame(io, &Signed { proof, body }).await;
        };
        let heads = answers
            .iter()
            .map(|a| ChunkHead {
                want: a.want.clone(),
                encoded: a.encoded.as_ref().map(|e| e.0.len() as u32),
            })
            .collect();
        let head = encode_frame(&Signed {
            proof,
            body: Response::ChunksHead(heads),
        })?;
        io.write_all(&head).await?;
        for encoded in answers.iter().filter_map(|a| a.encoded.as_ref()) {
            io.write_all(&encoded.0).await?;
        }
        io.close().await
    }
}

/// Most bao bytes an answer for `want` can take: the range widened to whole 16 KiB groups at
/// both ends, plus its share of the tree (64 bytes per group) and the tree's top levels.
fn encoded_bound(want: &ChunkWant) -> u64 {
    let r = want.byte_range();
    let span = (r.end - r.start) + 2 * fd_chunker::GROUP_SIZE;
    span + span / 64 + 4096
}

/// Reads the bao streams announced by `heads`, proving each 16 KiB group against its chunk
/// id as it arrives. Stops at the first group that fails ([`BAD_ANSWER`]), without reading on.
pub async fn read_verified<R>(io: &mut R, heads: Vec<ChunkHead>) -> io::Result<Vec<VerifiedChunk>>
where
    R: AsyncRead + Unpin + Send,
{
    let bad = |want: &ChunkWant, why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{BAD_ANSWER}: chunk {}: {why}", ChunkId(want.id).short()),
        )
    };
    if heads.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an answer of {} chunks", heads.len()),
        ));
    }
    let mut total = 0u64;
    for h in &heads {
        if let Some(n) = h.encoded {
            if u64::from(n) > encoded_bound(&h.want) {
                return Err(bad(&h.want, format!("{n} bao bytes for its range")));
            }
            total += u64::from(n);
        }
    }
    if total > MAX_FRAME as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an answer of {total} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut out = Vec::with_capacity(heads.len());
    let mut piece = vec![0u8; fd_chunker::GROUP_SIZE as usize];
    for ChunkHead { want, encoded } in heads {
        let Some(mut left) = encoded.map(u64::from) else {
            out.push(VerifiedChunk { want, data: None });
            continue;
        };
        let range = want.byte_range();
        let mut decoder = RangeDecoder::new(ChunkId(want.id), u64::from(want.len), range.clone());
        let mut data = Vec::with_capacity((range.end - range.start) as usize);
        let mut proven = Vec::new();
        while left > 0 {
            let n = left.min(piece.len() as u64) as usize;
            io.read_exact(&mut piece[..n]).await?;
            left -= n as u64;
            decoder
                .push_into(&piece[..n], &mut proven)
                .map_err(|e| bad(&want, e.to_string()))?;
            for (_, bytes) in proven.drain(..) {
                data.extend_from_slice(&bytes);
            }
        }
        decoder.finish().map_err(|e| bad(&want, e.to_string()))?;
        out.push(VerifiedChunk {
            want,
            data: Some(WireBytes(data)),
        });
    }
    Ok(out)
}

/// Encodes the answer for one want from the chunk's bytes (already checked against its id):
/// the bao stream of the range, verifiable group by group against the id alone.
pub fn encode_answer(data: &[u8], want: &ChunkWant) -> Vec<u8> {
    let ob = fd_chunker::outboard(data);
    fd_chunker::encode_range(data, &ob, want.byte_range())
}

/// Like [`encode_answer`] for bytes read without a check: the bao tree's root is the chunk's
/// id, so building the tree checks the bytes too. `None` when they are not the chunk asked
/// for (a damaged chunk file), or not of its length.
pub fn encode_checked_answer(data: &[u8], want: &ChunkWant) -> Option<Vec<u8>> {
    if data.len() as u64 != u64::from(want.len) {
        return None;
    }
    let ob = fd_chunker::outboard(data);
    (ob.root().0 == want.id).then(|| fd_chunker::encode_range(data, &ob, want.byte_range()))
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

    /// A reader that counts the bytes taken from it.
    struct Counting<'a> {
        inner: futures::io::Cursor<&'a [u8]>,
        taken: usize,
    }

    impl futures::AsyncRead for Counting<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let this = &mut *self;
            let got = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
            if let std::task::Poll::Ready(Ok(n)) = &got {
                this.taken += n;
            }
            got
        }
    }

    fn wire(answers: Vec<ChunkAnswer>) -> Vec<u8> {
        use libp2p::request_response::Codec as _;
        let mut out = futures::io::Cursor::new(Vec::new());
        futures::executor::block_on(Codec.write_response(
            &PROTOCOL,
            &mut out,
            Signed {
                proof: [3; 32],
                body: Response::Chunks(answers),
            },
        ))
        .expect("write");
        out.into_inner()
    }

    fn read(bytes: &[u8]) -> (io::Result<Signed<Response>>, usize) {
        use libp2p::request_response::Codec as _;
        let mut r = Counting {
            inner: futures::io::Cursor::new(bytes),
            taken: 0,
        };
        let got = futures::executor::block_on(Codec.read_response(&PROTOCOL, &mut r));
        (got, r.taken)
    }

    #[test]
    fn chunk_answers_are_proven_as_they_are_read_and_a_bad_group_stops_the_read() {
        let (a, b) = (
            sample(300_000),
            sample(120_000).iter().map(|x| x ^ 7).collect::<Vec<_>>(),
        );
        let want = |d: &[u8], range| ChunkWant {
            id: ChunkId::of(d).0,
            len: d.len() as u32,
            range,
        };
        let (wa, wb) = (want(&a, None), want(&b, Some((1_000, 90_000))));
        let missing = want(&sample(10), None);
        let answers = vec![
            ChunkAnswer {
                want: wa.clone(),
                encoded: Some(WireBytes(encode_answer(&a, &wa))),
            },
            ChunkAnswer {
                want: missing.clone(),
                encoded: None,
            },
            ChunkAnswer {
                want: wb.clone(),
                encoded: Some(WireBytes(encode_answer(&b, &wb))),
            },
        ];
        let bytes = wire(answers.clone());
        let (got, taken) = read(&bytes);
        let Ok(Signed {
            proof,
            body: Response::Verified(got),
        }) = got
        else {
            panic!("not a verified answer: {got:?}");
        };
        assert_eq!((proof, taken), ([3; 32], bytes.len()));
        assert_eq!(got[0].data.as_ref().map(|d| &d.0[..]), Some(&a[..]));
        assert_eq!(got[1].data, None);
        assert_eq!(
            got[2].data.as_ref().map(|d| &d.0[..]),
            Some(&b[1_000..90_000])
        );
        assert_eq!((&got[0].want, &got[2].want), (&wa, &wb));

        // A byte flipped early in the first chunk's stream: the read fails there, naming the
        // answer as bad, and the rest of the answer is never read.
        let mut tampered = bytes.clone();
        let head = bytes.len() - encode_answer(&a, &wa).len() - encode_answer(&b, &wb).len();
        tampered[head + 20_000] ^= 1;
        let (got, taken) = read(&tampered);
        let err = got.expect_err("tampered answer accepted");
        assert!(err.to_string().contains(BAD_ANSWER), "{err}");
        assert!(
            taken < head + 64 * 1024,
            "read {taken} of {} bytes after a bad group near the start",
            tampered.len()
        );

        // A head announcing more bytes than its range can take is refused before reading on.
        let mut huge = answers;
        huge[0].encoded = Some(WireBytes(vec![0; 400_000]));
        let (got, taken) = read(&wire(huge));
        assert!(got.is_err());
        assert!(taken < 1_000, "read {taken} bytes of an oversized answer");
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
        // Serving from unchecked bytes: the tree's root is the check.
        assert_eq!(encode_checked_answer(&data, &whole), Some(enc.clone()));
        let mut damaged = data.clone();
        damaged[123] ^= 1;
        assert_eq!(encode_checked_answer(&damaged, &whole), None);
        assert_eq!(encode_checked_answer(&data[1..], &whole), None);
        // A truncated answer fails too.
        assert!(verify_answer(&whole, &enc[..enc.len() - 1]).is_err());
        // Bytes of another chunk under this id fail at once.
        let other: Vec<u8> = data.iter().map(|b| b ^ 1).collect();
        let wrong = encode_answer(&other, &whole);
        assert!(verify_answer(&whole, &wrong).is_err());
    }
}
