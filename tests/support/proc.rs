//! Small helpers for running external tools: checking that a tool is installed (and naming the
//! Debian package when it is not), running a command with its output in the error, and the
//! tests' handling of long-running `fd` processes: running one to the end within a time limit,
//! or in the background while reading its stdout lines.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Proxy variables that some tools honour even for 127.0.0.1; the tests must only ever talk to
/// their own local servers, so these are removed from every command the helpers start.
pub(crate) const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
];

/// Finds `tool` on PATH, or fails saying which Debian package provides it.
pub(crate) fn require_tool(tool: &str, package: &str) -> Result<PathBuf> {
    find_in_path(tool).with_context(|| {
        format!("`{tool}` is not installed: install the Debian package `{package}`")
    })
}

pub(crate) fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A command with stdin closed and the proxy variables removed.
pub(crate) fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null());
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// Renders a command line for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Formats a finished command's status and output for an error message.
pub(crate) fn report(cmd: &Command, output: &Output) -> String {
    format!(
        "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        describe(cmd),
        output.status,
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end(),
    )
}

/// Runs `cmd` to completion and fails, showing its output, unless it exits with status 0.
pub(crate) fn run_ok(cmd: &mut Command) -> Result<Output> {
    let output = cmd
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!("{}", report(cmd, &output));
    }
    Ok(output)
}

/// Runs `cmd` to the end with stdin closed and its output captured, killing it after `timeout`.
pub fn output(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    // The wait runs on its own thread so that the time limit can be kept here.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: signalling our own child, which has not been reaped (its waiter waits).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!("`{}` did not finish within {timeout:?}", describe(&cmd))
        }
    }
}

/// A finished command's status, stdout and stderr, for an assertion's message.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A process running in the background, its stdout read line by line (its stderr goes to the
/// test's); killed by PID when dropped, so that a failed assertion leaves nothing running.
pub struct Proc {
    /// The process itself, for signals and waits of the test's own.
    pub child: Child,
    lines: mpsc::Receiver<String>,
}

/// Starts `cmd` in the background with stdin closed.
pub fn spawn(mut cmd: Command) -> Result<Proc> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, lines) = mpsc::channel();
    // A thread of its own drains stdout, so that the process never blocks on a full pipe
    // while the test waits for something else.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Proc { child, lines })
}

impl Proc {
    /// Waits for a stdout line containing `needle`, skipping the lines before it.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(_) => bail!("no line with {needle:?} within {timeout:?}"),
            }
        }
    }

    /// The last word of the first stdout line containing `needle` (an address fd announces).
    pub fn wait_word(&self, needle: &str, timeout: Duration) -> Result<String> {
        let line = self.wait_line(needle, timeout)?;
        line.split_whitespace()
            .last()
            .map(str::to_string)
            .with_context(|| format!("empty line {line:?}"))
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout` for it.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill with a PID of a child we own and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(Instant::now() < deadline, "process {pid} ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
