//! The image tree as the file system presents it: inode numbers, parents and children, the
//! attributes `stat` shows, and where each byte of a file lives among its chunks.
//!
//! Built once per mount from the merged [`FileIndex`] and never changed (the image is
//! immutable), so every lookup is a plain index or a binary search with no locking.
//!
//! Inode numbers: the entry at position `i` of the index (sorted by path, so the root is
//! first) is inode `i + 1`, which makes the root inode 1 as FUSE requires. All paths of one
//! hardlink group share the inode of the group's first path, so `stat` reports one inode with
//! the group's link count, exactly as on a disk.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fd_node::store::ChunkRef;
use fd_node::{Entry, FileIndex, Kind};
use fuser::{FileAttr, FileType, INodeNo};

use crate::{LazyError, Result};

/// Block size `stat` reports; the image has no real blocks, so the usual page size.
const BLOCK_SIZE: u32 = 4096;

/// One contiguous part of a read: `len` bytes of chunk number `chunk` (an index into
/// [`Tree::chunk`]), starting `from` bytes into that chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) chunk: usize,
    pub(crate) from: u32,
    pub(crate) len: u32,
}

/// The immutable tree of one mounted image. See the module docs.
pub(crate) struct Tree {
    entries: Vec<Entry>,
    /// Position of each entry's parent directory (the root is its own parent).
    parent: Vec<u32>,
    /// Children of each directory, in name order (the index's path order gives that).
    children: Vec<Vec<u32>>,
    /// Number of child directories, for the directory link count.
    subdirs: Vec<u32>,
    /// Position whose inode number an entry uses: itself, or the first path of its hardlink
    /// group.
    inode_of: Vec<u32>,
    /// Every file's chunks, one after another; `spans[i]` is entry i's range here.
    chunks: Vec<ChunkRef>,
    /// Offset in its file where each chunk of `chunks` starts.
    starts: Vec<u64>,
    spans: Vec<(u32, u32)>,
    content_bytes: u64,
}

impl Tree {
    /// Builds the tree. Fails on an index that cannot be presented (no root directory, paths
    /// out of order), which only a damaged or foreign index would have.
    pub(crate) fn new(index: FileIndex) -> Result<Tree> {
        let mut entries = index.entries;
        let bad = |reason: String| LazyError::BadIndex { reason };
        match entries.first() {
            Some(root) if root.path == b"/" && root.kind == Kind::Dir => {}
            _ => return Err(bad("the first entry is not the root directory".into())),
        }
        if entries.len() >= u32::MAX as usize {
            return Err(bad(format!(
                "{} paths is more than one mount can number",
                entries.len()
            )));
        }
        if let Some(w) = entries.windows(2).find(|w| w[0].path >= w[1].path) {
            return Err(bad(format!(
                "paths out of order at {:?}",
                w[1].path_lossy()
            )));
        }

        let n = entries.len();
        let mut parent = vec![0u32; n];
        let mut children: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut subdirs = vec![0u32; n];
        let mut inode_of: Vec<u32> = (0..n as u32).collect();
        let mut group_first: HashMap<u32, u32> = HashMap::new();
        let mut chunks = Vec::new();
        let mut starts = Vec::new();
        let mut spans = Vec::with_capacity(n);
        let mut content_bytes = 0u64;

        for i in 0..n {
            if i > 0 {
                let path = &entries[i].path;
                let slash = path.iter().rposition(|&b| b == b'/').unwrap_or(0);
                let parent_path: &[u8] = if slash == 0 { b"/" } else { &path[..slash] };
                let found = entries.binary_search_by(|e| e.path.as_slice().cmp(parent_path));
                match found {
                    Ok(p) if entries[p].kind == Kind::Dir && slash + 1 < path.len() => {
                        parent[i] = p as u32;
                        children[p].push(i as u32);
                        if entries[i].kind == Kind::Dir {
                            subdirs[p] += 1;
                        }
                    }
                    _ => {
                        // The merge always creates parents, so this is a damaged index; hiding
                        // the path is better than refusing the whole image.
                        tracing::warn!(path = %entries[i].path_lossy(), "path without a parent directory is hidden");
                    }
                }
            }
            let e = &mut entries[i];
            if e.link_group != 0 && e.kind != Kind::Dir {
                let first = *group_first.entry(e.link_group).or_insert(i as u32);
                inode_of[i] = first;
            }
            let begin = chunks.len() as u32;
            // Only the first path of a hardlink group is ever read (by its inode number).
            if e.kind == Kind::File && inode_of[i] == i as u32 {
                let mut offset = 0u64;
                for c in e.chunks.drain(..) {
                    starts.push(offset);
                    offset += u64::from(c.len);
                    chunks.push(c);
                }
                if offset != e.size {
                    tracing::warn!(path = %e.path_lossy(), size = e.size, chunk_bytes = offset,
                        "file size and chunk lengths disagree; reads past the chunks fail");
                }
                content_bytes += e.size;
            }
            e.chunks = Vec::new();
            spans.push((begin, chunks.len() as u32));
        }
        Ok(Tree {
            entries,
            parent,
            children,
            subdirs,
            inode_of,
            chunks,
            starts,
            spans,
            content_bytes,
        })
    }

