//! The FUSE side: answers the kernel's requests from the [`Tree`] and reads file contents
//! chunk by chunk.
//!
//! Everything but `read` is answered from memory. A read maps its byte range onto chunks; a
//! chunk already in the local store is read straight from its chunk file, so a warm mount
//! never touches the fetch machinery. When a chunk is missing, the read moves to a thread of
//! its own and asks the [`Fetcher`], so a slow source stalls only the readers of that chunk,
//! never the kernel's other requests.
//!
//! The image never changes, so the kernel is told to cache hard: attributes and names for a
//! long time, file pages across opens (`FOPEN_KEEP_CACHE`), directory listings
//! (`FOPEN_CACHE_DIR`) and symlink targets.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fd_chunker::ChunkId;
use fd_node::Kind;
use fd_node::fetch::Fetcher;
use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::profile::Recorder;
use crate::tree::{Piece, Tree};

/// How long the kernel may keep attributes and names: the image is immutable, so as long as
/// it likes.
const CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Reads waiting for a fetch on threads of their own, at most; past this the kernel's request
/// thread waits itself, which slows the kernel's queue instead of piling up threads.
const MAX_FETCHING_READS: usize = 64;

/// Threads that fetch the rest of a file once a read of it had to fetch: each waits on one
/// chunk at a time, so this many round trips to a distant peer overlap.
const READ_AHEAD_THREADS: usize = 8;
/// Most bytes of one file fetched ahead of its reads.
const READ_AHEAD_MAX_BYTES: u64 = 64 << 20;

/// Counters of what the mount served.
#[derive(Debug, Default)]
pub(crate) struct ServeStats {
    pub(crate) reads: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) failed_reads: AtomicU64,
}

/// State shared by the FUSE threads, the fetching reads and the prefetchers.
pub(crate) struct Shared {
    pub(crate) tree: Tree,
    pub(crate) fetcher: Arc<Fetcher>,
    pub(crate) recorder: Recorder,
    pub(crate) stats: ServeStats,
    /// Set at unmount: prefetchers stop between chunks.
    pub(crate) stopping: AtomicBool,
    fetching_reads: AtomicUsize,
    open_chunks: OpenChunks,
    read_ahead: ReadAhead,
}

/// Whole-file read-ahead: the first read of a file that has to fetch queues the file's other
/// chunks, which a few background threads fetch while the reader waits for its own. Without
/// it a program reading a file chunk by chunk pays one round trip per chunk; with it, about
/// one per file. Only files that needed a fetch are queued, so a mount whose chunks are all
/// local never starts the threads.
#[derive(Default)]
struct ReadAhead {
    /// Files already queued (entry indexes).
    queued_files: Mutex<std::collections::HashSet<usize>>,
    queue: Mutex<std::collections::VecDeque<(ChunkId, u32)>>,
    ready: std::sync::Condvar,
    started: std::sync::OnceLock<()>,
}

impl Shared {
    pub(crate) fn new(tree: Tree, fetcher: Arc<Fetcher>) -> Shared {
        let recorder = Recorder::new(tree.len());
        Shared {
            tree,
            fetcher,
            recorder,
            stats: ServeStats::default(),
            stopping: AtomicBool::new(false),
            fetching_reads: AtomicUsize::new(0),
            open_chunks: OpenChunks::default(),
            read_ahead: ReadAhead::default(),
        }
    }

    /// Queues the chunks of file `i` for the read-ahead threads (once per file), starting the
    /// threads on first use.
    fn read_ahead(self: &Arc<Self>, i: usize) {
        let ra = &self.read_ahead;
        if !ra
            .queued_files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(i)
        {
            return;
        }
        let mut bytes = 0u64;
        let chunks: Vec<(ChunkId, u32)> = self
            .tree
            .file_chunks(i)
            .map(|k| self.tree.chunk(k))
            .take_while(|c| {
                bytes += u64::from(c.len);
                bytes <= READ_AHEAD_MAX_BYTES
            })
            .map(|c| (c.id, c.len))
            .collect();
        if chunks.len() < 2 {
            return;
        }
        ra.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(chunks);
        ra.ready.notify_all();
        ra.started.get_or_init(|| {
            for n in 0..READ_AHEAD_THREADS {
                let shared = self.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("fd-readahead-{n}"))
                    .spawn(move || shared.read_ahead_worker());
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a read-ahead thread");
                }
            }
        });
    }

    /// Fetches queued chunks until the mount stops. The fetcher's single flight means a
    /// read-ahead and a read of the same chunk never fetch it twice.
    fn read_ahead_worker(&self) {
        let ra = &self.read_ahead;
        while !self.stopping.load(Ordering::Relaxed) {
            let next = {
                let mut queue = ra.queue.lock().unwrap_or_else(|p| p.into_inner());
                match queue.pop_front() {
                    Some(c) => Some(c),
                    None => {
                        // Woken by new work, or every so often to notice the mount stopping.
                        let (mut queue, _) = ra
                            .ready
                            .wait_timeout(queue, Duration::from_millis(200))
                            .unwrap_or_else(|p| p.into_inner());
                        queue.pop_front()
                    }
                }
            };
            if let Some((id, len)) = next
                && let Err(e) = self.fetcher.ensure_local(&id, len)
            {
                tracing::debug!(chunk = %id.short(), error = %e, "read-ahead of a chunk failed");
            }
        }
    }

    /// Reads bytes `offset .. offset + size` of file entry `i`, fetching chunks as needed.
    fn read_file(&self, i: usize, pieces: &[Piece], local_only: bool) -> ReadOutcome {
        let total: usize = pieces.iter().map(|p| p.len as usize).sum();
        let mut buf = Vec::with_capacity(total);
        for p in pieces {
            let chunk = self.tree.chunk(p.chunk);
            let range = p.from as usize..(p.from + p.len) as usize;
            if let Some(()) =
                self.open_chunks
                    .read(&self.fetcher, &chunk.id, chunk.len, p, &mut buf)
            {
                continue;
            }
            if local_only {
                return ReadOutcome::NeedsFetch;
            }
            match self.fetcher.get(&chunk.id, chunk.len) {
                Ok(data) => buf.extend_from_slice(&data[range]),
                Err(e) => {
                    tracing::warn!(file = %self.tree.entry(i).path_lossy(), chunk = %chunk.id.to_hex(),
                        error = %e, "read failed: chunk not available");
                    return ReadOutcome::Failed;
                }
            }
        }
        ReadOutcome::Data(buf)
    }
}

