//! An exact description of a directory tree, for comparing fd's view of an image (a mounted or
//! checked-out root filesystem) with a reference unpack made by umoci.
//!
//! [`tree_manifest`] walks a real tree with `lstat` (never following symlinks) and records
//! everything an image layer can express about each entry. [`diff_manifests`] compares two
//! such descriptions field by field:
//!
//! | field            | recorded for            | compared by `diff_manifests`         |
//! |------------------|-------------------------|--------------------------------------|
//! | `kind`           | every entry             | exactly                              |
//! | `mode`           | every entry (`& 0o7777`)| exactly, except for symlinks         |
//! | `uid`, `gid`     | every entry             | exactly                              |
//! | `size`           | regular files           | exactly                              |
//! | `sha256`         | regular files           | exactly                              |
//! | `symlink_target` | symlinks (raw bytes)    | exactly                              |
//! | `rdev`           | char and block devices  | exactly (major, minor)               |
//! | `mtime`          | every entry (seconds)   | exactly, except for directories      |
//! | `xattrs`         | every entry (raw bytes) | exactly, names and values            |
//! | `nlink`          | every entry             | exactly, except for directories      |
//! | `inode_group`    | non-directories with nlink > 1 | exactly                       |
//!
//! The exceptions are filesystem artefacts rather than image content: a directory's link count
//! is 2 plus its subdirectories on ext4 but 1 on some FUSE and overlay setups; umoci restores a
//! directory's mtime from its tar header, but a directory without a header of its own (the
//! root, or a parent that no layer lists) gets the time of extraction; Linux has no symlink
//! permission bits (lstat always reports 0777). Compare the maps with `==` to include them.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What kind of entry a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

/// Everything recorded about one path. See the module documentation for which fields are
/// compared by [`diff_manifests`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFacts {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size in bytes, for regular files only.
    pub size: Option<u64>,
    /// Lowercase hex SHA-256 of the contents, for regular files only.
    pub sha256: Option<String>,
    /// The link target exactly as stored, for symlinks only.
    pub symlink_target: Option<Vec<u8>>,
    /// `(major, minor)`, for character and block devices only.
    pub rdev: Option<(u32, u32)>,
    /// Modification time, whole seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes, name → value bytes, including `security.*` and `trusted.*` ones
    /// when the caller may read them.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub nlink: u64,
    /// For non-directories with more than one link: the smallest path (string order) of the
    /// entries in this tree that share the inode, so every member of a hardlink group carries
    /// the same value. `None` otherwise.
    pub inode_group: Option<String>,
}

/// Path (absolute within the tree, the root being `/`) → facts, in path order.
pub type TreeManifest = BTreeMap<String, FileFacts>;

/// Describes every entry under `root`, including `root` itself as `/`.
///
/// Fails on names that are not UTF-8 (no image used by the tests has one, and a lossy name
/// would make two different trees look alike).
pub fn tree_manifest(root: &Path) -> Result<TreeManifest> {
    let mut out = TreeManifest::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), "/".to_owned())];
    while let Some((path, name)) = stack.pop() {
        let meta =
            fs::symlink_metadata(&path).with_context(|| format!("lstat {}", path.display()))?;
        let facts = describe(&path, &meta)?;
        if facts.kind == FileKind::Dir {
            let mut children = Vec::new();
            for entry in fs::read_dir(&path).with_context(|| format!("read {}", path.display()))? {
                let entry = entry.with_context(|| format!("read {}", path.display()))?;
                let child = entry.file_name();
                let child = child
                    .to_str()
                    .with_context(|| format!("non-UTF-8 name {:?} in {}", child, path.display()))?
                    .to_owned();
                children.push(child);
            }
            for child in children {
                let child_name = if name == "/" {
                    format!("/{child}")
                } else {
                    format!("{name}/{child}")
                };
                stack.push((path.join(&child), child_name));
            }
        } else if facts.nlink > 1 {
            inodes
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push(name.clone());
        }
        out.insert(name, facts);
    }
    for names in inodes.values() {
        let Some(first) = names.iter().min() else {
            continue;
        };
        for name in names {
            if let Some(facts) = out.get_mut(name) {
                facts.inode_group = Some(first.clone());
            }
        }
    }
    Ok(out)
}

fn describe(path: &Path, meta: &fs::Metadata) -> Result<FileFacts> {
    let file_type = meta.mode() & libc::S_IFMT;
    let kind = match file_type {
        libc::S_IFREG => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFCHR => FileKind::Char,
        libc::S_IFBLK => FileKind::Block,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        other => bail!("{}: unknown file type {other:o}", path.display()),
    };
    let (size, sha256) = if kind == FileKind::File {
        (Some(meta.size()), Some(sha256_file(path)?))
    } else {
        (None, None)
    };
    let symlink_target = if kind == FileKind::Symlink {
        let target = fs::read_link(path).with_context(|| format!("readlink {}", path.display()))?;
        Some(target.as_os_str().as_bytes().to_vec())
    } else {
        None
    };
    let rdev = matches!(kind, FileKind::Char | FileKind::Block).then(|| split_dev(meta.rdev()));
    Ok(FileFacts {
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size,
        sha256,
        symlink_target,
        rdev,
        mtime: meta.mtime(),
        xattrs: xattrs(path)?,
        nlink: meta.nlink(),
        inode_group: None,
    })
}

