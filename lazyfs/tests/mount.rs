//! Real FUSE mounts inside the test process, of small images written here: reads across
//! chunk boundaries, a slow source that must not stall other requests, one fetch for many
//! readers, EIO for a chunk nobody has, and unmounting with a file still open.
//!
//! Needs root and /dev/fuse (as CI has); elsewhere each test says so and does nothing.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fd_chunker::ChunkId;
use fd_lazyfs::{MountOptions, Mounted, Prefetch};
use fd_node::fetch::{ChunkSource, FetchPolicy, Fetcher};
use fd_node::index::{self, FILE_INDEX_MEDIA_TYPE};
use fd_node::store::ChunkRef;
use fd_node::{Entry, FileIndex, ImageRecord, Kind, NodeError, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/dev/fuse").exists();
    if !ok {
        eprintln!("skipped: mounting needs root and /dev/fuse");
    }
    ok
}

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + usize::from(seed) * 13) % 251) as u8)
        .collect()
}

/// A source that answers from a map after a delay and counts what it was asked.
struct Slow {
    chunks: HashMap<ChunkId, Vec<u8>>,
    delay: Duration,
    calls: AtomicUsize,
}

impl ChunkSource for Slow {
    fn name(&self) -> String {
        "slow".into()
    }
    fn fetch(&self, id: &ChunkId, _len: u32) -> fd_node::Result<Vec<u8>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.chunks
            .get(id)
            .cloned()
            .ok_or_else(|| NodeError::Missing {
                what: "chunk".into(),
            })
    }
}

/// Fields drop in order: the mount goes before its directories.
struct Fixture {
    mounted: Option<Mounted>,
    mnt: std::path::PathBuf,
    source: Arc<Slow>,
    contents: HashMap<&'static str, Vec<u8>>,
    _dir: tempfile::TempDir,
}

/// Files: `/fast` (local), `/slow` (only at the slow source), `/gone` (nowhere), `/multi`
/// (three chunks: first local, the rest at the source), `/big` (three 1 MiB chunks at the
/// source).
fn fixture(delay: Duration) -> Result<Fixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path().join("store"))?);
    let mut remote = HashMap::new();
    let mut contents = HashMap::new();
    let mut entries = vec![Entry::implied_dir(b"/".to_vec())];

    let mut file = |path: &'static str, parts: Vec<(Vec<u8>, bool)>| -> fd_node::Result<()> {
        let mut e = Entry::implied_dir(path.as_bytes().to_vec());
        e.kind = Kind::File;
        e.mode = 0o644;
        let mut all = Vec::new();
        for (data, local) in parts {
            let id = ChunkId::of(&data);
            if local {
                store.put_chunk(&id, &data)?;
            } else if path != "/gone" {
                remote.insert(id, data.clone());
            }
            e.chunks.push(ChunkRef {
                id,
                len: data.len() as u32,
            });
            all.extend_from_slice(&data);
        }
        e.size = all.len() as u64;
        contents.insert(path, all);
        entries.push(e);
        Ok(())
    };
    // Larger than the kernel's own readahead window: only fd's read-ahead brings its end early.
    file(
        "/big",
        vec![
            (bytes(7, 1 << 20), false),
            (bytes(8, 1 << 20), false),
            (bytes(9, 1 << 20), false),
        ],
    )?;
    file("/fast", vec![(bytes(1, 5000), true)])?;
    file("/gone", vec![(bytes(2, 100), false)])?;
    file(
        "/multi",
        vec![
            (bytes(3, 70_000), true),
            (bytes(4, 1), false),
            (bytes(5, 33_333), false),
        ],
    )?;
    file("/slow", vec![(bytes(6, 20_000), false)])?;

    let key = store.put_object(
        FILE_INDEX_MEDIA_TYPE,
        &index::encode(&FileIndex { entries })?,
    )?;
    let image = ImageRecord {
        reference: "test/lazy:1".into(),
        manifest_digest: format!("sha256:{}", "ab".repeat(32)),
        index_digest: None,
        config_digest: format!("sha256:{}", "cd".repeat(32)),
        layers: vec![],
        file_index: key,
        size: 0,
        blob_size: 0,
        chunks: 0,
        pulled: 0,
        lazy: false,
    };
    let source = Arc::new(Slow {
        chunks: remote,
        delay,
        calls: AtomicUsize::new(0),
    });
    let policy = FetchPolicy {
        timeout: Duration::from_secs(10),
        down_for: Duration::from_secs(1),
    };
    let fetcher = Arc::new(Fetcher::new(
        store,
        vec![source.clone() as Arc<dyn ChunkSource>],
        policy,
    ));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let options = MountOptions {
        prefetch: Prefetch::None,
        ..MountOptions::default()
    };
    let mounted = fd_lazyfs::mount(fetcher, &image, &mnt, &options)?;
    Ok(Fixture {
        mounted: Some(mounted),
        mnt,
        source,
        contents,
        _dir: dir,
    })
}

