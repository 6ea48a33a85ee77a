//! Errors of the upstream registry client.
//!
//! Every failure a user can meet while pulling lands in [`GatewayError`], with the registry,
//! the reference, the digests or the HTTP status involved, and where there is one, the thing
//! to do about it. The CLI prints these messages as they are, so they are written for people.

use std::path::PathBuf;
use std::time::Duration;

/// A string that is not a usable image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct RefError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A string that is not a usable platform (`os/arch[/variant]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid platform {input:?}: {reason} (expected OS/ARCH or OS/ARCH/VARIANT, \
     e.g. linux/amd64 or linux/arm64/v8)"
)]
pub struct PlatformError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Everything that can go wrong while talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The reference could not be parsed (or a hand-built [`crate::ImageRef`] is malformed).
    #[error(transparent)]
    Reference(#[from] RefError),

    /// The platform could not be parsed.
    #[error(transparent)]
    Platform(#[from] PlatformError),

    /// The HTTP client could not be built.
    #[error("could not set up the registry HTTP client: {0}")]
    ClientSetup(String),

    /// The registry would need HTTPS but this client was told to use plain HTTP only; raised
    /// before any network use.
    #[error(
        "registry {registry} is not loopback; pass --insecure-registry {registry} to use plain HTTP"
    )]
    PlainHttpRefused {
        /// `host[:port]` of the registry.
        registry: String,
    },

    /// An HTTPS connection got an answer that is not TLS: most likely a plain-HTTP registry.
    #[error(
        "registry {registry} did not answer HTTPS ({detail}); if it serves plain HTTP, \
         pass --insecure-registry {registry}"
    )]
    NotHttps {
        /// `host[:port]` of the registry.
        registry: String,
        /// The TLS library's complaint.
        detail: String,
    },

    /// TLS failed in a way retrying will not fix (certificate not trusted, name mismatch...).
    #[error("TLS with registry {registry} failed: {detail}")]
    Tls {
        /// `host[:port]` of the registry.
        registry: String,
        /// The TLS library's complaint.
        detail: String,
    },

    /// The registry answered 401 (or an UNAUTHORIZED/DENIED error body).
    #[error("{}", unauthorized_message(registry, reference, credentials_from.as_ref()))]
    Unauthorized {
        /// `host[:port]` of the registry.
        registry: String,
        /// The reference being pulled.
        reference: String,
        /// The auth file the rejected credentials came from; `None` when none were found.
        credentials_from: Option<PathBuf>,
    },

    /// The registry does not have the manifest, repository or blob.
    #[error("{what} not found at registry {registry} (pulling {reference})")]
    NotFound {
        /// `host[:port]` of the registry.
        registry: String,
        /// The reference being pulled.
        reference: String,
        /// What was missing: `manifest` or `blob sha256:...`.
        what: String,
    },

    /// An HTTP status the client does not expect, after any retries.
    #[error(
        "registry {registry} answered HTTP {status} for {reference}: {message}{}",
        retry_note(*attempts, *elapsed)
    )]
    Http {
        /// `host[:port]` of the registry.
        registry: String,
        /// The reference being pulled.
        reference: String,
        /// The HTTP status code.
        status: u16,
        /// The body or error text the registry sent.
        message: String,
        /// How many requests were made.
        attempts: u32,
        /// Time from the first request to giving up.
        elapsed: Duration,
    },

    /// An error body from the registry (distribution spec error codes) that is not one of the
    /// cases above.
    #[error("registry {registry} refused {reference}: {code}: {message}")]
    Registry {
        /// `host[:port]` of the registry.
        registry: String,
        /// The reference being pulled.
        reference: String,
        /// The spec error code, e.g. `MANIFEST_INVALID`.
        code: String,
        /// The registry's message.
        message: String,
    },

    /// Connection refused, reset, timed out or cut short, after any retries.
    #[error(
        "could not talk to registry {registry} (pulling {reference}): {detail}{}",
        retry_note(*attempts, *elapsed)
    )]
    Connection {
        /// `host[:port]` of the registry.
        registry: String,
        /// The reference being pulled.
        reference: String,
        /// The underlying error chain.
        detail: String,
        /// How many requests were made.
        attempts: u32,
        /// Time from the first request to giving up.
        elapsed: Duration,
    },

    /// A manifest's bytes do not hash to the digest they were asked for by.
    #[error(
        "manifest digest mismatch for {reference}: expected {expected}, computed {computed}; \
         the registry sent different bytes than the reference names"
    )]
    ManifestDigestMismatch {
        /// The reference (with the expected digest).
        reference: String,
        /// The digest asked for.
        expected: String,
        /// The sha256 of the bytes received.
        computed: String,
    },

    /// The registry's `Docker-Content-Digest` header disagrees with what was asked for or
    /// received.
    #[error(
        "registry {registry} reports digest {header} for {reference}, \
         which does not match {expected}"
    )]
    DigestHeaderMismatch {
        /// `host[:port]` of the registry.
        registry: String,
        /// The reference or blob being fetched.
        reference: String,
        /// The digest asked for, or the one computed from the bytes received.
        expected: String,
        /// The header's value.
        header: String,
    },

    /// A blob's bytes do not hash to its digest.
    #[error(
        "blob digest mismatch: expected {expected}, computed {computed}{}",
        removed_note(removed.as_ref())
    )]
    BlobDigestMismatch {
        /// The digest from the manifest.
        expected: String,
        /// The sha256 of the bytes received (plus any resumed prefix).
        computed: String,
        /// The partial file removed because of the mismatch, if any.
        removed: Option<PathBuf>,
    },

    /// A document or blob has another size than its descriptor says.
    #[error("{what} {digest} has {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        /// `manifest` or `blob`.
        what: String,
        /// Its digest.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
        /// Size seen.
        actual: u64,
    },

    /// A manifest or config over the size this client accepts.
    #[error("{what} {name} is {size} bytes, over the {limit}-byte limit for {what}s; refusing it")]
    TooLarge {
        /// `manifest` or `config`.
        what: String,
        /// Its digest or reference.
        name: String,
        /// Its (announced or received) size.
        size: u64,
        /// The limit.
        limit: u64,
    },

    /// Docker image manifest schema 1, which is obsolete and unsupported.
    #[error(
        "{reference} uses Docker image manifest schema 1, which is not supported; \
         re-push the image with a current tool (docker, podman, skopeo) to convert it"
    )]
    Schema1 {
        /// The reference being pulled.
        reference: String,
    },

    /// A media type this client does not handle.
    #[error("unsupported {what} media type {media_type}")]
    UnsupportedMediaType {
        /// `manifest`, `layer`, `config` or `index entry`.
        what: String,
        /// The media type.
        media_type: String,
    },

    /// The index has no manifest for the platform asked for.
    #[error(
        "no manifest for platform {wanted} in index of {reference} (available: {})",
        if available.is_empty() { "none".to_string() } else { available.join(", ") }
    )]
    NoMatchingPlatform {
        /// The reference being pulled.
        reference: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms the index lists.
        available: Vec<String>,
    },

    /// A manifest that is not valid JSON or lacks what an image manifest needs.
    #[error("invalid manifest for {reference}: {reason}")]
    InvalidManifest {
        /// The reference being pulled.
        reference: String,
        /// What is wrong.
        reason: String,
    },

    /// A digest string this client cannot verify (other algorithm, bad hex...).
    #[error("unusable digest {digest:?}: {reason}")]
    UnsupportedDigest {
        /// The digest as given.
        digest: String,
        /// What is wrong.
        reason: String,
    },

    /// An auth file that cannot be read or understood.
    #[error("auth file {}: {reason}", path.display())]
    AuthFile {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the credentials themselves).
        reason: String,
    },

    /// A local file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `writing`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Any other failure reported by the protocol library.
    #[error("registry {registry} (pulling {reference}): {detail}")]
    Protocol {
        /// `host[:port]` of the registry.
        registry: String,
        /// The reference being pulled.
        reference: String,
        /// The library's message.
        detail: String,
    },
}

