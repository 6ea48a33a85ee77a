//! Mount records: what lets any fd process find, unmount and forget the mounts of others,
//! including those of a process that was killed.
//!
//! Every live mount has a small text file under the store:
//!
//! ```text
//! $FD_HOME/mounts/<pid>        (or <pid>.<n> for a process's second and later mounts)
//!   pid=<pid>
//!   start=<start time of the process, in clock ticks since boot>
//!   mountpoint=<absolute path, raw bytes to the end of the line>
//! ```
//!
//! The start time guards against a reused pid: a record is live only while a process with
//! that pid *and* that start time runs. The record is written before mounting and removed after
//! unmounting, so a crash at any point leaves at worst a record whose mount is gone, which
//! [`clean_stale_mounts`] forgets.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{LazyError, Result};

/// Mount source ("device") of fd's mounts in the mount table starts with this; the rest is
/// the image reference. The type is plain `fuse` when mounted directly as root and
/// `fuse.fd` through fusermount3, so the source is what identifies an fd mount.
pub(crate) const SOURCE_PREFIX: &str = "fd:";

/// How long `fd umount` waits for the mounting process to save its profile and exit.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// One mount record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRecord {
    pub pid: i32,
    /// Start time of the process (field 22 of `/proc/<pid>/stat`).
    pub start: u64,
    pub mountpoint: PathBuf,
    /// The record file itself.
    pub file: PathBuf,
}

impl MountRecord {
    /// True while the process that mounted is running (not a zombie, not a reused pid).
    pub fn is_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start)
    }
}

fn records_dir(store_root: &Path) -> PathBuf {
    store_root.join("mounts")
}

/// Writes the record of a mount this process is about to make.
pub(crate) fn write_record(store_root: &Path, mountpoint: &Path) -> Result<MountRecord> {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id() as i32;
    let start = process_start_time(pid).ok_or_else(|| LazyError::Io {
        what: "reading this process's start time from /proc".into(),
        error: std::io::Error::other("no /proc/self/stat"),
    })?;
    let dir = records_dir(store_root);
    let io = |what: String, source| LazyError::Io {
        what,
        error: source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let name = if n == 0 {
        pid.to_string()
    } else {
        format!("{pid}.{n}")
    };
    let file = dir.join(name);
    let mut text = format!("pid={pid}\nstart={start}\nmountpoint=").into_bytes();
    text.extend_from_slice(mountpoint.as_os_str().as_bytes());
    text.push(b'\n');
    let tmp = dir.join(format!(".tmp-{pid}-{n}"));
    std::fs::write(&tmp, &text).map_err(|e| io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &file).map_err(|e| io(format!("writing {}", file.display()), e))?;
    Ok(MountRecord {
        pid,
        start,
        mountpoint: mountpoint.to_path_buf(),
        file,
    })
}

/// Every readable mount record of the store. Unreadable or malformed files are skipped.
pub fn read_records(store_root: &Path) -> Vec<MountRecord> {
    let Ok(dir) = std::fs::read_dir(records_dir(store_root)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in dir.flatten() {
        let name = item.file_name();
        if name.as_bytes().starts_with(b".") {
            continue;
        }
        let file = item.path();
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        if let Some(rec) = parse_record(&bytes, file) {
            out.push(rec);
        }
    }
    out.sort_by_key(|r| r.file.clone());
    out
}

fn parse_record(bytes: &[u8], file: PathBuf) -> Option<MountRecord> {
    let (mut pid, mut start, mut mountpoint) = (None, None, None);
    for line in bytes.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"pid=") {
            pid = std::str::from_utf8(v).ok()?.parse().ok();
        } else if let Some(v) = line.strip_prefix(b"start=") {
            start = std::str::from_utf8(v).ok()?.parse().ok();
        } else if let Some(v) = line.strip_prefix(b"mountpoint=") {
            mountpoint = Some(PathBuf::from(OsStr::from_bytes(v)));
        }
    }
    Some(MountRecord {
        pid: pid?,
        start: start?,
        mountpoint: mountpoint?,
        file,
    })
}

