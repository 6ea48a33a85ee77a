//! Registry credentials from the auth files podman and docker write.
//!
//! fd has no login command of its own: users log in with `podman login` or `docker login`
//! and fd reads the same files, in podman's order, so a login made with either tool works.
//! Only the `auths` map is used; credential helpers (`credHelpers`, `credsStore`) would mean
//! running other programs and are skipped with a debug line. Credentials are never logged,
//! and their `Debug` form hides the password.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use tracing::debug;

use super::error::GatewayError;
use super::reference::DOCKER_HUB;

/// Names Docker Hub goes by in auth files.
const DOCKER_HUB_ALIASES: &[&str] = &[DOCKER_HUB, "index.docker.io", "registry-1.docker.io"];

/// A user name and password for one registry, and the file they came from.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
    /// The auth file they were read from.
    pub source: PathBuf,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

/// The auth files consulted when none are configured, in order: `$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `$XDG_CONFIG_HOME/containers/auth.json` (or
/// `~/.config/containers/auth.json`), then `$DOCKER_CONFIG/config.json` (or
/// `~/.docker/config.json`). Files that do not exist are skipped when reading.
pub fn default_auth_files() -> Vec<PathBuf> {
    default_auth_files_from(|name| std::env::var_os(name))
}

/// [`default_auth_files`] with the environment given as a function, for tests.
pub(crate) fn default_auth_files_from(env: impl Fn(&str) -> Option<OsString>) -> Vec<PathBuf> {
    // Empty values count as unset, as in the tools that define these variables.
    let var = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = var("HOME");
    let mut files = Vec::new();
    if let Some(f) = var("REGISTRY_AUTH_FILE") {
        files.push(f);
    }
    if let Some(d) = var("XDG_RUNTIME_DIR") {
        files.push(d.join("containers/auth.json"));
    }
    match (var("XDG_CONFIG_HOME"), &home) {
        (Some(d), _) => files.push(d.join("containers/auth.json")),
        (None, Some(h)) => files.push(h.join(".config/containers/auth.json")),
        (None, None) => {}
    }
    match (var("DOCKER_CONFIG"), &home) {
        (Some(d), _) => files.push(d.join("config.json")),
        (None, Some(h)) => files.push(h.join(".docker/config.json")),
        (None, None) => {}
    }
    files
}

#[derive(Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// Finds credentials for `registry` (`host[:port]`) in `files`, first file with an entry
/// winning. Missing files are skipped; unreadable or malformed ones are errors, so that a
/// broken login does not silently turn into an anonymous pull.
pub fn find_credentials(
    files: &[PathBuf],
    registry: &str,
) -> Result<Option<Credentials>, GatewayError> {
    for path in files {
        let bytes = match fs_err::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                debug!(file = %path.display(), "auth file absent");
                continue;
            }
            Err(e) => {
                return Err(GatewayError::AuthFile {
                    path: path.clone(),
                    reason: format!("cannot read it: {}", e.kind()),
                });
            }
        };
        if let Some(c) = lookup(path, &bytes, registry)? {
            debug!(registry, file = %path.display(), "using credentials from auth file");
            return Ok(Some(c));
        }
    }
    debug!(registry, "no credentials found; pulling anonymously");
    Ok(None)
}

