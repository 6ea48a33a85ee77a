//! fd's peer-to-peer chunk network: team machines fetch image blobs from each other.
//!
//! This crate owns everything that crosses the network between fd nodes:
//!
//! - [`keys`]: the node's ed25519 identity (`$FD_HOME/node.key`) and the team secret
//!   (`$FD_HOME/team.key`) with its printable token;
//! - [`proto`]: the request-response protocol `/fd/chunks/1` over QUIC (`Have`, `Recipe`,
//!   `Chunks`, `Tag`, and `Image`, which names an image's file index so a node can mount it
//!   before having its layers), its framed postcard codec, and the membership proofs every
//!   message carries;
//! - [`book`]: the peers seen, remembered in the store so that a short-lived `fd pull` asks
//!   them at once, with a rank lowered by bad answers;
//! - [`net`]: the libp2p swarm (QUIC, mDNS, identify, ping, request-response, Kademlia),
//!   serving the store's recorded blobs with a cap on concurrent uploads, and announcing and
//!   finding holders of images' blobs through the team's DHT;
//! - [`metrics`]: counters of what a node served and fetched, in the Prometheus text format;
//! - [`fetch`]: the client side: rebuild a blob from peers with every 16 KiB group of every
//!   chunk verified by bao, find a peer's record of an image ([`fetch::find_image`]), and
//!   [`fetch::PeerSource`] for the node's chunk fetcher (how lazyfs streams file contents
//!   from peers).
//!
//! Trust: chunk contents are checked against their BLAKE3 ids, whole blobs by the caller
//! against their digests. Membership is checked on every request and every answer with a
//! keyed BLAKE3 of both peer ids under the team key; QUIC's TLS binds the peer ids to the
//! connection. Registry credentials are never read here.

pub mod book;
pub mod fetch;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod proto;
#[cfg(test)]
mod testutil;

pub use book::{PeerBook, PeerEntry};
pub use fetch::{BlobFromPeers, PeerSource};
pub use keys::{TeamKey, load_or_create_node_key};
pub use libp2p::{Multiaddr, PeerId};
pub use metrics::Metrics;
pub use net::{NetConfig, PeerNet};

/// Errors of the peer network.
#[derive(Debug, thiserror::Error)]
pub enum P2pError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Node(#[from] fd_node::NodeError),
    #[error("{path}: {reason}")]
    BadFile {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("this store belongs to no team: run `fd team init` or `fd team join TOKEN` first")]
    NoTeam,
    #[error("not a team token: {0}")]
    BadToken(String),
    #[error("starting the peer network: {0}")]
    Start(String),
    #[error("peer {peer}: {reason}")]
    Peer { peer: String, reason: String },
    #[error("the peer network has stopped")]
    Stopped,
}

/// Result of this crate.
pub type Result<T, E = P2pError> = std::result::Result<T, E>;
