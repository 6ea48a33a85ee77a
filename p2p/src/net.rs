//! The libp2p node: QUIC transport, mDNS discovery, identify, ping, Kademlia and the chunk
//! protocol.
//!
//! One task owns the swarm; a cloneable [`PeerNet`] handle sends it commands. Inbound requests
//! are checked for team membership on the swarm task, then answered on blocking threads (the
//! store is synchronous). Uploads of chunks are capped ([`NetConfig::max_uploads`]); beyond
//! the cap a node answers [`Response::Busy`] at once rather than queueing without bound.
//! Only blobs recorded in the store are offered (a pull still in progress offers nothing it
//! has not verified and recorded), and every chunk is re-checked against its id when read.
//!
//! Kademlia (on the team's own protocol name, never the public DHT's) tells who holds what at
//! the grain of blobs: a listening node announces itself as provider of the file index and
//! layer blobs of every complete image it holds, at start, when [`PeerNet::provide`] is
//! called and when a rescan of the store finds a newly recorded image. [`PeerNet::providers`]
//! looks a key up and dials the providers, so a node can reach a holder it was never told
//! about. Every peer that connects and speaks the protocol joins the routing table (its
//! listen addresses come from identify). A provider record says only which peer holds which
//! blob key; the chunk protocol still checks team membership on every request.
//! Counters of what the node did are kept in a shared [`Metrics`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fd_chunker::ChunkId;
use fd_node::Store;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, identify, kad, mdns, ping,
    request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel},
};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::book::PeerBook;
use crate::keys::{TeamKey, load_or_create_node_key};
use crate::metrics::Metrics;
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
    /// Tests only: hold every chunk answer this long, to play a slow peer.
    #[cfg(test)]
    pub(crate) answer_delay: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            listen: Vec::new(),
            peers: Vec::new(),
            mdns: true,
            max_uploads: 16,
            request_timeout: Duration::from_secs(30),
            #[cfg(test)]
            tamper_answers: false,
            #[cfg(test)]
            answer_delay: Duration::ZERO,
        }
    }
}

/// Kademlia protocol of fd teams: a name of our own keeps fd nodes out of the public IPFS DHT
/// and that DHT's nodes out of ours.
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fd/kad/1.0.0");
/// Longest a DHT query runs when nobody asked for a shorter bound.
const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between a change of the routing table and the announcement it triggers, so that a
/// burst of new peers (a node starting among many) costs one round of announcements.
const REANNOUNCE_DELAY: Duration = Duration::from_secs(1);
/// How often a listening node looks in its store for newly recorded complete images.
const RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// Most keys this node announces: a store with more blobs than this announces the first ones
/// (every key costs one DHT query per announcement round).
const MAX_PROVIDED_KEYS: usize = 4096;

#[derive(NetworkBehaviour)]
struct Behaviour {
    rr: request_response::Behaviour<proto::Codec>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

enum Command {
    Request {
        peer: PeerId,
        body: Request,
        reply: oneshot::Sender<Result<Response>>,
    },
    Provide(Vec<String>),
    Providers {
        key: String,
        timeout: Duration,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// A provider lookup in flight: what it found so far and who waits for it.
struct ProviderLookup {
    found: Vec<PeerId>,
    reply: oneshot::Sender<Vec<PeerId>>,
}

/// The DHT key of a store blob key (`sha256:…`, `blake3:…`): a hash of it under a name of
/// our own, so the key space is fd's whatever the form of the blob key.
fn record_key(key: &str) -> kad::RecordKey {
    let hash = blake3::Hasher::new_derive_key("fd provider record v1")
        .update(key.as_bytes())
        .finalize();
    kad::RecordKey::new(hash.as_bytes())
}

/// The blob keys of the complete images in `store`: file indexes and layers, the keys other
/// nodes look up to find a holder.
fn held_image_keys(store: &Store) -> Vec<String> {
    let images = match store.images() {
        Ok(images) => images,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list images to announce");
            return Vec::new();
        }
    };
    let mut keys = BTreeSet::new();
    for img in images.into_iter().filter(|i| !i.lazy) {
        keys.insert(img.file_index);
        keys.extend(img.layers);
    }
    keys.into_iter()
        .filter(|k| store.has_blob(k).unwrap_or(false))
        .collect()
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
    metrics: Arc<Metrics>,
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
        PeerNet::start_with_metrics(store, cfg, Metrics::new()).await
    }

