//! Mounting and unmounting: the life of one lazyfs mount inside the process that serves it.
//!
//! [`mount`] writes the mount record, mounts with fuser, starts the FUSE request threads and
//! the background prefetch, and returns a [`Mounted`]. [`Mounted::unmount`] (also run on drop)
//! stops the prefetch, unmounts (detaching lazily when files are still open, so it always
//! succeeds), saves the prefetch profile and removes the record.
//!
//! As root the mount is made here with mount(2) and handed to fuser as a /dev/fuse descriptor,
//! so fuser never unmounts anything by itself and this module decides when and how (fuser's
//! automatic unmount goes through `fusermount3` as root and was seen to hang). Without root,
//! fuser mounts through the setuid `fusermount3`, and its unmount handle is used.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fd_node::fetch::{FetchStats, Fetcher};
use fd_node::{ImageRecord, load_file_index};
use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};

use crate::fs::{LazyFs, Shared};
use crate::profile::{self, Prefetch, Profile};
use crate::records::{self, MountRecord};
use crate::tree::Tree;
use crate::{LazyError, Result};

/// How long an unmount waits for the FUSE threads to finish before leaving them to end with
/// the last open file (a lazy unmount) or with the process.
const SESSION_GRACE: Duration = Duration::from_secs(2);

/// Readahead for the mount's backing device, in KiB: big sequential reads become requests of
/// up to 1 MiB (the most FUSE carries in one request) instead of the default 128 KiB.
const READ_AHEAD_KB: u32 = 1024;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub prefetch: Prefetch,
    /// Let other users (and containers in user namespaces) read the mount.
    pub allow_other: bool,
    /// Honour setuid bits and device nodes, as a container's root file system needs. Off by
    /// default so that browsing an image with `fd mount` cannot run its setuid programs.
    pub suid_and_devices: bool,
    /// Threads reading FUSE requests. Reads that must fetch run on threads of their own, so a
    /// few are enough.
    pub threads: usize,
    /// Owners as a user namespace must see them (empty: as stored).
    pub id_map: crate::idmap::IdMap,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            prefetch: Prefetch::Profile,
            allow_other: false,
            suid_and_devices: false,
            threads: 4,
            id_map: crate::idmap::IdMap::default(),
        }
    }
}

/// What an unmount did and what the mount served.
#[derive(Debug, Clone, Default)]
pub struct UnmountReport {
    /// The mount was busy and was detached; it disappears once its last file is closed.
    pub lazy: bool,
    /// Files read at least once.
    pub files_read: usize,
    /// Read requests served and bytes returned.
    pub reads: u64,
    pub bytes_read: u64,
    /// Reads that failed with EIO because a chunk could not be fetched.
    pub failed_reads: u64,
    pub fetch: FetchStats,
    /// Key of the prefetch profile saved for the image, if the mount read any file.
    pub profile: Option<String>,
}

/// A live mount. Unmounts when dropped.
pub struct Mounted {
    shared: Arc<Shared>,
    image: ImageRecord,
    mountpoint: PathBuf,
    session: Option<JoinHandle<std::io::Result<()>>>,
    unmounter: Option<SessionUnmounter>,
    prefetchers: Vec<JoinHandle<()>>,
    record: Option<MountRecord>,
    profile_loaded: Option<String>,
    done: bool,
}

