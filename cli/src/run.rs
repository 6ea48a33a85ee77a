//! `fd run`: a command in a new container from an image, fetched first when not in the store.
//!
//! The steps, and who does them:
//!
//! 1. this process finds (or pulls) the image, mounts its root file system with lazyfs under
//!    `$FD_HOME/runs/<id>/lower`, puts a private overlay over it, resolves the user and the
//!    command inside the image (a missing command ends here with 127, as a shell would), and
//!    writes the OCI runtime spec;
//! 2. `fd __container PLAN` (this binary again, with no other thread) creates, starts, waits
//!    for and deletes the container with libcontainer, and exits with its status;
//! 3. this process forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to the helper, waits for it, then
//!    unmounts and removes the run directory, and exits with the container's status.
//!
//! If this process is killed, the helper kills the container (it gets SIGTERM as its
//! parent-death signal) and the next `fd` command removes the rest (`clean_stale_runs`).
//!
//! Without root, the image is mounted through `fusermount3` with owners shifted by the
//! user's id maps, and the helper enters a user namespace before step 2 and mounts the
//! overlay there (see `fd_runtime::rootless`). With `-t`, this process keeps the caller's
//! terminal in raw mode while the helper relays the container's pty (`fd_runtime::tty`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use fd_lazyfs::{MountOptions, Prefetch};
use fd_node::Store;
use fd_node::fetch::{FetchPolicy, Fetcher};
use fd_runtime::container::RootlessPlan;
use fd_runtime::container::is_dev_null;
use fd_runtime::rootless::{self, UserNamespace};
use fd_runtime::spec::{Rootless, Volume};
use fd_runtime::{
    HelperPlan, ImageConfig, NetMode, RunDir, RunRequest, RuntimeError, SpecInput, build_spec,
    paths, plan_process, signals, user,
};

use crate::pull::RegistryArgs;
use crate::{images, output, pull};

/// How long a container may take to stop after a forwarded SIGINT or SIGTERM before it is
/// killed (its first process is PID 1 of its namespace and ignores signals it has no
/// handler for).
const STOP_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
#[command(trailing_var_arg = true)]
pub(crate) struct RunArgs {
    /// Keep stdin open and connected to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Give the container a pseudo-terminal (with -i: an interactive session).
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from this environment).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines; # comments).
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Bind a host directory or file: HOST:CONTAINER[:ro|rw]. (Only the long form: `-v` is
    /// fd's global --verbose.)
    #[arg(short = 'v', long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    volume: Vec<String>,
    /// Working directory inside the container (created when missing).
    #[arg(short, long)]
    workdir: Option<String>,
    /// User to run as: NAME or UID, optionally :GROUP or :GID.
    #[arg(short, long)]
    user: Option<String>,
    /// Replace the image's entrypoint ("" for none).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Network: share the host's (host) or a new namespace with only loopback (none).
    #[arg(long = "net", alias = "network", value_enum, default_value_t = NetArg::Host)]
    net: NetArg,
    /// Host name inside the container.
    #[arg(long)]
    hostname: Option<String>,
    /// Make the container's root file system read-only.
    #[arg(long)]
    read_only: bool,
    /// Remove the container when it exits (always done; accepted for docker compatibility).
    #[arg(long)]
    rm: bool,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Image reference or digest prefix.
    reference: String,
    /// Command and arguments (replace the image's CMD).
    #[arg(allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NetArg {
    Host,
    None,
}

#[derive(Debug, Args)]
pub(crate) struct ContainerArgs {
    /// The helper plan written by `fd run`.
    spec: PathBuf,
}

/// Exits with `code` after printing `err`, or with the error's own code when it is one of
/// the runtime's (127 for a missing command, 126 for one that cannot run, 125 otherwise).
fn fail(err: anyhow::Error) -> ! {
    let code = err
        .downcast_ref::<RuntimeError>()
        .map(RuntimeError::exit_code)
        .unwrap_or(125);
    output::error(&err);
    std::process::exit(i32::from(code));
}

pub(crate) fn run(args: RunArgs) -> Result<()> {
    // Without root the run goes through a user namespace; check first what the machine
    // allows, before anything is pulled or mounted.
    // Exits 125, as every failure of the runtime itself does.
    let userns = if rootless::is_rootless() {
        match UserNamespace::for_current_user().and_then(|ns| rootless::preflight(&ns).map(|()| ns))
        {
            Ok(ns) => Some(ns),
            Err(err) => fail(anyhow!(err)),
        }
    } else {
        None
    };
    // Before any thread exists, so every thread inherits the mask and the signals reach the
    // wait loop below (std's Command clears the mask again in the helper).
    let waited = signals::waited();
    signals::block(&waited).context("blocking signals")?;
    let code = match run_container(&args, userns.as_ref(), &waited) {
        Ok(code) => code,
        Err(err) => fail(err),
    };
    std::process::exit(code);
}

/// Docker's `--env-file` format: `KEY=VALUE` lines, `KEY` alone takes this process's value,
/// blank lines and `#` comments skipped.
fn read_env_file(path: &Path) -> Result<Vec<String>> {
    let text = fs_err::read_to_string(path)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.extend(env_entry(line));
    }
    Ok(out)
}

