//! Tests of the registry client against a scripted HTTP server on 127.0.0.1, for the
//! misbehaviours a real registry will not produce on demand: wrong bytes for a digest,
//! lying headers, 5xx and 429 answers, bodies cut short, Range requests ignored, oversized
//! or obsolete manifests.
//!
//! The server answers each request from a handler the test gives, logs every request, and
//! stops when the test drops it. Clients refuse every non-loopback registry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use fd_gateway::{BlobDesc, ClientOptions, GatewayError, ImageRef, Platform, RegistryClient};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Debug, Clone)]
struct Req {
    method: String,
    /// Path and query.
    path: String,
    range: Option<String>,
    authorization: Option<String>,
}

/// What the server sends back.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Announce this Content-Length but send only `body` and close: a cut connection.
    declared_len: Option<usize>,
}

impl Reply {
    fn ok(body: &[u8]) -> Reply {
        Reply {
            status: 200,
            headers: vec![],
            body: body.to_vec(),
            declared_len: None,
        }
    }
    fn status(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
            declared_len: None,
        }
    }
    fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

type Handler = Arc<dyn Fn(&Req, &str) -> Reply + Send + Sync>;

/// A scripted registry; stops serving when dropped.
struct Mock {
    host: String,
    log: Arc<Mutex<Vec<Req>>>,
    task: JoinHandle<()>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mock {
    /// Serves `handler` for every request except `GET /v2/`, which the client's auth probe
    /// sends and which gets an anonymous-OK answer.
    async fn start(handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Mock {
        Mock::start_with(true, move |req, _host| handler(req)).await
    }

    /// Serves every request from `handler`, which also gets the server's own `host:port`;
    /// with `answer_probe`, `GET /v2/` is answered as by [`Mock::start`].
    async fn start_with(
        answer_probe: bool,
        handler: impl Fn(&Req, &str) -> Reply + Send + Sync + 'static,
    ) -> Mock {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let task_log = log.clone();
        let task_host = host.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let log = task_log.clone();
                let host = task_host.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut sock).await else {
                        return;
                    };
                    let reply = if answer_probe && req.path == "/v2/" {
                        Reply::ok(b"{}")
                    } else {
                        log.lock().expect("lock").push(req.clone());
                        handler(&req, &host)
                    };
                    let len = reply.declared_len.unwrap_or(reply.body.len());
                    let mut head = format!(
                        "HTTP/1.1 {} X\r\nContent-Length: {len}\r\nConnection: close\r\n",
                        reply.status
                    );
                    for (k, v) in &reply.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let _ = sock.write_all(head.as_bytes()).await;
                    if req.method != "HEAD" {
                        let _ = sock.write_all(&reply.body).await;
                    }
                    let _ = sock.shutdown().await;
                });
            }
        });
        Mock { host, log, task }
    }

    fn requests(&self, path_part: &str) -> Vec<Req> {
        self.log
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.path.contains(path_part))
            .cloned()
            .collect()
    }

    fn reference(&self, rest: &str) -> ImageRef {
        ImageRef::parse(&format!("{}/{rest}", self.host)).expect("reference")
    }
}

/// Reads one request head (bounded in size).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 64 << 10 {
            return None;
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    Some(Req {
        method,
        path,
        range: header("range"),
        authorization: header("authorization"),
    })
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn client(platform: Option<&str>) -> RegistryClient {
    client_with_auth(platform, vec![])
}

fn client_with_auth(platform: Option<&str>, auth_files: Vec<std::path::PathBuf>) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        insecure_registries: vec![],
        platform: platform.map(|p| Platform::parse(p).expect("platform")),
        auth_files: Some(auth_files),
        plain_http_only: true,
    })
    .expect("client")
}

fn image_manifest(layer_type: &str) -> Vec<u8> {
    let config = sha256(b"config");
    let layer = sha256(b"layer");
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{config}","size":6}},"layers":[{{"mediaType":"{layer_type}","digest":"{layer}","size":5}}]}}"#
    )
    .into_bytes()
}

