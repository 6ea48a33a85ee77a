//! Turns one layer blob into its file view: contents chunked into the store, and a
//! [`LayerIndex`] of what the tar does.
//!
//! Layer tars are hostile input. Every entry is checked before it counts:
//! - paths must be relative and free of `..` (a leading `./` is fine), with no name over 255
//!   bytes;
//! - hardlink targets follow the same rules; symlink targets may be absolute (they resolve
//!   inside the container's root) but a relative target may not climb above the root;
//! - a header (long name, PAX record) may not exceed [`Limits::max_header`]: the tar reader
//!   buffers those in memory, so an unbounded one is a memory bomb;
//! - the decompressed stream may not exceed [`Limits::max_unpacked`] (decompression bombs);
//! - entry types other than files, directories, links and device nodes are refused.
//!
//! Contents stream through the chunker, so memory does not grow with the layer's size.

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::rc::Rc;

use sha2::Digest;

use crate::import::Compression;
use crate::index::{Entry, Kind, LayerIndex, LayerOp};
use crate::{NodeError, Result, Store};

mod pax;

/// Bounds on what one layer may make fd do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest decompressed layer accepted.
    pub max_unpacked: u64,
    /// Largest run of header bytes (long names, PAX records) before one entry.
    pub max_header: u64,
}

impl Default for Limits {
    /// 256 GiB of decompressed data is far beyond any real layer yet small enough to stop a
    /// bomb before it fills a disk; 1 MiB of headers fits thousands of xattrs. Both can be
    /// changed with `FD_MAX_LAYER_BYTES` and `FD_MAX_HEADER_BYTES`.
    fn default() -> Self {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Limits {
            max_unpacked: env("FD_MAX_LAYER_BYTES", 256 << 30),
            max_header: env("FD_MAX_HEADER_BYTES", 1 << 20),
        }
    }
}

/// What ingesting a layer produced.
#[derive(Debug, Clone)]
pub struct IngestedLayer {
    pub index: LayerIndex,
    /// `sha256:` of the decompressed tar: the layer's diff id.
    pub diff_id: String,
    pub files: u64,
    pub unpacked: u64,
}

/// Reads a layer blob (`compressed`, in `compression`) and writes its file contents as chunks.
/// `layer` names the layer in errors.
pub fn ingest_layer<'r>(
    store: &Store,
    layer: &str,
    compression: Compression,
    compressed: impl Read + 'r,
    limits: Limits,
) -> Result<IngestedLayer> {
    let state = Rc::new(GuardState::default());
    let decompressed: Box<dyn Read + 'r> = match compression {
        Compression::None => Box::new(compressed),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(compressed)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(compressed).map_err(|e| bad(layer, "zstd", e))?,
        ),
    };
    let guard = Guard {
        inner: decompressed,
        state: state.clone(),
        limits,
        hasher: sha2::Sha256::new(),
    };
    let mut archive = tar::Archive::new(guard);
    let mut index = LayerIndex::default();
    let mut files = 0u64;
    let mut previous = String::from("(start of layer)");

    let result = (|| -> Result<()> {
        state.expect_header(limits.max_header);
        let entries = archive
            .entries()
            .map_err(|e| bad(layer, "reading tar", e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| state.explain(layer, &previous, e))?;
            let header_bytes = state.expect_data();
            let pax = pax::records_before_entry(&header_bytes, state.header_start.get()).map_err(
                |reason| NodeError::HostileEntry {
                    layer: layer.to_string(),
                    entry: format!("after {previous}"),
                    reason: reason.to_string(),
                },
            )?;
            let raw_path = match pax.get(b"path".as_slice()) {
                Some(p) => p.clone(),
                None => entry.path_bytes().into_owned(),
            };
            previous = String::from_utf8_lossy(&raw_path).into_owned();
            let op =
                read_entry(store, layer, &raw_path, &pax, &mut entry).map_err(|e| match e {
                    NodeError::Io(io) => state.explain(layer, &previous, io),
                    e => e,
                })?;
            // Whatever the entry still holds (data on a non-file entry) is read here, so the
            // next header phase starts exactly at the end of this entry's data.
            std::io::copy(&mut entry, &mut std::io::sink())
                .map_err(|e| state.explain(layer, &previous, e))?;
            if let Some(op) = op {
                if matches!(
                    op,
                    LayerOp::Put(Entry {
                        kind: Kind::File,
                        ..
                    }) | LayerOp::Hardlink { .. }
                ) {
                    files += 1;
                }
                index.ops.push(op);
            }
            state.expect_header(limits.max_header);
        }
        Ok(())
    })();
    result?;

    // The diff id covers the whole decompressed stream, including the end-of-archive blocks
    // and any padding after them.
    let mut guard = archive.into_inner();
    let _ = state.expect_data();
    std::io::copy(&mut guard, &mut std::io::sink())
        .map_err(|e| state.explain(layer, &previous, e))?;
    let diff_id = format!("sha256:{}", hex::encode(guard.hasher.finalize()));
    Ok(IngestedLayer {
        index,
        diff_id,
        files,
        unpacked: state.pos.get(),
    })
}

