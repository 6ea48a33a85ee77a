//! The libp2p node: QUIC transport, mDNS discovery, identify, ping and the chunk protocol.
//!
//! One task owns the swarm; a cloneable [`PeerNet`] handle sends it commands. Inbound requests
//! are checked for team membership on the swarm task, then answered on blocking threads (the
//! store is synchronous). Uploads of chunks are capped ([`NetConfig::max_uploads`]); beyond
//! the cap a node answers [`Response::Busy`] at once rather than queueing without bound.
//! Only blobs recorded in the store are offered (a pull still in progress offers nothing it
//! has not verified and recorded), and every chunk is re-checked against its id when read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fd_chunker::ChunkId;
use fd_node::Store;
use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle, dial_opts::DialOpts};
use libp2p::{
    Multiaddr, PeerId, Swarm, identify, mdns, ping,
    request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel},
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::book::PeerBook;
use crate::keys::{TeamKey, load_or_create_node_key};
use crate::proto::{
    self, ChunkAnswer, Direction, ImageAnswer, MAX_CHUNKS_PER_REQUEST, MAX_KEYS_PER_HAVE,
    RecipeAnswer, Request, Response, Signed,
};
use crate::{P2pError, Result};

/// How the node runs.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on (none for a node that only asks).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start, besides those remembered in the store.
    pub peers: Vec<Multiaddr>,
    /// Find peers on the LAN by mDNS.
    pub mdns: bool,
    /// Chunk answers computed at once; further `Chunks` requests get `Busy`.
    pub max_uploads: usize,
    /// Longest wait for one answer.
    pub request_timeout: Duration,
    /// Tests only: flip a byte in every chunk answer, to play a lying peer.
    #[cfg(test)]
    pub(crate) tamper_answers: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: Vec::new(),
            peers: Vec::new(),
            mdns: true,
            max_uploads: 4,
            request_timeout: Duration::from_secs(30),
            #[cfg(test)]
            tamper_answers: false,
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    rr: request_response::Behaviour<proto::Codec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

enum Command {
    Request {
        peer: PeerId,
        body: Request,
        reply: oneshot::Sender<Result<Response>>,
    },
    Shutdown(oneshot::Sender<()>),
}

#[derive(Default)]
struct Shared {
    connected: HashMap<PeerId, Multiaddr>,
    /// Peers that answered `Denied` or with a bad proof: not of our team.
    outsiders: HashSet<PeerId>,
    listen: Vec<Multiaddr>,
    book: PeerBook,
}

/// A running peer node. Cheap to clone; the node stops when [`PeerNet::shutdown`] is called.
#[derive(Clone)]
pub struct PeerNet {
    cmd: mpsc::Sender<Command>,
    local: PeerId,
    shared: Arc<Mutex<Shared>>,
    root: std::path::PathBuf,
}

impl std::fmt::Debug for PeerNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNet")
            .field("local", &self.local)
            .finish()
    }
}