impl GatewayError {
    /// Whether trying the same request again may succeed: connection trouble, 5xx and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            GatewayError::Connection { .. } => true,
            GatewayError::Http { status, .. } => *status == 429 || (500..600).contains(status),
            _ => false,
        }
    }

    /// Records how many attempts were made and how long they took, for the message.
    pub(crate) fn with_attempts(mut self, n: u32, took: Duration) -> Self {
        match &mut self {
            GatewayError::Connection {
                attempts, elapsed, ..
            }
            | GatewayError::Http {
                attempts, elapsed, ..
            } => {
                *attempts = n;
                *elapsed = took;
            }
            _ => {}
        }
        self
    }
}

fn unauthorized_message(
    registry: &str,
    reference: &str,
    credentials_from: Option<&PathBuf>,
) -> String {
    match credentials_from {
        Some(path) => format!(
            "unauthorized: registry {registry} rejected the credentials from {} for {reference}; \
             run `podman login {registry}` or `docker login {registry}` to renew them",
            path.display()
        ),
        None => format!(
            "unauthorized: registry {registry} requires credentials for {reference} and none \
             were found; run `podman login {registry}` or `docker login {registry}`"
        ),
    }
}

fn retry_note(attempts: u32, elapsed: Duration) -> String {
    if attempts > 1 {
        format!(
            " (gave up after {attempts} attempts over {:.1} s)",
            elapsed.as_secs_f64()
        )
    } else {
        String::new()
    }
}

fn removed_note(removed: Option<&PathBuf>) -> String {
    match removed {
        Some(p) => format!("; removed {}", p.display()),
        None => String::new(),
    }
}
