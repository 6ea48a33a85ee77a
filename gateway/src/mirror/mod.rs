//! The registry mirror: the pull side of the OCI Distribution API, answered from fd's store.
//!
//! docker, containerd and podman pull through it (`GET`/`HEAD` of `/v2/`, manifests and
//! blobs, with Range). Every answer is byte-exact: what is served hashes to the digest asked
//! for. Content comes from, in order:
//!
//! 1. the local store (blobs kept as chunk recipes, read and verified chunk by chunk);
//! 2. team peers, when the mirror runs next to a peer node ([`MirrorConfig::peers`]): the
//!    blob is brought into the store from them (verified, recorded and pinned like an
//!    upstream download) and served from there. One peer fetch per blob however many clients
//!    ask at once; when no peer holds it, or the transfer fails, the upstream is used;
//! 3. the upstream registry, chosen per request by containerd's `ns=` parameter or else the
//!    configured default. One download per blob however many clients ask at once (see
//!    [`download`]); the bytes stream to every client as they arrive and are stored and
//!    pinned once verified.
//!
//! Tags are resolved upstream on every request and remembered (tag → digest, the manifest
//! stored as a blob), so while the upstream is down a warm mirror keeps answering with the
//! last digest it saw.
//!
//! Access: content is served only to a client that could pull it from the upstream itself,
//! wherever the bytes come from (peers save upstream bandwidth; they do not widen access).
//! Each (repository, digest, credentials) is checked upstream with the client's own
//! `Authorization` header (a HEAD; answers are remembered for a few minutes), and a refusal
//! is passed back with the upstream's challenge so the client can log in upstream and retry.
//! When the upstream cannot be reached, only content that once passed the check without any
//! credentials (public content) is served. The mirror never uses fd's own credentials.
//!
//! Blobs and manifests the mirror stores are pinned ([`fd_node::Store::pin_blob`]), so
//! `fd gc` keeps them.

mod download;
mod http;
mod upstream;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fd_node::Store;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use reqwest::header::HeaderValue;
use tracing::{debug, warn};

use download::Download;
use upstream::Upstream;

/// How long a successful access check is trusted before the upstream is asked again.
const ACCESS_TTL: Duration = Duration::from_secs(300);

/// Errors setting the mirror up or running its listener.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The HTTP client for upstreams could not be built.
    #[error("could not set up the upstream HTTP client: {0}")]
    Setup(String),
    /// Reading or writing the mirror's own files, or serving.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Team peers as a source of blobs. The mirror asks only after the client passed the access
/// check, and only for blobs the store lacks.
pub trait PeerBlobs: Send + Sync {
    /// Brings blob `digest` (`sha256:…`) into the store from peers: checked against the
    /// digest, recorded and pinned. True when the blob is now stored (also when it already
    /// was); false when no peer could give it. Failures are the implementation's to log.
    fn fetch_blob<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, bool>;
}

/// What the mirror does.
#[derive(Clone)]
pub struct MirrorConfig {
    /// Upstream (`host[:port]`) for requests without `ns=`. Without it such requests get 404.
    pub default_upstream: Option<String>,
    /// Further upstreams a client may name with `ns=`. The default upstream is always
    /// allowed; any other name is refused, so the mirror cannot be aimed at arbitrary hosts.
    pub allowed_upstreams: Vec<String>,
    /// Registries reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// How long a connection to an upstream may take before it counts as down.
    pub connect_timeout: Duration,
    /// Team peers to ask for a blob before the upstream; None: the upstream only.
    pub peers: Option<Arc<dyn PeerBlobs>>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            default_upstream: None,
            allowed_upstreams: Vec::new(),
            insecure_registries: Vec::new(),
            connect_timeout: Duration::from_secs(2),
            peers: None,
        }
    }
}

