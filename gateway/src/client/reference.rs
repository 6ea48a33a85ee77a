//! Image references: parsing and printing `registry/repository[:tag][@digest]`.
//!
//! fd accepts the same short forms as docker and podman (`busybox` means
//! `docker.io/library/busybox:latest`), so users can paste what they already use. The parser
//! is our own rather than the protocol library's so that errors can say exactly which part of
//! the input is wrong, and so that digests are limited to sha256, the only algorithm this
//! client verifies.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::error::RefError;

/// The registry that short names refer to.
pub const DOCKER_HUB: &str = "docker.io";
/// Older spelling of [`DOCKER_HUB`], folded into it when parsing.
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// Namespace of single-component names on Docker Hub.
const DOCKER_HUB_OFFICIAL: &str = "library";
/// Tag used when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest `registry/repository` the distribution spec allows.
const NAME_MAX: usize = 255;
/// Longest tag the distribution spec allows.
const TAG_MAX: usize = 128;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageRef {
    /// `host[:port]`, e.g. `docker.io`, `127.0.0.1:5000`, `[::1]:5000`.
    pub registry: String,
    /// Path inside the registry, e.g. `library/busybox`.
    pub repository: String,
    /// Tag, if any. `parse` fills in `latest` when neither tag nor digest is given.
    pub tag: Option<String>,
    /// `sha256:<64 hex>` if pinned.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses like docker: `busybox` -> `docker.io/library/busybox:latest`;
    /// `127.0.0.1:5000/debian-python:bookworm`; `host/repo@sha256:...`;
    /// `host/repo:tag@sha256:...`.
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        let fail = |reason: String| RefError {
            input: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(fail("it is empty".into()));
        }
        if s.chars().any(char::is_whitespace) {
            return Err(fail("it contains whitespace".into()));
        }
        if s.contains("://") {
            return Err(fail(
                "remove the scheme: an image reference has no http:// or https:// prefix".into(),
            ));
        }

        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                validate_digest(d).map_err(|r| fail(format!("digest {d:?}: {r}")))?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        if name_tag.is_empty() {
            return Err(fail("the name before '@' is empty".into()));
        }

        // Like docker: the first component names a registry only if it looks like a host
        // (has a dot or a port, is `localhost`, or has uppercase letters, which repository
        // names cannot have); otherwise the whole name is a Docker Hub repository.
        let (registry, rest) = match name_tag.split_once('/') {
            Some((first, rest))
                if first.contains('.')
                    || first.contains(':')
                    || first.starts_with('[')
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first, rest)
            }
            _ => (DOCKER_HUB, name_tag),
        };
        validate_registry(registry).map_err(|r| fail(format!("registry {registry:?}: {r}")))?;

        let (repository, tag) = match rest.split_once(':') {
            Some((repo, tag)) => {
                validate_tag(tag).map_err(|r| fail(format!("tag {tag:?}: {r}")))?;
                (repo, Some(tag.to_string()))
            }
            None => (rest, None),
        };

        let registry = if registry == DOCKER_HUB_LEGACY {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("{DOCKER_HUB_OFFICIAL}/{repository}")
        } else {
            repository.to_string()
        };
        validate_repository(&repository)
            .map_err(|r| fail(format!("repository {repository:?}: {r}")))?;
        if registry.len() + 1 + repository.len() > NAME_MAX {
            return Err(fail(format!(
                "the name is longer than {NAME_MAX} characters"
            )));
        }

        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (t, _) => t,
        };
        Ok(ImageRef {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// Whether the registry is on this machine: `localhost`, 127.0.0.0/8 or `[::1]`, with or
    /// without a port. Such registries are reached over plain HTTP by default, as docker does.
    pub fn is_loopback(&self) -> bool {
        registry_is_loopback(&self.registry)
    }

    /// The registry host without its port (IPv6 without brackets).
    pub fn registry_host(&self) -> &str {
        split_host_port(&self.registry).0
    }

    /// The same reference pinned to `digest`, keeping the tag for display.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// Checks a value that may have been built by hand rather than parsed.
    pub(crate) fn validate(&self) -> Result<(), RefError> {
        let back = ImageRef::parse(&self.to_string())?;
        // A tagless, digestless reference comes back with `latest`: that is fine.
        if back.registry != self.registry || back.repository != self.repository {
            return Err(RefError {
                input: self.to_string(),
                reason: "registry or repository is not in canonical form".into(),
            });
        }
        Ok(())
    }

    /// The equivalent reference of the protocol library.
    pub(crate) fn to_oci(&self) -> oci_client::Reference {
        let registry = self.registry.clone();
        let repository = self.repository.clone();
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => oci_client::Reference::with_tag_and_digest(
                registry,
                repository,
                t.clone(),
                d.clone(),
            ),
            (None, Some(d)) => oci_client::Reference::with_digest(registry, repository, d.clone()),
            (Some(t), None) => oci_client::Reference::with_tag(registry, repository, t.clone()),
            (None, None) => {
                oci_client::Reference::with_tag(registry, repository, DEFAULT_TAG.to_string())
            }
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

/// Whether `host[:port]` names this machine.
pub(crate) fn registry_is_loopback(registry: &str) -> bool {
    let (host, _) = split_host_port(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Ok(v4) = host.parse::<Ipv4Addr>() {
        return v4.is_loopback();
    }
    if let Ok(v6) = host.parse::<Ipv6Addr>() {
        return v6.is_loopback();
    }
    false
}

/// Splits `host[:port]` or `[v6][:port]`; the host comes back without brackets.
pub(crate) fn split_host_port(registry: &str) -> (&str, Option<&str>) {
    if let Some(rest) = registry.strip_prefix('[') {
        if let Some((addr, after)) = rest.split_once(']') {
            return (addr, after.strip_prefix(':'));
        }
        return (registry, None);
    }
    match registry.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (registry, None),
    }
}

/// Checks a `sha256:<64 lowercase hex>` digest.
pub(crate) fn validate_digest(d: &str) -> Result<(), String> {
    let Some((alg, hex)) = d.split_once(':') else {
        return Err("expected ALGORITHM:HEX, e.g. sha256:<64 hex digits>".into());
    };
    if alg != "sha256" {
        return Err(format!(
            "algorithm {alg:?} is not supported; only sha256 is"
        ));
    }
    if hex.len() != 64 {
        return Err(format!(
            "a sha256 digest has 64 hex digits, this one has {}",
            hex.len()
        ));
    }
    if !hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("the hex part must be lowercase hexadecimal".into());
    }
    Ok(())
}

fn validate_registry(reg: &str) -> Result<(), String> {
    let (host, port) = if let Some(rest) = reg.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or("the IPv6 address has no closing ']'")?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| format!("{addr:?} is not an IPv6 address"))?;
        let port = if after.is_empty() {
            None
        } else {
            Some(
                after
                    .strip_prefix(':')
                    .ok_or("only ':PORT' may follow the IPv6 address")?,
            )
        };
        (None, port)
    } else {
        match reg.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(reg), None),
        }
    };
    if let Some(host) = host {
        if host.is_empty() {
            return Err("the host name is empty".into());
        }
        for label in host.split('.') {
            let ok = !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!(
                    "host label {label:?} must be letters, digits and inner hyphens"
                ));
            }
        }
    }
    if let Some(port) = port {
        let valid = !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0);
        if !valid {
            return Err(format!("port {port:?} must be a number from 1 to 65535"));
        }
    }
    Ok(())
}

fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("it is empty".into());
    }
    if repo.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("repository names must be lowercase".into());
    }
    for comp in repo.split('/') {
        if !valid_path_component(comp) {
            return Err(format!(
                "component {comp:?} must be lowercase letters and digits, \
                 joined by single '.', '_', '__' or runs of '-'"
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+` groups joined by `.`, `_`, `__` or one or more `-`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("it is empty".into());
    }
    if tag.len() > TAG_MAX {
        return Err(format!("it is longer than {TAG_MAX} characters"));
    }
    let b = tag.as_bytes();
    let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
    if !word(b[0]) {
        return Err("it must start with a letter, digit or '_'".into());
    }
    if !b.iter().all(|&x| word(x) || x == b'.' || x == b'-') {
        return Err("it may only hold letters, digits, '_', '.' and '-'".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> ImageRef {
        match ImageRef::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn parts(r: &ImageRef) -> (&str, &str, Option<&str>, Option<&str>) {
        (
            &r.registry,
            &r.repository,
            r.tag.as_deref(),
            r.digest.as_deref(),
        )
    }

    #[test]
    fn short_names_go_to_docker_hub_library() {
        let r = p("busybox");
        assert_eq!(
            parts(&r),
            ("docker.io", "library/busybox", Some("latest"), None)
        );
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(
            parts(&p("busybox:1.36")),
            ("docker.io", "library/busybox", Some("1.36"), None)
        );
        assert_eq!(
            parts(&p("someuser/app")),
            ("docker.io", "someuser/app", Some("latest"), None)
        );
        assert_eq!(
            parts(&p("index.docker.io/library/alpine:3")),
            ("docker.io", "library/alpine", Some("3"), None)
        );
        assert_eq!(
            parts(&p("docker.io/alpine")),
            ("docker.io", "library/alpine", Some("latest"), None)
        );
    }

    #[test]
    fn registries_with_ports_and_digests() {
        assert_eq!(
            parts(&p("127.0.0.1:5000/debian-python:bookworm")),
            ("127.0.0.1:5000", "debian-python", Some("bookworm"), None)
        );
        let r = p(&format!("host.example/repo@{D}"));
        assert_eq!(parts(&r), ("host.example", "repo", None, Some(D)));
        assert_eq!(r.to_string(), format!("host.example/repo@{D}"));
        let r = p(&format!("host.example/a/b:v1.2@{D}"));
        assert_eq!(parts(&r), ("host.example", "a/b", Some("v1.2"), Some(D)));
        assert_eq!(r.to_string(), format!("host.example/a/b:v1.2@{D}"));
        assert_eq!(
            parts(&p("localhost/x")),
            ("localhost", "x", Some("latest"), None)
        );
        assert_eq!(
            parts(&p("localhost:5000/x/y_z__w---v.q:T_1")),
            ("localhost:5000", "x/y_z__w---v.q", Some("T_1"), None)
        );
        assert_eq!(
            parts(&p("[::1]:5000/x:1")),
            ("[::1]:5000", "x", Some("1"), None)
        );
        // Display then parse gives the same value.
        for s in ["busybox", "127.0.0.1:5000/a/b:c", "[::1]/x", "h.io/r:t"] {
            let r = p(s);
            assert_eq!(p(&r.to_string()), r);
        }
    }

    #[test]
    fn bad_references_name_the_input_and_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("Busybox", "lowercase"),
            ("host.io/Repo", "lowercase"),
            ("busybox:", "tag"),
            ("busybox:-x", "tag"),
            ("busybox:a/b", "port"),
            ("busybox@sha256:abc", "64 hex"),
            ("busybox@md5:0123", "not supported"),
            (
                &format!("busybox@{}", D.to_uppercase().replace("SHA256", "sha256")),
                "lowercase",
            ),
            ("https://host.io/r", "scheme"),
            ("host.io:99999/r", "port"),
            ("host.io:/r", "port"),
            ("-bad.io/r", "host label"),
            ("host.io/r//x", "component"),
            ("host.io/r-", "component"),
            ("host.io/", "empty"),
            ("bu sybox", "whitespace"),
            ("[::1/x", "closing"),
            ("[zz]:1/x", "IPv6"),
        ];
        for (input, needle) in cases {
            match ImageRef::parse(input) {
                Ok(r) => panic!("{input:?} parsed as {r:?}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert_eq!(e.input, *input);
                    assert!(msg.contains(needle), "{input:?}: {msg}");
                    assert!(msg.contains(&format!("{input:?}")), "{msg}");
                }
            }
        }
        let long = format!("h.io/{}", "a".repeat(300));
        assert!(ImageRef::parse(&long).is_err());
    }

    #[test]
    fn loopback_detection() {
        for s in [
            "127.0.0.1:5000/x",
            "127.1.2.3/x",
            "localhost/x",
            "LOCALHOST:80/x",
            "[::1]/x",
            "[::1]:5000/x",
        ] {
            assert!(p(s).is_loopback(), "{s}");
        }
        for s in [
            "busybox",
            "10.1.2.3:5000/x",
            "128.0.0.1/x",
            "localhost.example/x",
            "[::2]:5000/x",
            "registry.invalid/x",
        ] {
            assert!(!p(s).is_loopback(), "{s}");
        }
        assert_eq!(p("[::1]:5000/x").registry_host(), "::1");
        assert_eq!(p("h.io:5000/x").registry_host(), "h.io");
    }

    #[test]
    fn hand_built_references_are_checked() {
        let mut r = p("h.io/r:t");
        assert!(r.validate().is_ok());
        r.repository = "../etc".into();
        assert!(r.validate().is_err());
        r.repository = "r".into();
        r.tag = None;
        assert!(r.validate().is_ok());
        assert_eq!(r.to_oci().tag(), Some("latest"));
    }
}
