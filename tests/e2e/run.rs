//! `fd run`: real containers from the multi-layer debian-python image served by a real
//! registry on 127.0.0.1.
//!
//! - the first `fd run` pulls the image; python runs; /tmp is writable; exit codes pass
//!   through; `-e`, `-w`, `--entrypoint`, `-u`, `-v`, `--read-only`, `--net none` behave as
//!   in docker; a missing command is 127;
//! - SIGTERM to `fd run` stops a `sleep 100` within seconds; two runs at once both work;
//! - after every run no mount of the test's store and no run directory remain; after
//!   `kill -9` of `fd run`, the next fd command removes the mounts, the container's
//!   processes, its cgroup and its state.
//!
//! - `-t` under util-linux `script` (which makes a pty): the container's stdio is a pty of
//!   the outer terminal's size, the exit code passes through, the outer terminal is left in
//!   its cooked mode, and `-it` carries typed input;
//! - rootless: a user made for the test (removed on drop) runs the image through a user
//!   namespace: it is root inside, the image's owners show unshifted, nothing stays mounted.
//!   A machine that rules this out fails the test with the reason.
//!
//! Every `fd run` started in the background is owned by a guard that kills it by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fd_tests::{FdEnv, ImageCache, Registry, images};

/// A registry holding the debian-python image, an empty store, and the image's name there.
struct Setup {
    _registry: Registry,
    env: FdEnv,
    image: String,
}

