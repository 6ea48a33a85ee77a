//! What the user sees: short colored status lines on stderr (uv-style), progress bars for long
//! work, and errors with their causes. Machine-readable output (tables, JSON) goes to stdout.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use console::style;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Sends `tracing` logs to stderr. `FD_LOG` takes an env-filter string; `-v` raises the level.
pub(crate) fn init_logging(verbose: u8) {
    // libp2p's DHT warns once that it has nobody to bootstrap from whenever a node starts
    // alone, which is the normal first moment of every node; it stays quiet below -vv.
    let default = match verbose {
        0 => "warn,libp2p_kad=error",
        1 => "info,libp2p_kad=error",
        2 => "debug",
        _ => "trace",
    };
    let filter = std::env::var("FD_LOG").unwrap_or_else(|_| default.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .compact()
        .init();
}

static QUIET: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A status line: a bold verb, then the message (`Pulled busybox:latest in 1.2s`).
pub(crate) fn status(verb: &str, message: impl std::fmt::Display) {
    if quiet() {
        return;
    }
    // Writing to a closed stderr (`fd … 2>&1 | head`) must not panic, as eprintln! would.
    let _ = writeln!(
        std::io::stderr(),
        "{} {message}",
        style(verb).green().bold()
    );
}

/// Prints an error and its chain of causes.
pub(crate) fn error(err: &anyhow::Error) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{} {err}", style("error:").red().bold());
    for cause in err.chain().skip(1) {
        let _ = writeln!(stderr, "  {} {cause}", style("caused by:").dim());
    }
}

pub(crate) fn bytes(n: u64) -> String {
    indicatif::BinaryBytes(n).to_string()
}

pub(crate) fn duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// True when the error is a write to a closed pipe (`fd images | head -1`): the reader has
/// what it wanted, so fd ends quietly, as other command-line tools do.
pub(crate) fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Short form of a digest for tables: the first 12 hex digits.
pub(crate) fn short_digest(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    &hex[..hex.len().min(12)]
}

/// Progress bars for a set of downloads. Hidden when stderr is not a terminal.
pub(crate) struct Progress {
    multi: MultiProgress,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        let target = if quiet() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let multi = MultiProgress::with_draw_target(target);
        Progress { multi }
    }

    pub(crate) fn download(&self, name: &str, total: u64) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>14.dim} {bar:30.green/dim} {binary_bytes:>10}/{binary_total_bytes:<10} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("━━╌"),
        );
        bar.set_prefix(name.to_string());
        bar
    }
}
