//! `fd pull`, `fd load`, `fd images`, `fd inspect`, `fd rmi` and `fd gc` against a real
//! registry and the real test images.
//!
//! The central check compares fd's file view of an image, path by path, with the tree that
//! `umoci unpack` makes of the same image: fd's view is read straight from the store it wrote
//! (the merged file index and the chunk files), so the comparison covers both.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fd_node::{Kind, Store, load_file_index};
use fd_tests::{
    FdEnv, FileFacts, FileKind, ImageCache, Registry, Relay, TreeManifest, diff_manifests, images,
    tree_manifest, umoci_unpack,
};
use sha2::Digest;

/// fd's file view of an image, in the shape the tree walker produces.
fn fd_view(env: &FdEnv, reference: &str) -> Result<TreeManifest> {
    let store = Store::open(env.fd_home())?;
    let img = store.find_image(reference)?;
    let index = load_file_index(&store, &img)?;
    let mut groups: BTreeMap<u32, String> = BTreeMap::new();
    for e in &index.entries {
        if e.link_group != 0 {
            groups.entry(e.link_group).or_insert_with(|| e.path_lossy());
        }
    }
    let mut out = TreeManifest::new();
    for e in &index.entries {
        let mut facts = FileFacts {
            kind: match e.kind {
                Kind::File => FileKind::File,
                Kind::Dir => FileKind::Dir,
                Kind::Symlink => FileKind::Symlink,
                Kind::Char => FileKind::Char,
                Kind::Block => FileKind::Block,
                Kind::Fifo => FileKind::Fifo,
            },
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: None,
            sha256: None,
            symlink_target: None,
            rdev: None,
            mtime: e.mtime,
            xattrs: e
                .xattrs
                .iter()
                .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.clone()))
                .collect(),
            nlink: u64::from(e.nlink),
            inode_group: groups.get(&e.link_group).cloned(),
        };
        match e.kind {
            Kind::File => {
                let mut h = sha2::Sha256::new();
                for c in &e.chunks {
                    h.update(store.read_chunk(&c.id)?);
                }
                facts.size = Some(e.size);
                facts.sha256 = Some(hex::encode(h.finalize()));
            }
            Kind::Symlink => facts.symlink_target = Some(e.target.clone()),
            Kind::Char | Kind::Block => facts.rdev = Some((e.rdev_major, e.rdev_minor)),
            _ => {}
        }
        out.insert(e.path_lossy(), facts);
    }
    Ok(out)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn file_index_key(env: &FdEnv, reference: &str) -> Result<String> {
    Ok(Store::open(env.fd_home())?
        .find_image(reference)?
        .file_index)
}