impl std::fmt::Debug for MirrorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorConfig")
            .field("default_upstream", &self.default_upstream)
            .field("allowed_upstreams", &self.allowed_upstreams)
            .field("insecure_registries", &self.insecure_registries)
            .field("connect_timeout", &self.connect_timeout)
            .field("peers", &self.peers.is_some())
            .finish()
    }
}

/// A mirror over one store. Cheap to clone.
#[derive(Clone)]
pub struct Mirror {
    state: Arc<State>,
}

/// Key of a remembered access check: registry, repository, digest, credentials.
type AccessKey = (String, String, String, Option<String>);

/// A peer fetch in flight, awaited by every request for its blob.
type PeerAsk = Shared<BoxFuture<'static, bool>>;

pub(crate) struct State {
    store: Arc<Store>,
    upstream: Upstream,
    config: MirrorConfig,
    /// Downloads in flight, by digest.
    downloads: Mutex<HashMap<String, Arc<Download>>>,
    /// Peer fetches in flight, by digest.
    peer_asks: Mutex<HashMap<String, PeerAsk>>,
    /// Access checks that passed, until when they are trusted.
    access: Mutex<HashMap<AccessKey, Instant>>,
    /// `registry/repository@digest` that passed a check without credentials; kept on disk so
    /// a restarted mirror can still serve them during an outage.
    public: Mutex<HashSet<String>>,
    /// The mirror's own files (tags, public content) inside the store.
    dir: PathBuf,
}

impl Mirror {
    /// A mirror serving `store`. Reads its remembered state from the store directory.
    pub fn new(store: Arc<Store>, config: MirrorConfig) -> Result<Mirror, MirrorError> {
        let dir = store.root().join("mirror");
        let io = |what: &str| {
            let what = what.to_string();
            move |source| MirrorError::Io { what, source }
        };
        fs_err::create_dir_all(dir.join("tags")).map_err(io("creating the mirror directory"))?;
        let public = match fs_err::read_to_string(dir.join("public")) {
            Ok(s) => s.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(io("reading the mirror's public list")(e)),
        };
        let upstream = Upstream::new(config.insecure_registries.clone(), config.connect_timeout)
            .map_err(MirrorError::Setup)?;
        Ok(Mirror {
            state: Arc::new(State {
                store,
                upstream,
                config,
                downloads: Mutex::new(HashMap::new()),
                peer_asks: Mutex::new(HashMap::new()),
                access: Mutex::new(HashMap::new()),
                public: Mutex::new(public),
                dir,
            }),
        })
    }

    /// The HTTP routes, for embedding or tests.
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes; downloads in flight are abandoned
    /// (their partial files are removed).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), MirrorError> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| MirrorError::Io {
                what: "serving".into(),
                source,
            })
    }
}

/// The outcome of an access check that did not pass.
pub(crate) enum Refused {
    /// The upstream wants (other) credentials; carries its challenge.
    Unauthorized(Option<HeaderValue>),
    /// Unknown here and upstream (or upstream down and the content not known public).
    Unknown,
}

impl State {
    /// The upstream a request goes to, or None when it names one the mirror may not use.
    fn pick_upstream(&self, ns: Option<&str>) -> Option<String> {
        match ns {
            Some(ns) => {
                let ok = self.config.default_upstream.as_deref() == Some(ns)
                    || self
                        .config
                        .allowed_upstreams
                        .iter()
                        .any(|a| a.eq_ignore_ascii_case(ns));
                ok.then(|| ns.to_string())
            }
            None => self.config.default_upstream.clone(),
        }
    }

