//! Requests and answers: path parsing, manifests, blobs, Range, OCI error bodies.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::Stream;
use reqwest::header::HeaderValue;
use tracing::{debug, info, warn};

use super::download::{self, Joined};
use super::upstream::{UpError, UpManifest};
use super::{Refused, State};

const DIGEST_HEADER: &str = "docker-content-digest";

pub(super) fn router(state: Arc<State>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(state)
}

/// An OCI error answer.
fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn unknown(is_blob: bool) -> Response {
    if is_blob {
        oci_error(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            "blob unknown to registry",
        )
    } else {
        oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown to registry",
        )
    }
}

fn unauthorized(challenge: Option<HeaderValue>) -> Response {
    let mut r = oci_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required by the upstream registry",
    );
    if let Some(c) = challenge {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
    }
    r
}

fn refused(r: Refused, is_blob: bool) -> Response {
    match r {
        Refused::Unauthorized(c) => unauthorized(c),
        Refused::Unknown => unknown(is_blob),
    }
}

fn from_upstream(e: UpError, is_blob: bool) -> Response {
    match e {
        UpError::Denied { challenge, .. } => unauthorized(challenge),
        // Unreachable and unknown alike: a fast 404 lets clients fall through to the next
        // source.
        UpError::NotFound | UpError::Unreachable(_) => unknown(is_blob),
        UpError::Invalid(m) => {
            warn!(error = %m, "refusing a bad upstream answer");
            oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", &m)
        }
    }
}

pub(super) fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Repository names as the distribution spec defines them: lowercase components joined by
/// `/`, separators `.`, `_`, `__` and runs of `-` inside a component.
fn is_name(s: &str) -> bool {
    s.len() <= 255
        && s.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
                && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
                && b.iter()
                    .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
                && !c.contains("..")
                && !c.contains("___")
        })
}

/// The `ns` query parameter, percent-decoded.
fn ns_param(uri: &Uri) -> Option<String> {
    let q = uri.query()?;
    let raw = q.split('&').find_map(|kv| kv.strip_prefix("ns="))?;
    let mut out = Vec::new();
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let h = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

async fn handle(
    AxState(s): AxState<Arc<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        return oci_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this mirror only serves pulls",
        );
    }
    let path = uri.path();
    if path == "/v2/" || path == "/v2" {
        return (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (
                    header::HeaderName::from_static("docker-distribution-api-version"),
                    "registry/2.0",
                ),
            ],
            "{}",
        )
            .into_response();
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return oci_error(StatusCode::NOT_FOUND, "UNSUPPORTED", "not a registry path");
    };
    let (name, is_blob, reference) = if let Some((n, r)) = rest.rsplit_once("/manifests/") {
        (n, false, r)
    } else if let Some((n, r)) = rest.rsplit_once("/blobs/") {
        (n, true, r)
    } else {
        return oci_error(StatusCode::NOT_FOUND, "UNSUPPORTED", "not a pull path");
    };
    if !is_name(name) {
        return oci_error(
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
            "invalid repository name",
        );
    }
    let ns = ns_param(&uri);
    let Some(registry) = s.pick_upstream(ns.as_deref()) else {
        debug!(?ns, "request for an upstream this mirror does not serve");
        return oci_error(
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
            "this mirror does not serve that registry",
        );
    };
    let auth = headers.get(header::AUTHORIZATION).cloned();
    if is_blob {
        if !is_digest(reference) {
            return oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
        }
        let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
        blob(&s, &registry, name, reference, auth, head, range).await
    } else if is_digest(reference) {
        manifest_by_digest(&s, &registry, name, reference, auth.as_ref(), head).await
    } else if is_tag(reference) {
        manifest_by_tag(&s, &registry, name, reference, auth.as_ref(), head).await
    } else if reference.contains(':') {
        oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest")
    } else {
        oci_error(StatusCode::BAD_REQUEST, "TAG_INVALID", "invalid tag")
    }
}

