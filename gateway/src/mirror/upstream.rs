//! The mirror's own small registry client: plain requests with the client's credentials.
//!
//! The general client in [`crate::client`] uses fd's own credentials, retries for a long time
//! and reads manifests through a library that hides the response headers. A mirror needs the
//! opposite on each point: it forwards the credentials of whoever asked (so that nobody gets
//! content they could not pull themselves), gives up within a short connect timeout (so that
//! clients fall through to another source quickly when the upstream is down), and streams
//! blob bodies as they arrive.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::client::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST,
};

/// Media types asked for on every manifest request. The same list whoever asks, so that a tag
/// always maps to the same document and one cached answer serves every client.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// After a connection failure the upstream is taken as down for this long, so that a burst
/// of requests during an outage costs one connect timeout, not one each.
const DOWN_MEMORY: Duration = Duration::from_secs(3);

/// Why an upstream request gave no usable answer.
#[derive(Debug, Clone)]
pub(crate) enum UpError {
    /// No connection, a timeout or a server error: the content may well exist, the upstream
    /// just cannot say now. Cached content may be served.
    Unreachable(String),
    /// 401 or 403, with the upstream's challenge (passed on so the client can log in).
    Denied {
        status: u16,
        challenge: Option<HeaderValue>,
    },
    /// 404: the upstream does not have it.
    NotFound,
    /// An answer that cannot be right (wrong digest, oversized, unexpected status).
    Invalid(String),
}

impl std::fmt::Display for UpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpError::Unreachable(m) => write!(f, "upstream unreachable: {m}"),
            UpError::Denied { status, .. } => write!(f, "upstream refused access ({status})"),
            UpError::NotFound => write!(f, "upstream does not have it"),
            UpError::Invalid(m) => write!(f, "bad upstream answer: {m}"),
        }
    }
}

/// A manifest document as the upstream served it, checked against its digest.
#[derive(Debug, Clone)]
pub(crate) struct UpManifest {
    pub digest: String,
    pub media_type: String,
    pub bytes: Bytes,
}

pub(crate) struct Upstream {
    http: reqwest::Client,
    insecure: Vec<String>,
    down_until: Mutex<HashMap<String, Instant>>,
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Splits `host[:port]` (with `[v6]` literals) into host and port.
fn split_host(registry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = registry.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':')),
            None => (registry, None),
        };
    }
    match registry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (registry, None),
    }
}

