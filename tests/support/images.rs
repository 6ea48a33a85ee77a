//! The test images: building them once (through `tests/images/build.sh`, under a file lock so
//! parallel test binaries do not build twice), where they are, what is inside them, and
//! unpacking them with umoci as the reference to compare fd against.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use crate::proc;

/// Where the image layouts and archives are. All layouts are OCI image layouts; pass them to
/// skopeo as `oci:LAYOUT:TAG`.
#[derive(Clone, Debug)]
pub struct ImageCache {
    /// The cache directory (`$FD_TEST_CACHE`, else `<repo>/.cache/images`).
    pub dir: PathBuf,
    /// busybox layout, tag [`ImageCache::BUSYBOX_TAG`]: one gzip layer.
    pub busybox: PathBuf,
    /// The same busybox image with an uncompressed layer.
    pub busybox_raw: PathBuf,
    /// The same busybox image as a docker-archive tar (`docker save` format, `busybox:latest`).
    pub busybox_docker_tar: PathBuf,
    /// The same busybox image as an oci-archive tar (tag `latest`).
    pub busybox_oci_tar: PathBuf,
    /// debian-python layout, tag [`ImageCache::DEBIAN_TAG`]: three gzip layers.
    pub debian_python: PathBuf,
    /// The same debian-python image with zstd layers (same config, same diff_ids).
    pub debian_python_zstd: PathBuf,
}

impl ImageCache {
    /// Tag of the busybox layouts.
    pub const BUSYBOX_TAG: &'static str = "latest";
    /// Tag of the debian-python layouts.
    pub const DEBIAN_TAG: &'static str = "bookworm";
}

/// Paths inside the debian-python image, all added by its third layer (see build.sh).
pub mod debian_paths {
    /// 64 MiB of pseudo-random bytes (SHAKE-256 of a fixed seed, so the same on every build).
    pub const BIG_FILE: &str = "/opt/fdtest/big/random-64m.bin";
    /// Size of [`BIG_FILE`].
    pub const BIG_FILE_SIZE: u64 = 64 << 20;
    /// The three names of one inode.
    pub const HARDLINKS: [&str; 3] = [
        "/opt/fdtest/data/link3",
        "/opt/fdtest/hardlinks/one/file",
        "/opt/fdtest/hardlinks/two/link",
    ];
    /// Symlink to `../data/hello.txt`.
    pub const SYMLINK_RELATIVE: &str = "/opt/fdtest/links/relative";
    /// Symlink to `/etc/os-release`.
    pub const SYMLINK_ABSOLUTE: &str = "/opt/fdtest/links/absolute";
    /// Symlink to a path that does not exist.
    pub const SYMLINK_DANGLING: &str = "/opt/fdtest/links/dangling";
    /// Symlink whose target is longer than 100 bytes.
    pub const SYMLINK_LONG_TARGET: &str = "/opt/fdtest/links/long-target";
    /// Carries a `security.capability` xattr (cap_net_raw+ep).
    pub const CAPABILITY_FILE: &str = "/opt/fdtest/xattr/netraw";
    /// Carries `user.fdtest.binary` (non-UTF-8 bytes) and `user.fdtest.text`.
    pub const USER_XATTR_FILE: &str = "/opt/fdtest/xattr/binary";
    /// Value of `user.fdtest.binary` on [`USER_XATTR_FILE`].
    pub const USER_XATTR_BINARY: &[u8] = &[0x00, 0xff, 0x80, 0xfe, 0x7f, 0xc3, 0x28, 0x41, 0x0a];
    /// A directory carrying `user.fdtest.dir`.
    pub const XATTR_DIR: &str = "/opt/fdtest/xattr";
    /// Mode 4755.
    pub const SETUID_FILE: &str = "/opt/fdtest/perm/setuid-true";
    /// Mode 2755.
    pub const SETGID_FILE: &str = "/opt/fdtest/perm/setgid-true";
    /// Mode 1777.
    pub const STICKY_DIR: &str = "/opt/fdtest/perm/sticky";
    /// Owned by 1000:1000.
    pub const OWNED_1000: &str = "/opt/fdtest/perm/owned-1000";
    /// A fifo.
    pub const FIFO: &str = "/opt/fdtest/special/fifo";
    /// A character device, 1:3 (like /dev/null).
    pub const CHAR_DEVICE: &str = "/opt/fdtest/special/null";
    /// An empty regular file.
    pub const EMPTY_FILE: &str = "/opt/fdtest/data/empty";
    /// A file with mtime 1000000000 (2001-09-09).
    pub const OLD_FILE: &str = "/opt/fdtest/data/old-2001.txt";
    /// Mtime of [`OLD_FILE`].
    pub const OLD_FILE_MTIME: i64 = 1_000_000_000;
    /// Directory holding a file name of 120 bytes and a path over 255 bytes.
    pub const LONG_DIR: &str = "/opt/fdtest/long";
    /// Made opaque in layer 3: its layer-1 contents are gone, only `FDTEST` remains.
    pub const OPAQUE_DIR: &str = "/usr/share/common-licenses";
    /// Removed by whiteouts in layer 3 (a layer-1 file, a layer-2 file, a layer-2 directory).
    pub const WHITED_OUT: [&str; 3] = [
        "/usr/share/doc/apt/copyright",
        "/usr/share/doc/libpython3.11-minimal/copyright",
        "/usr/share/doc/python3",
    ];
}

