//! Turning the protocol library's errors into [`GatewayError`]s, and bounded retries.
//!
//! The library reports failures by kind of HTTP outcome; fd's users need them by what
//! happened to their pull (unauthorized, not found, unreachable), with the registry and
//! reference named. Retries live here so every request gets the same policy: a few quick
//! attempts for failures that may pass (connection trouble, 5xx, 429), none for the rest.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use tracing::debug;

use super::error::GatewayError;

/// Requests made for one operation before giving up: the first try and three retries.
pub(crate) const MAX_ATTEMPTS: u32 = 4;

/// No new attempt starts once this much time has gone into one operation: with timeouts, four
/// attempts could otherwise keep a pull silent for minutes against a registry that hangs.
pub(crate) const RETRY_BUDGET: Duration = Duration::from_secs(30);
/// Wait before the first retry; doubled before each later one (0.2 s, 0.4 s, 0.8 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Registry error bodies can be whole HTML pages; messages keep only this much of them.
const MESSAGE_MAX: usize = 300;

/// What an operation is about, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// `host[:port]`.
    pub registry: String,
    /// The reference as the user would recognise it.
    pub reference: String,
    /// Whether requests go over HTTPS.
    pub https: bool,
    /// Where the credentials in use came from, if any.
    pub credentials_from: Option<PathBuf>,
}

/// The thing a request fetches, for error messages.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    Manifest,
    Blob(&'a str),
}

impl Subject<'_> {
    fn describe(&self) -> String {
        match self {
            Subject::Manifest => "manifest".to_string(),
            Subject::Blob(d) => format!("blob {d}"),
        }
    }
}

/// Runs `op` until it succeeds, fails for good, or [`MAX_ATTEMPTS`] are spent.
pub(crate) async fn retry<T, F, Fut>(ctx: &Ctx, what: &str, mut op: F) -> Result<T, GatewayError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, GatewayError>>,
{
    let start = Instant::now();
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e)
                if e.is_transient() && attempt < MAX_ATTEMPTS && start.elapsed() < RETRY_BUDGET =>
            {
                let wait = backoff(attempt);
                debug!(registry = %ctx.registry, what, attempt, error = %e, ?wait,
                    "transient registry error; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(e) => return Err(e.with_attempts(attempt, start.elapsed())),
        }
    }
}

/// Wait before retry number `attempt` (1-based).
pub(crate) fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1))
}

/// Maps a library error for a request about `subject`.
pub(crate) fn map_oci(e: OciDistributionError, ctx: &Ctx, subject: Subject<'_>) -> GatewayError {
    let registry = ctx.registry.clone();
    let reference = ctx.reference.clone();
    let unauthorized = || GatewayError::Unauthorized {
        registry: ctx.registry.clone(),
        reference: ctx.reference.clone(),
        credentials_from: ctx.credentials_from.clone(),
    };
    let not_found = || GatewayError::NotFound {
        registry: ctx.registry.clone(),
        reference: ctx.reference.clone(),
        what: subject.describe(),
    };
    match e {
        OciDistributionError::UnauthorizedError { .. } => unauthorized(),
        OciDistributionError::RegistryError { envelope, .. } => {
            let Some(first) = envelope.errors.first() else {
                return GatewayError::Registry {
                    registry,
                    reference,
                    code: "UNKNOWN".into(),
                    message: "error body without errors".into(),
                };
            };
            let message = clip(&first.message);
            match &first.code {
                OciErrorCode::Unauthorized | OciErrorCode::Denied => unauthorized(),
                OciErrorCode::ManifestUnknown
                | OciErrorCode::NameUnknown
                | OciErrorCode::BlobUnknown
                | OciErrorCode::NotFound => not_found(),
                OciErrorCode::Toomanyrequests => GatewayError::Http {
                    registry,
                    reference,
                    status: 429,
                    message,
                    attempts: 1,
                    elapsed: Duration::ZERO,
                },
                code => GatewayError::Registry {
                    registry,
                    reference,
                    code: code_name(code),
                    message,
                },
            }
        }
        OciDistributionError::ServerError { code, message, .. } => match code {
            401 => unauthorized(),
            404 => not_found(),
            status => GatewayError::Http {
                registry,
                reference,
                status,
                message: clip(&message),
                attempts: 1,
                elapsed: Duration::ZERO,
            },
        },
        OciDistributionError::RequestError(re) => {
            let detail = error_chain(&re);
            if let Some(e) = tls_problem(&detail, ctx) {
                return e;
            }
            if re.is_timeout()
                || re.is_connect()
                || re.is_request()
                || re.is_body()
                || re.is_decode()
            {
                GatewayError::Connection {
                    registry,
                    reference,
                    detail,
                    attempts: 1,
                    elapsed: Duration::ZERO,
                }
            } else {
                GatewayError::Protocol {
                    registry,
                    reference,
                    detail,
                }
            }
        }
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            match subject {
                Subject::Manifest => GatewayError::ManifestDigestMismatch {
                    reference,
                    expected,
                    computed: actual,
                },
                Subject::Blob(_) => GatewayError::BlobDigestMismatch {
                    expected,
                    computed: actual,
                    removed: None,
                },
            }
        }
        OciDistributionError::UnsupportedSchemaVersionError(1) => {
            GatewayError::Schema1 { reference }
        }
        OciDistributionError::IoError(io) => GatewayError::Connection {
            registry,
            reference,
            detail: error_chain(&io),
            attempts: 1,
            elapsed: Duration::ZERO,
        },
        other => GatewayError::Protocol {
            registry,
            reference,
            detail: error_chain(&other),
        },
    }
}