/// Mounts `image` read-only at `mountpoint` (an existing directory). Contents come through
/// `fetcher`; the record goes under the fetcher's store.
pub fn mount(
    fetcher: Arc<Fetcher>,
    image: &ImageRecord,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<Mounted> {
    let io = |what: String, source| LazyError::Io {
        what,
        error: source,
    };
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| io(format!("mount point {}", mountpoint.display()), e))?;
    if !mountpoint.is_dir() {
        return Err(LazyError::Io {
            what: format!("mount point {}", mountpoint.display()),
            error: std::io::Error::from(std::io::ErrorKind::NotADirectory),
        });
    }
    let store = fetcher.store();
    let mut index = load_file_index(store, image)?;
    options.id_map.apply(&mut index);
    let tree = Tree::new(index)?;
    let shared = Arc::new(Shared::new(tree, fetcher.clone()));

    let profile = match options.prefetch {
        Prefetch::None => None,
        _ => profile::load_profile(store, &image.manifest_digest).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignoring the image's prefetch profile");
            None
        }),
    };

    // Name the mount after the image; commas and blanks would split mount options.
    let fsname: String = format!("{}{}", records::SOURCE_PREFIX, image.reference)
        .chars()
        .map(|c| {
            if c == ',' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname.clone()),
        MountOption::Subtype("fd".into()),
        MountOption::RO,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    if options.suid_and_devices {
        config
            .mount_options
            .extend([MountOption::Suid, MountOption::Dev]);
    }
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads.max(1));

    // The record goes first, so a crash right after mounting still leaves a trace to clean.
    let record = records::write_record(store.root(), &mountpoint)?;
    let fs = LazyFs::new(shared.clone());
    let session = match mount_direct(&mountpoint, &fsname, options) {
        Ok(Some(fd)) => Session::from_fd(fs, fd, config.acl, config.clone()).map(|s| (s, None)),
        // Not root: fuser mounts through the setuid fusermount3.
        Ok(None) => Session::new(fs, &mountpoint, &user_mount_config(&config)).map(|mut s| {
            let unmounter = s.unmount_callable();
            (s, Some(unmounter))
        }),
        Err(e) => Err(e),
    };
    let (session, unmounter) = match session {
        Ok(s) => s,
        Err(source) => {
            // A direct mount may be in place when the handshake failed.
            if records::is_fd_mount(&mountpoint) {
                let _ = records::umount2(&mountpoint, libc::MNT_DETACH);
            }
            let _ = std::fs::remove_file(&record.file);
            return Err(LazyError::Mount {
                path: mountpoint,
                error: source,
            });
        }
    };
    let thread = std::thread::Builder::new()
        .name("fd-lazyfs".into())
        .spawn(move || session.run());
    let session = match thread {
        Ok(t) => t,
        Err(source) => {
            // The session (and with it the mount) was dropped with the closure.
            let _ = records::umount2(&mountpoint, libc::MNT_DETACH);
            let _ = std::fs::remove_file(&record.file);
            return Err(LazyError::Io {
                what: "starting the FUSE thread".into(),
                error: source,
            });
        }
    };
    raise_readahead(&mountpoint);

    let prefetchers = profile::start_prefetch(&shared, options.prefetch, profile.as_ref());
    tracing::info!(
        mountpoint = %mountpoint.display(),
        image = %image.reference,
        paths = shared.tree.len(),
        profile_chunks = profile.as_ref().map(|p| p.chunks.len()),
        "mounted"
    );
    Ok(Mounted {
        shared,
        image: image.clone(),
        mountpoint,
        session: Some(session),
        unmounter,
        prefetchers,
        record: Some(record),
        profile_loaded: profile.map(|p| p.file_index),
        done: false,
    })
}

/// The mount options for a mount made without root.
///
/// fuser 0.18 first tries to open /dev/fuse itself and, when the device is root-only (mode
/// 0600, as on Debian), returns that EACCES instead of falling back to `fusermount3`. Only
/// `auto_unmount` makes it go to `fusermount3` directly, so a user's mount asks for it; it
/// also means the kernel mount goes away when this process dies, whatever the way.
fn user_mount_config(config: &Config) -> Config {
    let mut config = config.clone();
    if !config.mount_options.contains(&MountOption::AutoUnmount) {
        config.mount_options.push(MountOption::AutoUnmount);
    }
    config
}

/// Mounts a FUSE file system at `mountpoint` with mount(2) and returns the /dev/fuse
/// descriptor that serves it; None when not permitted (not root), to go through fusermount3.
///
/// Mounting here rather than in fuser keeps every unmount in this crate's hands: fuser would
/// otherwise try a plain unmount of the path again when its session ends, even after the
/// mount was removed from outside.
fn mount_direct(
    mountpoint: &Path,
    fsname: &str,
    options: &MountOptions,
) -> std::io::Result<Option<OwnedFd>> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    // SAFETY: getuid and getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_RDONLY | libc::MS_NOATIME;
    if !options.suid_and_devices {
        flags |= libc::MS_NOSUID | libc::MS_NODEV;
    }
    let c = |s: &[u8]| CString::new(s).map_err(std::io::Error::other);
    let (source, target) = (c(fsname.as_bytes())?, c(mountpoint.as_os_str().as_bytes())?);
    let (fstype, data) = (c(b"fuse.fd")?, c(data.as_bytes())?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EPERM) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(OwnedFd::from(dev)))
}

/// Larger readahead on the mount's backing device, so sequential reads come in large
/// requests. Best effort: without it reads are only smaller.
fn raise_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KB.to_string()) {
        tracing::debug!(path, error = %e, "cannot raise readahead");
    }
}

impl Mounted {
    /// The absolute mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Paths in the image.
    pub fn paths(&self) -> usize {
        self.shared.tree.len()
    }

    /// Bytes of file contents in the image.
    pub fn content_bytes(&self) -> u64 {
        self.shared.tree.content_bytes()
    }

    /// True when a prefetch profile was found for the image.
    pub fn has_profile(&self) -> bool {
        self.profile_loaded.is_some()
    }

