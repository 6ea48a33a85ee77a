//! `fd serve` as the foreground peer node, with its Prometheus page: real processes on
//! loopback (mDNS off, peers named with `--peer`), a real registry and a real image.
//!
//! Node A pulls an image from the registry, the registry goes away, and A runs `fd serve
//! --metrics`. Node B pulls the image from A alone. A's `/metrics` page must then count
//! exactly the bytes B verified and recorded as received from A, at least the image's layer
//! bytes, and no misses or refusals; SIGTERM must stop A at once with status 0.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fd_node::Store;
use fd_tests::{FdEnv, ImageCache, Registry, fd_no_mdns, images, output, spawn, text};

/// The body of `GET url` (http://HOST:PORT/PATH), with a plain HTTP/1.1 request.
fn http_get(url: &str) -> Result<(u16, String)> {
    let rest = url.strip_prefix("http://").context("not an http url")?;
    let (host, path) = rest.split_once('/').context("no path")?;
    let mut s = std::net::TcpStream::connect(host).with_context(|| format!("connecting {host}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, body.to_string()))
}

/// The value of one unlabelled series in a Prometheus text page.
fn series(page: &str, name: &str) -> Result<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in:\n{page}"))
}

#[test]
fn serve_counts_what_a_peer_fetched_and_stops_on_sigterm() -> Result<()> {
    let imgs = images()?;
    let mut registry = Registry::start()?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    let reference = format!("{}/busybox:latest", registry.addr());

    let a = FdEnv::new()?;
    let init = output(fd_no_mdns(&a, &["team", "init"]), Duration::from_secs(30))?;
    ensure!(init.status.success(), "team init: {}", text(&init));
    let token = String::from_utf8_lossy(&init.stdout).trim().to_string();
    let pulled = output(
        fd_no_mdns(&a, &["pull", &reference]),
        Duration::from_secs(120),
    )?;
    ensure!(pulled.status.success(), "pull on A: {}", text(&pulled));
    // From here on, A is the only source.
    registry.stop();
    let img = Store::open(a.fd_home())?.find_image(&reference)?;

    let mut node = spawn(fd_no_mdns(
        &a,
        &[
            "serve",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            "--metrics",
            "127.0.0.1:0",
        ],
    ))?;
    let a_addr = node.wait_word("listening on", Duration::from_secs(30))?;
    let a_id = a_addr.rsplit('/').next().context("peer id")?.to_string();
    let metrics_url = node.wait_word("metrics on", Duration::from_secs(30))?;
    let (status, before) = http_get(&metrics_url)?;
    ensure!(status == 200, "metrics answered {status}");
    ensure!(series(&before, "fd_peer_served_bytes_total")? == 0);

    let b = FdEnv::new()?;
    let join = output(
        fd_no_mdns(&b, &["team", "join", &token]),
        Duration::from_secs(30),
    )?;
    ensure!(join.status.success(), "team join: {}", text(&join));
    let pulled = output(
        fd_no_mdns(&b, &["pull", "--peer", &a_addr, &reference]),
        Duration::from_secs(120),
    )?;
    ensure!(pulled.status.success(), "pull on B: {}", text(&pulled));
    let summary = String::from_utf8_lossy(&pulled.stderr);
    ensure!(summary.contains("0 B from registry"), "summary: {summary}");

    // What B verified and kept from A, as B's peer book remembers it.
    let book: serde_json::Value =
        serde_json::from_slice(&fs_err::read(b.fd_home().join("peers.json"))?)?;
    let received = book["peers"][&a_id]["bytes_from"]
        .as_u64()
        .with_context(|| format!("B's book has no bytes from A: {book}"))?;

    let (status, page) = http_get(&metrics_url)?;
    ensure!(status == 200, "metrics answered {status}");
    let served = series(&page, "fd_peer_served_bytes_total")?;
    eprintln!(
        "A served {served} bytes; B received {received}; layers {}",
        img.blob_size
    );
    ensure!(served > 0, "nothing served:\n{page}");
    ensure!(
        served == received,
        "A served {served} bytes but B received {received}"
    );
    ensure!(
        served >= img.blob_size,
        "A served {served} bytes, less than the image's {} layer bytes",
        img.blob_size
    );
    ensure!(series(&page, "fd_peer_chunk_hits_total")? > 0);
    ensure!(series(&page, "fd_peer_chunk_misses_total")? == 0, "{page}");
    ensure!(series(&page, "fd_peer_denied_total")? == 0, "{page}");
    ensure!(series(&page, "fd_peer_chunk_requests_total")? > 0);
    // Only the one page is served, and only to GET.
    let (status, _) = http_get(&metrics_url.replace("/metrics", "/"))?;
    ensure!(status == 404, "/ answered {status}");

    // SIGTERM: exit 0 within a few seconds, nothing left running.
    let pid = node.child.id();
    let status = node
        .terminate(Duration::from_secs(5))
        .context("fd serve ignored SIGTERM")?;
    ensure!(status.success(), "fd serve exited with {status}");
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "fd serve is still there"
    );
    ensure!(
        std::net::TcpStream::connect(
            metrics_url
                .trim_start_matches("http://")
                .trim_end_matches("/metrics")
        )
        .is_err(),
        "the metrics port still answers"
    );
    Ok(())
}

#[test]
fn serve_without_a_team_or_a_mirror_says_what_to_do() -> Result<()> {
    let env = FdEnv::new()?;
    let out = output(fd_no_mdns(&env, &["serve"]), Duration::from_secs(30))?;
    ensure!(!out.status.success(), "fd serve ran: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("fd team init") && err.contains("fd team join") && err.contains("--mirror"),
        "unhelpful message: {err}"
    );
    Ok(())
}

#[test]
fn serve_counts_the_bytes_its_registry_mirror_answers() -> Result<()> {
    let imgs = images()?;
    let registry = Registry::start()?;
    registry.push(&imgs.busybox, ImageCache::BUSYBOX_TAG, "busybox:latest")?;
    let config = fd_tests::manifest(&imgs.busybox, ImageCache::BUSYBOX_TAG)?["config"]["digest"]
        .as_str()
        .context("config digest")?
        .to_string();
    // A store in no team: the mirror alone runs, with its metrics.
    let env = FdEnv::new()?;
    let mirror_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.to_string()
    };
    let node = spawn(fd_no_mdns(
        &env,
        &[
            "serve",
            "--mirror",
            &mirror_addr,
            "--upstream",
            &registry.addr(),
            "--metrics",
            "127.0.0.1:0",
        ],
    ))?;
    let metrics_url = node.wait_word("metrics on", Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        match http_get(&format!("http://{mirror_addr}/v2/busybox/blobs/{config}")) {
            Ok(answer) => break answer,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("the mirror never answered"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    ensure!(status == 200, "mirror answered {status}: {body}");
    ensure!(!body.is_empty());
    let (_, page) = http_get(&metrics_url)?;
    ensure!(
        series(&page, "fd_mirror_served_bytes_total")? == body.len() as u64,
        "the mirror sent {} bytes:\n{page}",
        body.len()
    );
    ensure!(series(&page, "fd_peer_served_bytes_total")? == 0);
    Ok(())
}