/// A connection error during a body stream.
pub(crate) fn stream_error(e: &std::io::Error, ctx: &Ctx) -> GatewayError {
    let detail = error_chain(e);
    if let Some(e) = tls_problem(&detail, ctx) {
        return e;
    }
    GatewayError::Connection {
        registry: ctx.registry.clone(),
        reference: ctx.reference.clone(),
        detail,
        attempts: 1,
        elapsed: Duration::ZERO,
    }
}

/// Whether a stream error is the library's own end-of-body digest check. Callers verify
/// the bytes themselves, with better messages, so they treat this as the end of the body.
pub(crate) fn is_library_digest_check(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<DigestError>().is_some())
}

/// TLS failures that retrying will not fix.
fn tls_problem(detail: &str, ctx: &Ctx) -> Option<GatewayError> {
    if !ctx.https {
        return None;
    }
    // rustls says this when the peer answers the handshake with something that is not TLS,
    // which in practice means a plain-HTTP server.
    if detail.contains("InvalidContentType") || detail.contains("corrupt message") {
        return Some(GatewayError::NotHttps {
            registry: ctx.registry.clone(),
            detail: detail.to_string(),
        });
    }
    if detail.contains("certificate") || detail.contains("UnknownIssuer") {
        return Some(GatewayError::Tls {
            registry: ctx.registry.clone(),
            detail: detail.to_string(),
        });
    }
    None
}

/// An error and its sources joined with `: `, skipping repeats (HTTP stacks often wrap an
/// error in one that prints the same text).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

fn code_name(code: &OciErrorCode) -> String {
    match serde_json::to_value(code) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{code:?}"),
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MESSAGE_MAX {
        return s.to_string();
    }
    let mut end = MESSAGE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Ctx {
        Ctx {
            registry: "h.io".into(),
            reference: "h.io/r:t".into(),
            https: true,
            credentials_from: None,
        }
    }

    #[test]
    fn status_mapping() {
        let c = ctx();
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "u".into(),
            message: "m".into(),
        };
        assert!(matches!(
            map_oci(server(404), &c, Subject::Manifest),
            GatewayError::NotFound { .. }
        ));
        assert!(matches!(
            map_oci(server(401), &c, Subject::Manifest),
            GatewayError::Unauthorized { .. }
        ));
        let e = map_oci(server(503), &c, Subject::Manifest);
        assert!(e.is_transient());
        let e = map_oci(server(429), &c, Subject::Manifest);
        assert!(e.is_transient());
        let e = map_oci(server(400), &c, Subject::Manifest);
        assert!(!e.is_transient());
        let msg = e.with_attempts(4, Duration::from_millis(1500)).to_string();
        assert!(
            msg.contains("HTTP 400") && msg.contains("4 attempts over 1.5 s"),
            "{msg}"
        );
        let e = map_oci(
            OciDistributionError::UnauthorizedError { url: "u".into() },
            &c,
            Subject::Manifest,
        );
        assert!(e.to_string().contains("podman login h.io"), "{e}");
    }

    #[test]
    fn envelope_codes() {
        let c = ctx();
        let env = |code: &str| {
            let body = format!(r#"{{"errors":[{{"code":"{code}","message":"msg"}}]}}"#);
            OciDistributionError::RegistryError {
                envelope: serde_json::from_str(&body).expect("envelope"),
                url: "u".into(),
            }
        };
        let e = map_oci(env("BLOB_UNKNOWN"), &c, Subject::Blob("sha256:ab"));
        assert_eq!(
            e.to_string(),
            "blob sha256:ab not found at registry h.io (pulling h.io/r:t)"
        );
        assert!(matches!(
            map_oci(env("DENIED"), &c, Subject::Manifest),
            GatewayError::Unauthorized { .. }
        ));
        assert!(map_oci(env("TOOMANYREQUESTS"), &c, Subject::Manifest).is_transient());
        let e = map_oci(env("MANIFEST_INVALID"), &c, Subject::Manifest);
        assert!(e.to_string().contains("MANIFEST_INVALID: msg"), "{e}");
    }

    #[tokio::test]
    async fn retry_is_bounded_and_reports_attempts() {
        let c = ctx();
        let mut calls = 0;
        let start = Instant::now();
        let r: Result<(), _> = retry(&c, "test", || {
            calls += 1;
            async {
                Err(GatewayError::Connection {
                    registry: "h.io".into(),
                    reference: "h.io/r:t".into(),
                    detail: "connection reset".into(),
                    attempts: 1,
                    elapsed: Duration::ZERO,
                })
            }
        })
        .await;
        assert_eq!(calls, MAX_ATTEMPTS);
        assert!(start.elapsed() >= backoff(1) + backoff(2) + backoff(3));
        let msg = r.expect_err("fails").to_string();
        assert!(msg.contains("gave up after 4 attempts"), "{msg}");

        let mut calls = 0;
        let r: Result<(), _> = retry(&c, "test", || {
            calls += 1;
            async { Err(GatewayError::ClientSetup("permanent".into())) }
        })
        .await;
        assert_eq!(calls, 1);
        assert!(r.is_err());
    }
}
