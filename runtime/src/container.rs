//! The helper side of `fd run`: create, start, wait for and delete one container with
//! libcontainer, in a process that has no other thread.
//!
//! `fd run` serves the image over FUSE and runs tokio, so it has many threads; libcontainer
//! forks with a raw `clone3` that skips the C library's fork handlers, and a child forked
//! while another thread holds the allocator's lock hangs forever. `fd run` therefore starts
//! `fd __container PLAN` (itself, re-executed), which calls [`run_helper`] and exits with the
//! container's status.
//!
//! The helper forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the container's first process.
//! That process is PID 1 of its namespace, where signals it has no handler for are ignored
//! (`sleep` has none), so a container still running `stop_grace` after a forwarded signal is
//! killed, as `docker stop` does after its timeout. When `fd run` itself dies, the kernel
//! sends the helper SIGTERM (parent-death signal); the helper notices its parent changed
//! and kills the container at once.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};

use fd_lazyfs::idmap::IdRange;

use crate::rootless::{self, UserNamespace};
use crate::{Result, RuntimeError, io_err, signals, tty};

/// How long the helper waits, after the container's process ended, for the rest of its
/// terminal output to be written.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// What the helper needs, written by `fd run` as JSON next to the bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperPlan {
    /// libcontainer's name of the container.
    pub container_id: String,
    /// The bundle directory (holds `config.json`).
    pub bundle: PathBuf,
    /// libcontainer's state root.
    pub state_root: PathBuf,
    /// The `fd run` process; when the helper's parent is no longer this pid, `fd run` died.
    pub parent_pid: i32,
    /// How long a container may take to exit after a forwarded stop signal.
    pub stop_grace_ms: u64,
    /// Give the container a pseudo-terminal (`-t`), relayed to the helper's stdio.
    #[serde(default)]
    pub tty: bool,
    /// Without root: the user namespace the helper enters before anything else.
    #[serde(default)]
    pub rootless: Option<RootlessPlan>,
}

/// The user namespace of a rootless run, as `inside, outside, count` triples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootlessPlan {
    pub uids: Vec<[u32; 3]>,
    pub gids: Vec<[u32; 3]>,
}

impl RootlessPlan {
    pub fn new(ns: &UserNamespace) -> RootlessPlan {
        let triples = |ranges: &[IdRange]| {
            ranges
                .iter()
                .map(|r| [r.inside, r.outside, r.count])
                .collect()
        };
        RootlessPlan {
            uids: triples(&ns.uids),
            gids: triples(&ns.gids),
        }
    }

    pub fn namespace(&self) -> UserNamespace {
        let ranges = |triples: &[[u32; 3]]| {
            triples
                .iter()
                .map(|&[inside, outside, count]| IdRange {
                    inside,
                    outside,
                    count,
                })
                .collect()
        };
        UserNamespace {
            uids: ranges(&self.uids),
            gids: ranges(&self.gids),
        }
    }
}

impl HelperPlan {
    pub fn read(path: &std::path::Path) -> Result<HelperPlan> {
        let bytes = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RuntimeError::Invalid(format!("{}: {e}", path.display())))
    }

    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        let bytes = serde_json::to_vec(self)
            .map_err(|e| RuntimeError::Invalid(format!("helper plan: {e}")))?;
        std::fs::write(path, bytes).map_err(io_err(format!("writing {}", path.display())))
    }
}

/// A duplicate of one of this process's standard descriptors, for libcontainer to put in
/// the container. Passing them explicitly keeps libcontainer's own handling of its caller's
/// stdio out of the way (`fd run` never gives the helper /dev/null for output: libcontainer
/// would swap it for a read-only /dev/null inside the container and writes would fail).
fn dup_stdio(fd: i32) -> Result<OwnedFd> {
    // SAFETY: 0, 1 and 2 are open for the life of the process (the parent sets them up).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    borrowed
        .try_clone_to_owned()
        .map_err(io_err(format!("duplicating descriptor {fd}")))
}

fn getppid() -> i32 {
    // SAFETY: getppid has no preconditions.
    unsafe { libc::getppid() }
}

