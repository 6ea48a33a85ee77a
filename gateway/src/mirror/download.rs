//! One upstream download per blob, shared by every client that asks for it meanwhile.
//!
//! The first request for a blob that is neither stored nor being fetched starts a task that
//! writes the upstream body to a file in the store's temp dir and publishes its progress on a
//! watch channel. Every client, the first included, reads that growing file at its own pace:
//! a slow client holds no buffer and slows nobody else, and memory stays bounded whatever the
//! blob size. The last byte is released only once the whole blob has hashed to its digest, so
//! no client ever receives a complete body that is wrong; on failure the readers get an error
//! and the connection is cut. The verified file is then chunked into the store and pinned.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::HeaderValue;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::State;
use super::upstream::UpError;

/// Largest piece handed to a client at once.
const READ_PIECE: u64 = 256 << 10;

/// Where a download stands.
#[derive(Debug, Clone)]
pub(crate) enum DlState {
    /// Waiting for the upstream's answer.
    Starting,
    /// Body arriving: `written` bytes of `size` are in the file.
    Streaming { size: u64, written: u64 },
    /// All bytes are in the file and match the digest.
    Verified { size: u64 },
    /// Gave up; readers fail.
    Failed(UpError),
}

/// A download in flight. The file goes when the last holder drops it, so readers that
/// joined late can finish even after the blob moved into the store.
pub(crate) struct Download {
    pub(crate) path: PathBuf,
    pub(crate) rx: watch::Receiver<DlState>,
}

impl Drop for Download {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Either the blob is in the store already, or here is the download to read.
pub(crate) enum Joined {
    Stored,
    Download(Arc<Download>),
}

impl State {
    /// Joins the download of `digest`, starting it if nobody has. Checking the store and
    /// inserting happen under one lock, and a finished download leaves the map only after its
    /// blob is recorded, so two requests can never both start a download of one blob.
    pub(crate) fn join_download(
        self: &Arc<Self>,
        registry: &str,
        name: &str,
        digest: &str,
        auth: Option<HeaderValue>,
    ) -> Result<Joined, UpError> {
        let mut map = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = map.get(digest) {
            return Ok(Joined::Download(d.clone()));
        }
        match self.store.blob(digest) {
            Ok(Some(_)) => return Ok(Joined::Stored),
            Ok(None) => {}
            Err(e) => return Err(UpError::Invalid(format!("store: {e}"))),
        }
        let (tx, rx) = watch::channel(DlState::Starting);
        let dl = Arc::new(Download {
            path: self.store.tmp_path("mirror-blob"),
            rx,
        });
        map.insert(digest.to_string(), dl.clone());
        drop(map);
        let state = self.clone();
        let (registry, name, digest) = (registry.to_string(), name.to_string(), digest.to_string());
        let task_dl = dl.clone();
        tokio::spawn(async move {
            let result = fetch(&state, &task_dl, &tx, &registry, &name, &digest, auth).await;
            if let Err(e) = result {
                warn!(%digest, error = %e, "blob download failed");
                tx.send_replace(DlState::Failed(e));
            }
            state
                .downloads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest);
        });
        Ok(Joined::Download(dl))
    }
}

