//! The state of one run, `$FD_HOME/runs/<id>/`, and the cleanup of runs whose `fd` is gone.
//!
//! ```text
//! runs/<id>/owner        pid=<fd run pid> start=<its start time>  (written first)
//! runs/<id>/helper       pid and start time of the `fd __container` helper
//! runs/<id>/lower/       the image's lazyfs mount (read-only)
//! runs/<id>/upper/ work/ the overlay's private writable layer
//! runs/<id>/rootfs/      the overlay: the container's root
//! runs/<id>/etc/         generated resolv.conf, hosts, hostname
//! runs/<id>/config.json  the OCI runtime spec (the directory is the bundle)
//! runs/<id>/state/       libcontainer's state directory
//! ```
//!
//! The container's cgroup is `/fd/<id>` in every hierarchy. A run whose `fd run` process is
//! gone (killed with SIGKILL, say) is stale: [`clean_stale_runs`] kills what is left in its
//! cgroup and its helper, detaches its mounts, removes its cgroups and its directory.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Result, RuntimeError, io_err, runs_dir, signals};

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Parent of every run's cgroup, in each hierarchy.
pub const CGROUP_PARENT: &str = "fd";
/// How long cleanup waits for killed processes to leave their cgroup.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// A run directory without an owner record this old is a leftover of a crash at creation.
const OWNERLESS_AGE: Duration = Duration::from_secs(60);

/// One run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub id: String,
    pub dir: PathBuf,
}

/// A process named by pid and start time, so a reused pid is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessId {
    pid: i32,
    start: u64,
}

impl ProcessId {
    fn current() -> Option<ProcessId> {
        let pid = std::process::id() as i32;
        Some(ProcessId {
            pid,
            start: fd_lazyfs::process_start_time(pid)?,
        })
    }

    fn of(pid: i32) -> Option<ProcessId> {
        Some(ProcessId {
            pid,
            start: fd_lazyfs::process_start_time(pid)?,
        })
    }

    fn is_alive(&self) -> bool {
        fd_lazyfs::process_start_time(self.pid) == Some(self.start)
    }

    fn text(&self) -> String {
        format!("pid={}\nstart={}\n", self.pid, self.start)
    }

    fn read(file: &Path) -> Option<ProcessId> {
        let text = std::fs::read_to_string(file).ok()?;
        let (mut pid, mut start) = (None, None);
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("pid=") {
                pid = v.parse().ok();
            } else if let Some(v) = line.strip_prefix("start=") {
                start = v.parse().ok();
            }
        }
        Some(ProcessId {
            pid: pid?,
            start: start?,
        })
    }
}

