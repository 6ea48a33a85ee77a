//! `fd`: pull, run and share containers from a content-addressed, peer-to-peer chunk store.
//!
//! This crate is the command line only: argument parsing, user-facing output, progress bars
//! and error messages. The work happens in the library crates (`fd-node` for the store,
//! `fd-gateway` for registries). Every command opens the store itself; there is no daemon.

mod images;
mod load;
mod mount;
mod output;
mod peer;
mod pull;
mod run;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for failures of the work itself (network, bad image, store problems). Usage
/// errors exit with 2, as clap does.
const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "fd",
    version,
    about = "Containers that start before their image is local"
)]
struct Cli {
    /// More log output (repeat for more); FD_LOG=debug does the same.
    // No `-v`: that is `fd run`'s volume flag, as in docker and podman.
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Print only errors (and the requested output of listing commands).
    #[arg(short, long, global = true)]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch an image into the local store.
    Pull(pull::PullArgs),
    /// List the images in the store.
    Images(images::ImagesArgs),
    /// Show an image's manifest, config, layers and chunk statistics as JSON.
    Inspect(images::InspectArgs),
    /// Import an image archive: an OCI layout (directory or tar) or a docker-archive tar.
    Load(load::LoadArgs),
    /// Remove images from the store (their chunks go at the next `fd gc`).
    Rmi(images::RmiArgs),
    /// Remove every chunk and blob no image needs, and leftovers of interrupted pulls.
    Gc(images::GcArgs),
    /// Mount an image's root filesystem read-only with FUSE; contents stream in on first read.
    Mount(mount::MountArgs),
    /// Unmount a directory mounted by `fd mount`.
    Umount(mount::UmountArgs),
    /// Run a command in a new container from an image; the image is fetched first if needed.
    Run(run::RunArgs),
    /// Run the foreground node: share the store with team peers; optionally a registry mirror
    /// and Prometheus metrics.
    // `share` is the older name, kept (hidden) for scripts.
    #[command(alias = "share")]
    Serve(serve::ServeArgs),
    /// List known peers: id, address, RTT, throughput, images held, last seen.
    Peers(peer::PeersArgs),
    /// Create, join or show the team whose machines share chunks with each other.
    Team(peer::TeamArgs),
    /// Internal: the single-threaded helper process that creates a container.
    #[command(hide = true, name = "__container")]
    Container(run::ContainerArgs),
}

fn main() -> ExitCode {
    let _ = fd_lazyfs::clean_stale_mounts_default();
    let _ = fd_runtime::clean_stale_runs_default();
    let cli = Cli::parse();
    output::init_logging(cli.verbose);
    output::set_quiet(cli.quiet);
    let result = match cli.command {
        Command::Pull(args) => pull::run(args),
        Command::Images(args) => images::list(args),
        Command::Inspect(args) => images::inspect(args),
        Command::Load(args) => load::run(args),
        Command::Rmi(args) => images::rmi(args),
        Command::Gc(args) => images::gc(args),
        Command::Mount(args) => mount::run(args),
        Command::Umount(args) => mount::umount(args),
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Container(args) => run::container(args),
        Command::Peers(args) => peer::peers(args),
        Command::Team(args) => peer::team(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if output::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            output::error(&err);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
