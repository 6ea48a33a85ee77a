//! The registry mirror against a scripted upstream on 127.0.0.1: headers, Range, error codes,
//! one upstream download per blob under concurrency, the warm-mirror outage path and the
//! private-content policy, and team peers (a scripted [`PeerBlobs`]) asked before the
//! upstream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fd_gateway::mirror::{Mirror, MirrorConfig, PeerBlobs};
use fd_node::Store;
use futures::StreamExt;
use sha2::{Digest, Sha256};

const SECRET: &str = "Basic dXNlcjpwYXNz";

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// What the scripted upstream holds and how often it was asked for blobs.
struct Upstream {
    manifests: HashMap<String, (String, Bytes)>,
    blobs: HashMap<String, Bytes>,
    blob_gets: Mutex<HashMap<String, usize>>,
    manifest_gets: AtomicUsize,
}

impl Upstream {
    fn gets(&self, digest: &str) -> usize {
        *self
            .blob_gets
            .lock()
            .expect("lock")
            .get(digest)
            .unwrap_or(&0)
    }
}

async fn upstream_handler(
    State(u): State<Arc<Upstream>>,
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path();
    if path == "/v2/" {
        return (StatusCode::OK, "{}").into_response();
    }
    let private = path.starts_with("/v2/private/");
    if private && headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(SECRET) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"test\"")],
            "{}",
        )
            .into_response();
    }
    let head = method == axum::http::Method::HEAD;
    if let Some((_, r)) = path.rsplit_once("/manifests/") {
        u.manifest_gets.fetch_add(1, Ordering::SeqCst);
        let found = u
            .manifests
            .get(r)
            .or_else(|| u.manifests.values().find(|(d, _)| d == r));
        return match found {
            Some((d, b)) => (
                StatusCode::OK,
                [
                    (
                        "content-type",
                        "application/vnd.oci.image.manifest.v1+json".to_string(),
                    ),
                    ("docker-content-digest", d.clone()),
                ],
                if head { Bytes::new() } else { b.clone() },
            )
                .into_response(),
            None => (StatusCode::NOT_FOUND, "{}").into_response(),
        };
    }
    if let Some((_, d)) = path.rsplit_once("/blobs/") {
        let Some(b) = u.blobs.get(d).cloned() else {
            return (StatusCode::NOT_FOUND, "{}").into_response();
        };
        let mut r = Response::new(Body::empty());
        r.headers_mut().insert("content-length", b.len().into());
        if head {
            return r;
        }
        *u.blob_gets
            .lock()
            .expect("lock")
            .entry(d.to_string())
            .or_default() += 1;
        // Slow, piecewise body, so that concurrent clients overlap with the download.
        let pieces: Vec<Bytes> = b.chunks(64 << 10).map(Bytes::copy_from_slice).collect();
        let stream = futures::stream::iter(pieces).then(|p| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, std::io::Error>(p)
        });
        *r.body_mut() = Body::from_stream(stream);
        return r;
    }
    (StatusCode::NOT_FOUND, "{}").into_response()
}

struct Setup {
    _dir: tempfile::TempDir,
    up: Arc<Upstream>,
    up_addr: String,
    up_task: tokio::task::JoinHandle<()>,
    mirror: String,
    mirror_task: tokio::task::JoinHandle<()>,
    blob: (String, Bytes),
    manifest: (String, Bytes),
    store: Arc<Store>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.up_task.abort();
        self.mirror_task.abort();
    }
}

async fn setup() -> Setup {
    setup_with(None).await
}