    /// Like [`PeerNet::start`], counting what the node does in `metrics` (shared with whoever
    /// reports them, e.g. the `/metrics` page of `fd serve`).
    pub async fn start_with_metrics(
        store: Arc<Store>,
        cfg: NetConfig,
        metrics: Arc<Metrics>,
    ) -> Result<PeerNet> {
        let root = store.root().to_path_buf();
        let team = TeamKey::load(&root)?.ok_or(P2pError::NoTeam)?;
        let key = load_or_create_node_key(&root)?;
        let local = key.public().to_peer_id();
        let start_err = |e: &dyn std::fmt::Display| P2pError::Start(e.to_string());

        let mdns_on = cfg.mdns;
        let timeout = cfg.request_timeout;
        // Only a node others can dial may serve the DHT; one that only asks stays a client,
        // so nobody puts an unreachable node in its routing table.
        let kad_server = !cfg.listen.is_empty();
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
                    kad: {
                        let id = key.public().to_peer_id();
                        let mut kcfg = kad::Config::new(KAD_PROTOCOL);
                        kcfg.set_query_timeout(KAD_QUERY_TIMEOUT);
                        // Announcements are renewed by the node itself (at start, on new
                        // images, on new peers); the library's 12-hour timer adds nothing.
                        kcfg.set_provider_publication_interval(None);
                        // The timed bootstrap would run (and warn) on a node that has no peer
                        // yet; the one the library runs whenever the routing table gains a peer
                        // is enough for a team's few nodes.
                        kcfg.set_periodic_bootstrap_interval(None);
                        let store = kad::store::MemoryStore::with_config(
                            id,
                            kad::store::MemoryStoreConfig {
                                max_provided_keys: MAX_PROVIDED_KEYS,
                                ..Default::default()
                            },
                        );
                        let mut kad = kad::Behaviour::with_config(id, store, kcfg);
                        kad.set_mode(Some(if kad_server {
                            kad::Mode::Server
                        } else {
                            kad::Mode::Client
                        }));
                        kad
                    },
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
        let (rescan_tx, rescan_rx) = mpsc::channel(4);
        let task = Task {
            swarm,
            store,
            team,
            local,
            shared: shared.clone(),
            pending: HashMap::new(),
            uploads: Arc::new(Semaphore::new(cfg.max_uploads.max(1))),
            root: root.clone(),
            metrics: metrics.clone(),
            kad_server,
            provided: BTreeSet::new(),
            reannounce_at: None,
            lookups: HashMap::new(),
            lookup_deadlines: FuturesUnordered::new(),
            rescan_tx,
            #[cfg(test)]
            tamper: cfg.tamper_answers,
            #[cfg(test)]
            answer_delay: cfg.answer_delay,
        };
        tokio::spawn(task.run(cmd_rx, rescan_rx));
        Ok(PeerNet {
            cmd: cmd_tx,
            local,
            shared,
            root,
            metrics,
        })
    }

    /// The counters of this node.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Announces in the DHT that this node holds the blobs `keys` (store blob keys such as
    /// `sha256:…`). Only a listening node announces: nobody could dial one that does not
    /// listen. Keys already announced are not announced again.
    pub async fn provide(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        if self.cmd.send(Command::Provide(keys)).await.is_err() {
            tracing::debug!("the peer network has stopped; nothing announced");
        }
    }