/// Looks `registry` up in one auth file's contents.
fn lookup(path: &Path, bytes: &[u8], registry: &str) -> Result<Option<Credentials>, GatewayError> {
    let bad = |reason: String| GatewayError::AuthFile {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // serde_json's message gives line and column, never the text around them, so it is
    // safe to show.
    let file: AuthFile =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid auth JSON: {e}")))?;

    // An entry spelled exactly like the registry goes before aliases and URL forms, so the
    // choice does not depend on the order of the map.
    let mut matching: Vec<(&String, &AuthEntry)> = file
        .auths
        .iter()
        .filter(|(k, _)| key_matches(k, registry))
        .collect();
    matching.sort_by_key(|(k, _)| (!k.eq_ignore_ascii_case(registry), k.as_str()));
    for (key, entry) in matching {
        if let Some(c) =
            entry_credentials(entry, path).map_err(|r| bad(format!("entry {key:?}: {r}")))?
        {
            return Ok(Some(c));
        }
        if entry
            .identity_token
            .as_deref()
            .is_some_and(|t| !t.is_empty())
        {
            debug!(key, file = %path.display(), "identity tokens are not supported; skipping entry");
        }
    }
    for (key, helper) in &file.cred_helpers {
        if key_matches(key, registry) {
            debug!(key, helper, file = %path.display(), "credential helpers are not supported; skipping");
        }
    }
    if let Some(store) = &file.creds_store {
        debug!(store, file = %path.display(), "credential stores are not supported; skipping");
    }
    Ok(None)
}

/// Credentials from one `auths` entry: `username`/`password`, or `auth` = base64(`user:pass`).
/// `Ok(None)` for an entry that holds neither (e.g. one written next to a credential store).
fn entry_credentials(entry: &AuthEntry, path: &Path) -> Result<Option<Credentials>, String> {
    if let (Some(u), Some(p)) = (&entry.username, &entry.password)
        && !u.is_empty()
    {
        return Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
            source: path.to_path_buf(),
        }));
    }
    let Some(auth) = entry
        .auth
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    else {
        return Ok(None);
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let raw = engine
        .decode(auth)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(auth))
        .map_err(|_| "the \"auth\" value is not base64".to_string())?;
    let text =
        String::from_utf8(raw).map_err(|_| "the \"auth\" value is not UTF-8 text".to_string())?;
    let (user, pass) = text
        .split_once(':')
        .ok_or_else(|| "the \"auth\" value is not USER:PASSWORD".to_string())?;
    if user.is_empty() {
        return Err("the \"auth\" value has an empty user name".into());
    }
    Ok(Some(Credentials {
        username: user.to_string(),
        password: pass.to_string(),
        source: path.to_path_buf(),
    }))
}