fn manifest_response(digest: &str, media_type: &str, bytes: Bytes, head: bool) -> Response {
    let len = bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(digest) {
        h.insert(DIGEST_HEADER, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// A stored manifest and its media type, checked against its digest.
async fn local_manifest(s: &Arc<State>, digest: &str) -> Option<(Bytes, String)> {
    let store = s.store.clone();
    let key = digest.to_string();
    let found =
        tokio::task::spawn_blocking(move || -> fd_node::Result<Option<(Vec<u8>, String)>> {
            let Some((_, media_type)) = store.blob(&key)? else {
                return Ok(None);
            };
            Ok(Some((store.read_blob(&key)?, media_type)))
        })
        .await;
    match found {
        Ok(Ok(Some((bytes, mt)))) => Some((Bytes::from(bytes), mt)),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            warn!(%digest, error = %e, "stored manifest unreadable");
            None
        }
        Err(e) => {
            warn!(%digest, error = %e, "stored manifest read failed");
            None
        }
    }
}

/// Stores a manifest fetched upstream and pins it.
async fn store_manifest(s: &Arc<State>, m: &UpManifest) {
    let store = s.store.clone();
    let m = m.clone();
    let digest = m.digest.clone();
    let result = tokio::task::spawn_blocking(move || -> fd_node::Result<()> {
        let _lock = store.writer_lock()?;
        if !store.has_blob(&m.digest)? {
            store.put_blob_from_reader(&m.digest, &m.media_type, &m.bytes[..])?;
        }
        store.pin_blob(&m.digest)
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(%digest, error = %e, "could not store manifest"),
        Err(e) => warn!(%digest, error = %e, "could not store manifest"),
    }
}

async fn manifest_by_digest(
    s: &Arc<State>,
    registry: &str,
    name: &str,
    digest: &str,
    auth: Option<&HeaderValue>,
    head: bool,
) -> Response {
    if let Some((bytes, mt)) = local_manifest(s, digest).await {
        let path = format!("{name}/manifests/{digest}");
        if let Err(r) = s.check_access(registry, name, digest, &path, auth).await {
            return refused(r, false);
        }
        return manifest_response(digest, &mt, bytes, head);
    }
    match s.upstream.manifest(registry, name, digest, auth).await {
        Ok(m) => {
            s.allow(registry, name, &m.digest, auth);
            store_manifest(s, &m).await;
            manifest_response(&m.digest, &m.media_type, m.bytes, head)
        }
        Err(e) => from_upstream(e, false),
    }
}

async fn manifest_by_tag(
    s: &Arc<State>,
    registry: &str,
    name: &str,
    tag: &str,
    auth: Option<&HeaderValue>,
    head: bool,
) -> Response {
    match s.upstream.manifest(registry, name, tag, auth).await {
        Ok(m) => {
            s.allow(registry, name, &m.digest, auth);
            store_manifest(s, &m).await;
            s.remember_tag(registry, name, tag, &m.digest);
            manifest_response(&m.digest, &m.media_type, m.bytes, head)
        }
        Err(UpError::Unreachable(why)) => {
            let Some(digest) = s.last_tag(registry, name, tag) else {
                debug!(%registry, %name, %tag, %why, "upstream down and tag never seen");
                return unknown(false);
            };
            info!(%registry, %name, %tag, %digest, "upstream down; serving the last known digest");
            manifest_by_digest(s, registry, name, &digest, auth, head).await
        }
        Err(e) => from_upstream(e, false),
    }
}

/// A parsed single `bytes=` range, or None to serve everything.
enum RangeAsk {
    All,
    Part(u64, u64),
    Unsatisfiable,
}

fn parse_range(range: Option<&str>, size: u64) -> RangeAsk {
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return RangeAsk::All;
    };
    // Several ranges at once are legal to ignore: the whole body is a valid answer.
    if spec.contains(',') {
        return RangeAsk::All;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::All;
    };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        // Suffix: the last N bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeAsk::All;
        };
        if n == 0 {
            return RangeAsk::Unsatisfiable;
        }
        (size.saturating_sub(n), size)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return RangeAsk::All;
        };
        let end = if b.is_empty() {
            size
        } else {
            match b.parse::<u64>() {
                Ok(last) if last >= start => last.saturating_add(1).min(size),
                _ => return RangeAsk::All,
            }
        };
        (start, end)
    };
    if start >= size {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(start, end)
}

