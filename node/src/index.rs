//! File indexes: the file view of a layer, and of a whole image once its layers are merged.
//!
//! A layer index is the list of operations a layer tar performs, in tar order: put an entry,
//! hardlink a path to another, white out a path, make a directory opaque. Merging applies them
//! layer by layer with the usual overlay rules, so the merged [`FileIndex`] is the final tree and
//! nothing downstream (lazyfs, the comparison tests) needs to know about whiteouts.
//!
//! Merging is pure: it takes indexes and returns an index, and is tested without any I/O.
//! Paths are bytes (Linux file names need not be UTF-8) and always absolute, `/` for the root.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::store::ChunkRef;
use crate::{NodeError, Result};

/// Media type of a stored merged file index.
pub const FILE_INDEX_MEDIA_TYPE: &str = "application/vnd.fd.file-index.v1+postcard+zstd";
/// Media type of a stored per-layer index.
pub const LAYER_INDEX_MEDIA_TYPE: &str = "application/vnd.fd.layer-index.v1+postcard+zstd";

/// The type of a file-system object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
}

/// One path of a tree, with everything needed to present it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Absolute path, `/` for the root, no trailing slash.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Content length for files; 0 otherwise.
    pub size: u64,
    /// Symlink target, as written.
    pub target: Vec<u8>,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    /// Extended attributes sorted by name; values are raw bytes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The chunks of a file's contents, in order.
    pub chunks: Vec<ChunkRef>,
    /// Entries with the same non-zero group are hardlinks of one inode.
    pub link_group: u32,
    /// Number of paths sharing this inode (1 for most files), set by the merge.
    pub nlink: u32,
}

impl Entry {
    /// A directory with default metadata, for parents a layer implies but does not list.
    pub fn implied_dir(path: Vec<u8>) -> Entry {
        Entry {
            path,
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            target: Vec::new(),
            rdev_major: 0,
            rdev_minor: 0,
            xattrs: Vec::new(),
            chunks: Vec::new(),
            link_group: 0,
            nlink: 1,
        }
    }

    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// One step of a layer, in tar order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerOp {
    Put(Entry),
    /// `path` becomes another name of the inode at `target` (both absolute).
    Hardlink {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    /// Removes `path` (and everything under it) from the layers below.
    Whiteout(Vec<u8>),
    /// Hides everything the layers below have under this directory.
    Opaque(Vec<u8>),
}

/// The file view of one layer before merging.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    pub ops: Vec<LayerOp>,
}

/// The merged tree of an image, sorted by path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIndex {
    pub entries: Vec<Entry>,
}

impl FileIndex {
    /// The entry at `path`, by binary search.
    pub fn get(&self, path: &[u8]) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_slice().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Bytes of file contents, counting each hardlinked inode once.
    pub fn content_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File && (e.link_group == 0 || seen.insert(e.link_group)))
            .map(|e| e.size)
            .sum()
    }

    /// Distinct chunks the files use.
    pub fn distinct_chunks(&self) -> HashSet<ChunkRef> {
        self.entries
            .iter()
            .flat_map(|e| e.chunks.iter().copied())
            .collect()
    }
}

/// Serialises an index compactly: postcard, then zstd.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let raw = postcard::to_stdvec(value).map_err(|e| NodeError::Decode {
        what: "index".into(),
        reason: e.to_string(),
    })?;
    Ok(zstd::bulk::compress(&raw, 3)?)
}

/// Reverses [`encode`]. `limit` bounds the decompressed size, as stored data may be damaged.
pub fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    /// A merged index of a very large image is tens of MiB; anything past this is damage.
    const LIMIT: usize = 1 << 30;
    let raw = zstd::bulk::decompress(bytes, LIMIT).map_err(|e| NodeError::Decode {
        what: what.into(),
        reason: e.to_string(),
    })?;
    postcard::from_bytes(&raw).map_err(|e| NodeError::Decode {
        what: what.into(),
        reason: e.to_string(),
    })
}