/// Start time of a running process (clock ticks since boot), None when it does not exist or is
/// a zombie. With the pid it identifies a process even after the pid is reused.
pub fn process_start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields after it start
    // after the last ')'.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // `state` was field 3; the start time is field 22.
    fields.nth(18)?.parse().ok()
}

/// One line of the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub(crate) point: PathBuf,
    pub(crate) fstype: String,
    pub(crate) source: Vec<u8>,
}

impl MountEntry {
    /// A FUSE mount made by fd.
    pub(crate) fn is_fd(&self) -> bool {
        (self.fstype == "fuse" || self.fstype.starts_with("fuse."))
            && self.source.starts_with(SOURCE_PREFIX.as_bytes())
    }
}

/// The mounts of this mount namespace in mount order, from mountinfo.
pub(crate) fn mount_table() -> Vec<MountEntry> {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.split(|&b| b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            let point = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == b"-")?;
            let fstype = std::str::from_utf8(fields.get(sep + 1)?).ok()?.to_string();
            let source = unescape(fields.get(sep + 2)?);
            Some(MountEntry {
                point: PathBuf::from(OsStr::from_bytes(&unescape(point))),
                fstype,
                source,
            })
        })
        .collect()
}

/// Mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
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
            let v = (field[i + 1] - b'0') * 64 + (field[i + 2] - b'0') * 8 + (field[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

/// True when an fd mount sits at `path` in this namespace.
pub fn is_fd_mount(path: &Path) -> bool {
    mount_table().iter().any(|m| m.point == path && m.is_fd())
}

/// `umount2(path, flags)`.
pub(crate) fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Unmounts `path`; when it is busy (open files, a process inside), detaches it lazily
/// instead. Returns true when the unmount was lazy.
pub(crate) fn unmount_or_detach(path: &Path) -> std::io::Result<bool> {
    match umount2(path, 0) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            umount2(path, libc::MNT_DETACH)?;
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// The absolute form of `dir` without following its last component, which may be a mount
/// whose process died (any `stat` of it fails with "transport endpoint is not connected").
pub(crate) fn absolute(dir: &Path) -> Result<PathBuf> {
    let io = |source| LazyError::Io {
        what: format!("resolving {}", dir.display()),
        error: source,
    };
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().map_err(io)?.join(dir)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize().map_err(io)?.join(name)),
        _ => Ok(abs),
    }
}

/// Unmounts (lazily) and forgets every mount of the store at `store_root` whose process is
/// gone. Returns how many records were cleaned.
pub fn clean_stale_mounts(store_root: &Path) -> Result<usize> {
    let records = read_records(store_root);
    if records.is_empty() {
        return Ok(0);
    }
    let (live, dead): (Vec<_>, Vec<_>) = records.into_iter().partition(MountRecord::is_alive);
    let mut cleaned = 0;
    for rec in dead {
        // Another live mount at the same place belongs to someone else: leave it.
        let taken = live.iter().any(|l| l.mountpoint == rec.mountpoint);
        if !taken && is_fd_mount(&rec.mountpoint) {
            match umount2(&rec.mountpoint, libc::MNT_DETACH) {
                Ok(()) => tracing::info!(mountpoint = %rec.mountpoint.display(), pid = rec.pid,
                    "unmounted the mount of a process that is gone"),
                Err(e) => {
                    tracing::warn!(mountpoint = %rec.mountpoint.display(), error = %e,
                        "cannot unmount the mount of a process that is gone");
                    continue;
                }
            }
        }
        match std::fs::remove_file(&rec.file) {
            Ok(()) => cleaned += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LazyError::Io {
                    what: format!("removing {}", rec.file.display()),
                    error: source,
                });
            }
        }
    }
    Ok(cleaned)
}

/// [`clean_stale_mounts`] for the default store ([`fd_node::paths::fd_home`]). Never fails:
/// problems are logged, and a store that does not exist has nothing to clean.
pub fn clean_stale_mounts_default() -> usize {
    let root = fd_node::paths::fd_home();
    if !records_dir(&root).is_dir() {
        return 0;
    }
    match clean_stale_mounts(&root) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "cleaning stale mounts failed");
            0
        }
    }
}

