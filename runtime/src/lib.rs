//! runtime: running a container from an image in the store.
//!
//! This crate owns everything between a mounted image and a running process:
//!
//! - [`config`]: the image config (entrypoint, cmd, env, working dir, user) combined with what
//!   the user asked for on the command line, the way docker combines them;
//! - [`user`]: user and group names looked up in the image's `/etc/passwd` and `/etc/group`;
//! - [`paths`]: path and command resolution inside a root file system (symlinks stay inside
//!   it), so a missing command is reported before anything starts;
//! - [`spec`]: the OCI runtime spec (mounts, namespaces, capabilities, cgroup path);
//! - [`rundir`]: the private state of one run under `$FD_HOME/runs/<id>`: the overlay (a
//!   writable upper directory over the read-only lazyfs mount), generated `/etc` files, the
//!   container state, and the cleanup of runs whose `fd` process is gone;
//! - [`container`]: the create/start/wait/delete cycle with libcontainer, meant to run in a
//!   single-threaded helper process (libcontainer forks with a raw `clone3` that skips the C
//!   library's fork handlers, so calling it from a process with other threads can deadlock the
//!   child on a lock some other thread held);
//! - [`tty`]: `-t`, the pty master received from libcontainer over the console socket, the
//!   copies between it and the caller's terminal, raw mode and window size.
//!
//! - [`rootless`]: runs without root, through a user namespace that maps the user to root
//!   (and its `/etc/subuid` range to the other ids), with checks that name what to change
//!   when the machine does not allow it.

pub mod config;
pub mod container;
pub mod paths;
pub mod rootless;
pub mod rundir;
pub mod signals;
pub mod spec;
pub mod tty;
pub mod user;

use std::path::PathBuf;

pub use config::{ImageConfig, ProcessPlan, RunRequest, plan_process};
pub use container::{HelperPlan, run_helper};
pub use rundir::{RunDir, clean_stale_runs, clean_stale_runs_default};
pub use spec::{NetMode, SpecInput, build_spec};

/// Shorthand for results in this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Everything that can go wrong preparing, running or cleaning up a container.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A file-system or system call failed; `what` says which and on what.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },

    /// The image config cannot be read.
    #[error("image config: {0}")]
    BadConfig(String),

    /// What the user asked for cannot be done (bad -u, -e, -v ...).
    #[error("{0}")]
    Invalid(String),

    /// The command is not in the image (exit status 127, as a shell says).
    #[error("{command}: executable file not found in the image{hint}")]
    NotFound { command: String, hint: String },

    /// The command exists but cannot be executed (exit status 126).
    #[error("{command}: {reason}")]
    NotExecutable { command: String, reason: String },

    /// The kernel lacks something a container needs.
    #[error("{feature} is not available: {error}; {how}")]
    Kernel {
        feature: &'static str,
        error: std::io::Error,
        how: &'static str,
    },

    /// Building the OCI runtime spec failed.
    #[error("runtime spec: {0}")]
    Spec(#[from] oci_spec::OciSpecError),

    /// libcontainer refused or failed.
    #[error("container {step}: {error}")]
    Container {
        step: &'static str,
        error: Box<libcontainer::error::LibcontainerError>,
    },

    /// The store failed.
    #[error(transparent)]
    Node(#[from] fd_node::NodeError),

    /// The lazy root file system failed.
    #[error(transparent)]
    Lazy(#[from] fd_lazyfs::LazyError),
}

impl RuntimeError {
    /// The exit status `fd run` should end with for this error: 127 and 126 as a shell
    /// reports a missing or unexecutable command, 125 for failures of the runtime itself
    /// (what docker and podman use).
    pub fn exit_code(&self) -> u8 {
        match self {
            RuntimeError::NotFound { .. } => 127,
            RuntimeError::NotExecutable { .. } => 126,
            _ => 125,
        }
    }
}

/// Wraps an I/O error with what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |error| RuntimeError::Io { what, error }
}

/// Where the runs of the store at `store_root` keep their state.
pub fn runs_dir(store_root: &std::path::Path) -> PathBuf {
    store_root.join("runs")
}