/// Builds the images if needed and returns where they are.
///
/// The build runs at most once per process; across processes a lock on `CACHE/.lock` makes
/// the others wait and then find the cache complete. build.sh itself rebuilds only when its
/// own content changed, so a warm cache costs one short script run.
pub fn images() -> Result<ImageCache> {
    static CACHE: OnceLock<std::result::Result<ImageCache, String>> = OnceLock::new();
    CACHE
        .get_or_init(|| build_images().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("FD_TEST_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => crate::repo_root().join(".cache/images"),
    }
}

fn build_images() -> Result<ImageCache> {
    let dir = cache_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Absolute, so the paths handed to tests do not depend on the working directory.
    let dir =
        fs::canonicalize(&dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let script = crate::repo_root().join("tests/images/build.sh");
    let bash = proc::require_tool("bash", "bash")?;

    let lock_path = dir.join(".lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; it stays open (and locked) until `lock` drops.
    // The descriptor is close-on-exec, so build.sh does not inherit the lock.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot lock {}", lock_path.display()));
    }

    let started = Instant::now();
    // The script's progress goes straight to the terminal: a cold build takes a minute or
    // more and silence would look like a hang.
    let mut cmd = proc::command(bash);
    cmd.arg(&script).arg(&dir);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", proc::describe(&cmd)))?;
    if !status.success() {
        bail!(
            "`{}` failed with {status}; its output is above",
            proc::describe(&cmd)
        );
    }
    eprintln!(
        "[images] ready in {} ({:.1} s)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    drop(lock);

    let cache = ImageCache {
        busybox: dir.join("busybox"),
        busybox_raw: dir.join("busybox-raw"),
        busybox_docker_tar: dir.join("busybox-docker.tar"),
        busybox_oci_tar: dir.join("busybox-oci.tar"),
        debian_python: dir.join("debian-python"),
        debian_python_zstd: dir.join("debian-python-zstd"),
        dir,
    };
    for path in [
        &cache.busybox,
        &cache.busybox_raw,
        &cache.busybox_docker_tar,
        &cache.busybox_oci_tar,
        &cache.debian_python,
        &cache.debian_python_zstd,
    ] {
        if !path.exists() {
            bail!("build.sh succeeded but {} is missing", path.display());
        }
    }
    Ok(cache)
}

/// The digest (`sha256:...`) of the manifest that `tag` names in the OCI layout `layout`.
pub fn manifest_digest(layout: &Path, tag: &str) -> Result<String> {
    let index_path = layout.join("index.json");
    let index: serde_json::Value = read_json(&index_path)?;
    let manifests = index["manifests"]
        .as_array()
        .with_context(|| format!("{} has no manifests array", index_path.display()))?;
    manifests
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
        .and_then(|m| m["digest"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("no tag {tag:?} in {}", index_path.display()))
}

/// The manifest that `tag` names in the OCI layout `layout`, parsed.
pub fn manifest(layout: &Path, tag: &str) -> Result<serde_json::Value> {
    let digest = manifest_digest(layout, tag)?;
    read_json(&blob_path(layout, &digest)?)
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf> {
    let (algo, hex) = digest
        .split_once(':')
        .with_context(|| format!("malformed digest {digest:?}"))?;
    Ok(layout.join("blobs").join(algo).join(hex))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))
}

/// Unpacks `layout:tag` with `umoci unpack` into the bundle directory `dest` (which must not
/// exist yet) and returns the root filesystem path, `dest/rootfs`.
///
/// Runs as root without `--rootless`, so ownership, device nodes and `security.*` xattrs are
/// reproduced exactly: that is what makes it a reference.
pub fn umoci_unpack(layout: &Path, tag: &str, dest: &Path) -> Result<PathBuf> {
    let umoci = proc::require_tool("umoci", "umoci")?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("umoci_unpack needs root: a non-rootless unpack restores owners and device nodes");
    }
    let layout_str = layout
        .to_str()
        .with_context(|| format!("layout path {} is not UTF-8", layout.display()))?;
    if layout_str.contains(':') {
        // umoci splits `--image` on the first colon.
        bail!("layout path {layout_str} contains ':'");
    }
    if dest.exists() {
        bail!(
            "{} already exists; umoci unpacks into a new directory",
            dest.display()
        );
    }
    proc::run_ok(
        proc::command(umoci)
            .args(["--log", "error", "unpack", "--image"])
            .arg(format!("{layout_str}:{tag}"))
            .arg(dest),
    )?;
    Ok(dest.join("rootfs"))
}
