//! Blob downloads: streamed into a caller's file with resume, or read whole when small.
//!
//! Layers can be gigabytes, so they go straight from the network to disk through a fixed
//! buffer while being hashed; nothing grows with the blob. A download cut short leaves its
//! file behind so the next call can continue with an HTTP Range request instead of starting
//! over. A file is only reported done once its size and sha256 match the manifest and it has
//! been fsynced; a mismatch removes it, since its bytes can no longer be trusted.

use std::io::SeekFrom;
use std::path::Path;
use std::time::Instant;

use futures::StreamExt;
use oci_client::client::{BlobResponse, SizedStream};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};
use tracing::{debug, trace};

use super::error::GatewayError;
use super::manifest::check_digest;
use super::transport::{
    Ctx, MAX_ATTEMPTS, Subject, backoff, is_library_digest_check, map_oci, retry, stream_error,
};
use super::{BlobDesc, FetchStats, ImageRef, MAX_SMALL_BLOB_BYTES, RegistryClient, Target};

/// Write buffer between the network and the file: large enough that writes are few, small
/// enough not to matter for memory.
const WRITE_BUFFER: usize = 1 << 20;
/// Read buffer when hashing the kept part of an interrupted download.
const READ_BUFFER: usize = 256 << 10;

/// `sha256:<hex>` of some bytes.
pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Where a download stands.
struct Progress {
    hasher: Sha256,
    /// Bytes in the file, all hashed.
    have: u64,
    /// Bytes received over the network by this call.
    downloaded: u64,
    /// Bytes kept from an earlier download.
    resumed_from: u64,
}

type Out = BufWriter<tokio::fs::File>;