enum ReadOutcome {
    Data(Vec<u8>),
    NeedsFetch,
    Failed,
}

/// Open chunk files, so a sequential read does not open, stat and close a chunk file per
/// request. Small and simply emptied when full: chunk files are cheap to reopen, and this only
/// needs to cover the chunks of the reads in progress.
#[derive(Default)]
pub(crate) struct OpenChunks {
    files: Mutex<HashMap<ChunkId, Arc<File>>>,
}

impl OpenChunks {
    const CAPACITY: usize = 256;

    /// The local chunk file, if it is there whole.
    fn get(&self, fetcher: &Fetcher, id: &ChunkId, len: u32) -> Option<Arc<File>> {
        if let Some(f) = self.files.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Some(f.clone());
        }
        let file = File::open(fetcher.store().chunk_path(id)).ok()?;
        // A chunk file of the wrong length is the remains of a crash; the fetcher replaces it.
        if file.metadata().ok()?.len() != u64::from(len) {
            return None;
        }
        let file = Arc::new(file);
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files.len() >= Self::CAPACITY {
            files.clear();
        }
        files.insert(*id, file.clone());
        Some(file)
    }

    /// Appends a piece of a local chunk to `buf`; None when the chunk is not local.
    fn read(
        &self,
        fetcher: &Fetcher,
        id: &ChunkId,
        len: u32,
        p: &Piece,
        buf: &mut Vec<u8>,
    ) -> Option<()> {
        let file = self.get(fetcher, id, len)?;
        let at = buf.len();
        buf.resize(at + p.len as usize, 0);
        if file
            .read_exact_at(&mut buf[at..], u64::from(p.from))
            .is_err()
        {
            buf.truncate(at);
            self.files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            return None;
        }
        Some(())
    }
}

/// The file system handed to fuser.
pub(crate) struct LazyFs {
    shared: Arc<Shared>,
    /// The kernel can skip OPEN/RELEASE (and OPENDIR/RELEASEDIR): every open then costs no
    /// round trip, and the kernel keeps page and directory caches by default.
    no_open: bool,
    no_opendir: bool,
}

impl LazyFs {
    pub(crate) fn new(shared: Arc<Shared>) -> LazyFs {
        LazyFs {
            shared,
            no_open: false,
            no_opendir: false,
        }
    }

    fn tree(&self) -> &Tree {
        &self.shared.tree
    }

    fn entry_or_reply(&self, ino: INodeNo) -> Result<usize, Errno> {
        self.tree().entry_of(ino).ok_or(Errno::ENOENT)
    }
}