/// A new random run id: 12 hex digits.
fn new_id() -> Result<String> {
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl RunDir {
    /// Creates a new run directory with its owner record (this process).
    pub fn create(store_root: &Path) -> Result<RunDir> {
        let runs = runs_dir(store_root);
        std::fs::create_dir_all(&runs).map_err(io_err(format!("creating {}", runs.display())))?;
        let id = new_id()?;
        let dir = runs.join(&id);
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&dir)
            .map_err(io_err(format!("creating {}", dir.display())))?;
        let me = ProcessId::current().ok_or_else(|| RuntimeError::Io {
            what: "reading this process's start time".into(),
            error: std::io::Error::other("no /proc/self/stat"),
        })?;
        let run = RunDir { id, dir };
        write_atomic(&run.dir.join("owner"), me.text().as_bytes())?;
        for sub in ["lower", "upper", "work", "rootfs", "etc", "state"] {
            let p = run.dir.join(sub);
            std::fs::create_dir(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        Ok(run)
    }

    pub fn lower(&self) -> PathBuf {
        self.dir.join("lower")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn etc(&self) -> PathBuf {
        self.dir.join("etc")
    }
    /// The container's name for libcontainer.
    pub fn container_id(&self) -> String {
        format!("fd-{}", self.id)
    }
    /// `linux.cgroupsPath` of the run.
    pub fn cgroups_path(&self) -> PathBuf {
        Path::new("/").join(CGROUP_PARENT).join(&self.id)
    }

    /// Records the helper process, so a cleanup after a crash can stop it.
    pub fn record_helper(&self, pid: i32) -> Result<()> {
        match ProcessId::of(pid) {
            Some(p) => write_atomic(&self.dir.join("helper"), p.text().as_bytes()),
            None => Ok(()),
        }
    }

    /// Mounts the overlay: a private writable layer over the lazyfs mount at `lower()`.
    pub fn mount_overlay(&self) -> Result<()> {
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower().display(),
            self.dir.join("upper").display(),
            self.dir.join("work").display()
        );
        sys_mount("overlay", &self.rootfs(), "overlay", 0, &opts).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ENODEV) => RuntimeError::Kernel {
                    feature: "overlayfs",
                    error: e,
                    how: "load it with `modprobe overlay` (kernel option CONFIG_OVERLAY_FS)",
                },
                _ => RuntimeError::Io {
                    what: format!("mounting the overlay at {}", self.rootfs().display()),
                    error: e,
                },
            }
        })
    }

    /// Writes `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` for the container. With
    /// the host's network the host's hosts and resolv.conf are the right ones; a container
    /// without network gets only loopback names.
    pub fn write_etc(&self, hostname: &str, host_net: bool) -> Result<(PathBuf, PathBuf, PathBuf)> {
        let etc = self.etc();
        let hostname_file = etc.join("hostname");
        write_atomic(&hostname_file, format!("{hostname}\n").as_bytes())?;
        let mut hosts =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        if host_net && let Ok(host) = std::fs::read_to_string("/etc/hosts") {
            hosts = host;
            if !hosts.ends_with('\n') {
                hosts.push('\n');
            }
        }
        hosts.push_str(&format!("127.0.1.1\t{hostname}\n"));
        let hosts_file = etc.join("hosts");
        write_atomic(&hosts_file, hosts.as_bytes())?;
        let resolv = if host_net {
            std::fs::read("/etc/resolv.conf").unwrap_or_default()
        } else {
            Vec::new()
        };
        let resolv_file = etc.join("resolv.conf");
        write_atomic(&resolv_file, &resolv)?;
        Ok((resolv_file, hosts_file, hostname_file))
    }

    /// Removes everything of the run: what is left in its cgroup and its helper are killed,
    /// its mounts detached, its cgroups and directory removed. The lazyfs mount should have
    /// been unmounted by its owner first (it is detached here only as a last resort).
    pub fn remove(&self) -> Result<()> {
        clean_run(&self.dir, &self.id, true)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("writing {}", path.display())))
}

fn cstr(bytes: &[u8]) -> std::io::Result<CString> {
    CString::new(bytes).map_err(std::io::Error::other)
}

fn sys_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let (s, t) = (
        cstr(source.as_bytes())?,
        cstr(target.as_os_str().as_bytes())?,
    );
    let (f, d) = (cstr(fstype.as_bytes())?, cstr(data.as_bytes())?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes every mount of this process's mount namespace private, so that mounts made from
/// now on stay in it.
pub(crate) fn make_mounts_private() -> Result<()> {
    sys_mount(
        "none",
        Path::new("/"),
        "",
        libc::MS_REC | libc::MS_PRIVATE,
        "",
    )
    .map_err(io_err("making the mounts private"))
}

/// Binds `source` over `target`.
pub(crate) fn bind_mount(source: &Path, target: &Path) -> std::io::Result<()> {
    let source = source
        .to_str()
        .ok_or_else(|| std::io::Error::other("a bind source that is not UTF-8"))?;
    sys_mount(source, target, "", libc::MS_BIND | libc::MS_REC, "")
}

/// True when `path` is the root of a cgroup v2 file system.
pub(crate) fn is_cgroup2(path: &str) -> bool {
    let Ok(c) = cstr(path.as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into `st`; `c` is a valid path for the call.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::CGROUP2_SUPER_MAGIC
    }
}

/// Mounts an overlay of `dir`'s `lower/`, `upper/` and `work/` at its `rootfs/`.
pub(crate) fn mount_overlay_in(dir: &Path) -> Result<()> {
    RunDir {
        id: String::new(),
        dir: dir.to_path_buf(),
    }
    .mount_overlay()
}

/// Unmounts the overlay of the run directory `dir` and empties its `upper/` and `work/`;
/// problems are logged (the caller removes the directory after).
pub(crate) fn remove_writable_layer(dir: &Path) {
    let rootfs = dir.join("rootfs");
    if let Err(e) = unmount_overlay(&rootfs) {
        tracing::warn!(error = %e, "unmounting the overlay");
    }
    for sub in ["upper", "work"] {
        let path = dir.join(sub);
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing the writable layer");
        }
    }
}

