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