/// Capabilities worth having when the kernel offers them: fewer round trips for `ls -l` and
/// `find` (readdirplus), cached symlinks, parallel lookups in one directory.
fn wanted_capabilities() -> InitFlags {
    InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_READDIRPLUS_AUTO
        | InitFlags::FUSE_CACHE_SYMLINKS
        | InitFlags::FUSE_PARALLEL_DIROPS
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let offered = config.capabilities();
        let _ = config.add_capabilities(wanted_capabilities() & offered);
        // Answering the first open with ENOSYS tells such a kernel to stop sending them; it
        // then opens files with FOPEN_KEEP_CACHE and directories with FOPEN_CACHE_DIR, which
        // is what this file system would answer anyway.
        self.no_open = offered.contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.no_opendir = offered.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        // Readahead as large as the kernel allows: sequential reads then arrive in big
        // requests, each covering several chunks.
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let tree = self.tree();
        let Some(dir) = tree.entry_of(parent) else {
            return reply.error(Errno::ENOENT);
        };
        if tree.entry(dir).kind != Kind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        match tree.lookup(dir, name.as_bytes()) {
            Some(i) => reply.entry(&CACHE_TTL, &tree.attr(i), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry_or_reply(ino) {
            Ok(i) => reply.attr(&CACHE_TTL, &self.tree().attr(i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry_or_reply(ino) {
            Ok(i) if self.tree().entry(i).kind == Kind::Symlink => {
                reply.data(&self.tree().entry(i).target)
            }
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let i = match self.entry_or_reply(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if self.tree().entry(i).kind == Kind::Dir {
            return reply.error(Errno::EISDIR);
        }
        if self.no_open {
            return reply.error(Errno::ENOSYS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let i = match self.entry_or_reply(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        if self.tree().entry(i).kind != Kind::File {
            return reply.error(Errno::EISDIR);
        }
        let shared = &self.shared;
        shared.recorder.note_read(i);
        shared.stats.reads.fetch_add(1, Ordering::Relaxed);
        let pieces = shared.tree.pieces(i, offset, size);
        let finish = move |shared: &Shared, outcome: ReadOutcome, reply: ReplyData| match outcome {
            ReadOutcome::Data(buf) => {
                shared
                    .stats
                    .bytes_read
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                reply.data(&buf)
            }
            _ => {
                shared.stats.failed_reads.fetch_add(1, Ordering::Relaxed);
                reply.error(Errno::EIO)
            }
        };
        match shared.read_file(i, &pieces, true) {
            ReadOutcome::NeedsFetch => {}
            outcome => return finish(shared, outcome, reply),
        }
        // A chunk must be fetched: the rest of the file will likely be wanted too.
        self.shared.read_ahead(i);
        // Fetch this read's chunks on a thread of its own so this request thread goes back to
        // serving the kernel.
        if shared.fetching_reads.fetch_add(1, Ordering::AcqRel) >= MAX_FETCHING_READS {
            shared.fetching_reads.fetch_sub(1, Ordering::AcqRel);
            let outcome = shared.read_file(i, &pieces, false);
            return finish(shared, outcome, reply);
        }
        let worker = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("fd-lazyfs-read".into())
            .spawn(move || {
                let outcome = worker.read_file(i, &pieces, false);
                worker.fetching_reads.fetch_sub(1, Ordering::AcqRel);
                finish(&worker, outcome, reply);
            });
        if let Err(e) = spawned {
            // The closure (and the reply in it) is gone; the kernel sees the request fail.
            shared.fetching_reads.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "cannot start a read thread");
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written, so close has nothing to flush; ENOSYS makes the kernel stop
        // asking.
        reply.error(Errno::ENOSYS);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry_or_reply(ino) {
            Ok(i) if self.tree().entry(i).kind == Kind::Dir && self.no_opendir => {
                reply.error(Errno::ENOSYS)
            }
            Ok(i) if self.tree().entry(i).kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let tree = self.tree();
        let dir = match self.entry_or_reply(ino) {
            Ok(i) if tree.entry(i).kind == Kind::Dir => i,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        // Offsets: 0 is ".", 1 is "..", child k is k + 2; each entry carries the next offset.
        let kids = tree.children(dir);
        for pos in offset..kids.len() as u64 + 2 {
            let (i, name): (usize, &[u8]) = match pos {
                0 => (dir, b"."),
                1 => (tree.parent(dir), b".."),
                k => {
                    let i = kids[(k - 2) as usize] as usize;
                    (i, tree.name(i))
                }
            };
            let attr = tree.attr(i);
            if reply.add(attr.ino, pos + 1, attr.kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let tree = self.tree();
        let dir = match self.entry_or_reply(ino) {
            Ok(i) if tree.entry(i).kind == Kind::Dir => i,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let kids = tree.children(dir);
        for pos in offset..kids.len() as u64 + 2 {
            let (i, name): (usize, &[u8]) = match pos {
                0 => (dir, b"."),
                1 => (tree.parent(dir), b".."),
                k => {
                    let i = kids[(k - 2) as usize] as usize;
                    (i, tree.name(i))
                }
            };
            let attr = tree.attr(i);
            if reply.add(
                attr.ino,
                pos + 1,
                OsStr::from_bytes(name),
                &CACHE_TTL,
                &attr,
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let tree = self.tree();
        let blocks = tree.content_bytes().div_ceil(4096);
        reply.statfs(blocks, 0, 0, tree.len() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let i = match self.entry_or_reply(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let xattrs = &self.tree().entry(i).xattrs;
        let Some((_, value)) = xattrs.iter().find(|(k, _)| k.as_slice() == name.as_bytes()) else {
            return reply.error(Errno::NO_XATTR);
        };
        sized_reply(value, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let i = match self.entry_or_reply(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (k, _) in &self.tree().entry(i).xattrs {
            names.extend_from_slice(k);
            names.push(0);
        }
        sized_reply(&names, size, reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.entry_or_reply(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// No ioctls: programs in containers probe files with some (python asks for inode flags
    /// with FS_IOC_GETFLAGS) and expect ENOTTY; fuser's default answer logs a warning for
    /// every call, which `fd run` would print on the user's terminal.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }
}

/// The xattr size protocol: size 0 asks for the length, a buffer too small is ERANGE.
fn sized_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}