fn detach(path: &Path) -> std::io::Result<()> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    // Without root only the setuid fusermount3 may remove a user's FUSE mount (the image
    // mount of a rootless run).
    if error.raw_os_error() == Some(libc::EPERM) && crate::rootless::is_rootless() {
        let status = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        if status.success() {
            return Ok(());
        }
    }
    Err(error)
}

/// Unmounts the overlay at `path` (the container's root); a plain unmount first, a detach
/// when busy. Not mounted is fine.
pub fn unmount_overlay(path: &Path) -> Result<()> {
    if !mount_points_under(path).iter().any(|p| p == path) {
        return Ok(());
    }
    detach(path).map_err(io_err(format!("unmounting {}", path.display())))
}

/// Mount points at or below `dir` in this namespace, deepest (latest) first.
fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape(p))))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.reverse();
    out
}

/// Mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 3 < field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (field[i + 1] - b'0') * 64 + (field[i + 2] - b'0') * 8 + (field[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// The run's cgroup directories, one per hierarchy that has one.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for h in dir.flatten() {
        let p = h.path().join(CGROUP_PARENT).join(id);
        if p.is_dir() {
            out.push(p);
        }
    }
    out
}

fn cgroup_pids(dirs: &[PathBuf]) -> Vec<i32> {
    let mut pids = Vec::new();
    for d in dirs {
        if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The cleanup shared by a normal end and a stale run.
fn clean_run(dir: &Path, id: &str, own: bool) -> Result<()> {
    if let Some(helper) = ProcessId::read(&dir.join("helper"))
        && helper.is_alive()
        && !own
    {
        signals::send(helper.pid, libc::SIGKILL);
    }
    let cgroups = cgroup_dirs(id);
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = cgroup_pids(&cgroups);
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!(run = id, ?pids, "processes of the run did not die");
            break;
        }
        for pid in pids {
            signals::send(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for point in mount_points_under(dir) {
        if let Err(e) = detach(&point) {
            tracing::warn!(mountpoint = %point.display(), error = %e, "cannot detach");
        }
    }
    for cg in &cgroups {
        // Emptied just above; the kernel may take a moment to let the directory go.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match std::fs::remove_dir(cg) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() > deadline => {
                    tracing::warn!(cgroup = %cg.display(), error = %e, "cannot remove cgroup");
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    if !mount_points_under(dir).is_empty() {
        return Err(RuntimeError::Io {
            what: format!("removing {}", dir.display()),
            error: std::io::Error::other("something is still mounted in it"),
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RuntimeError::Io {
            what: format!("removing {}", dir.display()),
            error: e,
        }),
    }
}

/// Cleans every run of the store whose `fd run` process is gone. Returns how many.
pub fn clean_stale_runs(store_root: &Path) -> Result<usize> {
    let runs = runs_dir(store_root);
    let Ok(entries) = std::fs::read_dir(&runs) else {
        return Ok(0);
    };
    let mut cleaned = 0;
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if !dir.is_dir() {
            continue;
        }
        let stale = match ProcessId::read(&dir.join("owner")) {
            Some(owner) => !owner.is_alive(),
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > OWNERLESS_AGE),
        };
        if !stale {
            continue;
        }
        match clean_run(&dir, &id, false) {
            Ok(()) => {
                tracing::info!(run = id, "cleaned a run whose fd process is gone");
                cleaned += 1;
            }
            Err(e) => tracing::warn!(run = id, error = %e, "cannot clean a stale run"),
        }
    }
    Ok(cleaned)
}

/// [`clean_stale_runs`] for the default store. Never fails: problems are logged.
pub fn clean_stale_runs_default() -> usize {
    let root = fd_node::paths::fd_home();
    if !runs_dir(&root).is_dir() {
        return 0;
    }
    clean_stale_runs(&root).unwrap_or_else(|e| {
        tracing::debug!(error = %e, "cleaning stale runs failed");
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_a_dead_process_is_removed_and_a_live_one_kept() -> Result<()> {
        let store = tempfile::tempdir().map_err(io_err("tempdir"))?;
        let live = RunDir::create(store.path())?;
        let dead = RunDir::create(store.path())?;
        // pid 0 never names a process.
        write_atomic(&dead.dir.join("owner"), b"pid=0\nstart=1\n")?;
        assert_eq!(clean_stale_runs(store.path())?, 1);
        assert!(live.dir.is_dir());
        assert!(!dead.dir.exists());
        live.remove()?;
        assert!(!live.dir.exists());
        Ok(())
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape(br"/a\040b"), b"/a b".to_vec());
    }
}