/// A blob answer's head and the byte span to send, or a refusal of the range.
enum Head {
    Send(Response, u64, u64),
    Refuse(Response),
}

/// Headers and status for a blob answer of `size` bytes; returns the byte span to send.
fn blob_head(digest: &str, size: u64, range: Option<&str>) -> Head {
    let (status, start, end) = match parse_range(range, size) {
        RangeAsk::All => (StatusCode::OK, 0, size),
        RangeAsk::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b),
        RangeAsk::Unsatisfiable => {
            let mut r = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "BLOB_UNKNOWN",
                "requested range not satisfiable",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Head::Refuse(r);
        }
    };
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(digest) {
        h.insert(DIGEST_HEADER, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Head::Send(r, start, end)
}

fn with_body<S>(mut r: Response, head: bool, stream: S) -> Response
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    if !head {
        *r.body_mut() = Body::from_stream(stream);
    }
    r
}

/// Size of a blob whose every chunk is in the store.
async fn local_blob_size(s: &Arc<State>, digest: &str) -> Option<u64> {
    let store = s.store.clone();
    let key = digest.to_string();
    tokio::task::spawn_blocking(move || -> Option<u64> {
        let (recipe, _) = store.blob(&key).ok()??;
        recipe
            .0
            .iter()
            .all(|c| store.has_chunk(&c.id, c.len))
            .then(|| recipe.size())
    })
    .await
    .ok()
    .flatten()
}