/// What [`unmount_dir`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmountOutcome {
    pub mountpoint: PathBuf,
    /// The mount was busy and was detached: it disappears once the last file is closed.
    pub lazy: bool,
    /// The mounting process that was asked to stop, and whether it had exited in time.
    pub stopped: Option<(i32, bool)>,
}

/// Unmounts the fd mount at `dir` (`fd umount`): unmounts it, lazily if busy, then asks the
/// process that mounted it to finish (save its profile, exit) and waits for it a while.
pub fn unmount_dir(store_root: &Path, dir: &Path) -> Result<UnmountOutcome> {
    let target = absolute(dir)?;
    let record = read_records(store_root)
        .into_iter()
        .find(|r| r.mountpoint == target);
    // The last mount at a path is the one on top, the one an unmount removes.
    let top = mount_table().into_iter().rev().find(|m| m.point == target);
    let mounted = top.as_ref().is_some_and(MountEntry::is_fd);
    if !mounted {
        if let Some(m) = top {
            return Err(LazyError::NotFdMount {
                path: target,
                fstype: m.fstype,
            });
        }
        if record.is_none() {
            return Err(LazyError::NotMounted { path: target });
        }
    }
    let mut lazy = false;
    if mounted {
        match unmount_or_detach(&target) {
            Ok(l) => lazy = l,
            // The mounting process may have unmounted it a moment ago.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(LazyError::Io {
                    what: format!("unmounting {}", target.display()),
                    error: source,
                });
            }
        }
    }
    let mut stopped = None;
    if let Some(rec) = record {
        if rec.is_alive() {
            // SAFETY: kill has no memory preconditions; the pid was checked against its start
            // time just above, so it is still the process that mounted.
            unsafe { libc::kill(rec.pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_WAIT;
            while rec.is_alive() && rec.file.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let exited = !rec.file.exists() || !rec.is_alive();
            if !exited {
                tracing::warn!(pid = rec.pid, "the mounting process did not finish in time");
            }
            stopped = Some((rec.pid, exited));
        }
        if !rec.is_alive() {
            let _ = std::fs::remove_file(&rec.file);
        }
    }
    Ok(UnmountOutcome {
        mountpoint: target,
        lazy,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_liveness() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| LazyError::Io {
            what: "tempdir".into(),
            error: e,
        })?;
        let rec = write_record(dir.path(), Path::new("/tmp/some where/\u{e9}"))?;
        assert!(rec.is_alive(), "this process is alive");
        let back = read_records(dir.path());
        assert_eq!(back, vec![rec.clone()]);
        // Same pid, other start time: a reused pid is not the mounting process.
        let reused = MountRecord {
            start: rec.start + 1,
            ..rec.clone()
        };
        assert!(!reused.is_alive());
        Ok(())
    }

    #[test]
    fn stale_record_without_mount_is_forgotten() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| LazyError::Io {
            what: "tempdir".into(),
            error: e,
        })?;
        let mounts = dir.path().join("mounts");
        std::fs::create_dir_all(&mounts).map_err(|e| LazyError::Io {
            what: "mkdir".into(),
            error: e,
        })?;
        // pid 0 never names a process here.
        std::fs::write(
            mounts.join("0"),
            "pid=0\nstart=1\nmountpoint=/nonexistent/fd-test\n",
        )
        .map_err(|e| LazyError::Io {
            what: "write".into(),
            error: e,
        })?;
        let live = write_record(dir.path(), Path::new("/nonexistent/other"))?;
        assert_eq!(clean_stale_mounts(dir.path())?, 1);
        assert_eq!(read_records(dir.path()), vec![live]);
        Ok(())
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(br"/a\040b\134c\011"), b"/a b\\c\t".to_vec());
        assert_eq!(unescape(br"/x\04"), br"/x\04".to_vec());
    }

    #[test]
    fn start_time_of_self_is_known_and_of_nobody_is_not() {
        assert!(process_start_time(std::process::id() as i32).is_some());
        assert_eq!(process_start_time(0), None);
    }
}