/// `KEY=VALUE` as is; `KEY` becomes `KEY=<value here>`, or nothing when unset here.
fn env_entry(entry: &str) -> Option<String> {
    if entry.contains('=') {
        Some(entry.to_string())
    } else {
        std::env::var(entry).ok().map(|v| format!("{entry}={v}"))
    }
}

fn parse_volume(spec: &str) -> Result<Volume> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (source, destination, mode) = match parts.as_slice() {
        [s, d] => (*s, *d, "rw"),
        [s, d, m] => (*s, *d, *m),
        _ => bail!("-v {spec}: expected HOST:CONTAINER[:ro|rw]"),
    };
    let readonly = match mode {
        "ro" => true,
        "rw" => false,
        other => bail!("-v {spec}: unknown mode {other:?} (ro or rw)"),
    };
    if !destination.starts_with('/') {
        bail!("-v {spec}: the container path must be absolute");
    }
    let source = PathBuf::from(source);
    if !source.is_absolute() {
        bail!("-v {spec}: the host path must be absolute");
    }
    if !source.exists() {
        // docker creates a missing host directory.
        fs_err::create_dir_all(&source)?;
    }
    Ok(Volume {
        source: source
            .canonicalize()
            .with_context(|| format!("-v {spec}: resolving {}", source.display()))?,
        destination: destination.to_string(),
        readonly,
    })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Finds the image. When the store lacks it and a team peer holds it, only its metadata is
/// fetched and its contents stream from the peers on first read (the returned `Streaming`
/// keeps the peer node up for the run and prints what came from peers when dropped, at the
/// end of the run); when no peer holds it, it is pulled. See `pull::open_image`.
fn image(
    store: &Arc<Store>,
    args: &RunArgs,
) -> Result<(fd_node::ImageRecord, Option<pull::Streaming>)> {
    if let Ok(image) = images::find(store, &args.reference)
        && !image.lazy
    {
        return Ok((image, None));
    }
    pull::open_image(
        store,
        &args.registry,
        &args.reference,
        pull::IfMissing::Pull,
    )
}

fn run_container(args: &RunArgs, userns: Option<&UserNamespace>, waited: &[i32]) -> Result<i32> {
    let store = Arc::new(Store::open_default().context("opening the store")?);
    let (image, streaming) = image(&store, args)?;
    let config = store
        .read_blob(&image.config_digest)
        .with_context(|| format!("reading the config of {}", image.reference))?;
    let config = ImageConfig::parse(&config)?;
    let mut env = Vec::new();
    for file in &args.env_file {
        env.extend(read_env_file(file).with_context(|| format!("--env-file {}", file.display()))?);
    }
    env.extend(args.env.iter().filter_map(|e| env_entry(e)));
    let request = RunRequest {
        command: args.command.clone(),
        entrypoint: args.entrypoint.clone(),
        env,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        tty: args.tty,
    };
    let mut plan = plan_process(&config, &request)?;
    let volumes = args
        .volume
        .iter()
        .map(|v| parse_volume(v))
        .collect::<Result<Vec<_>>>()?;

    let run = RunDir::create(store.root())?;
    // A lazily present image's missing chunks come from team peers.
    let sources = streaming.iter().map(|s| s.source()).collect();
    let fetcher = Arc::new(Fetcher::new(
        store.clone(),
        sources,
        FetchPolicy::from_env(),
    ));
    if let Some(s) = &streaming {
        s.watch(&fetcher);
    }
    let options = MountOptions {
        prefetch: Prefetch::Profile,
        // The container's users are not this process's user.
        allow_other: true,
        // A root file system needs its setuid programs and device nodes (fusermount3 never
        // allows them to a user, and a user namespace could not use them anyway).
        suid_and_devices: userns.is_none(),
        // In a user namespace the image's owners must show through its maps.
        id_map: userns.map(UserNamespace::id_map).unwrap_or_default(),
        ..MountOptions::default()
    };
    let mounted = match fd_lazyfs::mount(fetcher, &image, &run.lower(), &options) {
        Ok(m) => m,
        Err(e) => {
            let _ = run.remove();
            return Err(anyhow!(e).context(format!("mounting {}", image.reference)));
        }
    };
    let outcome = (|| -> Result<i32> {
        // Without root the helper mounts the overlay in its own mount namespace (see
        // fd_runtime::rootless), so the image is looked into through the lazyfs mount, and a
        // missing working directory is made in the writable layer.
        let (rootfs, view, writable) = match userns {
            None => {
                run.mount_overlay()?;
                (run.rootfs(), run.rootfs(), run.rootfs())
            }
            Some(_) => (run.rootfs(), run.lower(), run.dir.join("upper")),
        };
        let identity = user::resolve_user(&view, &plan.user)?;
        plan.env_default("HOME", identity.home.as_deref().unwrap_or("/"));
        let hostname = args.hostname.clone().unwrap_or_else(|| match args.net {
            NetArg::Host => host_name(),
            NetArg::None => run.id.clone(),
        });
        plan.env_default("HOSTNAME", &hostname);
        let path_var = plan.env_value("PATH").unwrap_or_default().to_string();
        paths::find_command(&view, &plan.args[0], &path_var, &plan.cwd)?;
        let cwd = paths::resolve_in_root(&view, &plan.cwd)
            .with_context(|| format!("working directory {}", plan.cwd))?;
        if !cwd.exists() {
            let cwd = paths::resolve_in_root(&writable, &plan.cwd)
                .with_context(|| format!("working directory {}", plan.cwd))?;
            fs_err::create_dir_all(&cwd).context("creating the working directory")?;
        }
        if userns.is_some() {
            tracing::debug!("rootless run: no cgroup (none is delegated to this user)");
        }
        let (resolv_conf, hosts, hostname_file) =
            run.write_etc(&hostname, args.net == NetArg::Host)?;
        let spec = build_spec(&SpecInput {
            rootfs: rootfs.clone(),
            readonly: args.read_only,
            args: plan.args.clone(),
            env: plan.env.clone(),
            cwd: plan.cwd.clone(),
            identity,
            terminal: args.tty,
            hostname,
            net: match args.net {
                NetArg::Host => NetMode::Host,
                NetArg::None => NetMode::None,
            },
            volumes,
            resolv_conf,
            hosts,
            hostname_file,
            cgroups_path: run.cgroups_path(),
            rootless: userns.map(|ns| Rootless {
                namespace: ns.clone(),
            }),
        })?;
        let config_path = run.dir.join("config.json");
        spec.save(&config_path)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let helper_plan = HelperPlan {
            container_id: run.container_id(),
            bundle: run.dir.clone(),
            state_root: run.state(),
            parent_pid: std::process::id() as i32,
            stop_grace_ms: STOP_GRACE.as_millis() as u64,
            tty: args.tty,
            rootless: userns.map(RootlessPlan::new),
        };
        let plan_path = run.dir.join("helper.json");
        helper_plan.write(&plan_path)?;
        // Keys go to the container's terminal as typed (Ctrl-C included) while it runs; the
        // guard restores the caller's settings however the run ends.
        let _raw = if args.tty {
            fd_runtime::tty::RawMode::enable(0).context("putting the terminal in raw mode")?
        } else {
            None
        };
        run_helper_process(&plan_path, args.interactive, &run, waited)
    })();
    // The overlay goes before the lazyfs mount it sits on.
    if let Err(e) = fd_runtime::rundir::unmount_overlay(&run.rootfs()) {
        tracing::warn!(error = %e, "unmounting the overlay");
    }
    if let Err(e) = mounted.unmount() {
        tracing::warn!(error = %e, "unmounting the image");
    }
    if let Err(e) = run.remove() {
        tracing::warn!(error = %e, "removing the run directory");
    }
    outcome
}