    /// Number of paths in the image.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of file contents, each hardlinked inode counted once.
    pub(crate) fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    /// The entry an inode number stands for, if it is one this tree hands out.
    pub(crate) fn entry_of(&self, ino: INodeNo) -> Option<usize> {
        let i = usize::try_from(ino.0.checked_sub(1)?).ok()?;
        (i < self.entries.len() && self.inode_of[i] as usize == i).then_some(i)
    }

    pub(crate) fn entry(&self, i: usize) -> &Entry {
        &self.entries[i]
    }

    pub(crate) fn inode(&self, i: usize) -> INodeNo {
        INodeNo(u64::from(self.inode_of[i]) + 1)
    }

    pub(crate) fn parent(&self, i: usize) -> usize {
        self.parent[i] as usize
    }

    pub(crate) fn children(&self, i: usize) -> &[u32] {
        &self.children[i]
    }

    /// The last component of an entry's path (empty for the root).
    pub(crate) fn name(&self, i: usize) -> &[u8] {
        let path = &self.entries[i].path;
        let slash = path.iter().rposition(|&b| b == b'/').unwrap_or(0);
        &path[slash + 1..]
    }

    /// The child of directory `dir` called `name`.
    pub(crate) fn lookup(&self, dir: usize, name: &[u8]) -> Option<usize> {
        let kids = &self.children[dir];
        kids.binary_search_by(|&c| self.name(c as usize).cmp(name))
            .ok()
            .map(|k| kids[k] as usize)
    }

    pub(crate) fn chunk(&self, k: usize) -> ChunkRef {
        self.chunks[k]
    }

    /// The chunks of file `i`, as indexes into [`Tree::chunk`].
    pub(crate) fn file_chunks(&self, i: usize) -> std::ops::Range<usize> {
        let (b, e) = self.spans[i];
        b as usize..e as usize
    }

    /// Every distinct chunk of every file, in path order.
    pub(crate) fn all_chunks(&self) -> Vec<ChunkRef> {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .copied()
            .filter(|c| seen.insert(c.id))
            .collect()
    }

    /// Where the bytes `offset .. offset + size` of file `i` are, clipped to the file's end.
    pub(crate) fn pieces(&self, i: usize, offset: u64, size: u32) -> Vec<Piece> {
        let (b, e) = self.spans[i];
        let (b, e) = (b as usize, e as usize);
        let end = offset
            .saturating_add(u64::from(size))
            .min(self.entries[i].size);
        map_range(&self.starts[b..e], &self.chunks[b..e], offset, end)
            .into_iter()
            .map(|p| Piece {
                chunk: p.chunk + b,
                ..p
            })
            .collect()
    }