fn expect_same_tree(layout: &Path, tag: &str, env: &FdEnv, reference: &str) -> Result<()> {
    let unpack = tempfile::tempdir()?;
    let rootfs = umoci_unpack(layout, tag, &unpack.path().join("bundle"))?;
    let expected = tree_manifest(&rootfs)?;
    let actual = fd_view(env, reference)?;
    let diffs = diff_manifests(&expected, &actual);
    ensure!(
        diffs.is_empty(),
        "{} differences, first ones:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

#[test]
fn pull_debian_python_matches_umoci_unpack() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let env = FdEnv::new()?;
    let reference = format!("{}/debian-python:bookworm", registry.addr());

    let out = env.run(["pull", &reference])?;
    ensure!(
        stderr(&out).contains(&format!("Pulled {reference} in")),
        "summary line missing:\n{}",
        stderr(&out)
    );
    expect_same_tree(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        &env,
        &reference,
    )?;

    // The listing and the inspection agree with the registry's manifest.
    let listed = String::from_utf8(env.run(["images"])?.stdout)?;
    let digest = fd_tests::manifest_digest(&imgs.debian_python, ImageCache::DEBIAN_TAG)?;
    ensure!(
        listed.contains(&reference) && listed.contains(&digest[7..19]),
        "fd images:\n{listed}"
    );
    let inspect: serde_json::Value =
        serde_json::from_slice(&env.run(["inspect", &reference])?.stdout)?;
    ensure!(
        inspect["digest"] == digest.as_str(),
        "inspect digest: {}",
        inspect["digest"]
    );
    ensure!(
        inspect["layers"].as_array().map(Vec::len) == Some(3),
        "inspect layers: {}",
        inspect["layers"]
    );
    ensure!(
        inspect["chunks"]["distinct_chunks"].as_u64().unwrap_or(0) > 100,
        "chunk stats: {}",
        inspect["chunks"]
    );

    // A second pull finds the image current and fetches nothing.
    let again = env.run(["pull", &reference])?;
    ensure!(
        stderr(&again).contains("Up to date"),
        "second pull:\n{}",
        stderr(&again)
    );
    Ok(())
}

#[test]
fn pull_zstd_and_uncompressed_layers_give_the_same_file_view() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(&imgs.debian_python, ImageCache::DEBIAN_TAG, "gz:bookworm")?;
    registry.push(
        &imgs.debian_python_zstd,
        ImageCache::DEBIAN_TAG,
        "zst:bookworm",
    )?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, "bb-gz:latest")?;
    registry.push(&imgs.busybox_raw, ImageCache::BUSYBOX_TAG, "bb-raw:latest")?;
    let env = FdEnv::new()?;
    let r = |name: &str| format!("{}/{name}", registry.addr());
    for name in [
        "gz:bookworm",
        "zst:bookworm",
        "bb-gz:latest",
        "bb-raw:latest",
    ] {
        env.run(["pull", &r(name)])?;
    }
    // The file index is content-addressed, so the same tree gives the same key whatever the
    // layers' compression.
    ensure!(file_index_key(&env, &r("gz:bookworm"))? == file_index_key(&env, &r("zst:bookworm"))?);
    ensure!(
        file_index_key(&env, &r("bb-gz:latest"))? == file_index_key(&env, &r("bb-raw:latest"))?
    );
    expect_same_tree(
        &imgs.busybox_raw,
        ImageCache::BUSYBOX_TAG,
        &env,
        &r("bb-raw:latest"),
    )
}

#[test]
fn load_archives_give_the_same_file_view_as_pull() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    let env = FdEnv::new()?;
    let pulled = format!("{}/busybox:latest", registry.addr());
    env.run(["pull", &pulled])?;
    let want = file_index_key(&env, &pulled)?;

    env.run([
        "load",
        &imgs.busybox_docker_tar.display().to_string(),
        "--name",
        "localhost/docker:1",
    ])?;
    env.run([
        "load",
        &imgs.busybox_oci_tar.display().to_string(),
        "--name",
        "localhost/ocitar:1",
    ])?;
    env.run([
        "load",
        &imgs.busybox.display().to_string(),
        "--name",
        "localhost/ocidir:1",
    ])?;
    for name in [
        "localhost/docker:1",
        "localhost/ocitar:1",
        "localhost/ocidir:1",
    ] {
        ensure!(
            file_index_key(&env, name)? == want,
            "{name} differs from the pulled image"
        );
    }
    // An OCI layout keeps the registry's digest; the docker archive gets one written by fd.
    let store = Store::open(env.fd_home())?;
    ensure!(
        store.find_image("localhost/ocidir:1")?.manifest_digest
            == store.find_image(&pulled)?.manifest_digest
    );
    Ok(())
}