/// Applies layers, lowest first, and returns the final tree.
///
/// Rules (those of overlay file systems and the OCI image spec): a whiteout or opaque marker
/// hides only what lower layers put there; a non-directory replacing a directory removes the
/// directory's contents; a directory over a directory keeps the contents and takes the new
/// metadata; parents a layer implies are created as plain directories; a path whose parent is a
/// symlink lands where the symlink points, resolved inside the image root.
pub fn merge_layers<'a>(
    layers: impl IntoIterator<Item = (&'a str, &'a LayerIndex)>,
) -> Result<FileIndex> {
    let mut tree = Tree::default();
    for (layer, index) in layers {
        tree.apply(layer, index)?;
    }
    Ok(tree.finish())
}

#[derive(Default)]
struct Tree {
    map: BTreeMap<Vec<u8>, Entry>,
    next_group: u32,
}

impl Tree {
    fn apply(&mut self, layer: &str, index: &LayerIndex) -> Result<()> {
        self.ensure_root();

        // Markers hide lower layers only, so they go first, before this layer's own entries.
        for op in &index.ops {
            match op {
                LayerOp::Whiteout(path) => {
                    let path = self.resolve_parent(layer, path)?;
                    self.map.remove(&path);
                    self.remove_children(&path);
                }
                LayerOp::Opaque(dir) => {
                    let dir = self.resolve_parent(layer, dir)?;
                    self.remove_children(&dir);
                }
                _ => {}
            }
        }

        for op in &index.ops {
            match op {
                LayerOp::Put(entry) => {
                    let path = self.resolve_parent(layer, &entry.path)?;
                    let mut entry = entry.clone();
                    entry.path = path;
                    self.insert(entry);
                }
                LayerOp::Hardlink { path, target } => {
                    let path = self.resolve_parent(layer, path)?;
                    let target_path = self.resolve_parent(layer, target)?;
                    let Some(target_entry) = self.map.get_mut(&target_path) else {
                        return Err(hostile(layer, path, "hardlink target does not exist"));
                    };
                    if target_entry.kind == Kind::Dir {
                        return Err(hostile(layer, path, "hardlink to a directory"));
                    }
                    if target_entry.link_group == 0 {
                        self.next_group += 1;
                        target_entry.link_group = self.next_group;
                    }
                    let mut entry = target_entry.clone();
                    entry.path = path;
                    self.insert(entry);
                }
                LayerOp::Whiteout(_) | LayerOp::Opaque(_) => {}
            }
        }
        Ok(())
    }

    fn ensure_root(&mut self) {
        self.map
            .entry(b"/".to_vec())
            .or_insert_with(|| Entry::implied_dir(b"/".to_vec()));
    }

    fn insert(&mut self, entry: Entry) {
        if entry.path == b"/" {
            if entry.kind == Kind::Dir {
                self.map.insert(entry.path.clone(), entry);
            }
            return;
        }
        self.ensure_parents(&entry.path);
        let replaces_dir = self
            .map
            .get(&entry.path)
            .is_some_and(|old| old.kind == Kind::Dir);
        if replaces_dir && entry.kind != Kind::Dir {
            self.remove_children(&entry.path);
        }
        self.map.insert(entry.path.clone(), entry);
    }

    fn ensure_parents(&mut self, path: &[u8]) {
        let mut end = 1;
        while let Some(pos) = path[end..].iter().position(|&b| b == b'/') {
            let parent = &path[..end + pos];
            let needs_dir = self.map.get(parent).is_none_or(|e| e.kind != Kind::Dir);
            if needs_dir {
                // A non-directory in the way of a path is replaced, as tar extraction does.
                self.remove_children(parent);
                self.map
                    .insert(parent.to_vec(), Entry::implied_dir(parent.to_vec()));
            }
            end += pos + 1;
        }
    }