impl PeerNet {
    /// Starts a node over `store` on the current tokio runtime. Needs the store to be in a team.
    pub async fn start(store: Arc<Store>, cfg: NetConfig) -> Result<PeerNet> {
        let root = store.root().to_path_buf();
        let team = TeamKey::load(&root)?.ok_or(P2pError::NoTeam)?;
        let key = load_or_create_node_key(&root)?;
        let local = key.public().to_peer_id();
        let start_err = |e: &dyn std::fmt::Display| P2pError::Start(e.to_string());

        let mdns_on = cfg.mdns;
        let timeout = cfg.request_timeout;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic()
            .with_behaviour(|key| {
                let mdns = if mdns_on {
                    let mcfg = mdns::Config {
                        // Re-ask often so a node that starts later is found within seconds.
                        query_interval: Duration::from_secs(2),
                        ..Default::default()
                    };
                    Some(mdns::tokio::Behaviour::new(
                        mcfg,
                        key.public().to_peer_id(),
                    )?)
                } else {
                    None
                };
                Ok(Behaviour {
                    rr: request_response::Behaviour::new(
                        [(proto::PROTOCOL, ProtocolSupport::Full)],
                        request_response::Config::default()
                            .with_request_timeout(timeout)
                            .with_max_concurrent_streams(64),
                    ),
                    mdns: Toggle::from(mdns),
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/fd/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(
                        ping::Config::new().with_interval(Duration::from_secs(5)),
                    ),
                })
            })
            .map_err(|e| start_err(&e))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();

        for addr in &cfg.listen {
            swarm.listen_on(addr.clone()).map_err(|e| start_err(&e))?;
        }
        let book = PeerBook::load(&root);
        for addr in &cfg.peers {
            if let Err(e) = swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "cannot dial peer");
            }
        }
        // Remembered peers: dial them at once (a failed dial costs nothing but a log line).
        for (id, entry) in &book.peers {
            let Ok(peer) = id.parse::<PeerId>() else {
                continue;
            };
            if peer == local {
                continue;
            }
            let addrs: Vec<Multiaddr> = entry.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if addrs.is_empty() {
                continue;
            }
            let _ = swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
        }

        let shared = Arc::new(Mutex::new(Shared {
            book,
            ..Default::default()
        }));
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let task = Task {
            swarm,
            store,
            team,
            local,
            shared: shared.clone(),
            pending: HashMap::new(),
            uploads: Arc::new(Semaphore::new(cfg.max_uploads.max(1))),
            root: root.clone(),
            #[cfg(test)]
            tamper: cfg.tamper_answers,
        };
        tokio::spawn(task.run(cmd_rx));
        Ok(PeerNet {
            cmd: cmd_tx,
            local,
            shared,
            root,
        })
    }

    /// This node's peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local
    }

    /// Addresses this node listens on (filled in shortly after start).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.lock().listen.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connected peers that may be of our team, best rank first.
    pub fn candidates(&self) -> Vec<PeerId> {
        let s = self.lock();
        let mut peers: Vec<PeerId> = s
            .connected
            .keys()
            .filter(|p| !s.outsiders.contains(p))
            .copied()
            .collect();
        peers.sort_by_key(|p| s.book.order_key(&p.to_string()));
        peers
    }

    /// Waits until some peer is connected, or `timeout` passes.
    pub async fn wait_for_peers(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.candidates().is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends one request and waits for the verified answer.
    pub async fn request(&self, peer: PeerId, body: Request) -> Result<Response> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Request { peer, body, reply })
            .await
            .map_err(|_| P2pError::Stopped)?;
        rx.await.map_err(|_| P2pError::Stopped)?
    }

    /// Lowers a peer's rank after an answer failed verification, and saves the book.
    pub fn penalize(&self, peer: &PeerId) {
        let mut s = self.lock();
        s.book.penalize(&peer.to_string());
        if let Err(e) = s.book.save(&self.root) {
            tracing::warn!(error = %e, "cannot save the peer book");
        }
    }

    /// Counts verified bytes received from a peer.
    pub fn received(&self, peer: &PeerId, bytes: u64) {
        self.lock().book.received(&peer.to_string(), bytes);
    }

    /// A copy of the peer book as this node sees it.
    pub fn book(&self) -> PeerBook {
        self.lock().book.clone()
    }

    /// Stops the node and saves what it learned about peers.
    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

struct Task {
    swarm: Swarm<Behaviour>,
    store: Arc<Store>,
    team: TeamKey,
    local: PeerId,
    shared: Arc<Mutex<Shared>>,
    pending: HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<Response>>)>,
    uploads: Arc<Semaphore>,
    root: std::path::PathBuf,
    #[cfg(test)]
    tamper: bool,
}

type Answered = (ResponseChannel<Signed<Response>>, PeerId, Response);