fn setup() -> Result<Setup> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(
        &imgs.debian_python,
        ImageCache::DEBIAN_TAG,
        "debian-python:bookworm",
    )?;
    let image = format!("{}/debian-python:bookworm", registry.addr());
    Ok(Setup {
        _registry: registry,
        env: FdEnv::new()?,
        image,
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `fd run ARGS...` and returns its output whatever the exit status.
fn fd_run(env: &FdEnv, args: &[&str]) -> Result<Output> {
    let mut cmd = env.cmd(["run"]);
    cmd.args(args);
    cmd.output().context("running fd run")
}

fn expect(out: &Output, code: i32, stdout: &str) -> Result<()> {
    ensure!(
        out.status.code() == Some(code) && text(&out.stdout) == stdout,
        "expected exit {code} and stdout {stdout:?}, got {:?} and {:?}; stderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(())
}

/// Nothing of the store is mounted and no run directory is left.
fn assert_clean(env: &FdEnv) -> Result<()> {
    let home = env.fd_home();
    let home = home.to_str().context("FD_HOME is not UTF-8")?;
    let mounts = fs_err::read_to_string("/proc/self/mounts")?;
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains(home)).collect();
    ensure!(left.is_empty(), "mounts left behind: {left:#?}");
    let runs = env.fd_home().join("runs");
    if runs.is_dir() {
        let entries: Vec<PathBuf> = fs_err::read_dir(&runs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        ensure!(
            entries.is_empty(),
            "run directories left behind: {entries:?}"
        );
    }
    Ok(())
}

/// A background `fd run`, killed by PID when dropped.
struct Background {
    child: Option<Child>,
}

impl Background {
    fn start(env: &FdEnv, args: &[&str]) -> Result<Background> {
        let mut cmd = env.cmd(["run"]);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        Ok(Background {
            child: Some(cmd.spawn().context("starting fd run")?),
        })
    }

    fn pid(&self) -> Result<i32> {
        let child = self.child.as_ref().context("already reaped")?;
        Ok(i32::try_from(child.id())?)
    }

    fn signal(&self, sig: libc::c_int) -> Result<()> {
        // SAFETY: the pid is our own unreaped child, so it names no other process.
        unsafe { libc::kill(self.pid()?, sig) };
        Ok(())
    }

    fn wait(&mut self, limit: Duration) -> Result<Output> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().context("already reaped")?;
        while child.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "fd run still running after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let child = self.child.take().context("already reaped")?;
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the store has a run whose container has a process; returns the run's id and
/// that process's pid.
fn wait_for_container(env: &FdEnv, limit: Duration) -> Result<(String, i32)> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(entries) = fs_err::read_dir(env.fd_home().join("runs")) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if let Some(&pid) = cgroup_pids(&id).first() {
                    return Ok((id, pid));
                }
            }
        }
        ensure!(
            Instant::now() < deadline,
            "no container running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Cgroup directories of a run, in every hierarchy.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let Ok(roots) = fs_err::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    roots
        .filter_map(|r| r.ok())
        .map(|r| r.path().join("fd").join(id))
        .filter(|p| p.is_dir())
        .collect()
}

fn cgroup_pids(id: &str) -> Vec<i32> {
    cgroup_dirs(id)
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

#[test]
fn run_pulls_and_honours_docker_options() -> Result<()> {
    let s = setup()?;
    let (env, image) = (&s.env, s.image.as_str());

    // Not in the store yet: fd run pulls it.
    let out = fd_run(env, &[image, "python3", "-c", "print(6*7)"])?;
    expect(&out, 0, "42\n")?;
    assert_clean(env)?;

    let out = fd_run(env, &[image, "sh", "-c", "echo x > /tmp/f && cat /tmp/f"])?;
    expect(&out, 0, "x\n")?;
    // The writable layer is private to the run.
    let out = fd_run(env, &[image, "sh", "-c", "test -e /tmp/f; echo $?"])?;
    expect(&out, 0, "1\n")?;
    expect(&fd_run(env, &[image, "sh", "-c", "exit 7"])?, 7, "")?;

    let out = fd_run(
        env,
        &[
            "-e",
            "GREETING=hi there",
            "-w",
            "/made/here",
            "--entrypoint",
            "sh",
            image,
            "-c",
            "echo \"$GREETING\" $(pwd)",
        ],
    )?;
    expect(&out, 0, "hi there /made/here\n")?;

    let env_file = env.dir().join("vars.env");
    fs_err::write(&env_file, "# comment\nFROM_FILE=yes\nGREETING=file\n")?;
    let env_file = env_file.to_str().context("path")?.to_string();
    let out = fd_run(
        env,
        &[
            "--env-file",
            &env_file,
            "-e",
            "GREETING=flag",
            image,
            "sh",
            "-c",
            "echo $FROM_FILE $GREETING",
        ],
    )?;
    expect(&out, 0, "yes flag\n")?;

    expect(
        &fd_run(env, &["-u", "1000", image, "id", "-u"])?,
        0,
        "1000\n",
    )?;
    expect(
        &fd_run(env, &["-u", "1000:1000", image, "id", "-g"])?,
        0,
        "1000\n",
    )?;
    // By name, from the image's /etc/passwd.
    expect(
        &fd_run(env, &["-u", "nobody", image, "id", "-un"])?,
        0,
        "nobody\n",
    )?;

    let out = fd_run(env, &[image, "no-such-command"])?;
    ensure!(
        out.status.code() == Some(127),
        "missing command: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    let out = fd_run(env, &[image, "/etc/passwd"])?;
    ensure!(
        out.status.code() == Some(126),
        "not executable: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );

    // A volume writes through to the host; :ro refuses writes.
    let host_dir = env.dir().join("vol");
    fs_err::create_dir_all(&host_dir)?;
    let vol = format!("{}:/data", host_dir.display());
    let out = fd_run(
        env,
        &[
            "-v",
            &vol,
            image,
            "sh",
            "-c",
            "echo from-container > /data/out",
        ],
    )?;
    expect(&out, 0, "")?;
    ensure!(fs_err::read_to_string(host_dir.join("out"))? == "from-container\n");
    let vol_ro = format!("{}:/data:ro", host_dir.display());
    let out = fd_run(
        env,
        &[
            "--volume",
            &vol_ro,
            image,
            "sh",
            "-c",
            "echo x > /data/other",
        ],
    )?;
    ensure!(
        out.status.code() != Some(0),
        "write to a :ro volume succeeded"
    );
    ensure!(!host_dir.join("other").exists());

    let out = fd_run(env, &["--read-only", image, "sh", "-c", "echo x > /etc/f"])?;
    ensure!(
        out.status.code() != Some(0),
        "write to a read-only root succeeded"
    );
    ensure!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );

    // --net none: only loopback.
    let out = fd_run(
        env,
        &[
            "--net",
            "none",
            "--hostname",
            "box",
            image,
            "sh",
            "-c",
            "ls /sys/class/net; hostname",
        ],
    )?;
    expect(&out, 0, "lo\nbox\n")?;

    // The process starts with no signal ignored or blocked: nothing of fd's own signal
    // handling (the Rust runtime ignores SIGPIPE, fd blocks stop signals) leaks into it.
    let out = fd_run(
        env,
        &[image, "grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"],
    )?;
    let status = text(&out.stdout);
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} in {status:?}"))?;
        Ok(u64::from_str_radix(line.trim(), 16)?)
    };
    ensure!(
        field("SigBlk:")? == 0,
        "signals blocked in the container: {status}"
    );
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    ensure!(
        field("SigIgn:")? & sigpipe == 0,
        "SIGPIPE ignored in the container: {status}"
    );

    // With fd's stdout on /dev/null the container can still write its output: libcontainer
    // would otherwise give it a read-only /dev/null.
    let mut cmd = env.cmd([
        "run",
        "--volume",
        &vol,
        image,
        "sh",
        "-c",
        "echo hidden; echo $? > /data/rc",
    ]);
    let status = cmd.stdout(Stdio::null()).status()?;
    ensure!(status.success(), "{status:?}");
    ensure!(fs_err::read_to_string(host_dir.join("rc"))? == "0\n");

    // -i passes stdin through.
    let mut cmd = env.cmd(["run", "-i", image, "cat"]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"through stdin\n")?;
    }
    let out = child.wait_with_output()?;
    expect(&out, 0, "through stdin\n")?;
    assert_clean(env)
}

#[test]
fn run_sigterm_stops_the_container() -> Result<()> {
    let s = setup()?;
    s.env.run(["pull", &s.image])?;
    let mut bg = Background::start(&s.env, &[&s.image, "sleep", "100"])?;
    let (_, pid) = wait_for_container(&s.env, Duration::from_secs(30))?;
    let started = Instant::now();
    bg.signal(libc::SIGTERM)?;
    let out = bg.wait(Duration::from_secs(10))?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    ensure!(!out.status.success(), "{:?}", out.status);
    ensure!(!process_exists(pid), "the container process {pid} survived");
    assert_clean(&s.env)
}

#[test]
fn run_two_at_once() -> Result<()> {
    let s = setup()?;
    s.env.run(["pull", &s.image])?;
    let mut a = Background::start(&s.env, &[&s.image, "sh", "-c", "sleep 1; echo a"])?;
    let mut b = Background::start(&s.env, &[&s.image, "sh", "-c", "sleep 1; echo b"])?;
    expect(&a.wait(Duration::from_secs(60))?, 0, "a\n")?;
    expect(&b.wait(Duration::from_secs(60))?, 0, "b\n")?;
    assert_clean(&s.env)
}

#[test]
fn run_killed_is_cleaned_by_the_next_command() -> Result<()> {
    let s = setup()?;
    s.env.run(["pull", &s.image])?;
    let mut bg = Background::start(&s.env, &[&s.image, "sleep", "100"])?;
    let (id, pid) = wait_for_container(&s.env, Duration::from_secs(30))?;
    bg.signal(libc::SIGKILL)?;
    let _ = bg.wait(Duration::from_secs(10))?;
    s.env.run(["images"])?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_exists(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(!process_exists(pid), "the container process {pid} survived");
    ensure!(
        cgroup_dirs(&id).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(&id)
    );
    assert_clean(&s.env)
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs the shell line `inner` on a fresh pty made by util-linux `script`, in `env`'s store,
/// feeding it `input`; returns the pty's output (with the terminal's `\r\n`s made `\n`) and
/// the exit status `script` passes through.
fn on_a_pty(env: &FdEnv, inner: &str, input: &[u8]) -> Result<(String, Option<i32>)> {
    use std::io::Write;
    let mut cmd = std::process::Command::new("script");
    cmd.args(["-qec", inner, "/dev/null"])
        .env("FD_HOME", env.fd_home())
        .env("HOME", env.home_dir())
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("starting script (package util-linux)")?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(input)?;
    }
    let out = child.wait_with_output()?;
    Ok((text(&out.stdout).replace("\r\n", "\n"), out.status.code()))
}

#[test]
fn run_tty_gives_a_real_terminal() -> Result<()> {
    let s = setup()?;
    s.env.run(["pull", &s.image])?;
    let fd = sh_quote(s.env.bin().to_str().context("fd path")?);
    let image = sh_quote(&s.image);

    // The outer pty is 33x77; the container's pty gets that size, its stdio is a pty, and
    // the exit code passes through.
    let inner = format!(
        "stty rows 33 cols 77; {fd} run -t {image} sh -c 'tty; stty size; exit 3'; \
         echo after=$?"
    );
    let (out, code) = on_a_pty(&s.env, &inner, b"")?;
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    ensure!(
        lines.first().is_some_and(|l| l.starts_with("/dev/pts/")),
        "tty inside printed {out:?}"
    );
    ensure!(lines.contains(&"33 77"), "stty size inside: {out:?}");
    ensure!(lines.contains(&"after=3"), "exit code: {out:?}");
    ensure!(code == Some(0), "script exited {code:?}: {out:?}");
    // The outer terminal is back in its cooked mode after fd run ended.
    let inner = format!("{fd} run -t {image} true; stty -a | grep -o -- ' -\\?icanon'");
    let (out, _) = on_a_pty(&s.env, &inner, b"")?;
    ensure!(out.contains(" icanon"), "terminal left raw: {out:?}");

    // -it: what is typed reaches the container's terminal (echoed by it) and its answer
    // comes back; the exit code passes through `script -e`.
    let inner = format!("{fd} run -it {image} sh -c 'read line; echo \"got $line\"; exit 4'");
    let (out, code) = on_a_pty(&s.env, &inner, b"hello\n")?;
    ensure!(out.contains("got hello"), "-it output: {out:?}");
    ensure!(code == Some(4), "-it exit {code:?}: {out:?}");
    assert_clean(&s.env)
}

/// An unprivileged user made for one test, with a subordinate id range, a private directory
/// it owns (its store and a copy of the fd binary) and nothing else. Removed on drop.
struct TestUser {
    name: String,
    /// Owned by the user: `fd` (the binary), `store/` (its FD_HOME), `home/`.
    dir: tempfile::TempDir,
}

impl TestUser {
    fn create(bin: &Path) -> Result<TestUser> {
        use std::os::unix::fs::PermissionsExt;
        let pid = std::process::id();
        let name = format!("fdrl{pid}");
        // A range of its own for this test run, inside login.defs' subordinate id bounds.
        let start = 1_000_000 + (pid % 4096) * 65_536;
        let range = format!("{start}-{}", start + 65_535);
        let status = std::process::Command::new("useradd")
            .args(["-M", "-N", "-s", "/usr/sbin/nologin", &name])
            .status()
            .context("running useradd")?;
        ensure!(status.success(), "useradd {name}: {status:?}");
        // From here the guard removes the user, whatever fails next.
        let dir = tempfile::Builder::new().prefix("fd-rootless-").tempdir()?;
        let user = TestUser { name, dir };
        let status = std::process::Command::new("usermod")
            .args(["--add-subuids", &range, "--add-subgids", &range, &user.name])
            .status()
            .context("running usermod")?;
        ensure!(status.success(), "usermod {}: {status:?}", user.name);
        fs_err::set_permissions(user.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        fs_err::copy(bin, user.bin())?;
        fs_err::set_permissions(user.bin(), std::fs::Permissions::from_mode(0o755))?;
        fs_err::create_dir(user.store())?;
        fs_err::create_dir(user.home())?;
        let status = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{}:", user.name))
            .arg(user.dir.path())
            .status()?;
        ensure!(status.success(), "chown: {status:?}");
        Ok(user)
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("fd")
    }
    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// `fd ARGS...` as the user, with its own store and nothing of root's environment.
    fn fd(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = if fuse_open_to_users()? {
            std::process::Command::new("runuser")
        } else {
            // fusermount3 opens /dev/fuse as the calling user. Debian makes the device 0666;
            // some machines (this test machine class among them) leave it 0600, which rules
            // out FUSE for every unprivileged user. Rather than change the host, the user's
            // command runs in a private mount namespace where a 0666 node of the same device
            // is bound over /dev/fuse, so the rootless path is exercised exactly as on a
            // standard system. Mounts made in there end with that namespace.
            let mut c = std::process::Command::new("unshare");
            c.args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                FUSE_SHIM,
                "sh",
                "runuser",
            ]);
            c
        };
        cmd.args(["-u", &self.name, "--", "env", "-i"])
            .arg(format!("FD_HOME={}", self.store().display()))
            .arg(format!("HOME={}", self.home().display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg("NO_COLOR=1")
            .arg(self.bin())
            .args(args)
            .stdin(Stdio::null());
        cmd.output().context("running fd as the test user")
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // -f: removed even if a process of the user is still running (a failed run); every
        // fd process of the test has been waited for by then.
        let _ = std::process::Command::new("userdel")
            .args(["-f", &self.name])
            .status();
        // userdel drops the subordinate ranges too; make sure, for a clean /etc.
        for file in ["/etc/subuid", "/etc/subgid"] {
            if let Ok(text) = std::fs::read_to_string(file) {
                let prefix = format!("{}:", self.name);
                if text.lines().any(|l| l.starts_with(&prefix)) {
                    let kept: String = text
                        .lines()
                        .filter(|l| !l.starts_with(&prefix))
                        .map(|l| format!("{l}\n"))
                        .collect();
                    let _ = std::fs::write(file, kept);
                }
            }
        }
    }
}

/// What the machine must allow for a rootless run; a clear failure (never a skip) when it
/// does not. Adds `user_allow_other` to /etc/fuse.conf when missing (a system setting the
/// suite leaves in place).
/// Runs its arguments after binding a world-usable node of the FUSE device (10, 229) over
/// /dev/fuse; meant to run in a private mount namespace.
const FUSE_SHIM: &str = r#"d=$(mktemp -d) && mount -t tmpfs -o mode=0755 fdfuse "$d" \
  && mknod -m 0666 "$d/fuse" c 10 229 && mount --bind "$d/fuse" /dev/fuse && exec "$@""#;

/// True when an unprivileged user can open /dev/fuse (mode o+rw).
fn fuse_open_to_users() -> Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs_err::metadata("/dev/fuse")?.permissions().mode();
    Ok(mode & 0o006 == 0o006)
}

fn rootless_machine_ready() -> Result<()> {
    let max = fs_err::read_to_string("/proc/sys/user/max_user_namespaces")?;
    ensure!(
        max.trim() != "0",
        "rootless runs are impossible here: sysctl user.max_user_namespaces is 0"
    );
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone") {
        ensure!(
            v.trim() != "0",
            "rootless runs are impossible here: sysctl kernel.unprivileged_userns_clone is 0"
        );
    }
    for tool in [
        "useradd",
        "usermod",
        "userdel",
        "runuser",
        "newuidmap",
        "fusermount3",
    ] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
        ensure!(
            found,
            "{tool} is missing (scripts/install-deps.sh installs it)"
        );
    }
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if !conf.lines().any(|l| l.trim() == "user_allow_other") {
        let mut conf = conf;
        if !conf.is_empty() && !conf.ends_with('\n') {
            conf.push('\n');
        }
        conf.push_str("user_allow_other\n");
        fs_err::write("/etc/fuse.conf", conf)?;
    }
    Ok(())
}