    /// Asks team peers to bring `digest` into the store; true when it is stored now. Every
    /// request for the blob meanwhile waits on the same fetch, which runs as a task of its
    /// own so that a client hanging up does not cut it short for the others.
    pub(crate) async fn ask_peers(self: &Arc<Self>, digest: &str) -> bool {
        let Some(peers) = self.config.peers.clone() else {
            return false;
        };
        let ask = {
            let mut asks = self.peer_asks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(ask) = asks.get(digest) {
                ask.clone()
            } else {
                // An upstream download already under way is joined instead: it got there
                // first because peers lacked the blob a moment ago.
                let downloading = self
                    .downloads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(digest);
                if downloading {
                    return false;
                }
                let state = self.clone();
                let key = digest.to_string();
                let task = tokio::spawn(async move {
                    let stored = peers.fetch_blob(&key).await;
                    state
                        .peer_asks
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                    stored
                });
                let ask: PeerAsk = task.map(|r| r.unwrap_or(false)).boxed().shared();
                asks.insert(digest.to_string(), ask.clone());
                ask
            }
        };
        ask.await
    }

    /// Whether the client with `auth` may read `digest` of `registry/name`. `path` is what to
    /// HEAD upstream for the check.
    async fn check_access(
        &self,
        registry: &str,
        name: &str,
        digest: &str,
        path: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<(), Refused> {
        let key = access_key(registry, name, digest, auth);
        {
            let map = self.access.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(&key).is_some_and(|t| Instant::now() < *t) {
                return Ok(());
            }
        }
        match self.upstream.head(registry, path, auth).await {
            Ok(_) => {
                self.allow(registry, name, digest, auth);
                Ok(())
            }
            Err(upstream::UpError::Denied { challenge, .. }) => {
                Err(Refused::Unauthorized(challenge))
            }
            Err(upstream::UpError::Unreachable(why)) => {
                if self.is_public(registry, name, digest) {
                    debug!(%registry, %name, %digest, %why, "upstream down; serving public content");
                    Ok(())
                } else {
                    debug!(%registry, %name, %digest, %why, "upstream down; content not known public");
                    Err(Refused::Unknown)
                }
            }
            Err(e) => {
                debug!(%registry, %name, %digest, error = %e, "access check failed");
                Err(Refused::Unknown)
            }
        }
    }

    /// Records that the client with `auth` read `digest` upstream.
    fn allow(&self, registry: &str, name: &str, digest: &str, auth: Option<&HeaderValue>) {
        let key = access_key(registry, name, digest, auth);
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Instant::now() + ACCESS_TTL);
        if auth.is_none() {
            let entry = format!("{registry}/{name}@{digest}");
            let mut public = self.public.lock().unwrap_or_else(|p| p.into_inner());
            if public.insert(entry.clone()) {
                let appended = fs_err::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("public"))
                    .and_then(|mut f| writeln!(f, "{entry}"));
                if let Err(e) = appended {
                    warn!(error = %e, "could not record public content");
                }
            }
        }
    }

    fn is_public(&self, registry: &str, name: &str, digest: &str) -> bool {
        self.public
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&format!("{registry}/{name}@{digest}"))
    }

    fn tag_path(&self, registry: &str, name: &str, tag: &str) -> PathBuf {
        let id = upstream::sha256_digest(format!("{registry}/{name}:{tag}").as_bytes());
        self.dir.join("tags").join(id.trim_start_matches("sha256:"))
    }

    /// Remembers what a tag pointed at; written whole (temp file and rename).
    fn remember_tag(&self, registry: &str, name: &str, tag: &str, digest: &str) {
        let path = self.tag_path(registry, name, tag);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = fs_err::write(&tmp, digest).and_then(|()| fs_err::rename(&tmp, &path));
        if let Err(e) = result {
            warn!(error = %e, "could not remember tag");
        }
    }

    fn last_tag(&self, registry: &str, name: &str, tag: &str) -> Option<String> {
        let s = std::fs::read_to_string(self.tag_path(registry, name, tag)).ok()?;
        let d = s.trim();
        http::is_digest(d).then(|| d.to_string())
    }
}

fn access_key(registry: &str, name: &str, digest: &str, auth: Option<&HeaderValue>) -> AccessKey {
    (
        registry.to_string(),
        name.to_string(),
        digest.to_string(),
        // Kept only in memory; hashed so the table does not hold secrets in the clear.
        auth.map(|a| upstream::sha256_digest(a.as_bytes())),
    )
}