/// A blob of `len` bytes that do not repeat.
fn blob_bytes(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

#[tokio::test]
async fn manifest_bytes_must_match_the_pinned_digest_and_the_header() {
    let good = image_manifest(GZIP_LAYER);
    let good_digest = sha256(&good);
    let other = sha256(b"other");
    let body = good.clone();
    let mock = Mock::start(move |req| {
        if req.path.ends_with("/manifests/lying-header") {
            Reply::ok(&body)
                .header("Content-Type", OCI_MANIFEST)
                .header("Docker-Content-Digest", &sha256(b"other"))
        } else {
            // Whatever digest is asked for, these bytes come back.
            Reply::ok(&body).header("Content-Type", OCI_MANIFEST)
        }
    })
    .await;
    let c = client(None);

    let ok = c.resolve(&mock.reference("x:t")).await.expect("resolve");
    assert_eq!(ok.manifest.digest, good_digest);

    let e = c
        .resolve(&mock.reference(&format!("x@{other}")))
        .await
        .expect_err("wrong bytes for digest");
    match &e {
        GatewayError::ManifestDigestMismatch {
            expected, computed, ..
        } => {
            assert_eq!(expected, &other);
            assert_eq!(computed, &good_digest);
        }
        e => panic!("wrong error: {e}"),
    }

    let e = c
        .resolve(&mock.reference("x:lying-header"))
        .await
        .expect_err("header disagrees");
    match &e {
        GatewayError::DigestHeaderMismatch {
            expected, header, ..
        } => {
            assert_eq!(header, &other);
            assert_eq!(expected, &good_digest);
        }
        e => panic!("wrong error: {e}"),
    }
}

#[tokio::test]
async fn transient_errors_are_retried_a_bounded_number_of_times() {
    let manifest = image_manifest(GZIP_LAYER);
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let mock = Mock::start(move |req| {
        if req.path.contains("/flaky/") {
            // Two failures (a 503, then a 429), then success.
            match counter.fetch_add(1, Ordering::SeqCst) {
                0 => Reply::status(503, "busy"),
                1 => Reply::status(429, "slow down"),
                _ => Reply::ok(&manifest).header("Content-Type", OCI_MANIFEST),
            }
        } else if req.path.contains("/broken/") {
            Reply::status(500, "internal trouble")
        } else {
            Reply::status(400, "bad request")
        }
    })
    .await;
    let c = client(None);

    c.resolve(&mock.reference("flaky:t"))
        .await
        .expect("succeeds on the third attempt");
    assert_eq!(hits.load(Ordering::SeqCst), 3);

    let e = c
        .resolve(&mock.reference("broken:t"))
        .await
        .expect_err("always 500");
    match &e {
        GatewayError::Http {
            status, attempts, ..
        } => assert_eq!((*status, *attempts), (500, 4)),
        e => panic!("wrong error: {e}"),
    }
    assert!(
        e.to_string().contains("gave up after 4 attempts over"),
        "{e}"
    );
    assert_eq!(mock.requests("/broken/").len(), 4);

    // A 400 is not retried.
    let e = c.resolve(&mock.reference("bad:t")).await.expect_err("400");
    assert!(
        matches!(
            e,
            GatewayError::Http {
                status: 400,
                attempts: 1,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(mock.requests("/bad/").len(), 1);
}

#[tokio::test]
async fn oversized_obsolete_and_unsupported_manifests_are_refused() {
    let huge = vec![b' '; (4 << 20) + 1];
    let schema1 = br#"{"schemaVersion":1,"name":"x","tag":"t","fsLayers":[]}"#.to_vec();
    let lz4 = image_manifest("application/vnd.oci.image.layer.v1.tar+lz4");
    let mock = Mock::start(move |req| {
        let body = if req.path.contains("/huge/") {
            &huge
        } else if req.path.contains("/old/") {
            &schema1
        } else {
            &lz4
        };
        Reply::ok(body)
    })
    .await;
    let c = client(None);
    let e = c
        .resolve(&mock.reference("huge:t"))
        .await
        .expect_err("huge");
    assert!(matches!(e, GatewayError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("over the 4194304-byte limit"), "{e}");
    let e = c
        .resolve(&mock.reference("old:t"))
        .await
        .expect_err("schema1");
    assert!(matches!(e, GatewayError::Schema1 { .. }), "{e}");
    let e = c.resolve(&mock.reference("lz4:t")).await.expect_err("lz4");
    assert_eq!(
        e.to_string(),
        "unsupported layer media type application/vnd.oci.image.layer.v1.tar+lz4"
    );
}

#[tokio::test]
async fn index_entries_are_checked_against_their_descriptors() {
    let manifest = image_manifest(GZIP_LAYER);
    let digest = sha256(&manifest);
    let entry = |size: u64, arch: &str| {
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{size},"platform":{{"os":"linux","architecture":"{arch}"}}}}"#
        )
    };
    // amd64 has the wrong size; arm64 announces more than the manifest limit.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{}]}}"#,
        entry(manifest.len() as u64 + 1, "amd64"),
        entry(5 << 20, "arm64")
    );
    let served_manifest = manifest.clone();
    let mock = Mock::start(move |req| {
        if req.path.ends_with("/manifests/t") {
            Reply::ok(index.as_bytes())
        } else {
            Reply::ok(&served_manifest)
        }
    })
    .await;

    let e = client(Some("linux/amd64"))
        .resolve(&mock.reference("x:t"))
        .await
        .expect_err("size");
    match &e {
        GatewayError::SizeMismatch {
            expected, actual, ..
        } => assert_eq!(
            (*expected, *actual),
            (manifest.len() as u64 + 1, manifest.len() as u64)
        ),
        e => panic!("wrong error: {e}"),
    }

    let before = mock.requests(&digest).len();
    let e = client(Some("linux/arm64"))
        .resolve(&mock.reference("x:t"))
        .await
        .expect_err("too large");
    assert!(matches!(e, GatewayError::TooLarge { .. }), "{e}");
    assert_eq!(
        mock.requests(&digest).len(),
        before,
        "refused without fetching"
    );
}

/// Serves one blob; `mode` decides how.
#[derive(Clone, Copy, PartialEq)]
enum BlobMode {
    /// Ignores Range headers and always sends the whole blob with 200.
    NoRanges,
    /// The first GET sends half the blob and closes; later GETs honour Range.
    CutOnce,
}

async fn blob_mock(blob: Vec<u8>, mode: BlobMode) -> Mock {
    let gets = Arc::new(AtomicUsize::new(0));
    Mock::start(move |req| {
        let n = gets.fetch_add(1, Ordering::SeqCst);
        let start = match (&req.range, mode) {
            (Some(r), BlobMode::CutOnce) => r
                .strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0),
            _ => 0,
        };
        if mode == BlobMode::CutOnce && n == 0 {
            return Reply {
                status: 200,
                headers: vec![],
                body: blob[..blob.len() / 2].to_vec(),
                declared_len: Some(blob.len()),
            };
        }
        if start > 0 {
            Reply {
                status: 206,
                headers: vec![(
                    "Content-Range".into(),
                    format!("bytes {start}-{}/{}", blob.len() - 1, blob.len()),
                )],
                body: blob[start..].to_vec(),
                declared_len: None,
            }
        } else {
            Reply::ok(&blob)
        }
    })
    .await
}