pub(crate) fn is_loopback(registry: &str) -> bool {
    let (host, _) = split_host(registry);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Upstream {
    pub(crate) fn new(
        insecure: Vec<String>,
        connect_timeout: Duration,
    ) -> Result<Upstream, String> {
        // Same TLS backend choice as the main client (see `client::install_crypto_provider`).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("fd-mirror/", env!("CARGO_PKG_VERSION")))
            // Proxy settings from the environment must not send mirror traffic elsewhere.
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Upstream {
            http,
            insecure,
            down_until: Mutex::new(HashMap::new()),
        })
    }

    fn base(&self, registry: &str) -> String {
        let (host, _) = split_host(registry);
        let plain = is_loopback(registry)
            || self.insecure.iter().any(|e| {
                let (eh, ep) = split_host(e);
                e.eq_ignore_ascii_case(registry) || (ep.is_none() && eh.eq_ignore_ascii_case(host))
            });
        // Docker Hub's API lives on another name than the one in references.
        let authority = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        format!("{}://{authority}", if plain { "http" } else { "https" })
    }

    fn is_down(&self, registry: &str) -> bool {
        let map = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        map.get(registry).is_some_and(|t| Instant::now() < *t)
    }

    fn mark_down(&self, registry: &str) {
        let mut map = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(registry.to_string(), Instant::now() + DOWN_MEMORY);
    }

    async fn send(
        &self,
        method: reqwest::Method,
        registry: &str,
        path: &str,
        auth: Option<&HeaderValue>,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, UpError> {
        if self.is_down(registry) {
            return Err(UpError::Unreachable(format!(
                "{registry} was down moments ago"
            )));
        }
        let url = format!("{}/v2/{path}", self.base(registry));
        let mut req = self.http.request(method.clone(), &url);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        if let Some(a) = accept {
            req = req.header(ACCEPT, a);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if e.is_connect() || e.is_timeout() {
                    self.mark_down(registry);
                }
                warn!(%url, error = %error_chain(&e), "upstream request failed");
                return Err(UpError::Unreachable(error_chain(&e)));
            }
        };
        let status = resp.status();
        debug!(%method, %url, %status, "upstream answered");
        match status {
            s if s.is_success() => Ok(resp),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(UpError::Denied {
                status: status.as_u16(),
                challenge: resp.headers().get(WWW_AUTHENTICATE).cloned(),
            }),
            StatusCode::NOT_FOUND => Err(UpError::NotFound),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(UpError::Unreachable(format!("{url}: {status}")))
            }
            _ => Err(UpError::Invalid(format!("{url}: unexpected {status}"))),
        }
    }

    /// GETs a manifest by tag or digest and checks it: size limit, the digest it was asked
    /// for, and the upstream's own digest header.
    pub(crate) async fn manifest(
        &self,
        registry: &str,
        name: &str,
        reference: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<UpManifest, UpError> {
        let path = format!("{name}/manifests/{reference}");
        let resp = self
            .send(
                reqwest::Method::GET,
                registry,
                &path,
                auth,
                Some(ACCEPT_MANIFESTS),
            )
            .await?;
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST_BYTES)
        {
            return Err(UpError::Invalid(format!("{path}: manifest too large")));
        }
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| UpError::Unreachable(error_chain(&e)))?;
            if (body.len() + piece.len()) as u64 > MAX_MANIFEST_BYTES {
                return Err(UpError::Invalid(format!("{path}: manifest too large")));
            }
            body.extend_from_slice(&piece);
        }
        let digest = sha256_digest(&body);
        if reference.contains(':') && reference != digest {
            return Err(UpError::Invalid(format!(
                "{path}: body hashes to {digest}, not the digest asked for"
            )));
        }
        if let Some(h) = header_digest
            && h.starts_with("sha256:")
            && h != digest
        {
            return Err(UpError::Invalid(format!(
                "{path}: body hashes to {digest}, the registry said {h}"
            )));
        }
        let media_type = match media_type {
            Some(m) if is_manifest_type(&m) => m,
            // Some registries send a generic type; the document names its own.
            _ => media_type_from_body(&body)
                .ok_or_else(|| UpError::Invalid(format!("{path}: not a manifest")))?,
        };
        Ok(UpManifest {
            digest,
            media_type,
            bytes: Bytes::from(body),
        })
    }

    /// HEADs a manifest or blob path: success means the caller's credentials can read it.
    pub(crate) async fn head(
        &self,
        registry: &str,
        path: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<Option<u64>, UpError> {
        let accept = path.contains("/manifests/").then_some(ACCEPT_MANIFESTS);
        let resp = self
            .send(reqwest::Method::HEAD, registry, path, auth, accept)
            .await?;
        Ok(resp
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// Starts a blob GET; the caller streams and verifies the body.
    pub(crate) async fn blob(
        &self,
        registry: &str,
        name: &str,
        digest: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpError> {
        self.send(
            reqwest::Method::GET,
            registry,
            &format!("{name}/blobs/{digest}"),
            auth,
            None,
        )
        .await
    }
}

fn is_manifest_type(m: &str) -> bool {
    [
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        DOCKER_MANIFEST_LIST,
    ]
    .contains(&m)
}

/// The `mediaType` a manifest document declares, or what its shape implies.
fn media_type_from_body(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(m) = v.get("mediaType").and_then(|m| m.as_str()) {
        return Some(m.to_string());
    }
    if v.get("manifests").is_some() {
        Some(OCI_INDEX.to_string())
    } else if v.get("layers").is_some() {
        Some(OCI_MANIFEST.to_string())
    } else {
        None
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_loopback() {
        assert_eq!(split_host("127.0.0.1:5000"), ("127.0.0.1", Some("5000")));
        assert_eq!(split_host("[::1]:5000"), ("::1", Some("5000")));
        assert_eq!(split_host("example.com"), ("example.com", None));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:80"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