/// Starts `fd pull` through a slow relay and kills it with SIGKILL once it has downloaded
/// about `at_least` bytes. Returns the relay for further use.
fn kill_pull_midway(env: &FdEnv, relay: &Relay, reference: &str, at_least: u64) -> Result<()> {
    let mut child = env
        .cmd(["pull", reference])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.bytes_down() < at_least {
        if let Some(status) = child.try_wait()? {
            bail!("pull ended ({status}) before it could be killed; the relay is too fast");
        }
        ensure!(
            Instant::now() < deadline,
            "pull made no progress through the relay"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    Ok(())
}

fn listed_images(env: &FdEnv) -> Result<Vec<serde_json::Value>> {
    let out = env.run(["images", "--json"])?;
    Ok(serde_json::from_slice::<Vec<serde_json::Value>>(
        &out.stdout,
    )?)
}

#[test]
fn pull_killed_midway_resumes_fetching_only_what_is_missing() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let relay = Relay::start(&registry.addr(), Some(8 << 20))?;
    let env = FdEnv::new()?;
    let reference = format!("{}/debian-python:bookworm", relay.addr());

    kill_pull_midway(&env, &relay, &reference, 60 << 20)?;
    ensure!(
        listed_images(&env)?.is_empty(),
        "a killed pull left an image listed"
    );
    let before = relay.bytes_down();

    relay.set_rate(None);
    env.run(["pull", &reference])?;
    let second = relay.bytes_down() - before;
    let total: u64 = fd_tests::manifest(&imgs.debian_python, ImageCache::DEBIAN_TAG)?["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum();
    // The second pull fetched only what the first had not: at least the 60 MiB already
    // fetched stay out of it (headers and manifests are small).
    ensure!(
        second + (50 << 20) < total,
        "second pull fetched {second} of {total} bytes"
    );
    expect_same_tree(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        &env,
        &reference,
    )
}

#[test]
fn gc_removes_what_a_killed_pull_left() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let relay = Relay::start(&registry.addr(), Some(8 << 20))?;
    let env = FdEnv::new()?;
    let reference = format!("{}/debian-python:bookworm", relay.addr());
    kill_pull_midway(&env, &relay, &reference, 60 << 20)?;

    let out = env.run(["gc"])?;
    let err = stderr(&out);
    ensure!(
        err.contains("Freed") && !err.contains("Freed 0 B"),
        "gc output: {err}"
    );
    let home = env.fd_home();
    for dir in ["chunks", "tmp", "downloads"] {
        let left = walk_files(&home.join(dir))?;
        ensure!(
            left.is_empty(),
            "{dir} still holds {} files after gc",
            left.len()
        );
    }
    Ok(())
}

#[test]
fn parallel_pulls_both_succeed_and_fetch_each_blob_once() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let relay = Relay::start(&registry.addr(), Some(40 << 20))?;
    let env = FdEnv::new()?;
    let reference = format!("{}/debian-python:bookworm", relay.addr());
    let a = env
        .cmd(["pull", &reference])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let b = env
        .cmd(["pull", &reference])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    for child in [a, b] {
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "a parallel pull failed:\n{}",
            stderr(&out)
        );
    }
    let manifest = fd_tests::manifest(&imgs.debian_python, ImageCache::DEBIAN_TAG)?;
    for layer in manifest["layers"].as_array().context("layers")? {
        let digest = layer["digest"].as_str().context("digest")?;
        let gets = relay.blob_gets(digest);
        ensure!(
            gets == 1,
            "layer {digest} was fetched {gets} times:\n{:#?}",
            relay.requests()
        );
    }
    expect_same_tree(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        &env,
        &reference,
    )
}

#[test]
fn rmi_and_gc_free_only_what_no_image_needs() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    let env = FdEnv::new()?;
    let debian = format!("{}/debian-python:bookworm", registry.addr());
    let busybox = format!("{}/busybox:latest", registry.addr());
    env.run(["pull", &debian])?;
    env.run(["pull", &busybox])?;

    env.run(["rmi", &debian])?;
    let out = env.run(["gc"])?;
    ensure!(
        !stderr(&out).contains("Freed 0 B"),
        "gc freed nothing after rmi: {}",
        stderr(&out)
    );
    expect_same_tree(&imgs.busybox, ImageCache::BUSYBOX_TAG, &env, &busybox)?;

    env.run(["rmi", &busybox])?;
    env.run(["gc"])?;
    ensure!(
        walk_files(&env.fd_home().join("chunks"))?.is_empty(),
        "chunks left after removing every image"
    );
    ensure!(listed_images(&env)?.is_empty());
    Ok(())
}

