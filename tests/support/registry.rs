//! A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution 2.8) serving a
//! temporary directory on 127.0.0.1, with helpers to push the test images into it (skopeo),
//! to stop and restart it on the same port and storage (for outage tests), and to check that
//! it serves blob byte ranges. HTTP checks go through curl so the support crate stays small.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::proc;

/// How long to wait for the registry to answer after starting it.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for it to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Repository that [`Registry::check_range_support`] uploads its probe blob to.
const PROBE_REPO: &str = "fd-harness/range-probe";

/// A running `docker-registry` on 127.0.0.1 with filesystem storage in a temporary directory.
///
/// Killed (by PID) and waited for on drop; the temporary directory goes with it.
pub struct Registry {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    credentials: Option<(String, String)>,
}

impl Registry {
    /// Starts an open registry (no authentication) on a free port, waits until `GET /v2/`
    /// answers and checks that blob Range requests get 206.
    pub fn start() -> Result<Registry> {
        Registry::start_inner(None)
    }

    /// Like [`Registry::start`], with HTTP basic authentication (`auth: htpasswd`) accepting
    /// only `user`/`pass`. The helpers here (push, curl checks) send these credentials.
    pub fn start_with_htpasswd(user: &str, pass: &str) -> Result<Registry> {
        Registry::start_inner(Some((user.to_owned(), pass.to_owned())))
    }

    fn start_inner(credentials: Option<(String, String)>) -> Result<Registry> {
        proc::require_tool("docker-registry", "docker-registry")?;
        proc::require_tool("skopeo", "skopeo")?;
        proc::require_tool("curl", "curl")?;
        let dir = tempfile::Builder::new()
            .prefix("fd-registry-")
            .tempdir()
            .context("cannot create a temporary directory for the registry")?;
        write_file(
            &dir.path().join("policy.json"),
            br#"{"default": [{"type": "insecureAcceptAnything"}]}"#,
        )?;
        write_file(&dir.path().join("registries.conf"), b"")?;
        if let Some((user, pass)) = &credentials {
            let line = htpasswd_line(user, pass)?;
            write_file(&dir.path().join("htpasswd"), format!("{line}\n").as_bytes())?;
        }

        // The port is found by binding port 0 and releasing it; another process could take it
        // in between, so a start that fails on the address is retried on a new port.
        let mut registry = Registry {
            dir,
            port: 0,
            child: None,
            credentials,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            registry.port = free_port()?;
            registry.write_config()?;
            match registry.spawn_and_wait() {
                Ok(()) => break,
                Err(e) if attempt < 3 && registry.log().contains("address already in use") => {
                    eprintln!(
                        "[registry] port {} was taken, retrying: {e:#}",
                        registry.port
                    );
                }
                Err(e) => return Err(e),
            }
        }
        registry.check_range_support()?;
        Ok(registry)
    }

    /// `127.0.0.1:PORT`, as used in image references (`ADDR/NAME:TAG`).
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// The port the registry listens on (the same across [`Registry::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The credentials of a registry started with [`Registry::start_with_htpasswd`].
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// The registry's storage root (its filesystem driver's `rootdirectory`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's log (warnings and errors only), for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the registry process is running (it may have been stopped).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Pushes tag `tag` of the OCI layout `layout_dir` as `ADDR/NAME:TAG`, where
    /// `name_and_tag` is `NAME:TAG`. Digests are preserved: the registry ends up with exactly
    /// the manifest and blobs of the layout (skopeo fails rather than recompress).
    pub fn push(&self, layout_dir: &Path, tag: &str, name_and_tag: &str) -> Result<()> {
        let layout = layout_dir
            .to_str()
            .with_context(|| format!("layout path {} is not UTF-8", layout_dir.display()))?;
        let mut cmd = self.skopeo();
        cmd.args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        if let Some((user, pass)) = &self.credentials {
            cmd.arg(format!("--dest-creds={user}:{pass}"));
        }
        cmd.arg(format!("oci:{layout}:{tag}"))
            .arg(format!("docker://{}/{name_and_tag}", self.addr()));
        proc::run_ok(&mut cmd)
            .with_context(|| format!("pushing {layout}:{tag} as {name_and_tag}"))
            .with_context(|| format!("registry log:\n{}", self.log()))?;
        Ok(())
    }