#[tokio::test]
async fn a_registry_that_ignores_range_gets_a_fresh_download() {
    let blob = blob_bytes(200_000);
    let desc = BlobDesc {
        digest: sha256(&blob),
        size: blob.len() as u64,
        media_type: GZIP_LAYER.into(),
    };
    let mock = blob_mock(blob.clone(), BlobMode::NoRanges).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("blob");
    std::fs::write(&dest, &blob[..50_000]).expect("partial");
    let stats = client(None)
        .fetch_blob(&mock.reference("x:t"), &desc, &dest, &|_| {})
        .await
        .expect("fetch");
    assert_eq!(
        (stats.resumed_from, stats.bytes_downloaded),
        (0, blob.len() as u64)
    );
    assert_eq!(std::fs::read(&dest).expect("read"), blob);
    let reqs = mock.requests("/blobs/");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].range.as_deref(), Some("bytes=50000-"));
}

#[tokio::test]
async fn a_cut_connection_is_resumed_where_it_stopped() {
    let blob = blob_bytes(300_000);
    let desc = BlobDesc {
        digest: sha256(&blob),
        size: blob.len() as u64,
        media_type: GZIP_LAYER.into(),
    };
    let mock = blob_mock(blob.clone(), BlobMode::CutOnce).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("blob");
    let last = Mutex::new(0u64);
    let stats = tokio::time::timeout(
        Duration::from_secs(30),
        client(None).fetch_blob(&mock.reference("x:t"), &desc, &dest, &|n| {
            *last.lock().expect("lock") = n;
        }),
    )
    .await
    .expect("in time")
    .expect("fetch");
    assert_eq!(std::fs::read(&dest).expect("read"), blob);
    assert_eq!(stats.resumed_from, 0, "nothing was on disk before the call");
    assert_eq!(stats.bytes_downloaded, blob.len() as u64);
    assert_eq!(*last.lock().expect("lock"), blob.len() as u64);
    let reqs = mock.requests("/blobs/");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=150000-"));
}