async fn setup_with(peers: Option<Arc<dyn PeerBlobs>>) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let blob = Bytes::from(blob);
    let blob_d = sha(&blob);
    let config = Bytes::from_static(b"{\"architecture\":\"amd64\",\"os\":\"linux\"}");
    let config_d = sha(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob_d, "size": blob.len()}],
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    let manifest_d = sha(&manifest);
    let up = Arc::new(Upstream {
        manifests: HashMap::from([("v1".to_string(), (manifest_d.clone(), manifest.clone()))]),
        blobs: HashMap::from([(blob_d.clone(), blob.clone()), (config_d, config)]),
        blob_gets: Mutex::new(HashMap::new()),
        manifest_gets: AtomicUsize::new(0),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let up_addr = l.local_addr().expect("addr").to_string();
    let app = axum::Router::new()
        .fallback(upstream_handler)
        .with_state(up.clone());
    let up_task = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    let store = Arc::new(Store::open(dir.path().join("fd")).expect("store"));
    let m = Mirror::new(
        store.clone(),
        MirrorConfig {
            default_upstream: Some(up_addr.clone()),
            peers,
            ..MirrorConfig::default()
        },
    )
    .expect("mirror");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mirror = format!("http://{}", l.local_addr().expect("addr"));
    let mirror_task = tokio::spawn(async move {
        let _ = m.serve(l, std::future::pending()).await;
    });
    Setup {
        _dir: dir,
        up,
        up_addr,
        up_task,
        mirror,
        mirror_task,
        blob: (blob_d, blob),
        manifest: (manifest_d, manifest),
        store,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn error_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.expect("error json");
    v["errors"][0]["code"].as_str().expect("code").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifests_blobs_ranges_and_errors() {
    let s = setup().await;
    let c = client();
    let r = c
        .get(format!("{}/v2/", s.mirror))
        .send()
        .await
        .expect("ping");
    assert_eq!(r.status(), 200);

    // Manifest by tag: exact bytes and headers, HEAD agrees with GET.
    let url = format!("{}/v2/app/manifests/v1", s.mirror);
    let r = c.get(&url).send().await.expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(r.headers()["docker-content-digest"], s.manifest.0.as_str());
    assert_eq!(
        r.headers()["content-length"],
        s.manifest.1.len().to_string().as_str()
    );
    assert_eq!(r.bytes().await.expect("body"), s.manifest.1);
    let h = c.head(&url).send().await.expect("head");
    assert_eq!(h.status(), 200);
    assert_eq!(h.headers()["docker-content-digest"], s.manifest.0.as_str());
    assert_eq!(
        h.headers()["content-length"],
        s.manifest.1.len().to_string().as_str()
    );
    // By digest, and with a slashed name.
    let r = c
        .get(format!("{}/v2/app/manifests/{}", s.mirror, s.manifest.0))
        .send()
        .await
        .expect("get");
    assert_eq!(sha(&r.bytes().await.expect("body")), s.manifest.0);

    // Blob: whole, HEAD, ranges, 416.
    let burl = format!("{}/v2/app/blobs/{}", s.mirror, s.blob.0);
    let h = c.head(&burl).send().await.expect("head");
    assert_eq!(h.status(), 200);
    assert_eq!(
        h.headers()["content-length"],
        s.blob.1.len().to_string().as_str()
    );
    assert_eq!(h.headers()["accept-ranges"], "bytes");
    let body = c
        .get(&burl)
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(sha(&body), s.blob.0);
    for _ in 0..50 {
        if s.store.has_blob(&s.blob.0).expect("store") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(s.store.has_blob(&s.blob.0).expect("store"), "blob stored");
    assert!(s.store.pinned_blobs().expect("pins").contains(&s.blob.0));
    let h = c.head(&burl).send().await.expect("head local");
    assert_eq!(
        h.headers()["content-length"],
        s.blob.1.len().to_string().as_str()
    );
    assert_eq!(h.headers()["accept-ranges"], "bytes");
    let r = c
        .get(&burl)
        .header("range", "bytes=100000-1999999")
        .send()
        .await
        .expect("range");
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100000-1999999/{}", s.blob.1.len()).as_str()
    );
    assert_eq!(
        r.bytes().await.expect("body"),
        s.blob.1.slice(100000..2000000)
    );
    let r = c
        .get(&burl)
        .header("range", "bytes=-10")
        .send()
        .await
        .expect("suffix");
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.bytes().await.expect("body"),
        s.blob.1.slice(s.blob.1.len() - 10..)
    );
    let r = c
        .get(&burl)
        .header("range", format!("bytes={}-", s.blob.1.len()))
        .send()
        .await
        .expect("416");
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", s.blob.1.len()).as_str()
    );
    assert_eq!(s.up.gets(&s.blob.0), 1, "one upstream GET in all");

    // Error codes.
    let r = c
        .get(format!("{}/v2/app/manifests/nope", s.mirror))
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = c
        .get(format!("{}/v2/app/blobs/{missing}", s.mirror))
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = c
        .get(format!("{}/v2/app/blobs/sha256:xyz", s.mirror))
        .send()
        .await
        .expect("400");
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c
        .get(format!("{}/v2/Bad/manifests/v1", s.mirror))
        .send()
        .await
        .expect("400");
    assert_eq!(error_code(r).await, "NAME_INVALID");
    let r = c
        .delete(format!("{}/v2/app/manifests/v1", s.mirror))
        .send()
        .await
        .expect("405");
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    // An upstream the mirror was not told about is refused without any request to it.
    let r = c
        .get(format!("{}/v2/app/manifests/v1?ns=10.255.255.1", s.mirror))
        .send()
        .await
        .expect("ns");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    let ns = format!(
        "{}/v2/app/manifests/v1?ns={}",
        s.mirror,
        s.up_addr.replace(':', "%3A")
    );
    assert_eq!(c.get(ns).send().await.expect("ns").status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_clients_one_upstream_download() {
    let s = setup().await;
    let burl = format!("{}/v2/app/blobs/{}", s.mirror, s.blob.0);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = burl.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut r = c.get(&url);
            // Some clients read a range, as resuming clients do.
            if i % 4 == 3 {
                r = r.header("range", "bytes=1000-");
            }
            let resp = r.send().await.expect("get");
            (resp.status().as_u16(), resp.bytes().await.expect("body"))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.expect("task");
        if i % 4 == 3 {
            assert_eq!(status, 206);
            assert_eq!(body, s.blob.1.slice(1000..));
        } else {
            assert_eq!(status, 200);
            assert_eq!(sha(&body), s.blob.0);
        }
    }
    assert_eq!(
        s.up.gets(&s.blob.0),
        1,
        "the upstream saw one GET of the blob"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_mirror_survives_an_outage() {
    let s = setup().await;
    let c = client();
    let url = format!("{}/v2/app/manifests/v1", s.mirror);
    let burl = format!("{}/v2/app/blobs/{}", s.mirror, s.blob.0);
    assert_eq!(c.get(&url).send().await.expect("warm").status(), 200);
    let body = c
        .get(&burl)
        .send()
        .await
        .expect("warm")
        .bytes()
        .await
        .expect("body");
    assert_eq!(sha(&body), s.blob.0);
    for _ in 0..50 {
        if s.store.has_blob(&s.blob.0).expect("store") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.up_task.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let t = Instant::now();
    let r = c.get(&url).send().await.expect("outage tag");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], s.manifest.0.as_str());
    assert_eq!(r.bytes().await.expect("body"), s.manifest.1);
    let body = c
        .get(&burl)
        .send()
        .await
        .expect("outage blob")
        .bytes()
        .await
        .expect("body");
    assert_eq!(sha(&body), s.blob.0);
    // Unknown content fails fast, so clients fall through to the next source.
    let r = c
        .get(format!("{}/v2/app/manifests/other", s.mirror))
        .send()
        .await
        .expect("404");
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "outage answers took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_content_needs_the_clients_own_credentials() {
    let s = setup().await;
    let c = client();
    let url = format!("{}/v2/private/app/manifests/v1", s.mirror);
    let burl = format!("{}/v2/private/app/blobs/{}", s.mirror, s.blob.0);
    // Without credentials: the upstream's challenge comes back.
    let r = c.get(&url).send().await.expect("anon");
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"test\"");
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    // With them: served.
    let r = c
        .get(&url)
        .header("authorization", SECRET)
        .send()
        .await
        .expect("auth");
    assert_eq!(r.status(), 200);
    let body = c
        .get(&burl)
        .header("authorization", SECRET)
        .send()
        .await
        .expect("auth blob")
        .bytes()
        .await
        .expect("body");
    assert_eq!(sha(&body), s.blob.0);
    // Now stored locally, it is still refused to a client without credentials, and to one
    // with wrong ones.
    let by_digest = format!("{}/v2/private/app/manifests/{}", s.mirror, s.manifest.0);
    assert_eq!(c.get(&by_digest).send().await.expect("anon").status(), 401);
    assert_eq!(c.get(&burl).send().await.expect("anon").status(), 401);
    let r = c
        .get(&burl)
        .header("authorization", "Basic bm86bm8=")
        .send()
        .await
        .expect("bad");
    assert_eq!(r.status(), 401);
    // During an outage, private content is not served to anyone from the cache.
    s.up_task.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.get(&burl).send().await.expect("outage").status(), 404);
    assert!(s.up.manifest_gets.load(Ordering::SeqCst) > 0);
}

/// Scripted team peers: they hold `blobs` and write them into `store` when asked, slowly,
/// so that concurrent requests overlap with the fetch.
struct FakePeers {
    store: Mutex<Option<Arc<Store>>>,
    blobs: HashMap<String, Bytes>,
    asked: AtomicUsize,
}

impl FakePeers {
    fn new(blobs: HashMap<String, Bytes>) -> Arc<FakePeers> {
        Arc::new(FakePeers {
            store: Mutex::new(None),
            blobs,
            asked: AtomicUsize::new(0),
        })
    }
}

impl PeerBlobs for FakePeers {
    fn fetch_blob<'a>(&'a self, digest: &'a str) -> futures::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            self.asked.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let store = self.store.lock().expect("lock").clone();
            match (store, self.blobs.get(digest)) {
                (Some(store), Some(bytes)) => {
                    store
                        .put_blob_from_reader(digest, "application/octet-stream", &bytes[..])
                        .expect("store");
                    store.pin_blob(digest).expect("pin");
                    true
                }
                _ => false,
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_come_before_the_upstream_and_do_not_widen_access() {
    let probe = setup().await;
    let (blob_d, blob) = probe.blob.clone();
    drop(probe);
    let peers = FakePeers::new(HashMap::from([(blob_d.clone(), blob.clone())]));
    let s = setup_with(Some(peers.clone() as Arc<dyn PeerBlobs>)).await;
    assert_eq!(s.blob.0, blob_d, "the test blob is the same in every setup");
    *peers.store.lock().expect("lock") = Some(s.store.clone());

    // A client without the credentials a private repository needs is refused before any
    // peer is asked.
    let c = client();
    let private = format!("{}/v2/private/app/blobs/{}", s.mirror, s.blob.0);
    assert_eq!(c.get(&private).send().await.expect("anon").status(), 401);
    assert_eq!(peers.asked.load(Ordering::SeqCst), 0);

    // Four clients at once: one peer fetch, no upstream download, exact bytes to all.
    let burl = format!("{}/v2/app/blobs/{}", s.mirror, s.blob.0);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let url = burl.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = client().get(&url);
            if i == 3 {
                r = r.header("range", "bytes=1000-");
            }
            let resp = r.send().await.expect("get");
            (resp.status().as_u16(), resp.bytes().await.expect("body"))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.expect("task");
        if i == 3 {
            assert_eq!(status, 206);
            assert_eq!(body, s.blob.1.slice(1000..));
        } else {
            assert_eq!(status, 200);
            assert_eq!(sha(&body), s.blob.0);
        }
    }
    assert_eq!(peers.asked.load(Ordering::SeqCst), 1, "one peer fetch");
    assert_eq!(s.up.gets(&s.blob.0), 0, "no upstream download");
    assert!(s.store.pinned_blobs().expect("pins").contains(&s.blob.0));

    // A blob the peers lack comes from the upstream.
    let config_d =
        s.up.blobs
            .keys()
            .find(|d| **d != s.blob.0)
            .expect("config digest")
            .clone();
    let r = c
        .get(format!("{}/v2/app/blobs/{config_d}", s.mirror))
        .send()
        .await
        .expect("config");
    assert_eq!(r.status(), 200);
    assert_eq!(sha(&r.bytes().await.expect("body")), config_d);
    assert_eq!(peers.asked.load(Ordering::SeqCst), 2, "peers asked first");
    assert_eq!(s.up.gets(&config_d), 1, "then the upstream");
}