/// Turns one tar entry into a layer operation; `None` for entries that carry no file.
fn read_entry<R: Read>(
    store: &Store,
    layer: &str,
    raw_path: &[u8],
    pax: &pax::Records,
    entry: &mut tar::Entry<'_, R>,
) -> Result<Option<LayerOp>> {
    let reject = |reason: &str| NodeError::HostileEntry {
        layer: layer.to_string(),
        entry: String::from_utf8_lossy(raw_path).into_owned(),
        reason: reason.to_string(),
    };
    let header_err = |e: std::io::Error| reject(&format!("unreadable header: {e}"));

    let entry_type = entry.header().entry_type();
    if entry_type.is_pax_global_extensions() {
        return Ok(None);
    }
    let path = normalize(raw_path).map_err(reject)?;

    // Whiteouts are named `.wh.NAME`; `.wh..wh..opq` marks its directory opaque.
    let (parent, name) = split_path(&path);
    if let Some(hidden) = name.strip_prefix(b".wh.") {
        if hidden == b".wh..opq" {
            return Ok(Some(LayerOp::Opaque(parent.to_vec())));
        }
        if hidden.starts_with(b".wh.") {
            // Other `.wh..wh.` names are private bookkeeping of some old tools; they name no file.
            return Ok(None);
        }
        return Ok(Some(LayerOp::Whiteout(child(parent, hidden))));
    }

    let header = entry.header();
    let mut e = Entry::implied_dir(path.clone());
    e.mode = header.mode().map_err(header_err)? & 0o7777;
    e.uid =
        u32::try_from(header.uid().map_err(header_err)?).map_err(|_| reject("uid over 32 bits"))?;
    e.gid =
        u32::try_from(header.gid().map_err(header_err)?).map_err(|_| reject("gid over 32 bits"))?;
    e.mtime = i64::try_from(header.mtime().map_err(header_err)?).unwrap_or(i64::MAX);

    // PAX records: exact mtime, numeric ids past the header's range, and xattrs.
    {
        for (key, value) in pax {
            let (key, value) = (key.as_slice(), value.as_slice());
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                e.xattrs.push((name.to_vec(), value.to_vec()));
            } else if key == b"mtime" {
                let (secs, nsec) = parse_pax_time(value).ok_or_else(|| reject("bad PAX mtime"))?;
                e.mtime = secs;
                e.mtime_nsec = nsec;
            } else if key == b"uid" {
                e.uid = parse_pax_u32(value).ok_or_else(|| reject("bad PAX uid"))?;
            } else if key == b"gid" {
                e.gid = parse_pax_u32(value).ok_or_else(|| reject("bad PAX gid"))?;
            } else if key.starts_with(b"GNU.sparse.") {
                return Err(reject(
                    "PAX sparse files are not supported; use GNU sparse headers",
                ));
            }
        }
    }
    e.xattrs.sort();
    e.xattrs.dedup_by(|a, b| a.0 == b.0);

    let link_name = || -> Result<Vec<u8>> {
        if let Some(l) = pax.get(b"linkpath".as_slice()) {
            return Ok(l.clone());
        }
        entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .ok_or_else(|| reject("link without a target"))
    };
    match entry_type {
        t if t.is_file() || t.is_contiguous() || t.is_gnu_sparse() => {
            e.kind = Kind::File;
            let recipe = store.write_chunks(&mut *entry)?;
            e.size = recipe.size();
            e.chunks = recipe.0;
        }
        t if t.is_dir() => e.kind = Kind::Dir,
        t if t.is_symlink() => {
            e.kind = Kind::Symlink;
            e.target = link_name()?;
            if e.target.is_empty() {
                return Err(reject("symlink with an empty target"));
            }
            if climbs_above_root(parent, &e.target) {
                return Err(reject("symlink points outside the image root"));
            }
        }
        t if t.is_hard_link() => {
            let target =
                normalize(&link_name()?).map_err(|r| reject(&format!("hardlink target: {r}")))?;
            if target == path {
                return Err(reject("hardlink to itself"));
            }
            return Ok(Some(LayerOp::Hardlink { path, target }));
        }
        t if t.is_character_special() || t.is_block_special() => {
            e.kind = if t.is_character_special() {
                Kind::Char
            } else {
                Kind::Block
            };
            e.rdev_major = entry
                .header()
                .device_major()
                .map_err(header_err)?
                .unwrap_or(0);
            e.rdev_minor = entry
                .header()
                .device_minor()
                .map_err(header_err)?
                .unwrap_or(0);
        }
        t if t.is_fifo() => e.kind = Kind::Fifo,
        t => {
            return Err(reject(&format!(
                "unsupported tar entry type {:?}",
                t.as_byte() as char
            )));
        }
    }
    Ok(Some(LayerOp::Put(e)))
}

