//! `fd serve --mirror ADDR`: answer as a registry mirror for docker, containerd and podman.
//!
//! Runs in the foreground until SIGINT or SIGTERM. Pulls through the mirror are served from
//! the local store first and from the upstream registry otherwise (see
//! `fd_gateway::mirror` for the sources, the access policy and what is kept).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use fd_gateway::mirror::{Mirror, MirrorConfig};
use fd_node::Store;
use tracing::info;

use crate::output;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Answer as a registry mirror on this address, e.g. 127.0.0.1:5001.
    #[arg(long, value_name = "ADDR")]
    mirror: Option<String>,
    /// Upstream registry (HOST[:PORT]) for clients that do not name one with `ns=`.
    #[arg(long, value_name = "HOST")]
    upstream: Option<String>,
    /// Another upstream clients may name with `ns=` (containerd does); repeatable.
    #[arg(long = "allow-upstream", value_name = "HOST")]
    allow_upstreams: Vec<String>,
    /// Allow plain HTTP to this registry (HOST or HOST:PORT). Loopback registries always are.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    /// Seconds to wait for a connection to the upstream before treating it as down.
    #[arg(long, value_name = "SECS", default_value_t = 2)]
    connect_timeout: u64,
}

pub(crate) fn run(args: ServeArgs) -> Result<()> {
    let Some(addr) = args.mirror.clone() else {
        bail!("nothing to serve: pass --mirror ADDR (e.g. --mirror 127.0.0.1:5001)");
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let store = Arc::new(Store::open_default().context("opening the store")?);
    let config = MirrorConfig {
        default_upstream: args.upstream.clone(),
        allowed_upstreams: args.allow_upstreams.clone(),
        insecure_registries: args.insecure_registries.clone(),
        connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
    };
    runtime.block_on(async move {
        let mirror = Mirror::new(store.clone(), config).context("setting up the mirror")?;
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener
            .local_addr()
            .context("reading the listening address")?;
        output::status(
            "Serving",
            format!(
                "registry mirror on http://{local} (store {}, upstream {})",
                store.root().display(),
                args.upstream.as_deref().unwrap_or("from ns= only")
            ),
        );
        mirror
            .serve(listener, shutdown_signal())
            .await
            .context("serving the mirror")?;
        info!("mirror stopped");
        Ok(())
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without handlers the default action (exit) still applies; wait forever here.
        _ => std::future::pending::<()>().await,
    }
}