/// Starts `fd __container PLAN`, forwards stop signals to it and returns its exit status.
fn run_helper_process(plan: &Path, interactive: bool, run: &RunDir, waited: &[i32]) -> Result<i32> {
    let exe = std::env::current_exe().context("finding the fd binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("__container").arg(plan);
    // libcontainer warns about every cgroup v1 controller this kernel lacks, on every run;
    // keep its logs to errors unless the user chose a filter.
    if std::env::var_os("FD_LOG").is_none() {
        cmd.env("FD_LOG", "warn,libcgroups=error,libcontainer=error");
    }
    cmd.stdin(if interactive {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    // Output that goes to /dev/null here goes through a pipe that is drained: given
    // /dev/null, libcontainer swaps in a read-only /dev/null inside the container.
    let out_null = is_dev_null(&std::io::stdout());
    let err_null = is_dev_null(&std::io::stderr());
    cmd.stdout(if out_null {
        Stdio::piped()
    } else {
        Stdio::inherit()
    });
    cmd.stderr(if err_null {
        Stdio::piped()
    } else {
        Stdio::inherit()
    });
    // SAFETY: the closure only calls prctl, which is async-signal-safe. The parent-death
    // signal is tied to the thread that forks, which is this (main) thread, alive until
    // the helper has been waited for.
    unsafe {
        cmd.pre_exec(fd_runtime::container::set_parent_death_signal);
    }
    let mut child = cmd.spawn().context("starting the container helper")?;
    let pid = child.id() as i32;
    run.record_helper(pid)?;
    let mut drains = Vec::new();
    for reader in [
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        drains.push(std::thread::spawn(move || {
            let mut reader = reader;
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        }));
    }
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .context("waiting for the container helper")?
        {
            break status;
        }
        if let Some(sig) = signals::wait(waited, Duration::from_millis(50))
            && signals::FORWARDED.contains(&sig)
        {
            signals::send(pid, sig);
        }
    };
    for d in drains {
        let _ = d.join();
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 125,
    })
}

pub(crate) fn container(args: ContainerArgs) -> Result<()> {
    let plan = HelperPlan::read(&args.spec)?;
    match fd_runtime::run_helper(&plan) {
        Ok(code) => std::process::exit(code),
        Err(err) => fail(anyhow!(err)),
    }
}