    fn remove_children(&mut self, dir: &[u8]) {
        let mut prefix = dir.to_vec();
        if prefix != b"/" {
            prefix.push(b'/');
        }
        let doomed: Vec<Vec<u8>> = self
            .map
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.map.remove(&k);
        }
    }

    /// Resolves symlinks among the parents of `path` (not the last component), inside the root.
    fn resolve_parent(&self, layer: &str, path: &[u8]) -> Result<Vec<u8>> {
        /// The kernel's own limit on symlinks followed in one lookup.
        const MAX_HOPS: u32 = 40;
        let Some(slash) = path.iter().rposition(|&b| b == b'/') else {
            return Ok(path.to_vec());
        };
        let (parent, name) = (&path[..slash.max(1)], &path[slash + 1..]);
        if name.is_empty() {
            return Ok(path.to_vec());
        }
        let mut resolved: Vec<Vec<u8>> = Vec::new();
        let mut pending: Vec<Vec<u8>> = parent
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut hops = 0;
        while let Some(comp) = pending.pop() {
            if comp == b"." {
                continue;
            }
            if comp == b".." {
                resolved.pop();
                continue;
            }
            resolved.push(comp);
            let here = join(&resolved);
            if let Some(e) = self.map.get(&here).filter(|e| e.kind == Kind::Symlink) {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(hostile(
                        layer,
                        path.to_vec(),
                        "too many levels of symbolic links",
                    ));
                }
                resolved.pop();
                if e.target.starts_with(b"/") {
                    resolved.clear();
                }
                pending.extend(
                    e.target
                        .split(|&b| b == b'/')
                        .filter(|c| !c.is_empty())
                        .rev()
                        .map(<[u8]>::to_vec),
                );
            }
        }
        let mut out = join(&resolved);
        if out != b"/" {
            out.push(b'/');
        }
        out.extend_from_slice(name);
        Ok(out)
    }

    fn finish(self) -> FileIndex {
        let mut members: HashMap<u32, u32> = HashMap::new();
        for e in self.map.values().filter(|e| e.link_group != 0) {
            *members.entry(e.link_group).or_default() += 1;
        }
        let entries = self
            .map
            .into_values()
            .map(|mut e| {
                let n = members.get(&e.link_group).copied().unwrap_or(1);
                if n <= 1 {
                    e.link_group = 0;
                }
                e.nlink = n.max(1);
                e
            })
            .collect();
        FileIndex { entries }
    }
}