    /// Looks up who announced `key` in the DHT, for at most `timeout`, and dials them so that
    /// they become [`PeerNet::candidates`]. Returns the providers found (never this node),
    /// after waiting, within the same bound, for the dials to connect.
    pub async fn providers(&self, key: &str, timeout: Duration) -> Vec<PeerId> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Providers {
            key: key.to_string(),
            timeout,
            reply,
        };
        if self.cmd.send(cmd).await.is_err() {
            return Vec::new();
        }
        // The task answers by the deadline itself; the margin only covers a stopped task.
        let found = match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
            Ok(Ok(found)) => found,
            _ => return Vec::new(),
        };
        loop {
            let pending = {
                let s = self.lock();
                found
                    .iter()
                    .any(|p| !s.connected.contains_key(p) && !s.outsiders.contains(p))
            };
            if !pending || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        found
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
    /// `took` is how long the request that brought them was out (for the peer's throughput).
    pub fn received(&self, peer: &PeerId, bytes: u64, took: Duration) {
        Metrics::add(&self.metrics.received_bytes, bytes);
        self.lock().book.received(&peer.to_string(), bytes, took);
    }

    /// Records the images a peer said it holds.
    pub fn holds_images(&self, peer: &PeerId, images: Vec<String>) {
        self.lock().book.images(&peer.to_string(), images);
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
    metrics: Arc<Metrics>,
    /// Whether this node serves the DHT (it listens) and so may announce what it holds.
    kad_server: bool,
    /// Keys announced by this node, announced again when the routing table grows.
    provided: BTreeSet<String>,
    /// When the next announcement of every provided key is due, if one is.
    reannounce_at: Option<tokio::time::Instant>,
    lookups: HashMap<kad::QueryId, ProviderLookup>,
    /// One timer per lookup, ending it with what it found by its caller's deadline.
    lookup_deadlines: FuturesUnordered<BoxFuture<'static, kad::QueryId>>,
    /// Keys found by store rescans on blocking threads.
    rescan_tx: mpsc::Sender<Vec<String>>,
    #[cfg(test)]
    tamper: bool,
    #[cfg(test)]
    answer_delay: Duration,
}

/// An answer computed on a blocking thread: where it goes, and the chunk bytes it carries.
type Answered = (ResponseChannel<Signed<Response>>, PeerId, Response, u64);

impl Task {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Command>,
        mut rescans: mpsc::Receiver<Vec<String>>,
    ) {
        let (done_tx, mut done_rx) = mpsc::channel::<Answered>(64);
        let mut save_tick = tokio::time::interval(Duration::from_secs(10));
        // The first tick is at once: a listening node announces what it holds at start.
        let mut rescan_tick = tokio::time::interval(RESCAN_INTERVAL);
        loop {
            let reannounce = self.reannounce_at;
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Command::Request { peer, body, reply }) => {
                        let proof = proto::proof(&self.team, Direction::Request, &self.local, &peer);
                        let id = self.swarm.behaviour_mut().rr.send_request(&peer, Signed { proof, body });
                        self.pending.insert(id, (peer, reply));
                    }
                    Some(Command::Provide(keys)) => self.provide(keys),
                    Some(Command::Providers { key, timeout, reply }) => {
                        if self.routing_table_empty() {
                            // Nobody to ask (and the library would only warn about it).
                            let _ = reply.send(Vec::new());
                            continue;
                        }
                        Metrics::add(&self.metrics.provider_lookups, 1);
                        let id = self.swarm.behaviour_mut().kad.get_providers(record_key(&key));
                        self.lookups.insert(id, ProviderLookup { found: Vec::new(), reply });
                        self.lookup_deadlines.push(Box::pin(async move {
                            tokio::time::sleep(timeout).await;
                            id
                        }));
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
                Some((channel, peer, body, bytes)) = done_rx.recv() => {
                    let proof = proto::proof(&self.team, Direction::Response, &self.local, &peer);
                    if self.swarm.behaviour_mut().rr.send_response(channel, Signed { proof, body }).is_err() {
                        tracing::debug!(%peer, "peer left before its answer was sent");
                    } else {
                        Metrics::add(&self.metrics.served_bytes, bytes);
                    }
                }
                _ = save_tick.tick() => self.save_book(),
                _ = rescan_tick.tick(), if self.kad_server => {
                    let (store, tx) = (self.store.clone(), self.rescan_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.blocking_send(held_image_keys(&store));
                    });
                }
                Some(keys) = rescans.recv() => self.provide(keys),
                _ = tokio::time::sleep_until(reannounce.unwrap_or_else(tokio::time::Instant::now)),
                    if reannounce.is_some() => {
                    self.reannounce_at = None;
                    let keys: Vec<String> = self.provided.iter().cloned().collect();
                    tracing::debug!(keys = keys.len(), "announcing held blobs again");
                    for key in keys {
                        self.announce(&key);
                    }
                }
                Some(id) = self.lookup_deadlines.next(), if !self.lookup_deadlines.is_empty() => {
                    if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        query.finish();
                    }
                    self.end_lookup(id);
                }
                event = self.swarm.select_next_some() => self.on_event(event, &done_tx),
            }
        }
    }

    fn save_book(&self) {
        if let Err(e) = self.shared().book.save(&self.root) {
            tracing::warn!(error = %e, "cannot save the peer book");
        }
    }

    /// Announces the keys not announced yet (a listening node only).
    fn provide(&mut self, keys: Vec<String>) {
        if !self.kad_server {
            tracing::debug!("not listening: nothing to announce");
            return;
        }
        for key in keys {
            if self.provided.contains(&key) {
                continue;
            }
            if self.provided.len() >= MAX_PROVIDED_KEYS {
                tracing::warn!(
                    max = MAX_PROVIDED_KEYS,
                    "too many blobs to announce them all"
                );
                break;
            }
            self.announce(&key);
            self.provided.insert(key);
        }
    }

    fn routing_table_empty(&mut self) -> bool {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .all(|bucket| bucket.num_entries() == 0)
    }

    /// Starts one announcement of `key`. With an empty routing table it is left for the
    /// round that the first peer to join the table triggers.
    fn announce(&mut self, key: &str) {
        if self.routing_table_empty() {
            return;
        }
        match self
            .swarm
            .behaviour_mut()
            .kad
            .start_providing(record_key(key))
        {
            Ok(_) => Metrics::add(&self.metrics.provides, 1),
            Err(e) => tracing::warn!(key, error = %e, "cannot announce a blob"),
        }
    }

    /// Gives a provider lookup's caller what it found, once.
    fn end_lookup(&mut self, id: kad::QueryId) {
        if let Some(lookup) = self.lookups.remove(&id) {
            let _ = lookup.reply.send(lookup.found);
        }
    }

    fn on_kad(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            } => {
                let mut last = step.last;
                match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        let local = self.local;
                        let mut dial = Vec::new();
                        if let Some(lookup) = self.lookups.get_mut(&id) {
                            for p in providers.into_iter().filter(|p| *p != local) {
                                if !lookup.found.contains(&p) {
                                    lookup.found.push(p);
                                    dial.push(p);
                                }
                            }
                        }
                        for peer in dial {
                            Metrics::add(&self.metrics.providers_found, 1);
                            tracing::debug!(%peer, "provider found");
                            // The lookup still runs, so the DHT knows the addresses it was
                            // told for this peer and the dial can use them.
                            let opts = DialOpts::peer_id(peer)
                                .condition(PeerCondition::DisconnectedAndNotDialing)
                                .build();
                            if let Err(e) = self.swarm.dial(opts) {
                                tracing::debug!(%peer, error = %e, "cannot dial a provider");
                            }
                        }
                    }
                    Ok(kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => last = true,
                    Err(e) => {
                        tracing::debug!(error = %e, "provider lookup ended");
                        last = true;
                    }
                }
                if last {
                    self.end_lookup(id);
                }
            }
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(result),
                ..
            } => match result {
                Ok(ok) => tracing::debug!(key = ?ok.key, "announced"),
                Err(e) => tracing::debug!(error = %e, "announcement reached no peer"),
            },
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer: true,
                ..
            } => {
                tracing::debug!(%peer, "joined the routing table");
                // A node announces into whatever table it has; the first announcements of a
                // node that starts alone reach nobody, so a newcomer triggers another round.
                if self.kad_server && !self.provided.is_empty() && self.reannounce_at.is_none() {
                    self.reannounce_at = Some(tokio::time::Instant::now() + REANNOUNCE_DELAY);
                }
            }
            _ => {}
        }
    }

    /// Puts a peer that speaks our DHT protocol in the routing table under the addresses it
    /// listens on.
    fn on_identify(&mut self, peer: PeerId, info: identify::Info) {
        if !info.protocols.contains(&KAD_PROTOCOL) || self.shared().outsiders.contains(&peer) {
            return;
        }
        // A loopback address names the peer only when we reach it over loopback ourselves.
        let via_loopback = self.shared().connected.get(&peer).is_some_and(is_loopback);
        for addr in info.listen_addrs {
            if is_loopback(&addr) && !via_loopback {
                continue;
            }
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
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
                let n = s.connected.len() as u64;
                self.metrics.peers_connected.store(n, Ordering::Relaxed);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let mut s = self.shared();
                s.connected.remove(&peer_id);
                let n = s.connected.len() as u64;
                self.metrics.peers_connected.store(n, Ordering::Relaxed);
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
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.on_kad(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => self.on_identify(peer_id, info),
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
                    Metrics::add(&self.metrics.denied, 1);
                    let denied = Signed {
                        proof: [0; 32],
                        body: Response::Denied,
                    };
                    let _ = self.swarm.behaviour_mut().rr.send_response(channel, denied);
                    return;
                }
                Metrics::add(&self.metrics.requests, 1);
                let permit = match request.body {
                    Request::Chunks { .. } => match self.uploads.clone().try_acquire_owned() {
                        Ok(p) => Some(p),
                        Err(_) => {
                            Metrics::add(&self.metrics.busy, 1);
                            let _ = done.try_send((channel, peer, Response::Busy, 0));
                            return;
                        }
                    },
                    _ => None,
                };
                // Sizes of the chunk data asked for, to count what a `Chunks` answer carries.
                let wanted: Vec<u64> = match &request.body {
                    Request::Chunks { wants } => wants
                        .iter()
                        .take(MAX_CHUNKS_PER_REQUEST)
                        .map(|w| {
                            let r = w.byte_range();
                            r.end - r.start
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let metrics = self.metrics.clone();
                let (store, done) = (self.store.clone(), done.clone());
                #[cfg(test)]
                let tamper = self.tamper;
                #[cfg(test)]
                let answer_delay = self.answer_delay;
                tokio::task::spawn_blocking(move || {
                    #[allow(unused_mut)]
                    let mut body = answer(&store, request.body);
                    #[cfg(test)]
                    if matches!(body, Response::Chunks(_)) && !answer_delay.is_zero() {
                        std::thread::sleep(answer_delay);
                    }
                    #[cfg(test)]
                    if tamper && let Response::Chunks(answers) = &mut body {
                        for a in answers.iter_mut().filter_map(|a| a.encoded.as_mut()) {
                            if let Some(b) = a.0.last_mut() {
                                *b ^= 1;
                            }
                        }
                    }
                    drop(permit);
                    let mut bytes = 0;
                    if let Response::Chunks(answers) = &body {
                        let hits: Vec<u64> = answers
                            .iter()
                            .zip(&wanted)
                            .filter(|(a, _)| a.encoded.is_some())
                            .map(|(_, len)| *len)
                            .collect();
                        bytes = hits.iter().sum();
                        Metrics::add(&metrics.chunk_requests, 1);
                        Metrics::add(&metrics.chunks_hit, hits.len() as u64);
                        Metrics::add(&metrics.chunks_missed, (answers.len() - hits.len()) as u64);
                    }
                    let _ = done.blocking_send((channel, peer, body, bytes));
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

fn is_loopback(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    matches!(
        addr.iter().next(),
        Some(Protocol::Ip4(ip)) if ip.is_loopback()
    ) || matches!(addr.iter().next(), Some(Protocol::Ip6(ip)) if ip.is_loopback())
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
                        want: w.clone(),
                        // The bao tree's root must be the id: a damaged chunk file is reported
                        // as not held rather than served, with the bytes hashed only once.
                        encoded: store
                            .read_chunk_unchecked(&ChunkId(w.id))
                            .ok()
                            .and_then(|d| proto::encode_checked_answer(&d, w))
                            .map(proto::WireBytes),
                    })
                    .collect(),
            ),
            Request::Tag { reference } => {
                Response::Tag(store.image(&reference)?.map(|img| img.manifest_digest))
            }
            Request::Images => Response::Images(
                store
                    .images()?
                    .into_iter()
                    .filter(|img| !img.lazy)
                    .map(|img| img.reference)
                    .take(proto::MAX_IMAGES_LISTED)
                    .collect(),
            ),
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
    use crate::testutil::{client, listen, store_with_blob};

    fn data() -> Vec<u8> {
        (0..1_500_000u32)
            .flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes())
            .collect()
    }

    /// A node holding [`data`] as one blob, started with `cfg`, and a node of `client_team`
    /// connected to it.
    struct Pair {
        bytes: Vec<u8>,
        key: String,
        server_store: Arc<Store>,
        server: PeerNet,
        _server_dir: tempfile::TempDir,
        client_dir: tempfile::TempDir,
        client_store: Arc<Store>,
        net: PeerNet,
    }

    impl Pair {
        async fn start(team: &TeamKey, client_team: &TeamKey, cfg: NetConfig) -> Pair {
            let bytes = data();
            let (_server_dir, server_store, key) = store_with_blob(team, &bytes);
            let (server, addr) = listen(server_store.clone(), cfg).await;
            let (client_dir, client_store, net) = client(client_team, vec![addr]).await;
            Pair {
                bytes,
                key,
                server_store,
                server,
                _server_dir,
                client_dir,
                client_store,
                net,
            }
        }

        /// Fetches the blob from the server into a file of the client's dir.
        async fn fetch_to_file(&self) -> (fetch::BlobFromPeers, std::path::PathBuf) {
            let dest = self.client_dir.path().join("blob");
            let got = fetch::fetch_blob_to_file(
                &self.net,
                &self.client_store,
                &self.key,
                self.bytes.len() as u64,
                &dest,
                &|_| {},
            )
            .await
            .expect("fetch");
            (got, dest)
        }

        async fn shutdown(self) {
            self.net.shutdown().await;
            self.server.shutdown().await;
        }
    }

    /// A listening node in `team` holding one small blob of no interest.
    async fn bystander(team: &TeamKey) -> (tempfile::TempDir, PeerNet, Multiaddr) {
        let (dir, store, _) = store_with_blob(team, b"what B holds");
        let (net, addr) = listen(store, NetConfig::default()).await;
        (dir, net, addr)
    }

    /// Asks `ask` until it finds something, bounded: DHT records take a while to spread.
    async fn until_found<T, F, Fut>(mut ask: F) -> Vec<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Vec<T>>,
    {
        let mut found = Vec::new();
        for _ in 0..20 {
            found = ask().await;
            if !found.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        found
    }

    /// A one-chunk image record naming `file_index` and `layers`.
    fn image_record(
        reference: &str,
        manifest: String,
        layers: Vec<String>,
        file_index: &str,
        lazy: bool,
    ) -> fd_node::ImageRecord {
        fd_node::ImageRecord {
            reference: reference.into(),
            manifest_digest: manifest,
            index_digest: None,
            config_digest: "sha256:cc".into(),
            layers,
            file_index: file_index.into(),
            size: 1,
            blob_size: 1,
            chunks: 1,
            pulled: 0,
            lazy,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn team_member_rebuilds_a_blob_exactly() {
        let team = TeamKey::generate();
        let pair = Pair::start(&team, &team, NetConfig::default()).await;
        let (got, dest) = pair.fetch_to_file().await;
        assert!(got.complete);
        assert_eq!(got.bytes_from_peers, pair.bytes.len() as u64);
        assert_eq!(std::fs::read(&dest).expect("read"), pair.bytes);
        pair.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lying_peer_is_caught_and_ranked_down() {
        let team = TeamKey::generate();
        let cfg = NetConfig {
            tamper_answers: true,
            ..NetConfig::default()
        };
        let pair = Pair::start(&team, &team, cfg).await;
        let (got, _) = pair.fetch_to_file().await;
        assert!(!got.complete);
        assert_eq!(got.bytes_from_peers, 0, "nothing unverified may be kept");
        assert_eq!(got.written, 0);
        let id = pair.server.local_peer_id().to_string();
        assert!(pair.net.book().rank(&id) < 0, "the liar kept its rank");
        // The penalty is remembered in the store for the next process.
        assert!(PeerBook::load(pair.client_dir.path()).rank(&id) < 0);
        pair.shutdown().await;
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
        let record = |reference: &str, manifest: &str, lazy: bool| {
            let layers = vec!["sha256:l1".into(), "sha256:l2".into()];
            image_record(reference, manifest.into(), layers, &file_index, lazy)
        };
        sstore
            .put_image(&record("r/complete:1", "sha256:aa", false))
            .expect("row");
        sstore
            .put_image(&record("r/lazy:1", "sha256:bb", true))
            .expect("row");
        std::fs::create_dir_all(sstore.root().join("profiles")).expect("dir");
        std::fs::write(sstore.root().join("profiles/aa"), format!("{profile}\n")).expect("ptr");
        let (server, addr) = listen(sstore, NetConfig::default()).await;
        let (_cd, cstore, net) = client(&team, vec![addr]).await;

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
        // One upload at a time: eight readers at once are mostly answered `Busy` at first.
        let cfg = NetConfig {
            max_uploads: 1,
            ..NetConfig::default()
        };
        let pair = Pair::start(&team, &team, cfg).await;
        let (recipe, _) = pair
            .server_store
            .blob(&pair.key)
            .expect("recipe")
            .expect("blob");
        let source = Arc::new(fetch::PeerSource::new(
            pair.net.clone(),
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
        pair.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_of_another_team_gets_nothing() {
        let team = TeamKey::generate();
        let pair = Pair::start(&team, &TeamKey::generate(), NetConfig::default()).await;
        let (net, key) = (&pair.net, &pair.key);
        let peer = pair.server.local_peer_id();
        let have = net
            .request(
                peer,
                Request::Have {
                    keys: vec![key.clone()],
                },
            )
            .await;
        assert!(matches!(have, Err(P2pError::Peer { .. })), "got {have:?}");
        assert!(fetch::find_recipe(net, key, None).await.is_none());
        assert!(net.candidates().is_empty(), "an outsider stays a candidate");
        let served = pair.server.metrics().render();
        assert!(
            served.lines().any(|l| l == "fd_peer_denied_total 1"),
            "{served}"
        );
        assert!(served.lines().any(|l| l == "fd_peer_served_bytes_total 0"));
        pair.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_holder_is_found_through_the_dht_by_a_node_that_never_met_it() {
        let team = TeamKey::generate();
        // B: a listening node holding nothing of interest.
        let (_bd, b, b_addr) = bystander(&team).await;
        // A: the only holder, which knows only B.
        let held: Vec<u8> = data().into_iter().take(300_000).collect();
        let (_ad, astore, key) = store_with_blob(&team, &held);
        let knows_b = NetConfig {
            peers: vec![b_addr.clone()],
            ..NetConfig::default()
        };
        let (a, _) = listen(astore, knows_b).await;
        assert!(a.wait_for_peers(Duration::from_secs(10)).await);
        a.provide(vec![key.clone()]).await;
        // C: a node that only asks, and knows only B.
        let (_cd, cstore, c) = client(&team, vec![b_addr]).await;
        assert_eq!(c.candidates(), vec![b.local_peer_id()]);

        // A's announcement reaches B once each has the other in its routing table, and C's
        // lookup needs B in its own: retry, bounded, until both have happened.
        let found = until_found(|| c.providers(&key, Duration::from_secs(3))).await;
        assert_eq!(found, vec![a.local_peer_id()]);
        // The provider was dialed: C can now fetch the blob from A, whom it was never told of.
        assert!(c.candidates().contains(&a.local_peer_id()));
        let (bytes, _, n) = fetch::fetch_blob_bytes(&c, &cstore, &key, 1 << 20)
            .await
            .expect("fetch")
            .expect("held by a candidate");
        assert_eq!(bytes, held);
        assert_eq!(n, held.len() as u64);
        assert_eq!(a.metrics().served_bytes(), held.len() as u64);
        assert_eq!(c.metrics().received_bytes(), held.len() as u64);
        // The fetch path merges DHT providers into the holders it asks: D, which also knows
        // only B (who does not hold the blob), finds A as the holder.
        let (_dd, _ds, d) = client(&team, vec![b.listen_addrs()[0].clone()]).await;
        let holders = until_found(|| fetch::find_holders(&d, &key)).await;
        assert_eq!(holders, vec![a.local_peer_id()]);
        d.shutdown().await;
        // Nobody announced this one: nothing is found, within the bound.
        let started = std::time::Instant::now();
        let none = c
            .providers("sha256:nobody-has-this", Duration::from_secs(2))
            .await;
        assert!(none.is_empty(), "{none:?}");
        assert!(started.elapsed() < Duration::from_secs(4));
        c.shutdown().await;
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listening_node_announces_its_complete_images_by_itself() {
        let team = TeamKey::generate();
        let (_bd, b, b_addr) = bystander(&team).await;
        // A holds one complete image and one lazy image, and is told nothing to announce.
        let (_ad, astore, layer) = store_with_blob(&team, b"a layer of the complete image");
        let complete_index = astore
            .put_object("application/octet-stream", b"complete image's file index")
            .expect("index");
        let lazy_index = astore
            .put_object("application/octet-stream", b"lazy image's file index")
            .expect("index");
        let record = |reference: &str, file_index: &str, lazy: bool| {
            let manifest = format!("sha256:{reference}");
            image_record(reference, manifest, vec![layer.clone()], file_index, lazy)
        };
        astore
            .put_image(&record("complete", &complete_index, false))
            .expect("row");
        astore
            .put_image(&record("lazy", &lazy_index, true))
            .expect("row");
        let knows_b = NetConfig {
            peers: vec![b_addr.clone()],
            ..NetConfig::default()
        };
        let (a, _) = listen(astore, knows_b).await;
        let (_cd, _cs, c) = client(&team, vec![b_addr]).await;
        let found = until_found(|| c.providers(&complete_index, Duration::from_secs(3))).await;
        assert_eq!(found, vec![a.local_peer_id()], "file index not announced");
        assert_eq!(
            c.providers(&layer, Duration::from_secs(3)).await,
            vec![a.local_peer_id()],
            "layer not announced"
        );
        // A lazy image's file index is not offered (its contents may be nowhere).
        assert!(
            c.providers(&lazy_index, Duration::from_secs(2))
                .await
                .is_empty()
        );
        let page = a.metrics().render();
        assert!(
            page.lines()
                .any(|l| l.starts_with("fd_dht_provides_total ") && l != "fd_dht_provides_total 0"),
            "{page}"
        );
        c.shutdown().await;
        a.shutdown().await;
        b.shutdown().await;
    }
}
