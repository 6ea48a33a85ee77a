//! The `fd` binary under test and a private environment to run it in: each `FdEnv` owns a
//! temporary directory holding the store (`FD_HOME`) and a fake home directory, so tests never
//! touch the real user's files or each other's stores.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::proc;

/// Path of the `fd` binary: `$FD_BIN` when set, else `fd` in the cargo profile directory that
/// holds the running test binary (`target/debug/deps/e2e-*` → `target/debug/fd`).
pub fn try_fd_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FD_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("FD_BIN points at {}, which is not a file", bin.display());
        }
        return Ok(bin);
    }
    let exe = std::env::current_exe().context("cannot find the running test binary")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().unwrap_or(dir);
    }
    let bin = dir.join("fd");
    if !bin.is_file() {
        bail!(
            "the fd binary is missing at {}: run `cargo build -p fd-cli` first \
             (or set FD_BIN to a built fd)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Like [`try_fd_bin`], for callers that cannot return an error: panics with the same message.
pub fn fd_bin() -> PathBuf {
    match try_fd_bin() {
        Ok(bin) => bin,
        Err(e) => panic!("{e:#}"),
    }
}

/// `fd ARGS` in `env` with mDNS off: tests name their peers, and a node must not find another
/// test's nodes on the machine's own network.
pub fn fd_no_mdns(env: &FdEnv, args: &[&str]) -> Command {
    let mut c = env.cmd(args);
    c.env("FD_MDNS", "0");
    c
}

/// A private fd environment: a temporary directory with the store and a home directory.
///
/// Layout of the temporary directory:
/// - `fd/`: `FD_HOME`, the store (created empty);
/// - `home/`: `HOME`, with `XDG_CONFIG_HOME`, `XDG_DATA_HOME`, `XDG_CACHE_HOME` and
///   `XDG_STATE_HOME` below it;
/// - `run/`: `XDG_RUNTIME_DIR` (mode 0700);
/// - `tmp/`: `TMPDIR`.
///
/// Removed (with everything fd wrote there) when dropped.
pub struct FdEnv {
    dir: TempDir,
    bin: PathBuf,
}

impl FdEnv {
    /// Creates the directories and checks that the fd binary exists.
    pub fn new() -> Result<FdEnv> {
        FdEnv::with_bin(try_fd_bin()?)
    }

    /// Like [`FdEnv::new`], running `bin` instead of the fd under test (another build of fd,
    /// or a stand-in program when checking the harness itself).
    pub fn with_bin(bin: PathBuf) -> Result<FdEnv> {
        let dir = tempfile::Builder::new()
            .prefix("fd-e2e-")
            .tempdir()
            .context("cannot create a temporary directory for FD_HOME")?;
        let env = FdEnv { dir, bin };
        for sub in [
            env.fd_home(),
            env.home_dir(),
            env.home_dir().join(".config"),
            env.home_dir().join(".local/share"),
            env.home_dir().join(".cache"),
            env.home_dir().join(".local/state"),
            env.dir.path().join("tmp"),
        ] {
            fs::create_dir_all(&sub).with_context(|| format!("cannot create {}", sub.display()))?;
        }
        let run = env.dir.path().join("run");
        fs::create_dir_all(&run).with_context(|| format!("cannot create {}", run.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&run, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot chmod {}", run.display()))?;
        }
        Ok(env)
    }

    /// The temporary directory that holds everything of this environment.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The store directory (`FD_HOME`).
    pub fn fd_home(&self) -> PathBuf {
        self.dir.path().join("fd")
    }

    /// The fake home directory (`HOME`).
    pub fn home_dir(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The fd binary this environment runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// A `Command` running fd with `args` in this environment: `FD_HOME`, `HOME` and the XDG
    /// directories point inside it, `NO_COLOR=1`, stdin is closed, and `FD_*` variables from
    /// the caller's environment (other than `FD_LOG`) and proxy variables are removed so the
    /// outer shell cannot change what a test sees.
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = proc::command(&self.bin);
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else { continue };
            if key.starts_with("FD_") && key != "FD_LOG" {
                cmd.env_remove(key);
            }
        }
        let home = self.home_dir();
        cmd.args(args)
            .env("FD_HOME", self.fd_home())
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .env("XDG_STATE_HOME", home.join(".local/state"))
            .env("XDG_RUNTIME_DIR", self.dir.path().join("run"))
            .env("TMPDIR", self.dir.path().join("tmp"))
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path());
        cmd
    }

    /// Runs fd with `args` and returns its output; fails, showing stdout and stderr, when the
    /// exit status is not 0.
    pub fn run<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        proc::run_ok(&mut self.cmd(args))
    }

    /// Runs fd with `args`, expecting it to fail; returns its output, or an error showing
    /// stdout and stderr when it exited with status 0.
    pub fn run_fail<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.cmd(args);
        let output = cmd
            .output()
            .with_context(|| format!("could not start `{}`", proc::describe(&cmd)))?;
        if output.status.success() {
            bail!("expected a failure, but {}", proc::report(&cmd, &output));
        }
        Ok(output)
    }
}