/// Runs the container described by `plan` to its end and returns its exit status (the exit
/// code, or 128 + the signal that killed it).
pub fn run_helper(plan: &HelperPlan) -> Result<i32> {
    // The Rust runtime ignores SIGPIPE, and an ignored signal stays ignored across exec: the
    // container's processes would never die of a closed pipe (`yes | head` would spin on
    // EPIPE). Restore the default before libcontainer forks.
    // SAFETY: setting a signal's disposition to SIG_DFL has no memory preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // Whatever mask this process was started with, the container must start with none
    // blocked: libcontainer passes the mask of its caller on to the container's process.
    signals::unblock_all().map_err(io_err("unblocking signals"))?;
    signals::record_early(&signals::FORWARDED).map_err(io_err("handling stop signals"))?;
    // The container's first process may end up as a grandchild: reap it here either way.
    // SAFETY: prctl with these arguments only changes this process's attributes.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if getppid() != plan.parent_pid {
        return Err(RuntimeError::Invalid(
            "fd run exited before the container started".into(),
        ));
    }

    if let Some(rootless) = &plan.rootless {
        // Without root: into a user namespace first, where the overlay can be mounted (in a
        // mount namespace that ends with this process, so nothing is left to unmount).
        rootless::enter_user_namespace(&rootless.namespace())?;
        rootless::show_unified_cgroup_only()?;
        crate::rundir::mount_overlay_in(&plan.bundle)?;
    }
    // With a terminal, libcontainer makes the pty and sends its master here; the container's
    // stdio is the pty's slave end, so no descriptors of ours are handed over.
    let console = if plan.tty {
        Some(tty::bind_console_socket(&plan.bundle)?)
    } else {
        None
    };
    let mut builder = ContainerBuilder::new(plan.container_id.clone(), SyscallType::Linux)
        .with_root_path(&plan.state_root)
        .map_err(|error| RuntimeError::Container {
            step: "state directory",
            error: Box::new(error),
        })?;
    builder = match &console {
        Some((_, path)) => builder.with_console_socket(Some(path)),
        None => builder
            .with_stdin(dup_stdio(0)?)
            .with_stdout(dup_stdio(1)?)
            .with_stderr(dup_stdio(2)?),
    };
    let builder = builder
        .validate_id()
        .map_err(|error| RuntimeError::Container {
            step: "id",
            error: Box::new(error),
        })?;
    let mut container = builder
        .as_init(&plan.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|error| RuntimeError::Container {
            step: "create",
            error: Box::new(error),
        })?;

    // Blocked only now: the container's processes were forked above and keep the mask they
    // were forked with, across exec.
    let mut waited = signals::waited();
    if console.is_some() {
        waited.push(libc::SIGWINCH);
    }
    signals::block(&waited).map_err(io_err("blocking signals"))?;

    let outcome = (|| {
        // libcontainer has forked by now, so threads may start: the relay's.
        let pty = match &console {
            Some((listener, _)) => {
                let master = tty::receive_master(listener)?;
                tty::copy_window_size(master.as_raw_fd());
                let relay = tty::Relay::start(&master)?;
                Some((master, relay))
            }
            None => None,
        };
        container.start().map_err(|error| RuntimeError::Container {
            step: "start",
            error: Box::new(error),
        })?;
        let pid = container
            .pid()
            .map(|p| p.as_raw())
            .ok_or_else(|| RuntimeError::Invalid("the container has no process".into()))?;
        let master = pty.as_ref().map(|(m, _)| m.as_raw_fd());
        let code = wait_for(pid, plan, &waited, master);
        if let Some((_, relay)) = pty {
            relay.finish(OUTPUT_DRAIN);
        }
        Ok(code)
    })();

    if let Err(error) = container.delete(true) {
        tracing::warn!(%error, "deleting the container failed");
    }
    if plan.rootless.is_some() {
        // The writable layer holds files of the namespace's other ids and the overlay's
        // mode-0 work directory, which the user cannot remove from outside: remove them here,
        // as the namespace's root.
        crate::rundir::remove_writable_layer(&plan.bundle);
    }
    outcome
}

/// Waits for `pid` to exit, forwarding stop signals; returns its exit status.
/// A terminal's window size is copied onto `master` whenever SIGWINCH comes.
fn wait_for(pid: i32, plan: &HelperPlan, waited: &[i32], master: Option<i32>) -> i32 {
    let grace = Duration::from_millis(plan.stop_grace_ms);
    let mut kill_at: Option<Instant> = None;
    // A stop signal that came while the container was being created is passed on now (when
    // it meant that fd run died, the parent check below kills the container instead).
    if let Some(sig) = signals::take_early() {
        signals::send(pid, sig);
        kill_at = Some(Instant::now() + grace);
    }
    loop {
        // Reap every child that ended (the subreaper gets orphans too).
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes only into `status`.
            let got = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if got <= 0 {
                break;
            }
            if got == pid {
                return signals::exit_code_of(status);
            }
        }
        if getppid() != plan.parent_pid {
            // fd run is gone: nobody is waiting for this container.
            signals::send(pid, libc::SIGKILL);
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            tracing::debug!(pid, "the container ignored the stop signal; killing it");
            signals::send(pid, libc::SIGKILL);
            kill_at = None;
        }
        match signals::wait(waited, Duration::from_millis(100)) {
            Some(sig) if signals::FORWARDED.contains(&sig) && getppid() == plan.parent_pid => {
                signals::send(pid, sig);
                kill_at.get_or_insert(Instant::now() + grace);
            }
            Some(libc::SIGWINCH) => {
                if let Some(master) = master {
                    tty::copy_window_size(master);
                }
            }
            _ => {}
        }
    }
}

/// True when descriptor `fd` is the character device /dev/null.
pub fn is_dev_null(fd: &impl AsRawFd) -> bool {
    // SAFETY: fstat writes only into `st`; a bad descriptor makes it fail, which is handled.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return false;
        }
        (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
            && libc::major(st.st_rdev) == 1
            && libc::minor(st.st_rdev) == 3
    }
}

/// For `Command::pre_exec` in `fd run`: the helper gets SIGTERM when the thread that started
/// it ends (the parent-death signal is tied to the forking thread, so start the helper from
/// a thread that lives until the helper has been waited for).
pub fn set_parent_death_signal() -> std::io::Result<()> {
    // SAFETY: prctl with these arguments only changes the calling process's attributes and
    // is async-signal-safe, as code between fork and exec must be.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
