//! Smoke test of the test harness itself (images, registry, reference unpack), so a broken
//! harness shows up as one clear failure instead of as failures of every fd test.

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use fd_tests::{
    FdEnv, FileKind, ImageCache, Registry, debian_paths, images, tree_manifest, umoci_unpack,
};

#[test]
fn harness_registry_serves_pushed_images() -> Result<()> {
    let images = images()?;
    let mut registry = Registry::start()?;
    let addr = registry.addr();

    registry.push(&images.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    registry.push(
        &images.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    // The other compressions must reach the registry unchanged too (push preserves digests,
    // so skopeo would fail rather than recompress them).
    registry.push(
        &images.busybox_raw,
        ImageCache::BUSYBOX_TAG,
        "busybox-raw:latest",
    )?;
    registry.push(
        &images.debian_python_zstd,
        ImageCache::DEBIAN_TAG,
        "debian-python-zstd:bookworm",
    )?;

    // skopeo reads the image back from the registry independently of the push.
    let inspect = registry
        .skopeo()
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{addr}/debian-python:bookworm"))
        .output()
        .context("running skopeo inspect")?;
    ensure!(
        inspect.status.success(),
        "skopeo inspect failed: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let inspected: serde_json::Value = serde_json::from_slice(&inspect.stdout)?;
    let layers = inspected["Layers"]
        .as_array()
        .context("skopeo inspect printed no Layers")?;
    ensure!(
        layers.len() == 3,
        "debian-python has {} layers",
        layers.len()
    );
    let pushed = fd_tests::manifest_digest(&images.debian_python, ImageCache::DEBIAN_TAG)?;
    ensure!(
        inspected["Digest"].as_str() == Some(pushed.as_str()),
        "the registry serves digest {} but the layout has {pushed}",
        inspected["Digest"]
    );

    registry.check_range_support()?;

    // An outage: the registry goes away and comes back with the same content.
    registry.stop();
    ensure!(
        registry.get("/v2/").is_err(),
        "the registry still answers after stop()"
    );
    registry.restart()?;
    let (status, _) = registry.get("/v2/debian-python/tags/list")?;
    ensure!(status == 200, "tags/list after restart answered {status}");
    registry.check_range_support()?;

    // The reference unpack has every hard case the image was built to carry.
    let unpack_dir = tempfile::tempdir()?;
    let rootfs = umoci_unpack(
        &images.debian_python,
        ImageCache::DEBIAN_TAG,
        &unpack_dir.path().join("bundle"),
    )?;
    let tree = tree_manifest(&rootfs)?;
    let get = |path: &str| tree.get(path).with_context(|| format!("{path} is missing"));

    let big = get(debian_paths::BIG_FILE)?;
    ensure!(
        big.size == Some(debian_paths::BIG_FILE_SIZE),
        "big file: {big:?}"
    );

    let caps = get(debian_paths::CAPABILITY_FILE)?;
    ensure!(
        caps.xattrs.contains_key("security.capability"),
        "no security.capability: {caps:?}"
    );
    let user = get(debian_paths::USER_XATTR_FILE)?;
    ensure!(
        user.xattrs.get("user.fdtest.binary").map(Vec::as_slice)
            == Some(debian_paths::USER_XATTR_BINARY),
        "binary user xattr: {:?}",
        user.xattrs
    );

    let groups: BTreeSet<_> = debian_paths::HARDLINKS
        .iter()
        .map(|p| get(p).map(|f| (f.nlink, f.inode_group.clone())))
        .collect::<Result<_>>()?;
    let expected_group = Some(debian_paths::HARDLINKS[0].to_owned());
    ensure!(
        groups == BTreeSet::from([(3, expected_group)]),
        "hardlink group: {groups:?}"
    );

    ensure!(get(debian_paths::FIFO)?.kind == FileKind::Fifo, "fifo");
    let dev = get(debian_paths::CHAR_DEVICE)?;
    ensure!(
        dev.kind == FileKind::Char && dev.rdev == Some((1, 3)),
        "char device: {dev:?}"
    );
    ensure!(tree.keys().any(|p| p.len() > 100), "no path over 100 bytes");
    ensure!(tree.keys().any(|p| p.len() > 255), "no path over 255 bytes");
    ensure!(
        get(debian_paths::OLD_FILE)?.mtime == debian_paths::OLD_FILE_MTIME,
        "old mtime"
    );
    ensure!(get(debian_paths::SETUID_FILE)?.mode == 0o4755, "setuid");
    ensure!(get(debian_paths::STICKY_DIR)?.mode == 0o1777, "sticky");
    for gone in debian_paths::WHITED_OUT {
        ensure!(!tree.contains_key(gone), "{gone} should be whited out");
    }
    let opaque: Vec<_> = tree
        .keys()
        .filter(|p| p.starts_with(&format!("{}/", debian_paths::OPAQUE_DIR)))
        .collect();
    ensure!(
        opaque == [&format!("{}/FDTEST", debian_paths::OPAQUE_DIR)],
        "opaque dir holds {opaque:?}"
    );
    eprintln!(
        "[harness] registry {addr}: {} paths in debian-python, all hard cases present",
        tree.len()
    );
    Ok(())
}

#[test]
fn harness_registry_with_htpasswd_rejects_anonymous() -> Result<()> {
    let images = images()?;
    let registry = Registry::start_with_htpasswd("fd-user", "fd-pass")?;
    registry.push(&images.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    let (status, _) = registry.get("/v2/busybox/tags/list")?;
    ensure!(status == 200, "authenticated tags/list answered {status}");

    let anonymous = std::process::Command::new("curl")
        .args(["--silent", "--noproxy", "*", "--max-time", "10"])
        .args(["--output", "/dev/null", "--write-out", "%{http_code}"])
        .arg(format!("{}/v2/", registry.url()))
        .output()
        .context("running curl")?;
    let code = String::from_utf8_lossy(&anonymous.stdout);
    ensure!(code == "401", "anonymous GET /v2/ answered {code}");
    Ok(())
}

#[test]
fn harness_fd_env_is_private() -> Result<()> {
    // `env` stands in for fd: it prints the environment fd would get.
    let env = FdEnv::with_bin("/usr/bin/env".into())?;
    let out = env.run(std::iter::empty::<&str>())?;
    let vars: std::collections::BTreeMap<String, String> = String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let inside = |key: &str| {
        vars.get(key)
            .is_some_and(|v| std::path::Path::new(v).starts_with(env.dir()))
    };
    for key in [
        "FD_HOME",
        "HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_CACHE_HOME",
        "XDG_STATE_HOME",
        "XDG_RUNTIME_DIR",
        "TMPDIR",
    ] {
        ensure!(inside(key), "{key} is not inside the environment: {vars:?}");
    }
    ensure!(
        vars.get("NO_COLOR").map(String::as_str) == Some("1"),
        "NO_COLOR"
    );
    ensure!(env.fd_home().is_dir(), "FD_HOME was not created");

    let failing = FdEnv::with_bin("/bin/false".into())?;
    failing.run_fail(["ignored"])?;
    ensure!(
        failing.run(["ignored"]).is_err(),
        "run accepted a failing command"
    );
    ensure!(
        env.run_fail(["true"]).is_err(),
        "run_fail accepted a successful command"
    );
    let err = format!("{:#}", failing.run(["ignored"]).err().context("no error")?);
    ensure!(
        err.contains("--- stderr ---"),
        "error lacks the output: {err}"
    );
    Ok(())
}