#[test]
fn pull_errors_name_the_problem() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    let env = FdEnv::new()?;

    let missing = format!("{}/busybox:nope", registry.addr());
    let out = env.run_fail(["pull", &missing])?;
    ensure!(
        out.status.code() == Some(1) && stderr(&out).contains("busybox:nope"),
        "{}",
        stderr(&out)
    );

    let out = env.run_fail(["pull", "Not A Reference!"])?;
    ensure!(
        stderr(&out).contains("Not A Reference!"),
        "{}",
        stderr(&out)
    );

    // A malformed option is named in the error.
    let out = env.run_fail([
        "pull",
        "--platform",
        "linux",
        &format!("{}/busybox:latest", registry.addr()),
    ])?;
    ensure!(stderr(&out).contains("--platform"), "{}", stderr(&out));

    let out = env.run_fail(["inspect", "nosuch:image"])?;
    ensure!(stderr(&out).contains("nosuch"), "{}", stderr(&out));

    let out = env.cmd(["pull"]).output()?;
    ensure!(
        out.status.code() == Some(2),
        "usage errors exit with 2, got {:?}",
        out.status.code()
    );
    ensure!(listed_images(&env)?.is_empty());
    Ok(())
}

#[test]
fn platform_and_rmi_edge_cases_are_handled() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    let env = FdEnv::new()?;
    let bb = format!("{}/busybox:latest", registry.addr());

    // Asking for another platform than a single-platform image has is an error, not a
    // silent pull of the wrong binaries; a malformed platform is a usage error.
    let out = env.run_fail(["pull", "--platform", "linux/arm64", &bb])?;
    ensure!(
        stderr(&out).contains("single-platform image"),
        "{}",
        stderr(&out)
    );
    let out = env.cmd(["pull", "--platform", "nonsense", &bb]).output()?;
    ensure!(
        out.status.code() == Some(2),
        "bad --platform exit code {:?}",
        out.status.code()
    );
    ensure!(listed_images(&env)?.is_empty());

    // Two tags of one digest: removing by digest is refused, by name works, and every
    // argument of rmi is tried even when one is unknown.
    env.run(["pull", &bb])?;
    env.run([
        "load",
        &imgs.busybox.display().to_string(),
        "--name",
        "localhost/second:1",
    ])?;
    let digest = fd_tests::manifest_digest(&imgs.busybox, ImageCache::BUSYBOX_TAG)?;
    let out = env.run_fail(["rmi", &digest[7..19]])?;
    ensure!(
        stderr(&out).contains("remove them by name"),
        "{}",
        stderr(&out)
    );
    let out = env.run_fail(["rmi", &bb, "localhost/nope:1", "localhost/second:1"])?;
    ensure!(stderr(&out).contains("nope"), "{}", stderr(&out));
    ensure!(
        listed_images(&env)?.is_empty(),
        "rmi stopped at the unknown name"
    );
    Ok(())
}

#[test]
fn pull_from_a_registry_that_never_answers_ends_with_an_error() -> Result<()> {
    // A listener that accepts connections and never says a word: fd must give up on its own
    // (bounded timeouts and retries) instead of hanging.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let env = FdEnv::new()?;
    let mut child = env
        .cmd(["pull", &format!("{addr}/silent:latest")])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut held = Vec::new();
    listener.set_nonblocking(true)?;
    let status = loop {
        if let Ok((conn, _)) = listener.accept() {
            held.push(conn);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!("fd pull was still waiting on a silent registry after 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output()?;
    ensure!(status.code() == Some(1), "exit status {status}");
    ensure!(
        stderr(&out).contains(&addr.to_string()),
        "error does not name the registry:\n{}",
        stderr(&out)
    );
    Ok(())
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() -> Result<()> {
    let imgs = images()?;
    let env = FdEnv::new()?;
    env.run(["load", &imgs.busybox.display().to_string()])?;
    // Both streams go to a pipe whose reader has gone: no panic, no error message.
    let mut child = env
        .cmd(["inspect", "--files", "localhost/busybox:latest"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = child.wait()?;
    ensure!(
        status.success(),
        "fd ended with {status} writing to a closed pipe"
    );
    Ok(())
}

fn walk_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in fs_err::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk_files(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}