#[test]
fn reads_across_chunk_boundaries_are_exact() -> TestResult {
    if !can_mount() {
        return Ok(());
    }
    let f = fixture(Duration::ZERO)?;
    let want = &f.contents["/multi"];
    let file = std::fs::File::open(f.mnt.join("multi"))?;
    for (offset, len) in [
        (0usize, 10usize),
        (69_990, 20),
        (70_000, 1),
        (69_999, 3),
        (70_001, 50_000),
        (0, 200_000),
    ] {
        let mut buf = vec![0u8; len];
        let n = file.read_at(&mut buf, offset as u64)?;
        let end = (offset + len).min(want.len());
        assert_eq!(&buf[..n], &want[offset..end], "read at {offset}+{len}");
    }
    assert_eq!(std::fs::read(f.mnt.join("fast"))?, f.contents["/fast"]);
    assert_eq!(
        std::fs::metadata(f.mnt.join("multi"))?.len(),
        want.len() as u64
    );
    Ok(())
}

#[test]
fn slow_fetch_does_not_stall_other_requests_and_is_fetched_once() -> TestResult {
    if !can_mount() {
        return Ok(());
    }
    let f = fixture(Duration::from_millis(1500))?;
    let started = Instant::now();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let path = f.mnt.join("slow");
            std::thread::spawn(move || std::fs::read(path))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));

    // While the slow chunk is in flight, everything else answers at once.
    let quick = Instant::now();
    assert_eq!(std::fs::read(f.mnt.join("fast"))?, f.contents["/fast"]);
    let names: Vec<_> = std::fs::read_dir(&f.mnt)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(names.len(), 5);
    std::fs::metadata(f.mnt.join("gone"))?;
    assert!(
        quick.elapsed() < Duration::from_millis(700),
        "other requests took {:?}",
        quick.elapsed()
    );
    assert!(
        readers.iter().any(|r| !r.is_finished()),
        "the slow read was not slow"
    );

    for r in readers {
        let got = r.join().map_err(|_| "reader panicked")??;
        assert_eq!(got, f.contents["/slow"]);
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        f.source.calls.load(Ordering::SeqCst),
        1,
        "one fetch for four readers"
    );
    Ok(())
}

#[test]
fn a_read_that_fetches_brings_the_rest_of_its_file_ahead() -> TestResult {
    if !can_mount() {
        return Ok(());
    }
    let f = fixture(Duration::from_millis(50))?;
    // One byte at the start of /big: that read fetches, and the file's last chunk, 2 MiB on
    // and never read, arrives too.
    let mut file = std::fs::File::open(f.mnt.join("big"))?;
    let mut one = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut one, 0)?;
    assert_eq!(one[0], f.contents["/big"][0]);
    let store = Store::open(f.mnt.parent().ok_or("no parent")?.join("store"))?;
    let last = bytes(9, 1 << 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.has_chunk(&ChunkId::of(&last), last.len() as u32) {
        assert!(
            Instant::now() < deadline,
            "the rest of the file was not fetched ahead"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reading the whole file now asks the source for nothing more.
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut all)?;
    assert_eq!(all, f.contents["/big"]);
    assert_eq!(
        f.source.calls.load(Ordering::SeqCst),
        3,
        "each remote chunk once"
    );
    Ok(())
}

#[test]
fn chunk_nobody_has_is_eio() -> TestResult {
    if !can_mount() {
        return Ok(());
    }
    let f = fixture(Duration::ZERO)?;
    let started = Instant::now();
    let err = std::fs::read(f.mnt.join("gone"))
        .err()
        .ok_or("read of a missing chunk succeeded")?;
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[test]
fn unmount_with_open_file_detaches_and_saves_profile() -> TestResult {
    if !can_mount() {
        return Ok(());
    }
    let mut f = fixture(Duration::ZERO)?;
    let mut open = std::fs::File::open(f.mnt.join("fast"))?;
    let mut first = [0u8; 10];
    open.read_exact(&mut first)?;
    let _ = std::fs::read(f.mnt.join("multi"))?;
    let report = f.mounted.take().ok_or("not mounted")?.unmount()?;
    assert!(report.lazy, "busy mount should be detached");
    assert_eq!(report.files_read, 2);
    assert!(report.profile.is_some());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mountinfo.contains(&format!(" {} ", f.mnt.display())),
        "still mounted"
    );
    Ok(())
}