/// Whether an `auths` key names `registry`. Keys may be `host[:port]` or URLs such as
/// `https://index.docker.io/v1/`; for URLs only the host part counts. Keys scoped to a
/// namespace (`host/org`) are not used: the protocol library keeps one credential per
/// registry, so per-namespace credentials could not be honoured reliably.
fn key_matches(key: &str, registry: &str) -> bool {
    let (stripped, is_url) = match key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
    {
        Some(rest) => (rest, true),
        None => (key, false),
    };
    let (host, path) = match stripped.split_once('/') {
        Some((h, p)) => (h, p),
        None => (stripped, ""),
    };
    if !is_url && !path.is_empty() {
        debug!(
            key,
            "namespace-scoped auth entries are not supported; skipping"
        );
        return false;
    }
    let is_hub = |h: &str| DOCKER_HUB_ALIASES.iter().any(|a| a.eq_ignore_ascii_case(h));
    host.eq_ignore_ascii_case(registry) || (is_hub(host) && is_hub(registry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write auth file");
        p
    }

    #[test]
    fn reads_auth_and_username_password_forms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "auth.json",
            &format!(
                r#"{{"auths": {{
                    "127.0.0.1:5000": {{"auth": "{}"}},
                    "reg.example": {{"username": "bob", "password": "p:w"}},
                    "https://index.docker.io/v1/": {{"auth": "{}"}}
                }}}}"#,
                b64("alice:s3cret:with:colons"),
                b64("hubuser:hubpass")
            ),
        );
        let files = vec![f.clone()];
        let c = find_credentials(&files, "127.0.0.1:5000")
            .expect("ok")
            .expect("found");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret:with:colons")
        );
        assert_eq!(c.source, f);
        let c = find_credentials(&files, "REG.example")
            .expect("ok")
            .expect("found");
        assert_eq!((c.username.as_str(), c.password.as_str()), ("bob", "p:w"));
        let c = find_credentials(&files, "docker.io")
            .expect("ok")
            .expect("found");
        assert_eq!(c.username, "hubuser");
        assert!(
            find_credentials(&files, "127.0.0.1:5001")
                .expect("ok")
                .is_none()
        );
        assert!(find_credentials(&files, "127.0.0.1").expect("ok").is_none());
        // The password never shows in Debug output.
        assert!(!format!("{c:?}").contains("hubpass"));
    }

    #[test]
    fn first_file_with_an_entry_wins_and_missing_files_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.json");
        let empty = write(dir.path(), "empty.json", "");
        let other = write(
            dir.path(),
            "other.json",
            r#"{"auths": {"elsewhere.io": {"auth": "eDp5"}}}"#,
        );
        let first = write(
            dir.path(),
            "first.json",
            &format!(r#"{{"auths": {{"h.io": {{"auth": "{}"}}}}}}"#, b64("one:1")),
        );
        let second = write(
            dir.path(),
            "second.json",
            &format!(r#"{{"auths": {{"h.io": {{"auth": "{}"}}}}}}"#, b64("two:2")),
        );
        let files = vec![missing, empty, other, first.clone(), second.clone()];
        let c = find_credentials(&files, "h.io")
            .expect("ok")
            .expect("found");
        assert_eq!(
            (c.username.as_str(), c.source.as_path()),
            ("one", first.as_path())
        );
        let c = find_credentials(&files[4..], "h.io")
            .expect("ok")
            .expect("found");
        assert_eq!(
            (c.username.as_str(), c.source.as_path()),
            ("two", second.as_path())
        );
    }

    #[test]
    fn helpers_tokens_and_namespaces_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let helper = write(
            dir.path(),
            "helper.json",
            r#"{"auths": {"h.io": {}}, "credHelpers": {"h.io": "secretservice"}, "credsStore": "desktop"}"#,
        );
        let token = write(
            dir.path(),
            "token.json",
            r#"{"auths": {"h.io": {"identitytoken": "tok"}}}"#,
        );
        let ns = write(
            dir.path(),
            "ns.json",
            &format!(
                r#"{{"auths": {{"h.io/org": {{"auth": "{}"}}}}}}"#,
                b64("ns:1")
            ),
        );
        let fallback = write(
            dir.path(),
            "fallback.json",
            &format!(
                r#"{{"auths": {{"http://h.io/": {{"auth": "{}"}}}}}}"#,
                b64("fb:1")
            ),
        );
        let files = vec![helper, token, ns, fallback.clone()];
        let c = find_credentials(&files, "h.io")
            .expect("ok")
            .expect("found");
        assert_eq!(
            (c.username.as_str(), c.source.as_path()),
            ("fb", fallback.as_path())
        );
    }

    #[test]
    fn malformed_files_are_errors_naming_the_file_not_the_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            ("json.json", "{not json".to_string(), "not valid auth JSON"),
            (
                "b64.json",
                r#"{"auths": {"h.io": {"auth": "!!!"}}}"#.to_string(),
                "not base64",
            ),
            (
                "colon.json",
                format!(
                    r#"{{"auths": {{"h.io": {{"auth": "{}"}}}}}}"#,
                    b64("nocolonsecret")
                ),
                "USER:PASSWORD",
            ),
        ];
        for (name, text, needle) in cases {
            let f = write(dir.path(), name, &text);
            let e = find_credentials(std::slice::from_ref(&f), "h.io").expect_err(name);
            let msg = e.to_string();
            assert!(matches!(e, GatewayError::AuthFile { .. }), "{msg}");
            assert!(msg.contains(needle), "{msg}");
            assert!(msg.contains(&f.display().to_string()), "{msg}");
            assert!(!msg.contains("nocolonsecret"), "{msg}");
        }
    }

    #[test]
    fn default_locations_follow_podman_then_docker() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = default_auth_files_from(env(&[
            ("REGISTRY_AUTH_FILE", "/a/auth.json"),
            ("XDG_RUNTIME_DIR", "/run/user/1"),
            ("XDG_CONFIG_HOME", "/cfg"),
            ("DOCKER_CONFIG", "/dk"),
            ("HOME", "/home/u"),
        ]));
        let expect: Vec<PathBuf> = [
            "/a/auth.json",
            "/run/user/1/containers/auth.json",
            "/cfg/containers/auth.json",
            "/dk/config.json",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(all, expect);

        let home_only =
            default_auth_files_from(env(&[("HOME", "/home/u"), ("REGISTRY_AUTH_FILE", "")]));
        let expect: Vec<PathBuf> = [
            "/home/u/.config/containers/auth.json",
            "/home/u/.docker/config.json",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(home_only, expect);
        assert!(default_auth_files_from(env(&[])).is_empty());
    }
}