async fn fetch(
    state: &Arc<State>,
    dl: &Arc<Download>,
    tx: &watch::Sender<DlState>,
    registry: &str,
    name: &str,
    digest: &str,
    auth: Option<HeaderValue>,
) -> Result<(), UpError> {
    let local = |e: &dyn std::fmt::Display| UpError::Invalid(format!("store: {e}"));
    // Held until the blob is recorded and pinned: gc must not clear the temp file or the new
    // chunks in between.
    let store = state.store.clone();
    let lock = tokio::task::spawn_blocking(move || store.writer_lock())
        .await
        .map_err(|e| local(&e))?
        .map_err(|e| local(&e))?;
    let resp = state
        .upstream
        .blob(registry, name, digest, auth.as_ref())
        .await?;
    let size = resp
        .content_length()
        .ok_or_else(|| UpError::Invalid(format!("{digest}: no Content-Length")))?;
    let mut file = tokio::fs::File::create(&dl.path)
        .await
        .map_err(|e| local(&e))?;
    tx.send_replace(DlState::Streaming { size, written: 0 });
    info!(%digest, size, %registry, %name, "fetching blob from upstream");
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| UpError::Unreachable(super::upstream::error_chain(&e)))?;
        written += piece.len() as u64;
        if written > size {
            return Err(UpError::Invalid(format!(
                "{digest}: longer than {size} bytes"
            )));
        }
        hasher.update(&piece);
        file.write_all(&piece).await.map_err(|e| local(&e))?;
        // tokio's file writes complete in the background; readers open the file separately,
        // so the bytes must have reached it before they are announced.
        file.flush().await.map_err(|e| local(&e))?;
        tx.send_modify(|s| {
            if let DlState::Streaming { written: w, .. } = s {
                *w = written;
            }
        });
    }
    if written != size {
        return Err(UpError::Unreachable(format!(
            "{digest}: body ended at {written} of {size} bytes"
        )));
    }
    let computed = format!("sha256:{}", hex::encode(hasher.finalize()));
    if computed != digest {
        return Err(UpError::Invalid(format!(
            "{digest}: upstream body hashes to {computed}"
        )));
    }
    file.sync_all().await.map_err(|e| local(&e))?;
    drop(file);
    tx.send_replace(DlState::Verified { size });
    debug!(%digest, "blob verified; storing");
    let store = state.store.clone();
    let path = dl.path.clone();
    let key = digest.to_string();
    tokio::task::spawn_blocking(move || -> fd_node::Result<()> {
        let f = fs_err::File::open(&path)?;
        store.put_blob_from_reader(&key, "application/octet-stream", std::io::BufReader::new(f))?;
        store.pin_blob(&key)?;
        drop(lock);
        Ok(())
    })
    .await
    .map_err(|e| local(&e))?
    .map_err(|e| local(&e))?;
    info!(%digest, size, "blob stored");
    Ok(())
}

/// Waits until the download knows its size (or failed).
pub(crate) async fn wait_size(dl: &Download) -> Result<u64, UpError> {
    let mut rx = dl.rx.clone();
    loop {
        let now = rx.borrow_and_update().clone();
        match now {
            DlState::Streaming { size, .. } | DlState::Verified { size } => return Ok(size),
            DlState::Failed(e) => return Err(e),
            DlState::Starting => {}
        }
        if rx.changed().await.is_err() {
            return Err(UpError::Invalid("download ended without a result".into()));
        }
    }
}

struct Tail {
    /// Keeps the file alive while this reader needs it.
    _dl: Arc<Download>,
    path: PathBuf,
    rx: watch::Receiver<DlState>,
    file: Option<tokio::fs::File>,
    pos: u64,
    end: u64,
    done: bool,
}

impl Tail {
    async fn read(&mut self, n: u64) -> std::io::Result<Bytes> {
        if self.file.is_none() {
            let mut f = tokio::fs::File::open(&self.path).await?;
            f.seek(SeekFrom::Start(self.pos)).await?;
            self.file = Some(f);
        }
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no file"))?;
        let mut buf = vec![0u8; n as usize];
        f.read_exact(&mut buf).await?;
        self.pos += n;
        Ok(Bytes::from(buf))
    }
}

/// Streams bytes `start..end` of a download as they arrive.
pub(crate) fn tail(
    dl: Arc<Download>,
    start: u64,
    end: u64,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let t = Tail {
        path: dl.path.clone(),
        rx: dl.rx.clone(),
        _dl: dl,
        file: None,
        pos: start,
        end,
        done: false,
    };
    futures::stream::unfold(t, |mut t| async move {
        if t.done || t.pos >= t.end {
            return None;
        }
        loop {
            let avail = match &*t.rx.borrow_and_update() {
                DlState::Starting => Ok(0),
                // Hold the final byte back until the digest is proven.
                DlState::Streaming { size, written } => Ok((*written).min(size.saturating_sub(1))),
                DlState::Verified { size } => Ok(*size),
                DlState::Failed(e) => Err(e.to_string()),
            };
            let avail = match avail {
                Ok(a) => a,
                Err(e) => {
                    t.done = true;
                    return Some((Err(std::io::Error::other(e)), t));
                }
            };
            if avail > t.pos {
                let n = (avail.min(t.end) - t.pos).min(READ_PIECE);
                let item = t.read(n).await;
                if item.is_err() {
                    t.done = true;
                }
                return Some((item, t));
            }
            if t.rx.changed().await.is_err() {
                // The download task is gone; its last word is still readable.
                if matches!(&*t.rx.borrow(), DlState::Verified { .. }) {
                    continue;
                }
                t.done = true;
                return Some((
                    Err(std::io::Error::other("download ended without a result")),
                    t,
                ));
            }
        }
    })
}