/// Makes a tar path absolute and canonical, refusing the forms that could escape the root.
pub fn normalize(raw: &[u8]) -> std::result::Result<Vec<u8>, &'static str> {
    if raw.starts_with(b"/") {
        return Err("absolute path");
    }
    let mut out = Vec::with_capacity(raw.len() + 1);
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path contains `..`"),
            c if c.len() > 255 => return Err("file name longer than 255 bytes"),
            c => {
                out.push(b'/');
                out.extend_from_slice(c);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

/// True when a relative symlink target, followed from `dir`, would leave the root lexically.
fn climbs_above_root(dir: &[u8], target: &[u8]) -> bool {
    if target.starts_with(b"/") {
        return false;
    }
    let mut depth = dir.split(|&b| b == b'/').filter(|c| !c.is_empty()).count() as i64;
    for comp in target.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(0) => (b"/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"/", path),
    }
}

fn child(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if p != b"/" {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    while digits.len() < 9 {
        digits.push('0');
    }
    Some((secs, digits.parse().ok()?))
}

fn parse_pax_u32(v: &[u8]) -> Option<u32> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn bad(layer: &str, what: &str, e: impl std::fmt::Display) -> NodeError {
    NodeError::BadLayer {
        layer: layer.to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// Shared between the ingest loop and the reader under the tar parser: the loop says whether
/// the parser is reading headers (bounded) or entry data (unbounded), and the reader enforces it.
///
/// While headers are read, the bytes are also kept, so that PAX records can be parsed here
/// rather than by the tar crate, whose parser splits records at newlines and so misreads
/// binary values (such as `security.capability` xattrs) that contain one.
#[derive(Default)]
struct GuardState {
    pos: Cell<u64>,
    limit: Cell<u64>,
    header_overflow: Cell<bool>,
    bomb: Cell<bool>,
    capturing: Cell<bool>,
    header_start: Cell<u64>,
    captured: RefCell<Vec<u8>>,
}

impl GuardState {
    fn expect_header(&self, max: u64) {
        // Headers are preceded by at most one block of padding of the previous entry.
        self.limit.set(self.pos.get().saturating_add(max + 1024));
        self.capturing.set(true);
        self.header_start.set(self.pos.get());
        self.captured.borrow_mut().clear();
    }

    /// Switches to entry data and returns the header bytes read since `expect_header`.
    fn expect_data(&self) -> Vec<u8> {
        self.limit.set(u64::MAX);
        self.capturing.set(false);
        std::mem::take(&mut *self.captured.borrow_mut())
    }

    /// Names the cause of a read error the tar parser reported.
    fn explain(&self, layer: &str, previous: &str, e: std::io::Error) -> NodeError {
        if self.bomb.get() {
            return NodeError::BadLayer {
                layer: layer.to_string(),
                reason: format!(
                    "decompression bomb: expands past the limit (near entry {previous:?}); raise FD_MAX_LAYER_BYTES if it is genuine"
                ),
            };
        }
        if self.header_overflow.get() {
            return NodeError::HostileEntry {
                layer: layer.to_string(),
                entry: format!("after {previous}"),
                reason: "oversized header (long name or PAX records)".into(),
            };
        }
        bad(layer, &format!("corrupt tar near entry {previous:?}"), e)
    }
}

struct Guard<'r> {
    inner: Box<dyn Read + 'r>,
    state: Rc<GuardState>,
    limits: Limits,
    hasher: sha2::Sha256,
}

impl Read for Guard<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let pos = self.state.pos.get();
        let limit = self.state.limit.get();
        if pos >= limit {
            self.state.header_overflow.set(true);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "oversized tar header",
            ));
        }
        let want = buf
            .len()
            .min(usize::try_from(limit - pos).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        let pos = pos + n as u64;
        if pos > self.limits.max_unpacked {
            self.state.bomb.set(true);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "layer too large",
            ));
        }
        self.state.pos.set(pos);
        self.hasher.update(&buf[..n]);
        if self.state.capturing.get() {
            self.state
                .captured
                .borrow_mut()
                .extend_from_slice(&buf[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_accepts_relative_and_refuses_escapes() {
        assert_eq!(normalize(b"./usr//bin/").as_deref(), Ok(&b"/usr/bin"[..]));
        assert_eq!(normalize(b"./").as_deref(), Ok(&b"/"[..]));
        assert_eq!(normalize(b"/etc/passwd"), Err("absolute path"));
        assert_eq!(normalize(b"a/../../etc"), Err("path contains `..`"));
        assert!(normalize(&[b'a'; 256]).is_err());
    }

    #[test]
    fn symlink_escape_is_lexical_from_the_links_dir() {
        assert!(!climbs_above_root(b"/etc", b"../usr/lib/os-release"));
        assert!(climbs_above_root(b"/etc", b"../../x"));
        assert!(!climbs_above_root(b"/", b"/anything/../../.."));
        assert!(!climbs_above_root(b"/a/b", b"c/../../../x"));
        assert!(climbs_above_root(b"/a/b", b"../../../x"));
    }

    #[test]
    fn pax_time_parses_fractions() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
