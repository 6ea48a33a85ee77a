//! The peer network between real `fd` processes, each in its own network namespace.
//!
//! A private LAN is built for each test: one namespace holds a bridge, every node gets its own
//! namespace with a veth to that bridge and a 10.77.x.y address that exists only inside these
//! namespaces. The registry runs on 127.0.0.1 in the root namespace, which the nodes cannot
//! reach: node A pulls from the root namespace (with mDNS off there), then shares from its
//! namespace, and the others can only get the image from A. Guards delete the namespaces and
//! kill every process by PID, even when an assertion fails.
//!
//! Containers and FUSE mounts in a node's namespace go through `nsenter --net` rather than
//! `ip netns exec` (which remounts /sys and hides the cgroup hierarchy containers need): a
//! cold `fd run` on B streams the image from A, fetching only what the command reads, and the
//! lazily recorded image, once fully fetched, presents exactly A's tree.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fd_node::{Store, load_file_index};
// Commands in the root namespace never use mDNS: A's pull there must not find the nodes of
// the namespaces.
use fd_tests::fd_no_mdns as root_ns;
use fd_tests::{FdEnv, ImageCache, Proc, Registry, images, output, spawn, text};
use sha2::Digest;

/// A LAN of namespaces; deleted (with their veths) when dropped.
struct Lan {
    bridge: String,
    nodes: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Lan {
    /// Namespaces `fdtest-TAG-br` (bridge) and `fdtest-TAG-0..n`, node i at 10.77.0.(i+1).
    fn new(n: usize) -> Result<Lan> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!("{:x}{:x}", std::process::id() & 0xfff, nanos & 0xffff);
        let mut lan = Lan {
            bridge: format!("fdtest-{tag}-br"),
            nodes: Vec::new(),
        };
        ip(&["netns", "add", &lan.bridge])?;
        ip(&["-n", &lan.bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan.bridge, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("fdtest-{tag}-{i}");
            ip(&["netns", "add", &ns])?;
            lan.nodes.push(ns.clone());
            let port = format!("p{i}");
            // Both ends are created inside the namespaces: nothing appears in the root one.
            ip(&[
                "-n",
                &lan.bridge,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns,
            ])?;
            ip(&[
                "-n",
                &lan.bridge,
                "link",
                "set",
                &port,
                "master",
                "br0",
                "up",
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 1),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // No default route here: give multicast (mDNS) a route out of eth0.
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
        }
        Ok(lan)
    }

    fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// `fd ARGS` in `env`, inside namespace `ns`.
fn in_ns(ns: &str, env: &FdEnv, args: &[&str]) -> Command {
    let inner = env.cmd(args);
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = inner.get_current_dir() {
        c.current_dir(d);
    }
    c.stdin(Stdio::null());
    c
}

/// Checks that `b` holds exactly the image `a` holds: same manifest, same file index (it is
/// content-addressed, so the same tree), every layer blob rebuilding to its sha256 and every
/// file chunk present and matching its id.
fn expect_same_image(a: &FdEnv, ref_a: &str, b: &FdEnv, ref_b: &str) -> Result<()> {
    let sa = Store::open(a.fd_home())?;
    let sb = Store::open(b.fd_home())?;
    let ia = sa.find_image(ref_a)?;
    let ib = sb.find_image(ref_b)?;
    ensure!(ia.manifest_digest == ib.manifest_digest, "manifest differs");
    ensure!(ia.file_index == ib.file_index, "file index differs");
    ensure!(ia.layers == ib.layers, "layers differ");
    for layer in &ib.layers {
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut sb.open_blob(layer)?, &mut h)?;
        ensure!(
            format!("sha256:{}", hex::encode(h.finalize())) == *layer,
            "layer {layer} differs"
        );
    }
    let index = load_file_index(&sb, &ib)?;
    for e in &index.entries {
        for c in &e.chunks {
            sb.read_chunk(&c.id)?;
        }
    }
    Ok(())
}

#[test]
fn team_peers_pull_without_the_registry_and_outsiders_get_nothing() -> Result<()> {
    let imgs = images()?;
    let mut registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let reference = format!("{}/debian-python:bookworm", registry.addr());

    // A: joins a team, pulls from the registry (root namespace, no mDNS there).
    let a = FdEnv::new()?;
    let init = output(root_ns(&a, &["team", "init"]), Duration::from_secs(30))?;
    ensure!(init.status.success(), "team init: {}", text(&init));
    let token = String::from_utf8_lossy(&init.stdout).trim().to_string();
    let started = Instant::now();
    let pulled = output(root_ns(&a, &["pull", &reference]), Duration::from_secs(300))?;
    ensure!(pulled.status.success(), "pull on A: {}", text(&pulled));
    let registry_secs = started.elapsed().as_secs_f64();
    registry.stop();

    let lan = Lan::new(4)?;
    let share = spawn(in_ns(
        &lan.nodes[0],
        &a,
        &[
            "serve",
            "--listen",
            &format!("/ip4/{}/udp/7700/quic-v1", lan.addr(0)),
        ],
    ))?;
    let line = share.wait_line("listening on", Duration::from_secs(30))?;
    let a_addr = line
        .split_whitespace()
        .last()
        .context("no address on the listening line")?
        .to_string();
    let mut share = share;

    // B: same team, finds A by mDNS alone (no --peer) and pulls with the registry gone.
    let b = FdEnv::new()?;
    let join = output(
        in_ns(&lan.nodes[1], &b, &["team", "join", &token]),
        Duration::from_secs(30),
    )?;
    ensure!(join.status.success(), "team join: {}", text(&join));
    let started = Instant::now();
    let pulled = output(
        in_ns(&lan.nodes[1], &b, &["pull", &reference]),
        Duration::from_secs(300),
    )?;
    let peer_secs = started.elapsed().as_secs_f64();
    ensure!(pulled.status.success(), "pull on B: {}", text(&pulled));
    let summary = String::from_utf8_lossy(&pulled.stderr);
    ensure!(summary.contains("0 B from registry"), "summary: {summary}");
    expect_same_image(&a, &reference, &b, &reference)?;
    eprintln!(
        "pull of debian-python: {registry_secs:.2} s from the registry (loopback), \
         {peer_secs:.2} s from peer A over the veth LAN (incl. discovery and registry timeout)"
    );

    // B remembers A.
    let peers = output(
        in_ns(&lan.nodes[1], &b, &["peers"]),
        Duration::from_secs(30),
    )?;
    let a_id = a_addr.rsplit('/').next().context("peer id")?;
    let listing = String::from_utf8_lossy(&peers.stdout);
    // A is asked live which images it holds, and B's pull measured A's throughput.
    let a_line = listing
        .lines()
        .find(|l| l.contains(a_id))
        .with_context(|| format!("fd peers on B: {}", text(&peers)))?;
    ensure!(
        a_line.contains(&reference) && a_line.contains("/s"),
        "fd peers on B: {}",
        text(&peers)
    );

    // B serves too; C, in the same team, finds A and B by mDNS and its pull is spread over
    // both of them.
    let share_b = spawn(in_ns(
        &lan.nodes[1],
        &b,
        &[
            "serve",
            "--listen",
            &format!("/ip4/{}/udp/7700/quic-v1", lan.addr(1)),
        ],
    ))?;
    let line = share_b.wait_line("listening on", Duration::from_secs(30))?;
    let b_id = line
        .rsplit('/')
        .next()
        .context("no peer id on the listening line")?
        .trim()
        .to_string();
    let mut share_b = share_b;
    let c = FdEnv::new()?;
    let join = output(
        in_ns(&lan.nodes[2], &c, &["team", "join", &token]),
        Duration::from_secs(30),
    )?;
    ensure!(join.status.success(), "team join on C: {}", text(&join));
    let b_addr = format!("/ip4/{}/udp/7700/quic-v1/p2p/{b_id}", lan.addr(1));
    let pulled = output(
        in_ns(
            &lan.nodes[2],
            &c,
            &["pull", "--peer", &a_addr, "--peer", &b_addr, &reference],
        ),
        Duration::from_secs(300),
    )?;
    ensure!(pulled.status.success(), "pull on C: {}", text(&pulled));
    let summary = String::from_utf8_lossy(&pulled.stderr);
    ensure!(summary.contains("0 B from registry"), "summary: {summary}");
    expect_same_image(&a, &reference, &c, &reference)?;
    let book: serde_json::Value =
        serde_json::from_slice(&fs_err::read(c.fd_home().join("peers.json"))?)?;
    let from = |id: &str| book["peers"][id]["bytes_from"].as_u64().unwrap_or(0);
    let (from_a, from_b) = (from(a_id), from(&b_id));
    ensure!(
        from_a > 0 && from_b > 0,
        "C's pull should be spread over A and B: {from_a} B from A, {from_b} B from B"
    );
    eprintln!("C's pull: {from_a} B from A, {from_b} B from B");
    let status = share_b.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "fd serve on B exited with {status}");

    // D: another team, told A's address explicitly: gets nothing, so the pull fails.
    let c = FdEnv::new()?;
    let other = output(
        in_ns(&lan.nodes[3], &c, &["team", "init"]),
        Duration::from_secs(30),
    )?;
    ensure!(other.status.success(), "team init on C: {}", text(&other));
    let denied = output(
        in_ns(&lan.nodes[3], &c, &["pull", "--peer", &a_addr, &reference]),
        Duration::from_secs(300),
    )?;
    ensure!(
        !denied.status.success(),
        "D pulled from another team: {}",
        text(&denied)
    );
    ensure!(
        Store::open(c.fd_home())?.images()?.is_empty(),
        "D has an image"
    );

    // A stops cleanly on SIGTERM.
    let status = share.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "fd serve exited with {status}");
    Ok(())
}