impl RegistryClient {
    /// Streams one blob into `dest`. If `dest` already holds some bytes (a download
    /// interrupted earlier), resumes with an HTTP Range request from its length when the
    /// registry supports it, else starts over. Verifies the size and sha256 digest of the
    /// whole file before returning `Ok`; on mismatch removes the file and returns an error
    /// naming the digest expected and computed. Calls `progress(bytes_so_far_total)` as data
    /// arrives. Memory use does not grow with blob size. Fsyncs the file before returning.
    ///
    /// Connection trouble mid-stream is retried from where the data stopped. If all
    /// attempts fail, the partial file stays for a later call to resume. When a registry
    /// ignores the Range request, the file is truncated and `progress` starts again from 0.
    pub async fn fetch_blob(
        &self,
        r: &ImageRef,
        desc: &BlobDesc,
        dest: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<FetchStats, GatewayError> {
        check_digest(&desc.digest)?;
        let t = self.target(r).await?;
        let io = |action: &'static str| {
            move |source| GatewayError::Io {
                action,
                path: dest.to_path_buf(),
                source,
            }
        };

        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dest)
            .await
            .map_err(io("opening"))?;
        let existing = file.metadata().await.map_err(io("inspecting"))?.len();
        let mut p = Progress {
            hasher: Sha256::new(),
            have: 0,
            downloaded: 0,
            resumed_from: 0,
        };
        if existing > desc.size {
            debug!(digest = %desc.digest, existing, size = desc.size,
                "partial file is longer than the blob; starting over");
            file.set_len(0).await.map_err(io("truncating"))?;
        } else if existing > 0 {
            hash_prefix(&mut file, &mut p.hasher)
                .await
                .map_err(io("reading"))?;
            p.have = existing;
            p.resumed_from = existing;
            debug!(digest = %desc.digest, existing, "found partial download");
            progress(existing);
        }
        file.seek(SeekFrom::Start(p.have))
            .await
            .map_err(io("seeking in"))?;
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);

        let start = Instant::now();
        let mut attempt = 1;
        while p.have < desc.size {
            match stream_into(&t, desc, &mut out, &mut p, progress, dest).await {
                Ok(()) => break,
                Err(e) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                    out.flush().await.map_err(io("writing"))?;
                    let wait = backoff(attempt);
                    debug!(digest = %desc.digest, attempt, have = p.have, error = %e, ?wait,
                        "blob download interrupted; resuming");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => {
                    // Keep what arrived for a later resume, unless the bytes themselves are
                    // wrong or there are none.
                    let _ = out.flush().await;
                    drop(out);
                    let bad_bytes = matches!(
                        e,
                        GatewayError::SizeMismatch { .. }
                            | GatewayError::DigestHeaderMismatch { .. }
                    );
                    if bad_bytes || p.have == 0 {
                        let _ = tokio::fs::remove_file(dest).await;
                    }
                    return Err(e.with_attempts(attempt, start.elapsed()));
                }
            }
        }
        out.flush().await.map_err(io("writing"))?;
        let file = out.into_inner();

        let computed = format!("sha256:{}", hex::encode(p.hasher.finalize()));
        if p.have != desc.size || computed != desc.digest {
            drop(file);
            tokio::fs::remove_file(dest).await.map_err(io("removing"))?;
            if p.have != desc.size {
                return Err(GatewayError::SizeMismatch {
                    what: "blob".into(),
                    digest: desc.digest.clone(),
                    expected: desc.size,
                    actual: p.have,
                });
            }
            return Err(GatewayError::BlobDigestMismatch {
                expected: desc.digest.clone(),
                computed,
                removed: Some(dest.to_path_buf()),
            });
        }
        file.sync_all().await.map_err(io("syncing"))?;
        debug!(digest = %desc.digest, size = desc.size, downloaded = p.downloaded,
            resumed_from = p.resumed_from, "blob verified");
        Ok(FetchStats {
            bytes_downloaded: p.downloaded,
            resumed_from: p.resumed_from,
        })
    }

    /// Fetches a small blob (an image config) into memory, verified. Refuses blobs over
    /// [`MAX_SMALL_BLOB_BYTES`] before asking the registry for them.
    pub async fn fetch_small_blob(
        &self,
        r: &ImageRef,
        desc: &BlobDesc,
    ) -> Result<Vec<u8>, GatewayError> {
        check_digest(&desc.digest)?;
        if desc.size > MAX_SMALL_BLOB_BYTES {
            return Err(GatewayError::TooLarge {
                what: "blob".into(),
                name: desc.digest.clone(),
                size: desc.size,
                limit: MAX_SMALL_BLOB_BYTES,
            });
        }
        let t = self.target(r).await?;
        let data = retry(&t.ctx, "small blob", || async {
            let sized = t
                .client
                .pull_blob_stream(&t.oci, desc.digest.as_str())
                .await
                .map_err(|e| map_oci(e, &t.ctx, Subject::Blob(&desc.digest)))?;
            check_response(&sized, desc, 0, &t.ctx)?;
            let mut buf = Vec::with_capacity(usize::try_from(desc.size).unwrap_or(0));
            let mut stream = sized.stream;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => {
                        let total = buf.len() as u64 + chunk.len() as u64;
                        if total > desc.size {
                            return Err(too_long(desc, total));
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    Err(e) if is_library_digest_check(&e) => break,
                    Err(e) => return Err(stream_error(&e, &t.ctx)),
                }
            }
            if (buf.len() as u64) < desc.size {
                return Err(cut_short(&t.ctx, buf.len() as u64, desc.size));
            }
            Ok(buf)
        })
        .await?;
        let computed = sha256_digest(&data);
        if computed != desc.digest {
            return Err(GatewayError::BlobDigestMismatch {
                expected: desc.digest.clone(),
                computed,
                removed: None,
            });
        }
        Ok(data)
    }
}