/// A registry that wants bearer tokens from its own token endpoint, as Docker Hub, ghcr.io
/// and quay.io do: the client must trade the auth file's credentials (or nothing, for
/// public repositories) for a token and present it.
#[tokio::test]
async fn bearer_token_flow_with_and_without_credentials() {
    let manifest = image_manifest(GZIP_LAYER);
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("tok-user:tok-pass")
    );
    let mock = Mock::start_with(false, move |req, host| {
        let challenge = format!(r#"Bearer realm="http://{host}/token",service="mock""#);
        if req.path == "/v2/" {
            return Reply::status(401, "{}").header("WWW-Authenticate", &challenge);
        }
        if req.path.starts_with("/token") {
            // Anyone gets a token for the public repository; the private one needs the
            // right user.
            let token = if req.authorization.as_deref() == Some(basic.as_str()) {
                "user-token"
            } else if req.path.contains("repository%3Apublic%3Apull")
                || req.path.contains("repository:public:pull")
            {
                "anonymous-token"
            } else {
                return Reply::status(401, "bad credentials");
            };
            return Reply::ok(format!(r#"{{"token":"{token}"}}"#).as_bytes());
        }
        let allowed = match req.authorization.as_deref() {
            Some("Bearer user-token") => true,
            Some("Bearer anonymous-token") => req.path.starts_with("/v2/public/"),
            _ => false,
        };
        if allowed {
            Reply::ok(&manifest)
        } else {
            Reply::status(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"token needed"}]}"#,
            )
            .header("WWW-Authenticate", &challenge)
        }
    })
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let auth = dir.path().join("auth.json");
    std::fs::write(
        &auth,
        format!(
            r#"{{"auths":{{"{}":{{"username":"tok-user","password":"tok-pass"}}}}}}"#,
            mock.host
        ),
    )
    .expect("auth file");

    let with_creds = client_with_auth(None, vec![auth.clone()]);
    with_creds
        .resolve(&mock.reference("private:t"))
        .await
        .expect("private repository with credentials");
    let token_requests = mock.requests("/token");
    assert!(!token_requests.is_empty());
    assert!(
        token_requests.iter().all(|r| r
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic "))),
        "credentials go to the token endpoint: {token_requests:?}"
    );
    assert!(
        mock.requests("/v2/private/manifests/t")
            .iter()
            .any(|r| r.authorization.as_deref() == Some("Bearer user-token"))
    );

    let anonymous = client(None);
    anonymous
        .resolve(&mock.reference("public:t"))
        .await
        .expect("public repository with an anonymous token");
    let e = anonymous
        .resolve(&mock.reference("private:t"))
        .await
        .expect_err("private repository without credentials");
    assert!(
        matches!(
            e,
            GatewayError::Unauthorized {
                credentials_from: None,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("podman login"), "{e}");

    let wrong = dir.path().join("wrong.json");
    std::fs::write(
        &wrong,
        format!(
            r#"{{"auths":{{"{}":{{"username":"tok-user","password":"nope"}}}}}}"#,
            mock.host
        ),
    )
    .expect("auth file");
    let e = client_with_auth(None, vec![wrong.clone()])
        .resolve(&mock.reference("private:t"))
        .await
        .expect_err("wrong password");
    match &e {
        GatewayError::Unauthorized {
            credentials_from, ..
        } => assert_eq!(credentials_from.as_deref(), Some(wrong.as_path())),
        e => panic!("wrong error: {e}"),
    }
}