/// Bytes of the partial downloads in a store (what a pull has written so far).
fn downloaded(env: &FdEnv) -> u64 {
    std::fs::read_dir(env.fd_home().join("downloads"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Shares A's store on 127.0.0.1 (root namespace, mDNS off) and returns the process and its
/// address.
fn share_on_loopback(a: &FdEnv) -> Result<(Proc, String)> {
    let share = spawn(root_ns(
        a,
        &[
            "serve",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
    ))?;
    let line = share.wait_line("listening on", Duration::from_secs(30))?;
    let addr = line
        .split_whitespace()
        .last()
        .context("address")?
        .to_string();
    ensure!(
        addr.starts_with("/ip4/127.0.0.1/"),
        "unexpected address {addr}"
    );
    Ok((share, addr))
}

#[test]
fn damaged_or_vanishing_peers_leave_the_registry_to_finish_without_refetching() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let a = FdEnv::new()?;
    let init = output(root_ns(&a, &["team", "init"]), Duration::from_secs(30))?;
    let token = String::from_utf8_lossy(&init.stdout).trim().to_string();
    let reference = format!("{}/debian-python:bookworm", registry.addr());
    let pulled = output(root_ns(&a, &["pull", &reference]), Duration::from_secs(300))?;
    ensure!(pulled.status.success(), "pull on A: {}", text(&pulled));
    let sa = Store::open(a.fd_home())?;
    let img = sa.find_image(&reference)?;
    let layer_bytes: u64 = img
        .layers
        .iter()
        .map(|l| {
            sa.blob(l)
                .ok()
                .flatten()
                .map(|(r, _)| r.size())
                .unwrap_or(0)
        })
        .sum();

    // Damage one chunk of the largest layer on A: A must not serve it, B must still end
    // with the exact image, getting that part from the registry.
    let (recipe, _) = sa.blob(&img.layers[0])?.context("layer recipe")?;
    let victim = recipe.0[recipe.0.len() / 2];
    std::fs::write(sa.chunk_path(&victim.id), vec![0u8; victim.len as usize])?;

    let (share, a_addr) = share_on_loopback(&a)?;
    let relay = fd_tests::Relay::start(&registry.addr(), None)?;
    let via_relay = format!("{}/debian-python:bookworm", relay.addr());
    let b = FdEnv::new()?;
    output(
        root_ns(&b, &["team", "join", &token]),
        Duration::from_secs(30),
    )?;
    let pulled = output(
        root_ns(&b, &["pull", "--peer", &a_addr, &via_relay]),
        Duration::from_secs(300),
    )?;
    ensure!(pulled.status.success(), "pull on B: {}", text(&pulled));
    expect_same_image(&a, &reference, &b, &via_relay)?;
    let from_registry = relay.bytes_down();
    ensure!(
        from_registry > 0,
        "the damaged chunk must come from the registry"
    );
    ensure!(
        from_registry < layer_bytes / 2,
        "B took {from_registry} of {layer_bytes} layer bytes from the registry"
    );
    drop(share);

    // A killed mid-transfer: B finishes from the registry, resuming after what A gave.
    let (mut share, a_addr) = share_on_loopback(&a)?;
    let relay = fd_tests::Relay::start(&registry.addr(), None)?;
    let via_relay = format!("{}/debian-python:bookworm", relay.addr());
    let c = FdEnv::new()?;
    output(
        root_ns(&c, &["team", "join", &token]),
        Duration::from_secs(30),
    )?;
    let mut pull = c.cmd(["pull", "--peer", &a_addr, &via_relay]);
    pull.env("FD_MDNS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let pull = pull.spawn().context("starting the pull")?;
    let pull_pid = pull.id() as libc::pid_t;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut from_peer_at_kill = 0;
    while Instant::now() < deadline {
        from_peer_at_kill = downloaded(&c);
        if from_peer_at_kill > 20 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = share.child.kill();
    let _ = share.child.wait();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(pull.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(out) => out?,
        Err(_) => {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(pull_pid, libc::SIGKILL) };
            bail!("pull did not finish after A was killed");
        }
    };
    ensure!(out.status.success(), "pull on C: {}", text(&out));
    ensure!(
        from_peer_at_kill > 20 << 20,
        "A was not killed mid-transfer"
    );
    expect_same_image(&a, &reference, &c, &via_relay)?;
    let from_registry = relay.bytes_down();
    eprintln!(
        "A killed with {from_peer_at_kill} bytes downloaded; registry then sent {from_registry} of {layer_bytes}"
    );
    ensure!(
        from_registry + (from_peer_at_kill / 2) <= layer_bytes + (1 << 20),
        "C refetched from the registry what A had given: {from_registry} of {layer_bytes}"
    );
    Ok(())
}

/// `fd ARGS` in `env` with only the network namespace `ns` entered (`nsenter --net`). Unlike
/// `ip netns exec`, which remounts /sys and so hides the cgroup hierarchy that creating a
/// container needs, this keeps the mount namespace: containers and FUSE mounts work as in the
/// root namespace, and the test sees the mounts.
fn in_net_ns(ns: &str, env: &FdEnv, args: &[&str]) -> Command {
    let inner = env.cmd(args);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = inner.get_current_dir() {
        c.current_dir(d);
    }
    c.stdin(Stdio::null());
    c
}

/// Chunk files in a store: hex id → size.
fn chunk_files(env: &FdEnv) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut out = std::collections::BTreeMap::new();
    let root = env.fd_home().join("chunks");
    if !root.exists() {
        return Ok(out);
    }
    for shard in fs_err::read_dir(&root)? {
        for chunk in fs_err::read_dir(shard?.path())? {
            let chunk = chunk?;
            out.insert(
                chunk.file_name().to_string_lossy().into_owned(),
                chunk.metadata()?.len(),
            );
        }
    }
    Ok(out)
}

/// True when an fd mount (source `fd:...`) sits at `dir`.
fn is_fd_mount(dir: &std::path::Path) -> Result<bool> {
    let info = fs_err::read_to_string("/proc/self/mountinfo")?;
    let want = dir.to_str().context("mount dir is not UTF-8")?;
    Ok(info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-");
        fields.get(4) == Some(&want)
            && sep
                .and_then(|s| fields.get(s + 2))
                .is_some_and(|src| src.starts_with("fd:"))
    }))
}

/// A running `fd mount` (its stderr in a log file); unmounted and killed by PID when dropped.
struct FuseMount {
    child: Option<Child>,
    dir: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl FuseMount {
    /// Starts `cmd` (an `fd mount … DIR`) and waits until `dir` is an fd mount.
    fn start(mut cmd: Command, env: &FdEnv, name: &str) -> Result<FuseMount> {
        let dir = env.dir().join(name);
        let log = env.dir().join(format!("{name}.log"));
        cmd.arg(&dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        fs_err::create_dir_all(&dir)?;
        let mut mount = FuseMount {
            child: Some(cmd.spawn().context("starting fd mount")?),
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_fd_mount(&mount.dir)? {
            if let Some(status) = mount
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok())
                .flatten()
            {
                mount.child = None;
                bail!("fd mount exited with {status}:\n{}", mount.log()?);
            }
            ensure!(Instant::now() < deadline, "no mount:\n{}", mount.log()?);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(mount)
    }

    fn log(&self) -> Result<String> {
        Ok(fs_err::read_to_string(&self.log)?)
    }

    /// SIGTERM (as Ctrl-C), then the log once the process has exited cleanly.
    fn stop(&mut self) -> Result<String> {
        let mut child = self.child.take().context("already stopped")?;
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("fd mount ignored SIGTERM:\n{}", self.log()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log()?;
        ensure!(status.success(), "fd mount exited with {status}:\n{log}");
        Ok(log)
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if is_fd_mount(&self.dir).unwrap_or(true) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The chunks (hex ids) of an image's stored prefetch profile.
fn profile_chunks(store: &Store, manifest_digest: &str) -> Result<BTreeSet<String>> {
    let hex = manifest_digest.trim_start_matches("sha256:");
    let key = fs_err::read_to_string(store.root().join("profiles").join(hex))?;
    let profile: serde_json::Value = serde_json::from_slice(&store.read_blob(key.trim())?)?;
    profile["chunks"]
        .as_array()
        .context("profile without chunks")?
        .iter()
        .map(|c| c[0].as_str().map(str::to_owned).context("chunk id"))
        .collect()
}

#[test]
fn cold_run_streams_from_a_team_peer_without_pulling() -> Result<()> {
    let imgs = images()?;
    let mut registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let reference = format!("{}/debian-python:bookworm", registry.addr());
    let workload = ["--net", "none", &reference, "python3", "-c", "print(6*7)"];

    // A: a team member with the whole image, which it ran once (so it has a prefetch profile
    // of that workload); then the registry goes away.
    let a = FdEnv::new()?;
    let init = output(root_ns(&a, &["team", "init"]), Duration::from_secs(30))?;
    ensure!(init.status.success(), "team init: {}", text(&init));
    let token = String::from_utf8_lossy(&init.stdout).trim().to_string();
    let pulled = output(root_ns(&a, &["pull", &reference]), Duration::from_secs(300))?;
    ensure!(pulled.status.success(), "pull on A: {}", text(&pulled));
    let mut run_args = vec!["run"];
    run_args.extend(workload);
    let ran = output(root_ns(&a, &run_args), Duration::from_secs(120))?;
    ensure!(
        ran.status.success() && ran.stdout == b"42\n",
        "run on A: {}",
        text(&ran)
    );
    registry.stop();
    let sa = Store::open(a.fd_home())?;
    let image_a = sa.find_image(&reference)?;
    let index_a = load_file_index(&sa, &image_a)?;
    let file_chunks: BTreeSet<String> = index_a
        .distinct_chunks()
        .iter()
        .map(|c| c.id.to_hex())
        .collect();
    let profile = profile_chunks(&sa, &image_a.manifest_digest)?;
    ensure!(!profile.is_empty(), "A saved no profile");

    let lan = Lan::new(3)?;
    let share = spawn(in_ns(
        &lan.nodes[0],
        &a,
        &[
            "serve",
            "--listen",
            &format!("/ip4/{}/udp/7700/quic-v1", lan.addr(0)),
        ],
    ))?;
    let line = share.wait_line("listening on", Duration::from_secs(30))?;
    let a_addr = line
        .split_whitespace()
        .last()
        .context("no address on the listening line")?
        .to_string();
    let mut share = share;

    // B: same team, finds A by mDNS, no registry: the run starts from metadata alone.
    let b = FdEnv::new()?;
    let join = output(
        in_net_ns(&lan.nodes[1], &b, &["team", "join", &token]),
        Duration::from_secs(30),
    )?;
    ensure!(join.status.success(), "team join: {}", text(&join));
    let started = Instant::now();
    let ran = output(
        in_net_ns(&lan.nodes[1], &b, &run_args),
        Duration::from_secs(300),
    )?;
    let run_secs = started.elapsed().as_secs_f64();
    ensure!(
        ran.status.success() && ran.stdout == b"42\n",
        "run on B: {}",
        text(&ran)
    );
    let status = String::from_utf8_lossy(&ran.stderr).into_owned();
    let streamed = status
        .lines()
        .find(|l| l.contains("Streamed") && l.contains("from peers"))
        .with_context(|| format!("no Streamed status line:\n{status}"))?;
    ensure!(!status.contains("Pulled"), "B pulled the image:\n{status}");
    let held: u64 = chunk_files(&b)?.values().sum();
    eprintln!(
        "lazy run on B: {run_secs:.2} s, store holds {held} chunk bytes of the image's {}\n{streamed}",
        image_a.size
    );
    ensure!(
        held * 2 < image_a.size,
        "B holds {held} chunk bytes of an image of {}",
        image_a.size
    );
    {
        let sb = Store::open(b.fd_home())?;
        let image_b = sb.find_image(&reference)?;
        ensure!(image_b.lazy, "B's image is not marked lazy");
        ensure!(
            image_b.file_index == image_a.file_index
                && image_b.manifest_digest == image_a.manifest_digest,
            "B recorded another image"
        );
        ensure!(
            image_b
                .layers
                .iter()
                .all(|l| !sb.has_blob(l).unwrap_or(true)),
            "B holds layer blobs"
        );
    }
    let listed = output(
        in_net_ns(&lan.nodes[1], &b, &["images"]),
        Duration::from_secs(30),
    )?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).contains("(lazy: "),
        "fd images on B: {}",
        text(&listed)
    );

    // gc keeps the lazy image's metadata and every chunk it fetched.
    let before = chunk_files(&b)?;
    let gc = output(
        in_net_ns(&lan.nodes[1], &b, &["gc"]),
        Duration::from_secs(60),
    )?;
    ensure!(gc.status.success(), "gc on B: {}", text(&gc));
    ensure!(
        chunk_files(&b)? == before,
        "gc removed chunks of the lazy image"
    );
    ensure!(
        Store::open(b.fd_home())?.find_image(&reference)?.lazy,
        "gc lost the lazy image"
    );

    // Run again: everything it reads is local now, so nothing is streamed or reported.
    let again = output(
        in_net_ns(&lan.nodes[1], &b, &run_args),
        Duration::from_secs(120),
    )?;
    ensure!(
        again.status.success() && again.stdout == b"42\n",
        "second run on B: {}",
        text(&again)
    );
    ensure!(
        !String::from_utf8_lossy(&again.stderr).contains("Streamed"),
        "second run streamed: {}",
        text(&again)
    );

    // C: mounts the image with no read at all: the peer's profile alone brings exactly the
    // profile's chunks, in the background.
    let c = FdEnv::new()?;
    let join = output(
        in_net_ns(&lan.nodes[2], &c, &["team", "join", &token]),
        Duration::from_secs(30),
    )?;
    ensure!(join.status.success(), "team join on C: {}", text(&join));
    let mut mount_c = FuseMount::start(
        in_net_ns(
            &lan.nodes[2],
            &c,
            &[
                "mount",
                "--peer",
                &a_addr,
                "--prefetch",
                "profile",
                &reference,
            ],
        ),
        &c,
        "mnt",
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have: BTreeSet<String> = chunk_files(&c)?
            .into_keys()
            .filter(|k| file_chunks.contains(k))
            .collect();
        if have == profile {
            break;
        }
        ensure!(
            have.is_subset(&profile),
            "C fetched chunks outside the profile"
        );
        ensure!(
            Instant::now() < deadline,
            "the profile prefetch did not finish ({} of {} chunks):\n{}",
            have.len(),
            profile.len(),
            mount_c.log()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = mount_c.stop()?;
    ensure!(
        log.contains("from team peers") && log.contains("Streamed"),
        "fd mount on C:\n{log}"
    );

    // B, fully fetched (prefetch all), presents exactly A's tree.
    let mount_b = FuseMount::start(
        in_net_ns(
            &lan.nodes[1],
            &b,
            &["mount", "--prefetch", "all", &reference],
        ),
        &b,
        "mnt",
    )?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let have = chunk_files(&b)?;
        let missing = file_chunks
            .iter()
            .filter(|c| !have.contains_key(*c))
            .count();
        if missing == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{missing} chunks still missing on B:\n{}",
            mount_b.log()?
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mount_a = FuseMount::start(
        root_ns(&a, &["mount", "--prefetch", "none", &reference]),
        &a,
        "mnt",
    )?;
    let tree_a = fd_tests::tree_manifest(&mount_a.dir)?;
    let tree_b = fd_tests::tree_manifest(&mount_b.dir)?;
    let diff = fd_tests::diff_manifests(&tree_a, &tree_b);
    ensure!(
        diff.is_empty() && tree_a.len() == tree_b.len(),
        "B's tree differs from A's in {} ways:\n{}",
        diff.len(),
        diff.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    let sb = Store::open(b.fd_home())?;
    for c in index_a.distinct_chunks() {
        sb.read_chunk(&c.id)?;
    }
    drop(mount_a);
    drop(mount_b);
    let listed = output(
        in_net_ns(&lan.nodes[1], &b, &["images"]),
        Duration::from_secs(30),
    )?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).contains("(lazy: 100% of contents stored"),
        "fd images on B: {}",
        text(&listed)
    );

    let status = share.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "fd serve exited with {status}");
    Ok(())
}
