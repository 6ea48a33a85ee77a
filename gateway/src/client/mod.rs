//! The upstream registry client: resolves image references to manifests and streams
//! verified blobs into files the caller names.
//!
//! It owns everything about talking to an OCI Distribution registry (plain HTTP or HTTPS
//! choice, credentials, retries, digest and size checks) and nothing about storing images:
//! the caller gets exact manifest bytes and finished, verified files, and decides what to do
//! with them. HTTP, the token dance and byte streaming come from `oci-client`; this module
//! adds the policy fd needs on top.

mod auth;
mod blob;
mod error;
mod manifest;
mod media;
mod platform;
mod reference;
mod transport;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};
use tracing::debug;

pub use auth::{Credentials, default_auth_files, find_credentials};
pub use error::{GatewayError, PlatformError, RefError};
pub use media::{
    Compression, DOCKER_CONFIG, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, layer_compression,
};
pub use platform::Platform;
pub use reference::{DEFAULT_TAG, DOCKER_HUB, ImageRef};

use media::ManifestKind;
use transport::{Ctx, Subject, map_oci, retry};

/// Largest manifest or index accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest blob [`RegistryClient::fetch_small_blob`] accepts, in bytes.
pub const MAX_SMALL_BLOB_BYTES: u64 = 16 << 20;

/// Sent as `User-Agent`, so registry operators can tell fd's requests apart.
const USER_AGENT: &str = concat!("fd/", env!("CARGO_PKG_VERSION"));
/// A registry that does not accept a connection in this time is treated as down (and the
/// attempt retried), rather than hanging a pull. Registries on a LAN or loopback accept in
/// milliseconds; 5 s also covers a slow WAN handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence tolerated in the middle of a response before the attempt is abandoned
/// (and, for blobs, resumed). A healthy registry never pauses this long mid-stream; a longer
/// wait only makes a stuck pull look alive.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// How the client reaches registries.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Registries (`host` or `host:port`) reached over plain HTTP besides loopback ones. A
    /// bare `host` covers every port of that host.
    pub insecure_registries: Vec<String>,
    /// Platform chosen from image indexes; `None` means the host's.
    pub platform: Option<Platform>,
    /// Auth files to read credentials from, in order; `None` means the usual places (see
    /// [`default_auth_files`]).
    pub auth_files: Option<Vec<PathBuf>>,
    /// Refuse, before any network use, every registry that would need HTTPS, i.e. that is
    /// neither loopback nor listed in `insecure_registries`. For air-gapped setups and for
    /// tests, which must never reach out to real registries.
    pub plain_http_only: bool,
}

/// A handle to reach registries. Cheap to clone and share across tasks: clones share
/// connection pools, tokens and the credential cache.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Client for registries reached over HTTPS.
    https: oci_client::Client,
    /// Client for loopback and insecure registries. A second client rather than the
    /// library's per-host exception list, because loopback is a whole address range.
    http: oci_client::Client,
    insecure: Vec<String>,
    plain_http_only: bool,
    platform: Platform,
    platform_requested: bool,
    auth_files: Vec<PathBuf>,
    /// Credentials per registry, looked up once: the library keeps the first credentials it
    /// is given for a registry anyway.
    credentials: Mutex<HashMap<String, Option<Credentials>>>,
}

/// A blob as a manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobDesc {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type from the manifest.
    pub media_type: String,
}

/// A manifest document exactly as the registry served it.
#[derive(Clone, PartialEq, Eq)]
pub struct RawManifest {
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// The bytes, unmodified.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for RawManifest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawManifest")
            .field("digest", &self.digest)
            .field("media_type", &self.media_type)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The reference, pinned to the digest of the top-level document (the index if there
    /// is one), as `docker pull` reports it.
    pub reference: ImageRef,
    /// The image index or manifest list, if the reference named one.
    pub index: Option<RawManifest>,
    /// The image manifest for the chosen platform.
    pub manifest: RawManifest,
    /// The image config blob.
    pub config: BlobDesc,
    /// The layer blobs, base layer first.
    pub layers: Vec<BlobDesc>,
}

/// How a blob download went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FetchStats {
    /// Bytes received from the registry by this call.
    pub bytes_downloaded: u64,
    /// Bytes of an earlier, interrupted download that were kept (0 if it started afresh).
    pub resumed_from: u64,
}