    /// False once the kernel ended the session (someone unmounted the directory).
    pub fn is_alive(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.is_finished())
    }

    /// What the fetcher has done so far.
    pub fn fetch_stats(&self) -> FetchStats {
        self.shared.fetcher.stats()
    }

    /// Unmounts (lazily if busy), saves the prefetch profile and removes the mount record.
    pub fn unmount(mut self) -> Result<UnmountReport> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<UnmountReport> {
        if self.done {
            return Ok(UnmountReport::default());
        }
        self.done = true;
        self.shared.stopping.store(true, Ordering::Relaxed);
        let mut report = UnmountReport::default();
        let mut failure = None;

        // A plain unmount first; when busy (open files), detach. EINVAL means it was already
        // unmounted from outside (`fd umount`, `umount`).
        let plain = match self.unmounter.take() {
            // Mounted through fusermount3: fuser's handle unmounts, and never tries again.
            Some(mut unmounter) => unmounter.unmount(),
            // The session ends when the mount is removed from outside; only a connection that
            // died some other way leaves the mount behind, dead, to be detached.
            None if self.session.as_ref().is_some_and(|s| s.is_finished()) => {
                if records::is_fd_mount(&self.mountpoint) {
                    records::umount2(&self.mountpoint, libc::MNT_DETACH)
                } else {
                    Ok(())
                }
            }
            None => records::umount2(&self.mountpoint, 0),
        };
        match plain {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => match records::umount2(&self.mountpoint, libc::MNT_DETACH) {
                Ok(()) => report.lazy = true,
                Err(d) if d.raw_os_error() == Some(libc::EINVAL) => {}
                Err(source) => {
                    tracing::warn!(first = %e, "unmount failed");
                    failure = Some(LazyError::Io {
                        what: format!("unmounting {}", self.mountpoint.display()),
                        error: source,
                    });
                }
            },
        }

        if let Some(session) = self.session.take() {
            let deadline = Instant::now() + SESSION_GRACE;
            while !session.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if session.is_finished() {
                match session.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "FUSE session ended with an error"),
                    Err(_) => tracing::warn!("a FUSE thread panicked"),
                }
            } else {
                // Open files keep a detached mount alive; its threads end with the last one
                // (or with this process).
                tracing::debug!("FUSE session still serving open files after unmount");
            }
        }
        // Prefetchers stop between chunks; one waiting on a stuck source ends on its own
        // within the fetch timeout, so it is not waited for.
        for t in self.prefetchers.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }

        let order = self.shared.recorder.order();
        report.files_read = order.len();
        if let Some(profile) = Profile::from_reads(&self.shared.tree, &self.image, &order) {
            match profile::save_profile(self.shared.fetcher.store(), &profile) {
                Ok(key) => report.profile = Some(key),
                Err(e) => tracing::warn!(error = %e, "cannot save the prefetch profile"),
            }
        }
        let stats = &self.shared.stats;
        report.reads = stats.reads.load(Ordering::Relaxed);
        report.bytes_read = stats.bytes_read.load(Ordering::Relaxed);
        report.failed_reads = stats.failed_reads.load(Ordering::Relaxed);
        report.fetch = self.shared.fetcher.stats();

        if let Some(rec) = self.record.take()
            && let Err(e) = std::fs::remove_file(&rec.file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %rec.file.display(), error = %e, "cannot remove the mount record");
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "unmount on drop failed");
        }
    }
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set they are given, which lives on this
    // stack frame and is fully initialised by sigemptyset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and every thread it starts later,
/// so that [`wait_for_stop_signal`] receives them. Call before starting any thread.
pub fn block_stop_signals() -> Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is a valid signal set; the old mask is not requested.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(LazyError::Io {
            what: "blocking stop signals".into(),
            error: std::io::Error::from_raw_os_error(rc),
        });
    }
    Ok(())
}

/// Waits up to `timeout` for SIGINT, SIGTERM or SIGHUP (blocked by [`block_stop_signals`]);
/// returns the signal number when one came.
pub fn wait_for_stop_signal(timeout: Duration) -> Option<i32> {
    let set = stop_signals();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `set` and `ts` are valid for the call; no siginfo is requested.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_mount_goes_through_fusermount3() {
        // fuser 0.18 reaches fusermount3 only with auto_unmount (see user_mount_config).
        let mut config = Config::default();
        config.mount_options = vec![MountOption::RO];
        let user = user_mount_config(&config);
        assert!(user.mount_options.contains(&MountOption::AutoUnmount));
        assert!(user.mount_options.contains(&MountOption::RO));
        assert_eq!(
            user_mount_config(&user).mount_options.len(),
            user.mount_options.len()
        );
    }
}
