//! `fd mount` and `fd umount`: real FUSE mounts of the debian-python image.
//!
//! - the mounted tree is the tree `umoci unpack` writes, path by path and field by field;
//! - a store that holds only the image's metadata fetches from another store exactly the
//!   chunks of the files read, and its prefetch profile brings back exactly those;
//! - a chunk no source can give is EIO after a bounded wait, with a warning naming it;
//! - `fd umount` works with a file still open; a mount whose process was killed is cleaned
//!   by the next fd command.
//!
//! Every mount is owned by a [`Mount`] guard that lazily unmounts and kills its process by PID
//! when dropped, so a failing test leaves nothing mounted.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fd_tests::{
    FdEnv, FileKind, ImageCache, debian_paths, diff_manifests, images, tree_manifest, umoci_unpack,
};

/// How long a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `fd mount`; unmounts and stops it when dropped.
struct Mount {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl Mount {
    /// Starts `fd mount REF DIR ARGS...` in `env` (with extra environment variables) and
    /// waits until the directory is an fd mount.
    fn start(
        env: &FdEnv,
        reference: &str,
        name: &str,
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<Mount> {
        let dir = env.dir().join(name);
        fs_err::create_dir_all(&dir)?;
        let log = env.dir().join(format!("{name}.log"));
        let out = File::create(&log)?;
        let mut cmd = env.cmd(["mount", reference]);
        cmd.arg(&dir)
            .args(args)
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(out);
        let child = cmd.spawn().context("starting fd mount")?;
        let mut mount = Mount {
            child: Some(child),
            dir,
            log,
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_fd_mount(&mount.dir)? {
            if let Some(child) = mount.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                mount.child = None;
                bail!(
                    "fd mount exited with {status} before mounting:\n{}",
                    mount.log()?
                );
            }
            ensure!(
                Instant::now() < deadline,
                "no mount at {} after {MOUNT_TIMEOUT:?}:\n{}",
                mount.dir.display(),
                mount.log()?
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(mount)
    }

    fn path(&self, inner: &str) -> PathBuf {
        self.dir.join(inner.trim_start_matches('/'))
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log(&self) -> Result<String> {
        Ok(fs_err::read_to_string(&self.log)?)
    }

    /// Waits for the fd mount process to exit (after `fd umount` or a signal).
    fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self
            .child
            .as_mut()
            .context("the mount process was already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "fd mount still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the mount with SIGTERM, as Ctrl-C would, and waits for a clean exit.
    fn stop(&mut self) -> Result<String> {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGTERM);
        }
        let status = self.wait_exit(Duration::from_secs(20))?;
        let log = self.log()?;
        ensure!(status.success(), "fd mount exited with {status}:\n{log}");
        ensure!(
            !is_fd_mount(&self.dir)?,
            "still mounted after fd mount exited"
        );
        Ok(log)
    }
}

impl Drop for Mount {
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

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: `pid` is our own child, not yet reaped (the guard holds its Child), so the
        // number cannot name another process.
        unsafe { libc::kill(pid, sig) };
    }
}

/// True when an fd mount (source `fd:...`) sits at `dir` in this mount namespace.
fn is_fd_mount(dir: &Path) -> Result<bool> {
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

/// Loads the debian-python layout into `env`'s store and returns the image reference.
fn load_debian(env: &FdEnv) -> Result<String> {
    let images = images()?;
    env.run([Path::new("load"), images.debian_python.as_path()])?;
    let out = env.run(["images", "--json"])?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    list.as_array()
        .and_then(|l| l.first())
        .and_then(|i| i["reference"].as_str())
        .map(str::to_owned)
        .context("fd images lists no image after fd load")
}

/// Chunk ids (hex) of every path of the image, from `fd inspect --files`.
fn chunks_by_path(env: &FdEnv, reference: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let out = env.run(["inspect", "--files", reference])?;
    let mut map = BTreeMap::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let path = v["path"].as_str().context("no path")?.to_owned();
        let chunks = v["chunks"]
            .as_array()
            .context("no chunks")?
            .iter()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        map.insert(path, chunks);
    }
    Ok(map)
}

/// Chunk files in a store.
fn stored_chunks(fd_home: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let root = fd_home.join("chunks");
    if !root.exists() {
        return Ok(out);
    }
    for shard in fs_err::read_dir(&root)? {
        for chunk in fs_err::read_dir(shard?.path())? {
            out.insert(chunk?.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    Ok(fs_err::read(path)?)
}

fn xattr_call(path: &Path, name: &str, size: usize) -> (isize, Option<i32>, Vec<u8>) {
    let (Ok(p), Ok(n)) = (
        CString::new(path.as_os_str().as_bytes()),
        CString::new(name),
    ) else {
        return (-1, Some(libc::EINVAL), Vec::new());
    };
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr()
    };
    // SAFETY: both strings are NUL-terminated; `ptr` is null with size 0 or points to `size`
    // writable bytes.
    let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), ptr.cast(), size) };
    let errno = (rc < 0)
        .then(|| std::io::Error::last_os_error().raw_os_error())
        .flatten();
    buf.truncate(rc.max(0) as usize);
    (rc, errno, buf)
}

#[test]
fn mount_matches_umoci_unpack() -> Result<()> {
    let images = images()?;
    let env = FdEnv::new()?;
    let reference = load_debian(&env)?;

    let unpack = tempfile::tempdir()?;
    let rootfs = umoci_unpack(
        &images.debian_python,
        ImageCache::DEBIAN_TAG,
        &unpack.path().join("bundle"),
    )?;
    let expected = tree_manifest(&rootfs)?;

    let mut mount = Mount::start(&env, &reference, "mnt", &["--prefetch", "none"], &[])?;
    let log = mount.log()?;
    let status = format!("({} paths, contents on demand", thousands(expected.len()));
    ensure!(log.contains(&status), "status line: {log}");

    let actual = tree_manifest(&mount.dir)?;
    let diff = diff_manifests(&expected, &actual);
    ensure!(
        diff.is_empty(),
        "{} differences, first ones:\n{}",
        diff.len(),
        diff.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );

    // What diff_manifests leaves out as disk artefacts, lazyfs still gets right: directory
    // link counts are 2 + subdirectories, and directories umoci restored from a tar header
    // (all but the root, whose time is that of the unpack) have the image's mtime.
    for (path, facts) in actual.iter().filter(|(_, f)| f.kind == FileKind::Dir) {
        let prefix = if path == "/" {
            "/".to_owned()
        } else {
            format!("{path}/")
        };
        let subdirs = actual
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter(|(p, f)| {
                f.kind == FileKind::Dir && *p != path && !p[prefix.len()..].contains('/')
            })
            .count() as u64;
        ensure!(
            facts.nlink == 2 + subdirs,
            "{path}: nlink {} with {subdirs} subdirectories",
            facts.nlink
        );
        if path != "/" {
            let want = expected[path].mtime;
            ensure!(
                facts.mtime == want,
                "{path}: directory mtime {} expected {want}",
                facts.mtime
            );
        }
    }

    // The xattr protocol: size query, exact value, ERANGE for a short buffer, ENODATA when
    // absent.
    let file = mount.path(debian_paths::USER_XATTR_FILE);
    let want = debian_paths::USER_XATTR_BINARY;
    let (size, _, _) = xattr_call(&file, "user.fdtest.binary", 0);
    ensure!(size == want.len() as isize, "size query gave {size}");
    let (rc, _, value) = xattr_call(&file, "user.fdtest.binary", 64);
    ensure!(
        rc == want.len() as isize && value == want,
        "value {value:?}"
    );
    let (rc, errno, _) = xattr_call(&file, "user.fdtest.binary", want.len() - 1);
    ensure!(
        rc < 0 && errno == Some(libc::ERANGE),
        "short buffer: {rc} {errno:?}"
    );
    let (rc, errno, _) = xattr_call(&file, "user.fdtest.absent", 64);
    ensure!(
        rc < 0 && errno == Some(libc::ENODATA),
        "absent: {rc} {errno:?}"
    );

    // Hardlinks are one inode.
    use std::os::unix::fs::MetadataExt;
    let inodes: BTreeSet<u64> = debian_paths::HARDLINKS
        .iter()
        .map(|p| fs_err::symlink_metadata(mount.path(p)).map(|m| m.ino()))
        .collect::<Result<_, _>>()?;
    ensure!(inodes.len() == 1, "hardlinks have inodes {inodes:?}");
    ensure!(
        fs_err::metadata(&mount.dir)?.ino() == 1,
        "root inode is not 1"
    );

    // statfs: sane numbers for a read-only image.
    let c = CString::new(mount.dir.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid path; `st` is written by statvfs before it is read.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    ensure!(
        unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0,
        "statvfs failed"
    );
    ensure!(
        st.f_files as usize == expected.len(),
        "f_files {} for {} paths",
        st.f_files,
        expected.len()
    );
    ensure!(
        st.f_bsize == 4096 && st.f_bfree == 0 && st.f_namemax == 255,
        "statvfs {:?}",
        (st.f_bsize, st.f_bfree, st.f_namemax)
    );
    ensure!(st.f_flag & libc::ST_RDONLY != 0, "not read-only");
    ensure!(st.f_blocks > 0, "no blocks");

    // Writes are refused.
    let err = fs_err::write(mount.path("/etc/fd-write-test"), b"x")
        .err()
        .context("a write succeeded")?;
    ensure!(err.to_string().contains("Read-only"), "write error: {err}");

    let log = mount.stop()?;
    ensure!(log.contains("Unmounted"), "{log}");
    Ok(())
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn lazy_mount_fetches_only_what_is_read_and_profile_brings_it_back() -> Result<()> {
    let a = FdEnv::new()?;
    let reference = load_debian(&a)?;
    let by_path = chunks_by_path(&a, &reference)?;
    let all_chunks: BTreeSet<&String> = by_path.values().flatten().collect();

    let b = FdEnv::new()?;
    let a_home = a.fd_home();
    let a_home = a_home.to_str().context("temp path is not UTF-8")?;
    let mut mount = Mount::start(
        &b,
        &reference,
        "mnt",
        &["--from", a_home, "--prefetch", "none"],
        &[],
    )?;
    // Only metadata came over: the image row, manifest, config and file index.
    let metadata_chunks = stored_chunks(&b.fd_home())?;
    ensure!(
        metadata_chunks.iter().all(|c| !all_chunks.contains(c)),
        "file chunks were copied before any read"
    );

    // Regular files only (a symlink would read its target, whose chunks are listed there).
    let read = [
        "/usr/lib/os-release",
        "/etc/debian_version",
        "/opt/fdtest/data/hello.txt",
        "/usr/bin/python3.11",
    ];
    let mut expected_new = BTreeSet::new();
    for path in read {
        let bytes = read_all(&mount.path(path))?;
        ensure!(!bytes.is_empty(), "{path} read empty");
        expected_new.extend(
            by_path
                .get(path)
                .with_context(|| format!("{path} not in the index"))?
                .iter()
                .cloned(),
        );
    }
    // The same bytes as the full store serves.
    let a_mount = Mount::start(&a, &reference, "mnt", &["--prefetch", "none"], &[])?;
    for path in read {
        ensure!(
            read_all(&mount.path(path))? == read_all(&a_mount.path(path))?,
            "{path} differs"
        );
    }
    drop(a_mount);

    let new: BTreeSet<String> = stored_chunks(&b.fd_home())?
        .difference(&metadata_chunks)
        .cloned()
        .collect();
    ensure!(
        new == expected_new,
        "fetched {} chunks, expected the {} of the files read (extra: {:?}, missing: {:?})",
        new.len(),
        expected_new.len(),
        new.difference(&expected_new).take(5).collect::<Vec<_>>(),
        expected_new.difference(&new).take(5).collect::<Vec<_>>()
    );
    ensure!(
        new.len() * 20 < all_chunks.len(),
        "{} of {} chunks fetched",
        new.len(),
        all_chunks.len()
    );

    let log = mount.stop()?;
    ensure!(log.contains(&format!("{} files read", read.len())), "{log}");
    ensure!(log.contains("profile saved"), "{log}");

    // gc drops the fetched chunks (no local layer names them) but keeps the profile; the next
    // mount's prefetch brings exactly those chunks back without any read.
    b.run(["gc"])?;
    let after_gc = stored_chunks(&b.fd_home())?;
    ensure!(
        after_gc.intersection(&expected_new).count() == 0,
        "gc kept fetched chunks"
    );
    let mut again = Mount::start(&b, &reference, "mnt", &["--from", a_home], &[])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = stored_chunks(&b.fd_home())?;
        if expected_new.is_subset(&now) {
            let extra: Vec<_> = now
                .difference(&after_gc)
                .filter(|c| !expected_new.contains(*c))
                .collect();
            ensure!(
                extra.is_empty(),
                "prefetch fetched chunks outside the profile: {extra:?}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "profile prefetch did not finish:\n{}",
            again.log()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        again.log()?.contains("prefetching its profile"),
        "{}",
        again.log()?
    );
    again.stop()?;
    Ok(())
}

#[test]
fn unavailable_chunk_is_eio_after_a_bounded_wait() -> Result<()> {
    let a = FdEnv::new()?;
    let reference = load_debian(&a)?;
    let by_path = chunks_by_path(&a, &reference)?;
    let path = debian_paths::OLD_FILE;
    let chunk = by_path
        .get(path)
        .and_then(|c| c.first())
        .context("old file has no chunk")?
        .clone();
    // The only source loses the chunk.
    fs_err::remove_file(a.fd_home().join("chunks").join(&chunk[..2]).join(&chunk))?;

    let b = FdEnv::new()?;
    let a_home = a.fd_home();
    let a_home = a_home.to_str().context("temp path is not UTF-8")?;
    let mut mount = Mount::start(
        &b,
        &reference,
        "mnt",
        &["--from", a_home, "--prefetch", "none"],
        &[("FD_FETCH_TIMEOUT_MS", "500")],
    )?;
    let started = Instant::now();
    let mut buf = Vec::new();
    let err = File::open(mount.path(path))?
        .read_to_end(&mut buf)
        .err()
        .context("read succeeded")?;
    let took = started.elapsed();
    ensure!(err.raw_os_error() == Some(libc::EIO), "read error {err}");
    ensure!(took < Duration::from_secs(10), "EIO took {took:?}");
    // Other files still read fine.
    ensure!(!read_all(&mount.path("/etc/os-release"))?.is_empty());

    let log = mount.stop()?;
    ensure!(
        log.contains(path) && log.contains(&chunk) && log.contains("does not have it"),
        "warning:\n{log}"
    );
    Ok(())
}

#[test]
fn mount_presents_owners_mapped_for_a_user_namespace() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let env = FdEnv::new()?;
    let reference = load_debian(&env)?;
    // Root inside maps to 100000 outside; 1000 ids in all, so uid 1000 is past the range.
    let maps = ["--uid-map", "0:100000:1000", "--gid-map", "0:200000:65536"];
    let mut args = vec!["--prefetch", "none"];
    args.extend(maps);
    let mut mount = Mount::start(&env, &reference, "mnt", &args, &[])?;
    let etc = fs_err::symlink_metadata(mount.path("/etc/passwd"))?;
    ensure!(
        (etc.uid(), etc.gid()) == (100_000, 200_000),
        "/etc/passwd owner {}:{}",
        etc.uid(),
        etc.gid()
    );
    let owned = fs_err::symlink_metadata(mount.path(debian_paths::OWNED_1000))?;
    ensure!(
        owned.uid() == 65534,
        "uid 1000 past the map shows as {} (want the overflow id)",
        owned.uid()
    );
    ensure!(owned.gid() == 201_000, "gid 1000 shows as {}", owned.gid());
    // Contents are unaffected.
    ensure!(read_all(&mount.path("/etc/passwd"))?.starts_with(b"root:"));
    mount.stop()?;
    Ok(())
}

#[test]
fn umount_with_an_open_file_works() -> Result<()> {
    let env = FdEnv::new()?;
    let reference = load_debian(&env)?;
    let mut mount = Mount::start(&env, &reference, "mnt", &["--prefetch", "none"], &[])?;
    let mut open = File::open(mount.path(debian_paths::BIG_FILE))?;
    let mut head = [0u8; 4096];
    open.read_exact(&mut head)?;

    let started = Instant::now();
    let out = env.run([Path::new("umount"), mount.dir.as_path()])?;
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "fd umount took {:?}",
        started.elapsed()
    );
    ensure!(
        !is_fd_mount(&mount.dir)?,
        "still in /proc/self/mounts after fd umount"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("Unmounted"),
        "{out:?}"
    );
    let status = mount.wait_exit(Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "fd mount exited with {status}:\n{}",
        mount.log()?
    );
    ensure!(mount.log()?.contains("profile saved"), "{}", mount.log()?);
    // The open file no longer reaches a server: an error, not a hang.
    // Far from the start, past what readahead put in the page cache.
    use std::io::Seek;
    open.seek(std::io::SeekFrom::Start(debian_paths::BIG_FILE_SIZE / 2))?;
    ensure!(
        open.read(&mut head).is_err(),
        "read from an unmounted file succeeded"
    );
    ensure!(
        !env.fd_home().join("mounts").read_dir()?.any(|_| true),
        "mount record left behind"
    );
    Ok(())
}

#[test]
fn killed_mount_is_cleaned_by_the_next_command() -> Result<()> {
    let env = FdEnv::new()?;
    let reference = load_debian(&env)?;
    let mut mount = Mount::start(&env, &reference, "mnt", &["--prefetch", "none"], &[])?;
    let pid = mount.pid().context("no mount process")?;
    signal(pid, libc::SIGKILL);
    let status = mount.wait_exit(Duration::from_secs(10))?;
    ensure!(!status.success(), "killed process exited with {status}");
    ensure!(
        is_fd_mount(&mount.dir)?,
        "the kernel dropped the mount by itself; nothing to clean"
    );

    env.run(["images"])?;
    ensure!(
        !is_fd_mount(&mount.dir)?,
        "stale mount still in /proc/self/mounts"
    );
    ensure!(
        !env.fd_home().join("mounts").read_dir()?.any(|_| true),
        "stale record left behind"
    );
    // The directory is usable again.
    ensure!(
        fs_err::read_dir(&mount.dir)?.next().is_none(),
        "mount dir not empty"
    );
    Ok(())
}
