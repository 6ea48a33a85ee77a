//! `fd serve --mirror` in front of a real registry, pulled through by the real clients:
//! skopeo, podman (`registries.conf` mirror) and containerd (`hosts.toml`), then the same
//! with the registry stopped (warm mirror), and eight clients at once through a cold mirror
//! with a counting relay proving the registry saw each blob once; and a mirror that runs next
//! to a peer node taking the blobs from a team peer instead of the registry, then falling
//! back to the registry once that peer is gone.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fd_tests::{
    FdEnv, ImageCache, Registry, Relay, fd_no_mdns, images, manifest, manifest_digest, output,
    spawn, text,
};

const IMAGE: &str = "debian-python:bookworm";

/// A free port on 127.0.0.1 (bound, then released for the child to take).
fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} not ready after {timeout:?}")
}

/// A child process killed (by its PID) and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `fd serve --mirror`.
struct Mirror {
    addr: String,
    log: PathBuf,
    _child: Guard,
}

impl Mirror {
    fn start(env: &FdEnv, upstream: &str, extra: &[&str]) -> Result<Mirror> {
        Mirror::start_logging(env, upstream, extra, "info")
    }

    /// Like [`Mirror::start`], with `FD_LOG` set to `filter`.
    fn start_logging(env: &FdEnv, upstream: &str, extra: &[&str], filter: &str) -> Result<Mirror> {
        let addr = free_addr()?;
        let log = env
            .dir()
            .join(format!("mirror-{}.log", addr.replace(':', "-")));
        let mut cmd = env.cmd(["serve", "--mirror", &addr, "--upstream", upstream]);
        cmd.args(extra)
            .env("FD_LOG", filter)
            .env("FD_MDNS", "0")
            .stdout(Stdio::null())
            .stderr(fs_err::File::create(&log)?.into_parts().0);
        let child = Guard(cmd.spawn().context("starting fd serve")?);
        wait_for("the mirror", Duration::from_secs(20), || {
            TcpStream::connect(&addr).is_ok()
        })?;
        Ok(Mirror {
            addr,
            log,
            _child: child,
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The manifest and layer digests of the debian-python test image.
fn expected(imgs: &ImageCache) -> Result<(String, Vec<String>)> {
    expected_of(&imgs.debian_python, ImageCache::DEBIAN_TAG)
}

/// The manifest digest, then the config and layer digests, of `tag` in an OCI layout.
fn expected_of(layout: &Path, tag: &str) -> Result<(String, Vec<String>)> {
    let digest = manifest_digest(layout, tag)?;
    let m = manifest(layout, tag)?;
    let mut blobs = vec![
        m["config"]["digest"]
            .as_str()
            .context("config digest")?
            .to_string(),
    ];
    for l in m["layers"].as_array().context("layers")? {
        blobs.push(l["digest"].as_str().context("layer digest")?.to_string());
    }
    Ok((digest, blobs))
}

/// `skopeo copy` from the mirror into an OCI layout; checks every digest.
fn skopeo_pull(
    registry: &Registry,
    mirror: &str,
    dir: &Path,
    want: &(String, Vec<String>),
) -> Result<()> {
    skopeo_pull_image(registry, mirror, IMAGE, dir, want)
}

/// `skopeo copy` of `image` from the mirror into an OCI layout; checks every digest.
fn skopeo_pull_image(
    registry: &Registry,
    mirror: &str,
    image: &str,
    dir: &Path,
    want: &(String, Vec<String>),
) -> Result<()> {
    if let Some(parent) = dir.parent() {
        fs_err::create_dir_all(parent)?;
    }
    let out = registry
        .skopeo()
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{mirror}/{image}"))
        .arg(format!("oci:{}:t", dir.display()))
        .output()?;
    ensure!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        manifest_digest(dir, "t")? == want.0,
        "manifest digest differs"
    );
    let m = manifest(dir, "t")?;
    let mut got = vec![
        m["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ];
    for l in m["layers"].as_array().context("layers")? {
        got.push(l["digest"].as_str().unwrap_or_default().to_string());
    }
    ensure!(
        got == want.1,
        "blob digests differ: {got:?} vs {:?}",
        want.1
    );
    // The layout's blobs hash to their names.
    for d in &want.1 {
        let hex = d.trim_start_matches("sha256:");
        let bytes = std::fs::read(dir.join("blobs/sha256").join(hex))?;
        let computed = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        ensure!(computed == hex, "blob {d} in the copy hashes to {computed}");
    }
    Ok(())
}

/// podman with every piece of state under `dir`, pulling `upstream` through `mirror`.
fn podman(dir: &Path, upstream: &str, mirror: &str) -> Result<Command> {
    fs_err::create_dir_all(dir)?;
    fs_err::write(
        dir.join("storage.conf"),
        format!(
            "[storage]\ndriver = \"overlay\"\ngraphroot = \"{0}/root\"\nrunroot = \"{0}/run\"\n",
            dir.display()
        ),
    )?;
    fs_err::write(
        dir.join("registries.conf"),
        format!(
            "unqualified-search-registries = []\n\n[[registry]]\nlocation = \"{upstream}\"\n\
             insecure = true\n\n[[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = true\n"
        ),
    )?;
    fs_err::write(
        dir.join("containers.conf"),
        "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"none\"\n",
    )?;
    fs_err::write(dir.join("auth.json"), "{}")?;
    fs_err::write(
        dir.join("policy.json"),
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )?;
    let mut cmd = Command::new("podman");
    cmd.stdin(Stdio::null())
        .env("CONTAINERS_STORAGE_CONF", dir.join("storage.conf"))
        .env("CONTAINERS_REGISTRIES_CONF", dir.join("registries.conf"))
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .env("REGISTRY_AUTH_FILE", dir.join("auth.json"));
    for v in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(v);
    }
    Ok(cmd)
}

fn run_ok(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Unmounts anything left mounted under `dir` (podman's overlay mounts).
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|t| t.starts_with(&prefix))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = Command::new("umount").arg("-l").arg(t).status();
    }
}

fn podman_pull_run(dir: &Path, upstream: &str, mirror: &str) -> Result<()> {
    let image = format!("{upstream}/{IMAGE}");
    let result = (|| -> Result<()> {
        let sig = dir.join("policy.json");
        let mut pull = podman(dir, upstream, mirror)?;
        pull.args(["pull", "--quiet", "--signature-policy"])
            .arg(&sig)
            .arg(&image);
        run_ok(pull, "podman pull")?;
        let mut run = podman(dir, upstream, mirror)?;
        run.args([
            "run",
            "--rm",
            "--pull=never",
            "--runtime",
            "runc",
            "--network=none",
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
            &image,
            "python3",
            "-c",
            "print(6*7)",
        ]);
        let out = run_ok(run, "podman run")?;
        ensure!(out.trim() == "42", "podman run printed {out:?}");
        Ok(())
    })();
    if let Ok(mut rm) = podman(dir, upstream, mirror) {
        rm.args(["rmi", "-a", "-f"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = rm.status();
    }
    unmount_under(dir);
    result
}

/// A containerd of its own (root, state, sockets under `dir`, CRI off).
struct Containerd {
    sock: PathBuf,
    _child: Guard,
}

impl Containerd {
    fn start(dir: &Path) -> Result<Containerd> {
        fs_err::create_dir_all(dir)?;
        let d = dir.display();
        let sock = dir.join("c.sock");
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/c.sock\"\n[ttrpc]\n  address = \"{d}/c-ttrpc.sock\"\n\
             [debug]\n  address = \"{d}/c-debug.sock\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        );
        fs_err::write(dir.join("config.toml"), config)?;
        let log = fs_err::File::create(dir.join("containerd.log"))?
            .into_parts()
            .0;
        let child = Guard(
            Command::new("containerd")
                .arg("--config")
                .arg(dir.join("config.toml"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting containerd")?,
        );
        wait_for("containerd", Duration::from_secs(20), || sock.exists())?;
        Ok(Containerd {
            sock,
            _child: child,
        })
    }

    fn pull(&self, hosts: &Path, upstream: &str, mirror: &str) -> Result<()> {
        let hd = hosts.join(upstream);
        fs_err::create_dir_all(&hd)?;
        fs_err::write(
            hd.join("hosts.toml"),
            format!(
                "server = \"http://{upstream}\"\n\n[host.\"http://{mirror}\"]\n  \
                 capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        let mut cmd = Command::new("ctr");
        cmd.stdin(Stdio::null())
            .arg("-a")
            .arg(&self.sock)
            .args(["-n", "test", "image", "pull", "--hosts-dir"])
            .arg(hosts)
            .arg(format!("{upstream}/{IMAGE}"));
        run_ok(cmd, "ctr image pull")?;
        Ok(())
    }
}

fn containerd_pull(dir: &Path, upstream: &str, mirror: &str) -> Result<()> {
    let c = Containerd::start(&dir.join("containerd"))?;
    let r = c.pull(&dir.join("hosts"), upstream, mirror);
    drop(c);
    unmount_under(dir);
    r
}

#[test]
fn real_clients_pull_through_the_mirror_and_survive_an_outage() -> Result<()> {
    let imgs = images()?;
    let want = expected(&imgs)?;
    let mut registry = Registry::start()?;
    registry.push(&imgs.debian_python, ImageCache::DEBIAN_TAG, IMAGE)?;
    let up = registry.addr();
    let env = FdEnv::new()?;
    let mirror = Mirror::start(&env, &up, &[])?;
    let work = tempfile::tempdir()?;

    for phase in ["up", "down"] {
        let w = work.path().join(phase);
        skopeo_pull(&registry, &mirror.addr, &w.join("skopeo"), &want)
            .with_context(|| format!("skopeo ({phase}); mirror log:\n{}", mirror.log()))?;
        podman_pull_run(&w.join("podman"), &up, &mirror.addr)
            .with_context(|| format!("podman ({phase}); mirror log:\n{}", mirror.log()))?;
        containerd_pull(&w, &up, &mirror.addr)
            .with_context(|| format!("containerd ({phase}); mirror log:\n{}", mirror.log()))?;
        if phase == "up" {
            registry.stop();
            ensure!(
                TcpStream::connect(&up).is_err(),
                "the registry still answers"
            );
        }
    }

    // The mirror's blobs survive gc.
    env.run(["gc"])?;
    skopeo_pull(
        &registry,
        &mirror.addr,
        &work.path().join("after-gc"),
        &want,
    )
    .with_context(|| format!("after gc; mirror log:\n{}", mirror.log()))?;
    Ok(())
}

#[test]
fn eight_clients_at_once_fetch_each_blob_once_upstream() -> Result<()> {
    let imgs = images()?;
    let want = expected(&imgs)?;
    let registry = Registry::start()?;
    registry.push(&imgs.debian_python, ImageCache::DEBIAN_TAG, IMAGE)?;
    let relay = Relay::start(&registry.addr(), None)?;
    let env = FdEnv::new()?;
    let mirror = Mirror::start(&env, relay.addr(), &[])?;
    let work = tempfile::tempdir()?;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let dir = work.path().join(format!("c{i}"));
                let (registry, mirror, want) = (&registry, &mirror.addr, &want);
                s.spawn(move || skopeo_pull(registry, mirror, &dir, want))
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))?
                .with_context(|| format!("mirror log:\n{}", mirror.log()))?;
        }
        Ok(())
    })?;
    for d in &want.1 {
        let n = relay.blob_gets(d);
        ensure!(n == 1, "the registry saw {n} GETs of {d}");
    }
    Ok(())
}

/// A store in the team of `token`.
fn team_member(token: &str) -> Result<FdEnv> {
    let env = FdEnv::new()?;
    let join = output(
        fd_no_mdns(&env, &["team", "join", token]),
        Duration::from_secs(30),
    )?;
    ensure!(join.status.success(), "team join: {}", text(&join));
    Ok(env)
}

/// `fd serve` as peer node and mirror in one process, connected to the peer at `peer`, with
/// the peer node's connection log on; returns once the mirror answers and, when `connect`,
/// once the peer is connected.
fn peer_mirror(env: &FdEnv, upstream: &str, peer: &str, connect: bool) -> Result<Mirror> {
    let m = Mirror::start_logging(
        env,
        upstream,
        &[
            "--no-mdns",
            "--peer",
            peer,
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
        "info,fd_p2p::net=debug",
    )?;
    if connect {
        wait_for(
            "the connection to the peer",
            Duration::from_secs(20),
            || m.log().contains("connected"),
        )
        .with_context(|| format!("mirror log:\n{}", m.log()))?;
    }
    Ok(m)
}

#[test]
fn a_mirror_beside_a_peer_node_takes_blobs_from_team_peers_first() -> Result<()> {
    const NAME: &str = "busybox:latest";
    let imgs = images()?;
    let want = expected_of(&imgs.busybox, ImageCache::BUSYBOX_TAG)?;
    let sizes: Vec<u64> = manifest(&imgs.busybox, ImageCache::BUSYBOX_TAG)?["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .map(|l| l["size"].as_u64().unwrap_or(0))
        .collect();
    let smallest_layer = sizes.iter().copied().min().context("no layers")?;
    let registry = Registry::start()?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, NAME)?;
    // The mirrors reach the registry only through the relay, which counts what it sends.
    let relay = Relay::start(&registry.addr(), None)?;

    // Node A holds the image (pulled straight from the registry) and serves it to the team.
    let a = FdEnv::new()?;
    let init = output(fd_no_mdns(&a, &["team", "init"]), Duration::from_secs(30))?;
    ensure!(init.status.success(), "team init: {}", text(&init));
    let token = String::from_utf8_lossy(&init.stdout).trim().to_string();
    let reference = format!("{}/{NAME}", registry.addr());
    let pulled = output(
        fd_no_mdns(&a, &["pull", &reference]),
        Duration::from_secs(120),
    )?;
    ensure!(pulled.status.success(), "pull on A: {}", text(&pulled));
    let mut node_a = spawn(fd_no_mdns(
        &a,
        &[
            "serve",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
    ))?;
    let a_addr = node_a.wait_word("listening on", Duration::from_secs(30))?;

    // Node M: same team, empty store, peer node and mirror in one process.
    let m_env = team_member(&token)?;
    let m = peer_mirror(&m_env, relay.addr(), &a_addr, true)?;
    let work = tempfile::tempdir()?;
    skopeo_pull_image(&registry, &m.addr, NAME, &work.path().join("peers"), &want)
        .with_context(|| format!("copy through M; mirror log:\n{}", m.log()))?;
    let requests = relay.requests();
    let blob_gets: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains("/blobs/"))
        .collect();
    ensure!(
        blob_gets.is_empty(),
        "the registry sent blobs: {blob_gets:?}\nmirror log:\n{}",
        m.log()
    );
    let down = relay.bytes_down();
    eprintln!(
        "the registry sent {down} bytes (manifests and HEADs); smallest layer {smallest_layer}"
    );
    ensure!(
        down < smallest_layer,
        "the registry sent {down} bytes, as much as a layer ({smallest_layer})"
    );
    // The access checks still went to the registry: one per blob.
    for d in &want.1 {
        let needle = format!("HEAD /v2/busybox/blobs/{d}");
        ensure!(
            requests.iter().any(|r| r.starts_with(&needle)),
            "no access check for {d}: {requests:?}"
        );
    }
    ensure!(
        m.log().contains("blob stored from team peers"),
        "mirror log:\n{}",
        m.log()
    );
    // Kept like an upstream download: recorded and pinned in M's store.
    let m_store = fd_node::Store::open(m_env.fd_home())?;
    let pins = m_store.pinned_blobs()?;
    for d in &want.1 {
        ensure!(m_store.has_blob(d)?, "{d} not in M's store");
        ensure!(pins.contains(d), "{d} not pinned in M's store");
    }
    drop(m_store);
    drop(m);

    // A goes away: a fresh mirror in the same team gets everything from the registry.
    let status = node_a
        .terminate(Duration::from_secs(10))
        .context("stopping A")?;
    ensure!(status.success(), "A exited with {status}");
    let m2_env = team_member(&token)?;
    let m2 = peer_mirror(&m2_env, relay.addr(), &a_addr, false)?;
    skopeo_pull_image(
        &registry,
        &m2.addr,
        NAME,
        &work.path().join("upstream"),
        &want,
    )
    .with_context(|| {
        format!(
            "copy through a fresh M with A gone; mirror log:\n{}",
            m2.log()
        )
    })?;
    for d in &want.1 {
        let n = relay.blob_gets(d);
        ensure!(n == 1, "the registry saw {n} GETs of {d} after A left");
    }
    // The peers were asked first and had nothing to give.
    let log = m2.log();
    ensure!(
        log.contains("no team peer holds the blob") && !log.contains("blob stored from team peers"),
        "mirror log:\n{log}"
    );
    Ok(())
}