    /// What `stat` shows for entry `i`.
    pub(crate) fn attr(&self, i: usize) -> FileAttr {
        let e = &self.entries[i];
        let (kind, size) = match e.kind {
            Kind::File => (FileType::RegularFile, e.size),
            Kind::Dir => (FileType::Directory, u64::from(BLOCK_SIZE)),
            Kind::Symlink => (FileType::Symlink, e.target.len() as u64),
            Kind::Char => (FileType::CharDevice, 0),
            Kind::Block => (FileType::BlockDevice, 0),
            Kind::Fifo => (FileType::NamedPipe, 0),
        };
        let nlink = match e.kind {
            Kind::Dir => 2 + self.subdirs[i],
            _ => e.nlink.max(1),
        };
        let mtime = system_time(e.mtime, e.mtime_nsec);
        FileAttr {
            ino: self.inode(i),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            // Nothing ever changes an image, so its last change is its modification.
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (e.mode & 0o7777) as u16,
            nlink,
            uid: e.uid,
            gid: e.gid,
            rdev: encode_dev(e.rdev_major, e.rdev_minor),
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }
}

/// Maps the byte range `offset .. end` of a file onto its chunks. `starts[k]` is where chunk
/// `k` begins in the file. Stops early where the chunks end before `end`.
pub(crate) fn map_range(starts: &[u64], chunks: &[ChunkRef], offset: u64, end: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    if offset >= end || chunks.is_empty() {
        return out;
    }
    // The last chunk starting at or before `offset`.
    let mut k = starts.partition_point(|&s| s <= offset).saturating_sub(1);
    let mut pos = offset;
    while pos < end && k < chunks.len() {
        let chunk_start = starts[k];
        let chunk_end = chunk_start + u64::from(chunks[k].len);
        if pos >= chunk_end {
            k += 1;
            continue;
        }
        let take_end = chunk_end.min(end);
        out.push(Piece {
            chunk: k,
            from: (pos - chunk_start) as u32,
            len: (take_end - pos) as u32,
        });
        pos = take_end;
        k += 1;
    }
    out
}

/// Device numbers in the kernel's 32-bit encoding that FUSE carries (12-bit major, 20-bit
/// minor, minor split around the major as in `new_encode_dev`).
pub(crate) fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn system_time(secs: i64, nsec: u32) -> SystemTime {
    let nsec = nsec.min(999_999_999);
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        // Before 1970: step back whole seconds, then forward by the fraction.
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nsec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fd_chunker::ChunkId;

    fn refs(lens: &[u32]) -> (Vec<u64>, Vec<ChunkRef>) {
        let mut starts = Vec::new();
        let mut at = 0u64;
        let chunks = lens
            .iter()
            .enumerate()
            .map(|(k, &len)| {
                starts.push(at);
                at += u64::from(len);
                ChunkRef {
                    id: ChunkId([k as u8; 32]),
                    len,
                }
            })
            .collect();
        (starts, chunks)
    }

    fn piece(chunk: usize, from: u32, len: u32) -> Piece {
        Piece { chunk, from, len }
    }

    #[test]
    fn range_inside_one_chunk() {
        let (s, c) = refs(&[100, 50, 200]);
        assert_eq!(map_range(&s, &c, 10, 20), vec![piece(0, 10, 10)]);
        assert_eq!(map_range(&s, &c, 100, 150), vec![piece(1, 0, 50)]);
        assert_eq!(map_range(&s, &c, 160, 170), vec![piece(2, 10, 10)]);
    }

    #[test]
    fn range_across_chunks() {
        let (s, c) = refs(&[100, 50, 200]);
        assert_eq!(
            map_range(&s, &c, 90, 200),
            vec![piece(0, 90, 10), piece(1, 0, 50), piece(2, 0, 50)]
        );
        assert_eq!(
            map_range(&s, &c, 0, 350),
            vec![piece(0, 0, 100), piece(1, 0, 50), piece(2, 0, 200)]
        );
    }

    #[test]
    fn range_at_and_past_the_end() {
        let (s, c) = refs(&[100, 50]);
        assert_eq!(map_range(&s, &c, 150, 150), vec![]);
        assert_eq!(map_range(&s, &c, 149, 150), vec![piece(1, 49, 1)]);
        // An end beyond the chunks (a damaged index) stops where the chunks stop.
        assert_eq!(map_range(&s, &c, 140, 400), vec![piece(1, 40, 10)]);
        assert_eq!(map_range(&s, &c, 500, 600), vec![]);
        assert_eq!(map_range(&[], &[], 0, 10), vec![]);
    }

    #[test]
    fn every_byte_maps_to_the_right_chunk() {
        let lens = [17u32, 1, 64, 3, 250, 9];
        let (s, c) = refs(&lens);
        let total: u64 = lens.iter().map(|&l| u64::from(l)).sum();
        for offset in 0..total {
            for size in [1u64, 2, 7, 100, 400] {
                let end = (offset + size).min(total);
                let pieces = map_range(&s, &c, offset, end);
                let mut pos = offset;
                for p in &pieces {
                    assert_eq!(
                        s[p.chunk] + u64::from(p.from),
                        pos,
                        "contiguous at {offset}+{size}"
                    );
                    assert!(p.len > 0 && p.from + p.len <= c[p.chunk].len);
                    pos += u64::from(p.len);
                }
                assert_eq!(pos, end, "covers {offset}..{end}");
            }
        }
    }

    fn entry(path: &str, kind: Kind) -> Entry {
        let mut e = Entry::implied_dir(path.as_bytes().to_vec());
        e.kind = kind;
        e
    }

    #[test]
    fn tree_numbers_inodes_links_and_children() -> Result<()> {
        let mut a = entry("/a", Kind::File);
        a.link_group = 7;
        a.nlink = 2;
        a.size = 5;
        a.chunks = vec![ChunkRef {
            id: ChunkId([1; 32]),
            len: 5,
        }];
        let mut b = a.clone();
        b.path = b"/d/b".to_vec();
        let index = FileIndex {
            entries: vec![
                entry("/", Kind::Dir),
                a,
                entry("/a-x", Kind::Dir),
                entry("/d", Kind::Dir),
                b,
                entry("/d/e", Kind::Dir),
                entry("/d/e/f", Kind::Symlink),
                entry("/d/z", Kind::Fifo),
            ],
        };
        let t = Tree::new(index)?;
        assert_eq!(t.inode(0), INodeNo::ROOT);
        assert_eq!(t.inode(1), t.inode(4), "hardlinks share an inode");
        assert_eq!(t.entry_of(t.inode(4)), Some(1));
        assert_eq!(
            t.entry_of(INodeNo(5)),
            None,
            "the second link's own number is never used"
        );
        assert_eq!(t.attr(4).nlink, 2);
        assert_eq!(t.attr(0).nlink, 4, "root: 2 + /a-x + /d");
        assert_eq!(t.attr(3).nlink, 3, "/d: 2 + /d/e");
        assert_eq!(t.children(0), &[1, 2, 3]);
        assert_eq!(t.children(3), &[4, 5, 7]);
        assert_eq!(t.lookup(3, b"z"), Some(7));
        assert_eq!(t.lookup(3, b"f"), None);
        assert_eq!(t.parent(6), 5);
        assert_eq!(t.name(6), b"f");
        assert_eq!(t.content_bytes(), 5, "a hardlinked inode counts once");
        assert_eq!(t.pieces(1, 0, 100), vec![piece(0, 0, 5)]);
        assert_eq!(t.pieces(1, 3, 100), vec![piece(0, 3, 2)]);
        assert_eq!(t.pieces(1, 5, 100), vec![]);
        Ok(())
    }

    #[test]
    fn tree_rejects_index_without_root() {
        let index = FileIndex {
            entries: vec![entry("/a", Kind::File)],
        };
        assert!(Tree::new(index).is_err());
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(encode_dev(1, 3), 0x103);
        // Same as glibc's makedev for numbers that fit in 32 bits.
        for (ma, mi) in [(8u32, 1u32), (259, 65536), (4095, 0xfffff)] {
            assert_eq!(u64::from(encode_dev(ma, mi)), libc::makedev(ma, mi));
        }
    }

    #[test]
    fn times_before_1970_keep_their_fraction() {
        let t = system_time(-2, 500_000_000);
        assert_eq!(
            UNIX_EPOCH.duration_since(t).ok(),
            Some(Duration::from_millis(1500))
        );
    }
}
