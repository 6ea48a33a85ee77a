//! `fd`: pull, run and share containers from a content-addressed, peer-to-peer chunk store.
//!
//! This crate is the command line only: argument parsing, user-facing output, progress bars
//! and error messages. The work happens in the library crates (`fd-node` for the store,
//! `fd-gateway` for registries). Every command opens the store itself; there is no daemon.

mod images;
mod load;
mod mount;
mod output;
mod pull;

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
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
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
}

fn main() -> ExitCode {
    let _ = fd_lazyfs::clean_stale_mounts_default();
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