/// glibc's encoding of a 64-bit dev_t: major in bits 8..20 and 32..64, minor in bits 0..8 and
/// 20..32.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    // Both fit in 32 bits by construction of the masks above.
    (major as u32, minor as u32)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// All extended attributes of `path` itself (not of a symlink's target), byte-exact.
fn xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    let mut out = BTreeMap::new();
    let names = match read_xattr_buffer(|buf, len| {
        // SAFETY: c_path is a valid C string; buf is either null with len 0 (size query) or
        // points to `len` writable bytes.
        unsafe { libc::llistxattr(c_path.as_ptr(), buf.cast(), len) }
    }) {
        Ok(names) => names,
        // Filesystems without xattr support have no attributes to report.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP)) => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("llistxattr {}", path.display())),
    };
    for raw_name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(raw_name)
            .with_context(|| format!("{}: xattr name {raw_name:?} is not UTF-8", path.display()))?
            .to_owned();
        let c_name = CString::new(raw_name).context("xattr name with a NUL byte")?;
        let value = match read_xattr_buffer(|buf, len| {
            // SAFETY: as above; c_name is a valid C string.
            unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), buf.cast(), len) }
        }) {
            Ok(value) => value,
            // Removed between listing and reading.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("lgetxattr {} {name}", path.display()));
            }
        };
        out.insert(name, value);
    }
    Ok(out)
}

/// Calls a size-query-then-fill xattr function, retrying when the value grows in between.
fn read_xattr_buffer(
    mut call: impl FnMut(*mut u8, usize) -> libc::ssize_t,
) -> std::io::Result<Vec<u8>> {
    for _ in 0..8 {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size.unsigned_abs()];
        if buf.is_empty() {
            return Ok(buf);
        }
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got.unsigned_abs());
            return Ok(buf);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ERANGE))
}

/// Differences between two tree descriptions, one line each (missing and extra paths first,
/// then field differences), ignoring the filesystem artefacts listed in the module
/// documentation. Empty when the trees match.
pub fn diff_manifests(expected: &TreeManifest, actual: &TreeManifest) -> Vec<String> {
    let mut out = Vec::new();
    for path in expected.keys().filter(|p| !actual.contains_key(*p)) {
        out.push(format!("missing: {path}"));
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        out.push(format!("unexpected: {path}"));
    }
    for (path, want) in expected {
        let Some(got) = actual.get(path) else {
            continue;
        };
        let is_dir = want.kind == FileKind::Dir;
        let is_symlink = want.kind == FileKind::Symlink;
        let mut field = |name: &str, differs: bool, want: String, got: String| {
            if differs {
                out.push(format!("{path}: {name} expected {want}, got {got}"));
            }
        };
        field(
            "kind",
            want.kind != got.kind,
            format!("{:?}", want.kind),
            format!("{:?}", got.kind),
        );
        field(
            "mode",
            !is_symlink && want.mode != got.mode,
            format!("{:o}", want.mode),
            format!("{:o}", got.mode),
        );
        field(
            "owner",
            (want.uid, want.gid) != (got.uid, got.gid),
            format!("{}:{}", want.uid, want.gid),
            format!("{}:{}", got.uid, got.gid),
        );
        field(
            "size",
            want.size != got.size,
            format!("{:?}", want.size),
            format!("{:?}", got.size),
        );
        field(
            "sha256",
            want.sha256 != got.sha256,
            format!("{:?}", want.sha256),
            format!("{:?}", got.sha256),
        );
        field(
            "symlink target",
            want.symlink_target != got.symlink_target,
            format!(
                "{:?}",
                want.symlink_target.as_deref().map(String::from_utf8_lossy)
            ),
            format!(
                "{:?}",
                got.symlink_target.as_deref().map(String::from_utf8_lossy)
            ),
        );
        field(
            "rdev",
            want.rdev != got.rdev,
            format!("{:?}", want.rdev),
            format!("{:?}", got.rdev),
        );
        field(
            "mtime",
            !is_dir && want.mtime != got.mtime,
            want.mtime.to_string(),
            got.mtime.to_string(),
        );
        field(
            "xattrs",
            want.xattrs != got.xattrs,
            format!("{:?}", want.xattrs),
            format!("{:?}", got.xattrs),
        );
        field(
            "nlink",
            !is_dir && want.nlink != got.nlink,
            want.nlink.to_string(),
            got.nlink.to_string(),
        );
        field(
            "inode group",
            want.inode_group != got.inode_group,
            format!("{:?}", want.inode_group),
            format!("{:?}", got.inode_group),
        );
    }
    out
}