fn join(components: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in components {
        out.push(b'/');
        out.extend_from_slice(c);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn hostile(layer: &str, path: Vec<u8>, reason: &str) -> NodeError {
    NodeError::HostileEntry {
        layer: layer.to_string(),
        entry: String::from_utf8_lossy(&path).into_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: u8) -> LayerOp {
        let mut e = Entry::implied_dir(path.as_bytes().to_vec());
        e.kind = Kind::File;
        e.mode = 0o644;
        e.size = u64::from(content);
        LayerOp::Put(e)
    }
    fn dir(path: &str) -> LayerOp {
        LayerOp::Put(Entry::implied_dir(path.as_bytes().to_vec()))
    }
    fn symlink(path: &str, target: &str) -> LayerOp {
        let mut e = Entry::implied_dir(path.as_bytes().to_vec());
        e.kind = Kind::Symlink;
        e.target = target.as_bytes().to_vec();
        LayerOp::Put(e)
    }
    fn paths(index: &FileIndex) -> Vec<String> {
        index.entries.iter().map(Entry::path_lossy).collect()
    }
    fn merge(layers: &[LayerIndex]) -> Result<FileIndex> {
        merge_layers(layers.iter().map(|l| ("test", l)))
    }

    #[test]
    fn merge_whiteout_removes_lower_file_and_dir_contents() -> Result<()> {
        let lower = LayerIndex {
            ops: vec![dir("/a"), file("/a/x", 1), file("/a/y", 2), file("/b", 3)],
        };
        let upper = LayerIndex {
            ops: vec![
                LayerOp::Whiteout(b"/a".to_vec()),
                LayerOp::Whiteout(b"/b".to_vec()),
            ],
        };
        assert_eq!(paths(&merge(&[lower, upper])?), vec!["/"]);
        Ok(())
    }

    #[test]
    fn merge_opaque_hides_lower_children_but_keeps_same_layer_ones() -> Result<()> {
        let lower = LayerIndex {
            ops: vec![dir("/d"), file("/d/old", 1)],
        };
        let upper = LayerIndex {
            ops: vec![
                dir("/d"),
                file("/d/new", 2),
                LayerOp::Opaque(b"/d".to_vec()),
            ],
        };
        assert_eq!(paths(&merge(&[lower, upper])?), vec!["/", "/d", "/d/new"]);
        Ok(())
    }

    #[test]
    fn merge_file_replacing_dir_drops_its_children() -> Result<()> {
        let lower = LayerIndex {
            ops: vec![dir("/d"), file("/d/x", 1)],
        };
        let upper = LayerIndex {
            ops: vec![file("/d", 2)],
        };
        let merged = merge(&[lower, upper])?;
        assert_eq!(paths(&merged), vec!["/", "/d"]);
        assert_eq!(merged.get(b"/d").map(|e| e.kind), Some(Kind::File));
        Ok(())
    }

    #[test]
    fn merge_hardlinks_share_a_group_and_count_links() -> Result<()> {
        let l = LayerIndex {
            ops: vec![
                file("/a", 5),
                LayerOp::Hardlink {
                    path: b"/b".to_vec(),
                    target: b"/a".to_vec(),
                },
                LayerOp::Hardlink {
                    path: b"/c/d".to_vec(),
                    target: b"/a".to_vec(),
                },
                file("/single", 1),
            ],
        };
        let m = merge(&[l])?;
        let (a, b, d) = (m.get(b"/a"), m.get(b"/b"), m.get(b"/c/d"));
        let groups: Vec<u32> = [a, b, d]
            .iter()
            .map(|e| e.map_or(0, |e| e.link_group))
            .collect();
        assert!(groups[0] != 0 && groups.iter().all(|g| *g == groups[0]));
        assert!(
            [a, b, d]
                .iter()
                .all(|e| e.is_some_and(|e| e.nlink == 3 && e.size == 5))
        );
        assert_eq!(
            m.get(b"/single").map(|e| (e.link_group, e.nlink)),
            Some((0, 1))
        );
        Ok(())
    }

    #[test]
    fn merge_replacing_one_hardlink_leaves_the_others_linked() -> Result<()> {
        let lower = LayerIndex {
            ops: vec![
                file("/a", 5),
                LayerOp::Hardlink {
                    path: b"/b".to_vec(),
                    target: b"/a".to_vec(),
                },
                LayerOp::Hardlink {
                    path: b"/c".to_vec(),
                    target: b"/a".to_vec(),
                },
            ],
        };
        let upper = LayerIndex {
            ops: vec![file("/c", 9)],
        };
        let m = merge(&[lower, upper])?;
        assert_eq!(m.get(b"/a").map(|e| e.nlink), Some(2));
        assert_eq!(
            m.get(b"/c").map(|e| (e.nlink, e.link_group, e.size)),
            Some((1, 0, 9))
        );
        Ok(())
    }

    #[test]
    fn merge_hardlink_to_missing_target_is_rejected() {
        let l = LayerIndex {
            ops: vec![LayerOp::Hardlink {
                path: b"/b".to_vec(),
                target: b"/nope".to_vec(),
            }],
        };
        let err = merge(&[l]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err.contains("/b") && err.contains("hardlink target does not exist"),
            "{err}"
        );
    }

    #[test]
    fn merge_follows_parent_symlinks_inside_the_root() -> Result<()> {
        let lower = LayerIndex {
            ops: vec![dir("/usr"), dir("/usr/bin"), symlink("/bin", "usr/bin")],
        };
        let upper = LayerIndex {
            ops: vec![
                file("/bin/tool", 1),
                symlink("/esc", "../../../etc"),
                file("/esc/x", 2),
            ],
        };
        let m = merge(&[lower, upper])?;
        assert!(m.get(b"/usr/bin/tool").is_some());
        assert!(m.get(b"/bin/tool").is_none());
        // `..` past the root stays at the root, as in the kernel.
        assert!(m.get(b"/etc/x").is_some());
        Ok(())
    }

    #[test]
    fn merge_implies_missing_parent_dirs() -> Result<()> {
        let l = LayerIndex {
            ops: vec![file("/a/b/c", 1)],
        };
        let m = merge(&[l])?;
        assert_eq!(paths(&m), vec!["/", "/a", "/a/b", "/a/b/c"]);
        assert_eq!(
            m.get(b"/a").map(|e| (e.kind, e.mode)),
            Some((Kind::Dir, 0o755))
        );
        Ok(())
    }

    #[test]
    fn index_encoding_round_trips() -> Result<()> {
        let l = LayerIndex {
            ops: vec![file("/a", 1), LayerOp::Whiteout(b"/x\xff".to_vec())],
        };
        let back: LayerIndex = decode("test", &encode(&l)?)?;
        assert_eq!(back, l);
        Ok(())
    }
}