    /// `skopeo` with this registry's own policy and registries configuration, so that the
    /// host's configuration (mirrors, signature policy, stored logins) plays no part.
    pub fn skopeo(&self) -> Command {
        let mut cmd = proc::command("skopeo");
        cmd.env(
            "CONTAINERS_REGISTRIES_CONF",
            self.dir.path().join("registries.conf"),
        )
        .env("REGISTRY_AUTH_FILE", self.dir.path().join("auth.json"))
        .arg("--policy")
        .arg(self.dir.path().join("policy.json"));
        cmd
    }

    /// Checks that the registry serves byte ranges of blobs: uploads a small probe blob to
    /// `fd-harness/range-probe` (so that repository exists afterwards) and expects `206
    /// Partial Content` with exactly the requested bytes for `Range: bytes=10-19`.
    pub fn check_range_support(&self) -> Result<()> {
        let probe: Vec<u8> = (0u8..64).map(|i| b'a' + i % 26).collect();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&probe)));

        // Start an upload; the registry answers 202 with the upload URL in Location.
        let (status, _, location) =
            self.curl(&["-X", "POST"], &format!("/v2/{PROBE_REPO}/blobs/uploads/"))?;
        if status != 202 {
            bail!("starting a blob upload: expected 202, got {status}");
        }
        let location = location.context("the upload answer has no Location header")?;
        let upload_url = if location.starts_with('/') {
            format!("{}{location}", self.url())
        } else if location.starts_with(&format!("{}/", self.url())) {
            location
        } else {
            // Never follow the registry anywhere but itself.
            bail!("the registry sent an upload URL on another host: {location}");
        };
        let separator = if upload_url.contains('?') { '&' } else { '?' };
        let body_path = self.dir.path().join("range-probe.bin");
        write_file(&body_path, &probe)?;
        let data_arg = format!("@{}", body_path.display());
        let (status, _, _) = self.curl_url(
            &[
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                &data_arg,
            ],
            &format!("{upload_url}{separator}digest={digest}"),
        )?;
        if status != 201 {
            bail!("finishing the probe blob upload: expected 201, got {status}");
        }

        let (status, body, _) = self.curl(
            &["-H", "Range: bytes=10-19"],
            &format!("/v2/{PROBE_REPO}/blobs/{digest}"),
        )?;
        if status != 206 {
            bail!("a blob Range request got {status}, not 206: the registry ignores ranges");
        }
        if body != probe[10..20] {
            bail!(
                "a blob Range request for bytes 10-19 returned {:?}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    /// `GET path` (e.g. `/v2/`) with this registry's credentials; returns the HTTP status and
    /// the body. Never follows redirects.
    pub fn get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        let (status, body, _) = self.curl(&[], path)?;
        Ok((status, body))
    }

    /// Stops the registry (SIGTERM, then SIGKILL after 5 s) and waits for it. The storage is
    /// kept, so [`Registry::restart`] brings the same content back on the same port.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: signalling our own child, which has not been reaped yet (try_wait above
            // saw it running), so the PID cannot belong to another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the registry again on the same port with the same storage, after
    /// [`Registry::stop`] (or stops it first), and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn_and_wait()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn write_config(&self) -> Result<()> {
        let root = self.dir.path();
        let auth = if self.credentials.is_some() {
            format!(
                "auth:\n  htpasswd:\n    realm: fd-test\n    path: {}\n",
                root.join("htpasswd").display()
            )
        } else {
            String::new()
        };
        // A fixed secret keeps the registry from warning about generating one; it signs upload
        // state, and nothing here is exposed beyond loopback.
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  \
             cache:\n    blobdescriptor: inmemory\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: fd-e2e-test-secret\n\
             {auth}",
            storage = self.storage_dir().display(),
            port = self.port,
        );
        write_file(&root.join("config.yml"), config.as_bytes())
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("cannot open {}", self.log_path().display()))?;
        let log_err = log.try_clone().context("cannot duplicate the log handle")?;
        let mut cmd = proc::command("docker-registry");
        cmd.arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{}`", proc::describe(&cmd)))?;
        self.child = Some(child);

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                bail!(
                    "docker-registry exited with {status} before answering; log:\n{}",
                    self.log()
                );
            }
            if let Ok((200, _, _)) = self.curl(&["--max-time", "1"], "/v2/") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "docker-registry did not answer GET /v2/ within {} s; log:\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.log()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn curl(&self, args: &[&str], path: &str) -> Result<(u16, Vec<u8>, Option<String>)> {
        self.curl_url(args, &format!("{}{path}", self.url()))
    }

    /// Runs curl against `url` (always this registry) and returns the status, the body and
    /// the Location header when there is one.
    fn curl_url(&self, args: &[&str], url: &str) -> Result<(u16, Vec<u8>, Option<String>)> {
        if !url.starts_with(&format!("{}/", self.url())) {
            bail!("refusing to send a request to {url}: not this registry");
        }
        let mut cmd = proc::command("curl");
        // --noproxy: never route loopback requests through a proxy from the environment.
        cmd.args([
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--max-time",
            "10",
        ])
        .args(["--write-out", "%{stderr}\n%{http_code} %header{location}"]);
        if let Some((user, pass)) = &self.credentials {
            cmd.arg("--user").arg(format!("{user}:{pass}"));
        }
        cmd.args(args).arg(url);
        let output = proc::run_ok(&mut cmd)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default().trim();
        let (code, location) = last.split_once(' ').unwrap_or((last, ""));
        let status: u16 = code
            .parse()
            .with_context(|| format!("curl printed no status code: {stderr}"))?;
        let location = Some(location.trim().to_owned()).filter(|l| !l.is_empty());
        Ok((status, output.stdout, location))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// One htpasswd line `user:$2...` with a bcrypt hash, the only format the registry accepts.
/// Tries `htpasswd` (apache2-utils), then Python's `crypt` module (glibc's libxcrypt does
/// bcrypt; the module exists up to Python 3.12, Debian 12 has 3.11), then `mkpasswd` (whois).
fn htpasswd_line(user: &str, pass: &str) -> Result<String> {
    let mut tried = Vec::new();
    if proc::find_in_path("htpasswd").is_some() {
        match proc::run_ok(proc::command("htpasswd").args(["-Bbn", user, pass])) {
            Ok(out) => {
                let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if line.starts_with(&format!("{user}:$2")) {
                    return Ok(line);
                }
                tried.push(format!("htpasswd printed {line:?}"));
            }
            Err(e) => tried.push(format!("{e:#}")),
        }
    }
    let mut hashers: Vec<(&str, Vec<&str>)> = Vec::new();
    if proc::find_in_path("python3").is_some() {
        hashers.push((
            "python3",
            vec![
                "-W",
                "ignore",
                "-c",
                "import crypt, sys; \
                 print(crypt.crypt(sys.stdin.read(), crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            ],
        ));
    }
    if proc::find_in_path("mkpasswd").is_some() {
        hashers.push(("mkpasswd", vec!["--method=bcrypt", "--stdin"]));
    }
    for (program, args) in hashers {
        match hash_with(program, &args, pass) {
            Ok(hash) if hash.starts_with("$2") => return Ok(format!("{user}:{hash}")),
            Ok(other) => tried.push(format!("{program} printed {other:?}")),
            Err(e) => tried.push(format!("{program}: {e:#}")),
        }
    }
    bail!(
        "cannot make a bcrypt htpasswd entry; install apache2-utils (htpasswd). Tried: {}",
        if tried.is_empty() {
            "nothing found".to_owned()
        } else {
            tried.join("; ")
        }
    )
}

fn hash_with(program: &str, args: &[&str], pass: &str) -> Result<String> {
    let mut child = proc::command(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start {program}"))?;
    child
        .stdin
        .take()
        .context("no stdin pipe")?
        .write_all(pass.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
