//! Test helpers: in-process team nodes on loopback, without mDNS.

use std::sync::Arc;
use std::time::Duration;

use fd_node::Store;
use libp2p::Multiaddr;

use crate::keys::TeamKey;
use crate::net::{NetConfig, PeerNet};

/// A store in `team` holding `data` as one recorded blob; returns its dir, the store and key.
pub(crate) fn store_with_blob(
    team: &TeamKey,
    data: &[u8],
) -> (tempfile::TempDir, Arc<Store>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    team.save(dir.path()).expect("team");
    let key = fd_node::store::digest_of("sha256:", data);
    store
        .put_blob_from_reader(&key, "application/octet-stream", data)
        .expect("blob");
    (dir, store, key)
}

/// An empty store in `team`.
pub(crate) fn empty_store(team: &TeamKey) -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    team.save(dir.path()).expect("team");
    (dir, store)
}

/// Starts a node over `store` listening on a loopback port; returns it and its address.
pub(crate) async fn listen(store: Arc<Store>, cfg: NetConfig) -> (PeerNet, Multiaddr) {
    let cfg = NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")],
        mdns: false,
        ..cfg
    };
    let net = PeerNet::start(store, cfg).await.expect("server");
    for _ in 0..200 {
        if let Some(a) = net.listen_addrs().first() {
            return (net.clone(), a.clone());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server never listened");
}

/// Starts a node over `store` that dials `peers` and waits until it is connected to all.
pub(crate) async fn dial(store: Arc<Store>, peers: Vec<Multiaddr>) -> PeerNet {
    let n = peers.len();
    let cfg = NetConfig {
        peers,
        mdns: false,
        ..NetConfig::default()
    };
    let net = PeerNet::start(store, cfg).await.expect("client");
    for _ in 0..1000 {
        if net.candidates().len() >= n {
            return net;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("connected to {} of {n} peers", net.candidates().len());
}

/// An empty store in `team` and a node over it connected to all of `peers`; returns the
/// store's dir, the store and the node.
pub(crate) async fn client(
    team: &TeamKey,
    peers: Vec<Multiaddr>,
) -> (tempfile::TempDir, Arc<Store>, PeerNet) {
    let (dir, store) = empty_store(team);
    let net = dial(store.clone(), peers).await;
    (dir, store, net)
}

/// Deterministic incompressible-looking test bytes.
pub(crate) fn bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