/// Streams bytes `start..end` of a stored blob, each chunk verified as it is read. A chunk
/// that fails ends the stream with an error, which cuts the connection.
fn local_stream(
    store: Arc<fd_node::Store>,
    key: String,
    start: u64,
    end: u64,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let recipe = match store.blob(&key) {
            Ok(Some((r, _))) => r,
            Ok(None) => {
                let _ = tx.blocking_send(Err(std::io::Error::other("blob vanished")));
                return;
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        let mut off = 0u64;
        for c in recipe.0 {
            let len = u64::from(c.len);
            if off >= end {
                break;
            }
            if off + len <= start {
                off += len;
                continue;
            }
            let item = match store.read_chunk(&c.id) {
                Ok(data) if data.len() as u64 == len => {
                    let a = start.saturating_sub(off) as usize;
                    let b = (end - off).min(len) as usize;
                    Ok(Bytes::from(data).slice(a..b))
                }
                Ok(_) => Err(std::io::Error::other("stored chunk has the wrong length")),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
            off += len;
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

/// The answer for a blob of `size` bytes that is in the store.
fn serve_stored(
    s: &Arc<State>,
    digest: &str,
    size: u64,
    range: Option<&str>,
    head: bool,
) -> Response {
    match blob_head(digest, size, range) {
        Head::Send(r, _, _) if head => r,
        Head::Send(r, start, end) => with_body(
            r,
            false,
            local_stream(s.store.clone(), digest.to_string(), start, end),
        ),
        Head::Refuse(r) => r,
    }
}

async fn blob(
    s: &Arc<State>,
    registry: &str,
    name: &str,
    digest: &str,
    auth: Option<HeaderValue>,
    head: bool,
    range: Option<&str>,
) -> Response {
    let path = format!("{name}/blobs/{digest}");
    // 1. The local store.
    if let Some(size) = local_blob_size(s, digest).await {
        if let Err(r) = s
            .check_access(registry, name, digest, &path, auth.as_ref())
            .await
        {
            return refused(r, true);
        }
        return serve_stored(s, digest, size, range, head);
    }
    // A HEAD needs only the size, which the upstream's answer to the access check gives: no
    // blob is fetched for it, from peers or upstream.
    if head {
        return match s.upstream.head(registry, &path, auth.as_ref()).await {
            Ok(Some(size)) => {
                s.allow(registry, name, digest, auth.as_ref());
                match blob_head(digest, size, range) {
                    Head::Send(r, _, _) => r,
                    Head::Refuse(r) => r,
                }
            }
            Ok(None) => oci_error(StatusCode::BAD_GATEWAY, "UNKNOWN", "upstream sent no size"),
            Err(e) => from_upstream(e, true),
        };
    }
    // Whatever the source, and whoever started a shared fetch, this client must pass its own
    // check: peers save upstream bandwidth, they do not widen access.
    if let Err(r) = s
        .check_access(registry, name, digest, &path, auth.as_ref())
        .await
    {
        return refused(r, true);
    }
    // 2. Team peers, into the store, then served from there.
    if s.ask_peers(digest).await {
        if let Some(size) = local_blob_size(s, digest).await {
            return serve_stored(s, digest, size, range, false);
        }
        warn!(%digest, "peers reported the blob stored, but it is not complete; going upstream");
    }
    // 3. The upstream.
    let dl = match s.join_download(registry, name, digest, auth.clone()) {
        Ok(Joined::Download(dl)) => dl,
        // Finished between the two looks: serve it from the store.
        Ok(Joined::Stored) => {
            return match local_blob_size(s, digest).await {
                Some(size) => serve_stored(s, digest, size, range, false),
                None => unknown(true),
            };
        }
        Err(e) => return from_upstream(e, true),
    };
    let size = match download::wait_size(&dl).await {
        Ok(size) => size,
        Err(e) => return from_upstream(e, true),
    };
    match blob_head(digest, size, range) {
        Head::Send(r, start, end) => with_body(r, false, download::tail(dl, start, end)),
        Head::Refuse(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tags_digests() {
        assert!(is_name("debian-python"));
        assert!(is_name("library/debian"));
        assert!(is_name("a/b_c/d.e/f__g"));
        assert!(!is_name("Upper"));
        assert!(!is_name("a//b"));
        assert!(!is_name("../x"));
        assert!(!is_name("-x"));
        assert!(is_tag("bookworm"));
        assert!(is_tag("v1.2_3-rc"));
        assert!(!is_tag(".hidden"));
        assert!(!is_tag(""));
        assert!(is_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_digest("sha256:abc"));
    }

    #[test]
    fn ranges() {
        assert!(matches!(parse_range(None, 10), RangeAsk::All));
        assert!(matches!(
            parse_range(Some("bytes=0-4"), 10),
            RangeAsk::Part(0, 5)
        ));
        assert!(matches!(
            parse_range(Some("bytes=5-"), 10),
            RangeAsk::Part(5, 10)
        ));
        assert!(matches!(
            parse_range(Some("bytes=-3"), 10),
            RangeAsk::Part(7, 10)
        ));
        assert!(matches!(
            parse_range(Some("bytes=8-100"), 10),
            RangeAsk::Part(8, 10)
        ));
        assert!(matches!(
            parse_range(Some("bytes=10-"), 10),
            RangeAsk::Unsatisfiable
        ));
        assert!(matches!(
            parse_range(Some("bytes=0-1,3-4"), 10),
            RangeAsk::All
        ));
        assert!(matches!(parse_range(Some("items=0-1"), 10), RangeAsk::All));
    }

    #[test]
    fn ns_is_decoded() {
        let u: Uri = "/v2/x/manifests/t?ns=127.0.0.1%3A5000"
            .parse()
            .expect("uri");
        assert_eq!(ns_param(&u).as_deref(), Some("127.0.0.1:5000"));
        let u: Uri = "/v2/x/manifests/t?a=b&ns=docker.io".parse().expect("uri");
        assert_eq!(ns_param(&u).as_deref(), Some("docker.io"));
        let u: Uri = "/v2/x/manifests/t?ns=%zz".parse().expect("uri");
        assert_eq!(ns_param(&u), None);
    }
}