/// One request's worth of a blob download, appended to `out` from `p.have` on.
async fn stream_into(
    t: &Target<'_>,
    desc: &BlobDesc,
    out: &mut Out,
    p: &mut Progress,
    progress: &(dyn Fn(u64) + Send + Sync),
    dest: &Path,
) -> Result<(), GatewayError> {
    let io = |action: &'static str| {
        move |source| GatewayError::Io {
            action,
            path: dest.to_path_buf(),
            source,
        }
    };
    let map = |e| map_oci(e, &t.ctx, Subject::Blob(&desc.digest));
    let sized = if p.have == 0 {
        trace!(digest = %desc.digest, "GET blob");
        t.client
            .pull_blob_stream(&t.oci, desc.digest.as_str())
            .await
            .map_err(map)?
    } else {
        trace!(digest = %desc.digest, offset = p.have, "GET blob with Range");
        match t
            .client
            .pull_blob_stream_partial(&t.oci, desc.digest.as_str(), p.have, None)
            .await
            .map_err(map)?
        {
            BlobResponse::Partial(s) => {
                debug!(digest = %desc.digest, offset = p.have, "registry honoured the range; resuming");
                s
            }
            BlobResponse::Full(s) => {
                debug!(digest = %desc.digest, "registry ignored the range; starting over");
                out.flush().await.map_err(io("writing"))?;
                out.get_mut().set_len(0).await.map_err(io("truncating"))?;
                out.seek(SeekFrom::Start(0))
                    .await
                    .map_err(io("seeking in"))?;
                p.hasher = Sha256::new();
                p.have = 0;
                p.resumed_from = 0;
                progress(0);
                s
            }
        }
    };
    check_response(&sized, desc, p.have, &t.ctx)?;
    let mut stream = sized.stream;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                let total = p.have + chunk.len() as u64;
                if total > desc.size {
                    return Err(too_long(desc, total));
                }
                out.write_all(&chunk).await.map_err(io("writing"))?;
                p.hasher.update(&chunk);
                p.have = total;
                p.downloaded += chunk.len() as u64;
                progress(p.have);
            }
            Err(e) if is_library_digest_check(&e) => break,
            Err(e) => return Err(stream_error(&e, &t.ctx)),
        }
    }
    if p.have < desc.size {
        return Err(cut_short(&t.ctx, p.have, desc.size));
    }
    Ok(())
}

/// Checks what the response headers announce: the length of the rest of the blob, and the
/// registry's digest for it (the library only passes the header on when it differs from
/// the digest asked for).
fn check_response(
    sized: &SizedStream,
    desc: &BlobDesc,
    offset: u64,
    ctx: &Ctx,
) -> Result<(), GatewayError> {
    if let Some(header) = &sized.digest_header_value
        && header != &desc.digest
    {
        return Err(GatewayError::DigestHeaderMismatch {
            registry: ctx.registry.clone(),
            reference: format!("blob {}", desc.digest),
            expected: desc.digest.clone(),
            header: header.clone(),
        });
    }
    if let Some(len) = sized.content_length
        && offset + len != desc.size
    {
        return Err(GatewayError::SizeMismatch {
            what: "blob".into(),
            digest: desc.digest.clone(),
            expected: desc.size,
            actual: offset + len,
        });
    }
    Ok(())
}

fn too_long(desc: &BlobDesc, total: u64) -> GatewayError {
    GatewayError::SizeMismatch {
        what: "blob".into(),
        digest: desc.digest.clone(),
        expected: desc.size,
        actual: total,
    }
}

/// A body that ended cleanly but early: worth another (resuming) attempt.
fn cut_short(ctx: &Ctx, have: u64, size: u64) -> GatewayError {
    GatewayError::Connection {
        registry: ctx.registry.clone(),
        reference: ctx.reference.clone(),
        detail: format!("the blob body ended after {have} of {size} bytes"),
        attempts: 1,
        elapsed: std::time::Duration::ZERO,
    }
}

/// Hashes a file from its start, in fixed-size reads.
async fn hash_prefix(file: &mut tokio::fs::File, hasher: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0)).await?;
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let c = RegistryClient::new(super::super::ClientOptions::default()).expect("client");
        let r = ImageRef::parse("127.0.0.1:1/x").expect("ref");
        let d = BlobDesc {
            digest: sha256_digest(b""),
            size: 0,
            media_type: String::new(),
        };
        let dest = Path::new("/nonexistent/never-written");
        let cb = |_: u64| {};
        // Only built, never polled: nothing is sent.
        assert_send(&c.fetch_blob(&r, &d, dest, &cb));
        assert_send(&c.fetch_small_blob(&r, &d));
        assert_send(&c.resolve(&r));
        assert_send(&c.head_digest(&r));
    }
}