#[test]
fn run_rootless_as_an_unprivileged_user() -> Result<()> {
    rootless_machine_ready()?;
    let s = setup()?;
    let user = TestUser::create(s.env.bin())?;
    let image = s.image.as_str();
    let clean = |user: &TestUser, after: &Output| -> Result<()> {
        let store = user.store();
        let store = store.to_str().context("store path")?;
        let mounts = fs_err::read_to_string("/proc/self/mounts")?;
        let left: Vec<&str> = mounts.lines().filter(|l| l.contains(store)).collect();
        ensure!(
            left.is_empty(),
            "mounts left behind: {left:#?}\n{}",
            text(&after.stderr)
        );
        let runs = user.store().join("runs");
        let entries = match fs_err::read_dir(&runs) {
            Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(_) => Vec::new(),
        };
        ensure!(
            entries.is_empty(),
            "run directories left: {entries:?}\n{}",
            text(&after.stderr)
        );
        Ok(())
    };

    // The first run pulls into the user's store.
    let out = user.fd(&["run", image, "python3", "-c", "print(6*7)"])?;
    expect(&out, 0, "42\n")?;
    clean(&user, &out)?;
    expect(&user.fd(&["run", image, "id", "-u"])?, 0, "0\n")?;
    let out = user.fd(&[
        "run",
        image,
        "stat",
        "-c",
        "%u:%g",
        "/opt/fdtest/perm/owned-1000",
    ])?;
    expect(&out, 0, "1000:1000\n")?;
    expect(&user.fd(&["run", image, "sh", "-c", "exit 9"])?, 9, "")?;
    // The writable layer works without root too.
    let out = user.fd(&["run", image, "sh", "-c", "echo w > /tmp/w && cat /tmp/w"])?;
    expect(&out, 0, "w\n")?;
    clean(&user, &out)
}