impl Task {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        let (done_tx, mut done_rx) = mpsc::channel::<Answered>(64);
        let mut save_tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Command::Request { peer, body, reply }) => {
                        let proof = proto::proof(&self.team, Direction::Request, &self.local, &peer);
                        let id = self.swarm.behaviour_mut().rr.send_request(&peer, Signed { proof, body });
                        self.pending.insert(id, (peer, reply));
                    }
                    Some(Command::Shutdown(done)) => {
                        self.save_book();
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.save_book();
                        return;
                    }
                },
                Some((channel, peer, body)) = done_rx.recv() => {
                    let proof = proto::proof(&self.team, Direction::Response, &self.local, &peer);
                    if self.swarm.behaviour_mut().rr.send_response(channel, Signed { proof, body }).is_err() {
                        tracing::debug!(%peer, "peer left before its answer was sent");
                    }
                }
                _ = save_tick.tick() => self.save_book(),
                event = self.swarm.select_next_some() => self.on_event(event, &done_tx),
            }
        }
    }

    fn save_book(&self) {
        if let Err(e) = self.shared().book.save(&self.root) {
            tracing::warn!(error = %e, "cannot save the peer book");
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>, done: &mpsc::Sender<Answered>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.shared().listen.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                tracing::debug!(peer = %peer_id, %addr, "connected");
                let mut s = self.shared();
                // Only addresses we dialed are worth remembering: an inbound connection's
                // source port is ephemeral.
                let remember = endpoint.is_dialer().then(|| addr.to_string());
                s.book.seen(&peer_id.to_string(), remember.as_deref());
                s.connected.insert(peer_id, addr);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.shared().connected.remove(&peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if peer == self.local || self.shared().connected.contains_key(&peer) {
                        continue;
                    }
                    tracing::debug!(%peer, %addr, "found by mDNS");
                    let _ = self
                        .swarm
                        .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                self.shared().book.rtt(&peer.to_string(), rtt);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(ev)) => self.on_rr(ev, done),
            _ => {}
        }
    }

    fn on_rr(
        &mut self,
        ev: request_response::Event<Signed<Request>, Signed<Response>>,
        done: &mpsc::Sender<Answered>,
    ) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if !proto::check_proof(
                    &self.team,
                    Direction::Request,
                    &peer,
                    &self.local,
                    &request.proof,
                ) {
                    tracing::info!(%peer, "refusing a request from outside the team");
                    let denied = Signed {
                        proof: [0; 32],
                        body: Response::Denied,
                    };
                    let _ = self.swarm.behaviour_mut().rr.send_response(channel, denied);
                    return;
                }
                let permit = match request.body {
                    Request::Chunks { .. } => match self.uploads.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => {
                            let _ = done.try_send((channel, peer, Response::Busy));
                            return;
                        }
                    },
                    _ => None,
                };
                let (store, done) = (self.store.clone(), done.clone());
                #[cfg(test)]
                let tamper = self.tamper;
                tokio::task::spawn_blocking(move || {
                    #[allow(unused_mut)]
                    let mut body = answer(&store, request.body);
                    #[cfg(test)]
                    if tamper && let Response::Chunks(answers) = &mut body {
                        for a in answers.iter_mut().filter_map(|a| a.encoded.as_mut()) {
                            if let Some(b) = a.0.last_mut() {
                                *b ^= 1;
                            }
                        }
                    }
                    drop(permit);
                    let _ = done.blocking_send((channel, peer, body));
                });
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((_, reply)) = self.pending.remove(&request_id) else {
                    return;
                };
                let result = if matches!(response.body, Response::Denied) {
                    self.shared().outsiders.insert(peer);
                    Err(P2pError::Peer {
                        peer: peer.to_string(),
                        reason: "not of our team (denied)".into(),
                    })
                } else if !proto::check_proof(
                    &self.team,
                    Direction::Response,
                    &peer,
                    &self.local,
                    &response.proof,
                ) {
                    self.shared().outsiders.insert(peer);
                    Err(P2pError::Peer {
                        peer: peer.to_string(),
                        reason: "answer without a valid team proof".into(),
                    })
                } else {
                    self.shared().book.seen(&peer.to_string(), None);
                    Ok(response.body)
                };
                let _ = reply.send(result);
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some((_, reply)) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(P2pError::Peer {
                        peer: peer.to_string(),
                        reason: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

/// Answers one request from the store. Runs on a blocking thread.
fn answer(store: &Store, req: Request) -> Response {
    let result: fd_node::Result<Response> = (|| {
        Ok(match req {
            Request::Have { keys } => {
                let mut held = Vec::new();
                for key in keys.into_iter().take(MAX_KEYS_PER_HAVE) {
                    if store.has_blob(&key)? {
                        held.push(key);
                    }
                }
                Response::Have { keys: held }
            }
            Request::Recipe { key } => Response::Recipe(match store.blob(&key)? {
                Some((recipe, media_type)) => Some(RecipeAnswer {
                    media_type,
                    chunks: recipe.0.iter().map(|c| (c.id.0, c.len)).collect(),
                }),
                None => None,
            }),
            Request::Chunks { wants } => Response::Chunks(
                wants
                    .iter()
                    .take(MAX_CHUNKS_PER_REQUEST)
                    .map(|w| ChunkAnswer {
                        // read_chunk re-checks the bytes against the id: a damaged chunk file
                        // is reported as not held rather than served.
                        encoded: store
                            .read_chunk(&ChunkId(w.id))
                            .ok()
                            .filter(|d| d.len() as u64 == u64::from(w.len))
                            .map(|d| proto::WireBytes(proto::encode_answer(&d, w))),
                    })
                    .collect(),
            ),
            Request::Tag { reference } => {
                Response::Tag(store.image(&reference)?.map(|img| img.manifest_digest))
            }
            Request::Image { manifest_digest } => {
                // Only a complete image: a lazy one would send the asker to chunks that may
                // be nowhere in the team.
                let mut answer = None;
                for img in store.complete_images_with_manifest(&manifest_digest)? {
                    if !store.has_blob(&img.file_index)? {
                        continue;
                    }
                    let profile = store
                        .profile_key(&img.manifest_digest)
                        .map(|k| store.has_blob(&k).map(|held| held.then_some(k)))
                        .transpose()?
                        .flatten();
                    answer = Some(ImageAnswer {
                        file_index: img.file_index,
                        layers: img.layers,
                        profile,
                    });
                    break;
                }
                Response::Image(answer)
            }
        })
    })();
    result.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot answer a peer");
        Response::Failed(e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch;

    fn store_with_blob(team: &TeamKey, data: &[u8]) -> (tempfile::TempDir, Arc<Store>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        team.save(dir.path()).expect("team");
        let key = fd_node::store::digest_of("sha256:", data);
        store
            .put_blob_from_reader(&key, "application/octet-stream", data)
            .expect("blob");
        (dir, store, key)
    }

    fn loopback() -> Multiaddr {
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")
    }

    async fn serve(store: Arc<Store>, tamper: bool) -> (PeerNet, Multiaddr) {
        serve_with(store, tamper, NetConfig::default().max_uploads).await
    }

    async fn serve_with(
        store: Arc<Store>,
        tamper: bool,
        max_uploads: usize,
    ) -> (PeerNet, Multiaddr) {
        let cfg = NetConfig {
            listen: vec![loopback()],
            mdns: false,
            tamper_answers: tamper,
            max_uploads,
            ..NetConfig::default()
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

    async fn client(team: &TeamKey, server: Multiaddr) -> (tempfile::TempDir, Arc<Store>, PeerNet) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        team.save(dir.path()).expect("team");
        let cfg = NetConfig {
            peers: vec![server],
            mdns: false,
            ..NetConfig::default()
        };
        let net = PeerNet::start(store.clone(), cfg).await.expect("client");
        assert!(
            net.wait_for_peers(Duration::from_secs(10)).await,
            "never connected"
        );
        (dir, store, net)
    }

    fn data() -> Vec<u8> {
        (0..1_500_000u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn team_member_rebuilds_a_blob_exactly() {
        let team = TeamKey::generate();
        let bytes = data();
        let (_sd, sstore, key) = store_with_blob(&team, &bytes);
        let (server, addr) = serve(sstore, false).await;
        let (cdir, cstore, net) = client(&team, addr).await;
        let dest = cdir.path().join("blob");
        let got =
            fetch::fetch_blob_to_file(&net, &cstore, &key, bytes.len() as u64, &dest, &|_| {})
                .await
                .expect("fetch");
        assert!(got.complete);
        assert_eq!(got.bytes_from_peers, bytes.len() as u64);
        assert_eq!(std::fs::read(&dest).expect("read"), bytes);
        net.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lying_peer_is_caught_and_ranked_down() {
        let team = TeamKey::generate();
        let bytes = data();
        let (_sd, sstore, key) = store_with_blob(&team, &bytes);
        let (server, addr) = serve(sstore, true).await;
        let (cdir, cstore, net) = client(&team, addr).await;
        let dest = cdir.path().join("blob");
        let got =
            fetch::fetch_blob_to_file(&net, &cstore, &key, bytes.len() as u64, &dest, &|_| {})
                .await
                .expect("fetch");
        assert!(!got.complete);
        assert_eq!(got.bytes_from_peers, 0, "nothing unverified may be kept");
        assert_eq!(got.written, 0);
        let id = server.local_peer_id().to_string();
        assert!(net.book().rank(&id) < 0, "the liar kept its rank");
        // The penalty is remembered in the store for the next process.
        assert!(PeerBook::load(cdir.path()).rank(&id) < 0);
        net.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn image_records_are_offered_only_for_complete_images() {
        let team = TeamKey::generate();
        let index_bytes = b"a file index, as far as this test cares".to_vec();
        let (_sd, sstore, _) = store_with_blob(&team, b"unused");
        let file_index = sstore
            .put_object("application/octet-stream", &index_bytes)
            .expect("index");
        let profile = sstore
            .put_object("application/json", b"{}")
            .expect("profile");
        let record = |reference: &str, manifest: &str, lazy: bool| fd_node::ImageRecord {
            reference: reference.into(),
            manifest_digest: manifest.into(),
            index_digest: None,
            config_digest: "sha256:cc".into(),
            layers: vec!["sha256:l1".into(), "sha256:l2".into()],
            file_index: file_index.clone(),
            size: 1,
            blob_size: 1,
            chunks: 1,
            pulled: 0,
            lazy,
        };
        sstore
            .put_image(&record("r/complete:1", "sha256:aa", false))
            .expect("row");
        sstore
            .put_image(&record("r/lazy:1", "sha256:bb", true))
            .expect("row");
        std::fs::create_dir_all(sstore.root().join("profiles")).expect("dir");
        std::fs::write(sstore.root().join("profiles/aa"), format!("{profile}\n")).expect("ptr");
        let (server, addr) = serve(sstore, false).await;
        let (_cd, cstore, net) = client(&team, addr).await;

        let (peer, answer) = fetch::find_image(&net, "sha256:aa")
            .await
            .expect("the complete image is offered");
        assert_eq!(peer, server.local_peer_id());
        assert_eq!(answer.file_index, file_index);
        assert_eq!(answer.layers, vec!["sha256:l1", "sha256:l2"]);
        assert_eq!(answer.profile, Some(profile));
        assert!(
            fetch::find_image(&net, "sha256:bb").await.is_none(),
            "lazy image offered"
        );
        assert!(fetch::find_image(&net, "sha256:cc").await.is_none());
        // The file index is a blob like any other: fetched and checked against its key.
        let (bytes, _, _) = fetch::fetch_blob_bytes(&net, &cstore, &answer.file_index, 1 << 20)
            .await
            .expect("fetch")
            .expect("held");
        assert_eq!(bytes, index_bytes);
        net.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_source_waits_out_a_busy_peer() {
        use fd_node::fetch::ChunkSource;
        let team = TeamKey::generate();
        let bytes = data();
        let (_sd, sstore, key) = store_with_blob(&team, &bytes);
        let (recipe, _) = sstore.blob(&key).expect("recipe").expect("blob");
        // One upload at a time: eight readers at once are mostly answered `Busy` at first.
        let (server, addr) = serve_with(sstore, false, 1).await;
        let (_cd, _cs, net) = client(&team, addr).await;
        let source = Arc::new(fetch::PeerSource::new(
            net.clone(),
            tokio::runtime::Handle::current(),
        ));
        let chunks: Vec<_> = recipe.0.iter().take(8).copied().collect();
        // The fetcher calls sources from plain threads, outside the runtime.
        let threads: Vec<_> = chunks
            .iter()
            .map(|c| {
                let (source, c) = (source.clone(), *c);
                std::thread::spawn(move || source.fetch(&c.id, c.len))
            })
            .collect();
        let results = tokio::task::spawn_blocking(move || {
            threads
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect::<Vec<_>>()
        })
        .await
        .expect("join");
        for (c, got) in chunks.iter().zip(results) {
            let got = got.expect("every chunk despite Busy answers");
            assert_eq!(fd_chunker::ChunkId::of(&got), c.id);
        }
        // A chunk nobody has is `Missing`, not an error against the source.
        let nowhere = fd_chunker::ChunkId::of(b"nowhere");
        let s = source.clone();
        let missing = std::thread::spawn(move || s.fetch(&nowhere, 7))
            .join()
            .expect("thread");
        assert!(
            matches!(missing, Err(fd_node::NodeError::Missing { .. })),
            "{missing:?}"
        );
        net.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_of_another_team_gets_nothing() {
        let team = TeamKey::generate();
        let bytes = data();
        let (_sd, sstore, key) = store_with_blob(&team, &bytes);
        let (server, addr) = serve(sstore, false).await;
        let (_cd, _cs, net) = client(&TeamKey::generate(), addr).await;
        let peer = server.local_peer_id();
        let have = net
            .request(
                peer,
                Request::Have {
                    keys: vec![key.clone()],
                },
            )
            .await;
        assert!(matches!(have, Err(P2pError::Peer { .. })), "got {have:?}");
        assert!(fetch::find_recipe(&net, &key, None).await.is_none());
        assert!(net.candidates().is_empty(), "an outsider stays a candidate");
        net.shutdown().await;
        server.shutdown().await;
    }
}