/// Everything needed to make requests about one reference.
pub(crate) struct Target<'a> {
    pub client: &'a oci_client::Client,
    pub oci: oci_client::Reference,
    pub auth: RegistryAuth,
    pub ctx: Ctx,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("insecure_registries", &self.inner.insecure)
            .field("plain_http_only", &self.inner.plain_http_only)
            .field("platform", &self.inner.platform)
            .field("auth_files", &self.inner.auth_files)
            .finish_non_exhaustive()
    }
}

/// The HTTP stack is built with rustls but without a bundled crypto backend, so one must be
/// installed for the process before any client exists. We install ring: the default
/// backend, aws-lc, needs a large C build (cmake, and minutes on small machines). If the
/// program already installed a provider, that one stays and this does nothing.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl RegistryClient {
    /// Builds a client. Reads no files and makes no requests yet.
    pub fn new(opts: ClientOptions) -> Result<Self, GatewayError> {
        install_crypto_provider();
        let build = |protocol: ClientProtocol| {
            let config = ClientConfig {
                protocol,
                // Platform choice is ours (with better errors), so the library must never
                // pick an index entry itself.
                platform_resolver: None,
                connect_timeout: Some(CONNECT_TIMEOUT),
                read_timeout: Some(READ_TIMEOUT),
                user_agent: USER_AGENT,
                ..ClientConfig::default()
            };
            oci_client::Client::try_from(config)
                .map_err(|e| GatewayError::ClientSetup(transport::error_chain(&e)))
        };
        let platform_requested = opts.platform.is_some();
        let platform = opts.platform.unwrap_or_else(Platform::host);
        let auth_files = opts.auth_files.unwrap_or_else(default_auth_files);
        debug!(%platform, ?auth_files, insecure = ?opts.insecure_registries,
            plain_http_only = opts.plain_http_only, "registry client configured");
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                https: build(ClientProtocol::Https)?,
                http: build(ClientProtocol::Http)?,
                insecure: opts.insecure_registries,
                plain_http_only: opts.plain_http_only,
                platform,
                platform_requested,
                auth_files,
                credentials: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The platform chosen from indexes.
    pub fn platform(&self) -> &Platform {
        &self.inner.platform
    }

    /// True when the caller asked for a platform rather than taking the host's.
    pub fn platform_requested(&self) -> bool {
        self.inner.platform_requested
    }

    /// Whether requests to `r`'s registry go over plain HTTP. Errors, without any network
    /// use, when HTTPS would be needed but is ruled out by `plain_http_only`.
    pub fn uses_plain_http(&self, r: &ImageRef) -> Result<bool, GatewayError> {
        if r.is_loopback() || self.is_listed_insecure(&r.registry) {
            return Ok(true);
        }
        if self.inner.plain_http_only {
            return Err(GatewayError::PlainHttpRefused {
                registry: r.registry.clone(),
            });
        }
        Ok(false)
    }

    fn is_listed_insecure(&self, registry: &str) -> bool {
        let (host, _) = reference::split_host_port(registry);
        self.inner.insecure.iter().any(|entry| {
            let entry = entry.trim();
            let (entry_host, entry_port) = reference::split_host_port(entry);
            entry.eq_ignore_ascii_case(registry)
                || (entry_port.is_none() && entry_host.eq_ignore_ascii_case(host))
        })
    }

    fn credentials(&self, registry: &str) -> Result<Option<Credentials>, GatewayError> {
        let mut cache = self
            .inner
            .credentials
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(c) = cache.get(registry) {
            return Ok(c.clone());
        }
        let found = find_credentials(&self.inner.auth_files, registry)?;
        cache.insert(registry.to_string(), found.clone());
        Ok(found)
    }

    /// Checks the reference, picks the transport and credentials. Nothing goes on the
    /// network here, so policy refusals happen before any connection.
    pub(crate) async fn target(&self, r: &ImageRef) -> Result<Target<'_>, GatewayError> {
        r.validate()?;
        let plain = self.uses_plain_http(r)?;
        let creds = self.credentials(&r.registry)?;
        let auth = match &creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let client = if plain {
            &self.inner.http
        } else {
            &self.inner.https
        };
        let oci = r.to_oci();
        // Blob requests take no credentials argument: the library uses what it stored for
        // the registry, so store them first.
        client
            .store_auth_if_needed(oci.resolve_registry(), &auth)
            .await;
        debug!(reference = %r, plain_http = plain, authenticated = creds.is_some(), "registry target");
        Ok(Target {
            client,
            oci,
            auth,
            ctx: Ctx {
                registry: r.registry.clone(),
                reference: r.to_string(),
                https: !plain,
                credentials_from: creds.map(|c| c.source),
            },
        })
    }

    /// Resolves a reference to one image manifest for the chosen platform. Returns the exact
    /// bytes of every manifest document involved, so the caller can store them byte-for-byte.
    ///
    /// A reference that names a single image manifest is taken as is, whatever platform its
    /// config declares (as docker does); the platform only chooses among index entries.
    pub async fn resolve(&self, r: &ImageRef) -> Result<Resolved, GatewayError> {
        let t = self.target(r).await?;
        let top = self.fetch_manifest(&t, &t.oci, None).await?;
        let (index, manifest) = match media::manifest_kind(&top.media_type) {
            Some(ManifestKind::Index) => {
                let entry =
                    manifest::choose_platform(&top.bytes, &self.inner.platform, &t.ctx.reference)?;
                debug!(reference = %r, platform = %self.inner.platform, digest = %entry.digest,
                    "chose index entry");
                let child_ref = t.oci.clone_with_digest(entry.digest.clone());
                let child = self
                    .fetch_manifest(&t, &child_ref, Some((&entry.digest, entry.size)))
                    .await?;
                if media::manifest_kind(&child.media_type) != Some(ManifestKind::Image) {
                    return Err(GatewayError::InvalidManifest {
                        reference: t.ctx.reference.clone(),
                        reason: format!(
                            "index entry {} is a {}, not an image manifest",
                            entry.digest, child.media_type
                        ),
                    });
                }
                (Some(top), child)
            }
            _ => (None, top),
        };
        let (config, layers) = manifest::image_parts(&manifest.bytes, &t.ctx.reference)?;
        let top_digest = index.as_ref().unwrap_or(&manifest).digest.clone();
        Ok(Resolved {
            reference: r.with_digest(&top_digest),
            index,
            manifest,
            config,
            layers,
        })
    }

    /// Fetches one manifest document and checks it: size limit, digest (against the pinned
    /// or expected one and the registry's header), size against its descriptor, and kind.
    async fn fetch_manifest(
        &self,
        t: &Target<'_>,
        oci: &oci_client::Reference,
        expected: Option<(&str, u64)>,
    ) -> Result<RawManifest, GatewayError> {
        if let Some((digest, size)) = expected
            && size > MAX_MANIFEST_BYTES
        {
            return Err(GatewayError::TooLarge {
                what: "manifest".into(),
                name: digest.to_string(),
                size,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let pinned = oci.digest();
        let (body, library_digest) = retry(&t.ctx, "manifest", || async move {
            t.client
                .pull_manifest_raw(oci, &t.auth, media::ACCEPTED_MANIFESTS)
                .await
                .map_err(|e| match map_oci(e, &t.ctx, Subject::Manifest) {
                    // The library checks the body against the pinned digest and against the
                    // Docker-Content-Digest header alike; a failure against anything but the
                    // pinned digest was the header's.
                    GatewayError::ManifestDigestMismatch {
                        reference,
                        expected,
                        computed,
                    } if pinned != Some(expected.as_str()) => GatewayError::DigestHeaderMismatch {
                        registry: t.ctx.registry.clone(),
                        reference,
                        expected: computed,
                        header: expected,
                    },
                    other => other,
                })
        })
        .await?;
        let len = body.len() as u64;
        // The library reads the whole response before handing it over, so this limit keeps
        // oversized documents out of everything downstream but cannot stop the read itself.
        if len > MAX_MANIFEST_BYTES {
            return Err(GatewayError::TooLarge {
                what: "manifest".into(),
                name: oci.digest().unwrap_or(&t.ctx.reference).to_string(),
                size: len,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let computed = blob::sha256_digest(&body);
        if let Some(want) = expected.map(|(d, _)| d).or(oci.digest())
            && want != computed
        {
            return Err(GatewayError::ManifestDigestMismatch {
                reference: t.ctx.reference.clone(),
                expected: want.to_string(),
                computed,
            });
        }
        // The library has already checked the body against a Docker-Content-Digest header and
        // returns that header's value; a sha256 one must agree with our own hash too.
        if library_digest.starts_with("sha256:") && library_digest != computed {
            return Err(GatewayError::DigestHeaderMismatch {
                registry: t.ctx.registry.clone(),
                reference: t.ctx.reference.clone(),
                expected: computed,
                header: library_digest,
            });
        }
        if let Some((digest, size)) = expected
            && size != len
        {
            return Err(GatewayError::SizeMismatch {
                what: "manifest".into(),
                digest: digest.to_string(),
                expected: size,
                actual: len,
            });
        }
        let (_, media_type) = manifest::identify(&body, &t.ctx.reference)?;
        debug!(reference = %t.ctx.reference, digest = %computed, %media_type, len, "fetched manifest");
        Ok(RawManifest {
            digest: computed,
            media_type,
            bytes: body.to_vec(),
        })
    }

    /// Cheap HEAD of a tag: returns the digest the registry reports for it (falling back to
    /// a GET and hashing the body when the registry sends no digest header).
    pub async fn head_digest(&self, r: &ImageRef) -> Result<String, GatewayError> {
        let t = self.target(r).await?;
        let digest = retry(&t.ctx, "manifest digest", || async {
            t.client
                .fetch_manifest_digest(&t.oci, &t.auth)
                .await
                .map_err(|e| map_oci(e, &t.ctx, Subject::Manifest))
        })
        .await?;
        manifest::check_digest(&digest)?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// HTTPS to a server that speaks plain HTTP must say so, and point at
    /// --insecure-registry. Loopback registries always get plain HTTP through the public
    /// API, so this test aims the HTTPS client at a loopback plain-HTTP server directly.
    #[tokio::test]
    async fn https_to_a_plain_http_server_suggests_insecure_registry() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(async move {
            // Answer a bounded number of connections (the auth probe and the request).
            for _ in 0..8 {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
                let _ = sock.shutdown().await;
            }
        });
        let c = RegistryClient::new(ClientOptions {
            auth_files: Some(vec![]),
            ..ClientOptions::default()
        })
        .expect("client");
        let r = ImageRef::parse(&format!("{host}/x:t")).expect("ref");
        let t = Target {
            client: &c.inner.https,
            oci: r.to_oci(),
            auth: RegistryAuth::Anonymous,
            ctx: Ctx {
                registry: r.registry.clone(),
                reference: r.to_string(),
                https: true,
                credentials_from: None,
            },
        };
        c.inner
            .https
            .store_auth_if_needed(t.oci.resolve_registry(), &t.auth)
            .await;
        let e = c
            .fetch_manifest(&t, &t.oci, None)
            .await
            .expect_err("not TLS");
        server.abort();
        assert!(matches!(e, GatewayError::NotHttps { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pass --insecure-registry {host}")),
            "{e}"
        );
    }
}
