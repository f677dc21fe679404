//! The control channel (docs/pending-reads.md) driven through the FileSystem trait, as the
//! FUSE dispatcher would: pending reads, long polls, fills, the read log and the counters.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use incfs::cache::BlockCache;
use incfs::control::{
    Control, HandleObserver, SavedHandle, SavedHandles, CTL_BIT, FILL_HEADER_SIZE, LOG_CAPACITY, RECORD_SIZE,
};
use incfs::engine::{Engine, EngineConfig, FillSource};
use incfs::fs::MountFs;
use incfs::image::ImageId;
use incfs::pack::{pack, PackOptions};
use incfs::store::{Remote, Store};
use incfs_fuse::{abi, Context, DirEntry, DirSink, Errno, FileSystem, Reply};
use support::pseudo_random;

const ROOT: u64 = 1;

struct Setup {
    fs: Arc<MountFs>,
    data: Vec<u8>,
    _dir: tempfile::TempDir,
}

async fn setup(fill: FillSource, read_timeout: Duration) -> Setup {
    let (engine, data, dir) = engine(fill, read_timeout).await;
    Setup { fs: Arc::new(MountFs::new(engine)), data, _dir: dir }
}

/// An engine over a small image: "a" (its bytes returned), "sub/b", "zeros".
async fn engine(fill: FillSource, read_timeout: Duration) -> (Arc<Engine>, Vec<u8>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    let data = pseudo_random(7, 5 * 4096 + 100);
    std::fs::write(src.join("a"), &data).expect("write");
    std::fs::write(src.join("sub/b"), pseudo_random(8, 3000)).expect("write");
    // All zero blocks: always present, never fetched.
    std::fs::write(src.join("zeros"), vec![0u8; 4096 * 64]).expect("write");
    let store = dir.path().join("store");
    let id: ImageId =
        pack(&src, &Store::new(&store), &PackOptions { progress: false, ..PackOptions::default() }).expect("pack").0;
    let cfg = EngineConfig { read_timeout, fill, ..EngineConfig::default() };
    let remote = Remote::open(store.to_str().expect("utf8"), cfg.attempt_timeout).expect("remote");
    let cache = Arc::new(BlockCache::open(&dir.path().join("cache")).expect("cache"));
    let engine = Engine::open(remote, id, cache, cfg).await.expect("engine");
    (engine, data, dir)
}

/// READ through the FileSystem trait into a fresh buffer, as the dispatcher would.
fn read(fs: &MountFs, ino: u64, fh: u64, offset: u64, size: u32, ctx: &Context) -> Reply<Vec<u8>> {
    incfs_fuse::read_to_vec(fs, ino, fh, offset, size, ctx)
}

async fn done<T>(r: Reply<T>) -> Result<T, Errno> {
    match r {
        Reply::Ready(x) => x,
        Reply::Pending(f) => f.await,
    }
}

fn ctx(uid: u32) -> Context {
    Context { uid, gid: uid, pid: 42 }
}

fn ino(fs: &MountFs, parent: u64, name: &str) -> u64 {
    fs.lookup(parent, name.as_bytes()).expect(name).ino
}

fn file_id(fs: &MountFs, ino: u64) -> [u8; 16] {
    let hex_id = fs.getxattr(ino, b"user.incfs.id").expect("id");
    let mut id = [0u8; 16];
    hex::decode_to_slice(&hex_id, &mut id).expect("hex");
    id
}

fn open_ctl(fs: &MountFs, name: &str, flags: i32) -> (u64, u64) {
    let i = ino(fs, ROOT, name);
    let (fh, open_flags) = fs.open(i, flags as u32).expect("open");
    assert_ne!(open_flags & abi::FOPEN_DIRECT_IO, 0, "{name} must be direct I/O");
    (i, fh)
}

#[derive(Debug, PartialEq)]
struct Rec {
    id: [u8; 16],
    ts: u64,
    block: u32,
    serial: u32,
    uid: u32,
}

fn records(b: &[u8]) -> Vec<Rec> {
    assert_eq!(b.len() % RECORD_SIZE, 0);
    b.chunks(RECORD_SIZE)
        .map(|r| {
            let u32_at = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().expect("4"));
            Rec {
                id: r[..16].try_into().expect("16"),
                ts: u64::from_le_bytes(r[16..24].try_into().expect("8")),
                block: u32_at(24),
                serial: u32_at(28),
                uid: u32_at(32),
            }
        })
        .collect()
}

fn fill_record(id: &[u8; 16], block: u32, compression: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(id);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.push(compression);
    out.extend_from_slice(&[0u8; 7]);
    assert_eq!(out.len(), FILL_HEADER_SIZE);
    out.extend_from_slice(data);
    out
}

fn set_timeout(fs: &MountFs, i: u64, fh: u64, ms: u32) {
    let Reply::Ready(r) = fs.write(i, fh, 0, &ms.to_le_bytes(), &ctx(0)) else { panic!("timeout write parked") };
    assert_eq!(r, Ok(4));
}

fn stat(fs: &MountFs, name: &str) -> u64 {
    let text = read_text(fs, ".stats");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn read_text(fs: &MountFs, name: &str) -> String {
    let (i, fh) = open_ctl(fs, name, libc::O_RDONLY);
    let Reply::Ready(r) = read(fs, i, fh, 0, 65536, &ctx(0)) else { panic!("parked") };
    fs.release(i, fh);
    String::from_utf8(r.expect("read")).expect("utf8")
}

struct Names(Vec<(u64, String)>);
impl DirSink for Names {
    fn add(&mut self, e: DirEntry<'_>) -> bool {
        self.0.push((e.ino, String::from_utf8_lossy(e.name).into_owned()));
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_read_is_reported_and_filled() {
    let s = setup(FillSource::Supplied, Duration::from_secs(10)).await;
    let fs = &s.fs;
    let a = ino(fs, ROOT, "a");
    let id = file_id(fs, a);
    let (p, pfh) = open_ctl(fs, ".pending_reads", libc::O_RDWR);

    // Nothing pending: incfs's answer is an empty read at once.
    assert_eq!(done(read(fs, p, pfh, 0, 4096, &ctx(0))).await, Ok(vec![]));
    // Smaller than one record.
    assert_eq!(done(read(fs, p, pfh, 0, 39, &ctx(0))).await, Err(libc::EINVAL));

    let reader = match read(fs, a, 0, 4096, 4096, &ctx(1234)) {
        Reply::Pending(f) => tokio::spawn(f),
        Reply::Ready(r) => panic!("block 1 should be missing, got {r:?}"),
    };
    let before = Instant::now();
    let recs = records(&done(read(fs, p, pfh, 0, 4096, &ctx(0))).await.expect("pending"));
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].id, recs[0].block, recs[0].uid), (id, 1, 1234));
    assert!(recs[0].serial >= 1 && recs[0].ts > 0);
    // The cursor moved past it.
    assert_eq!(done(read(fs, p, pfh, 0, 4096, &ctx(0))).await, Ok(vec![]));
    // A fresh handle sees it again.
    let (_, pfh2) = open_ctl(fs, ".pending_reads", libc::O_RDONLY);
    assert_eq!(records(&done(read(fs, p, pfh2, 0, 4096, &ctx(0))).await.expect("pending")).len(), 1);

    let (f, ffh) = open_ctl(fs, ".fill", libc::O_WRONLY);
    let rec = fill_record(&id, 1, 0, &s.data[4096..8192]);
    assert_eq!(done(fs.write(f, ffh, 0, &rec, &ctx(0))).await, Ok(rec.len() as u32));
    let got = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("reader woke").expect("join");
    assert_eq!(got.expect("read"), s.data[4096..8192]);
    assert!(before.elapsed() < Duration::from_secs(5));
    // Done: no longer pending; a second fill of the same block is fine (already present).
    assert!(s.fs.control().pending_now().is_empty());
    assert_eq!(done(fs.write(f, ffh, 0, &rec, &ctx(0))).await, Ok(rec.len() as u32));
    assert_eq!(stat(fs, "fill_blocks_written"), 1);
    assert_eq!(stat(fs, "fill_blocks_present"), 1);
    assert_eq!(stat(fs, "reads_delayed_pending"), 1);
    assert_eq!(read_text(fs, ".blocks_written"), "1");
    // The file is served from the cache now.
    assert!(matches!(read(fs, a, 0, 4096, 4096, &ctx(0)), Reply::Ready(Ok(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_a_new_pending_read_and_times_out_otherwise() {
    let s = setup(FillSource::Supplied, Duration::from_secs(3)).await;
    let fs = s.fs.clone();
    let a = ino(&fs, ROOT, "a");
    let (p, pfh) = open_ctl(&fs, ".pending_reads", libc::O_RDWR);
    set_timeout(&fs, p, pfh, 5000);
    // Over the cap: clamped, not refused; a bad length is refused.
    assert_eq!(done(fs.write(p, pfh, 0, &[1, 2, 3], &ctx(0))).await, Err(libc::EINVAL));

    let poll = match read(&fs, p, pfh, 0, 40 * 16, &ctx(0)) {
        Reply::Pending(f) => tokio::spawn(f),
        Reply::Ready(r) => panic!("long poll answered at once: {r:?}"),
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!poll.is_finished());
    let t = Instant::now();
    let reader = match read(&fs, a, 0, 2 * 4096, 4096, &ctx(7)) {
        Reply::Pending(f) => tokio::spawn(f),
        Reply::Ready(_) => panic!("expected a miss"),
    };
    let recs = records(&poll.await.expect("join").expect("poll"));
    assert!(t.elapsed() < Duration::from_secs(1), "long poll took {:?}", t.elapsed());
    assert_eq!(recs.iter().map(|r| (r.block, r.uid)).collect::<Vec<_>>(), vec![(2, 7)]);

    // Nothing new: the poll ends empty at its timeout.
    set_timeout(&fs, p, pfh, 300);
    let t = Instant::now();
    assert_eq!(done(read(&fs, p, pfh, 0, 4096, &ctx(0))).await, Ok(vec![]));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(2), "{took:?}");
    // The reader was never filled: ETIME at the read timeout.
    assert_eq!(reader.await.expect("join"), Err(libc::ETIME));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_fill_is_rejected_and_the_reader_times_out() {
    let s = setup(FillSource::Supplied, Duration::from_millis(1500)).await;
    let fs = &s.fs;
    let a = ino(fs, ROOT, "a");
    let id = file_id(fs, a);
    let t = Instant::now();
    let reader = match read(fs, a, 0, 0, 4096, &ctx(1000)) {
        Reply::Pending(f) => tokio::spawn(f),
        Reply::Ready(_) => panic!("expected a miss"),
    };
    let (f, ffh) = open_ctl(fs, ".fill", libc::O_WRONLY);
    let mut bad = s.data[..4096].to_vec();
    bad[17] ^= 1;
    let rec = fill_record(&id, 0, 0, &bad);
    assert_eq!(done(fs.write(f, ffh, 0, &rec, &ctx(0))).await, Err(libc::EBADMSG));
    // Garbage claiming to be zstd is rejected the same way.
    assert_eq!(done(fs.write(f, ffh, 0, &fill_record(&id, 0, 2, b"not zstd"), &ctx(0))).await, Err(libc::EBADMSG));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!reader.is_finished(), "the reader keeps waiting after a rejected fill");
    assert_eq!(s.fs.control().pending_now().len(), 1);
    assert_eq!(reader.await.expect("join"), Err(libc::ETIME));
    assert!(t.elapsed() >= Duration::from_millis(1400));
    assert_eq!(stat(fs, "fill_blocks_rejected"), 2);
    assert_eq!(stat(fs, "reads_failed_timed_out"), 1);
    assert_eq!(stat(fs, "engine_verify_failures"), 2);
    assert_eq!(stat(fs, "engine_timeouts"), 1);
    assert!(s.fs.control().pending_now().is_empty());
    // Nothing was stored.
    assert_eq!(read_text(fs, ".blocks_written"), "0");

    let (e, efh) = open_ctl(fs, ".last_read_error", libc::O_RDONLY);
    let b = done(read(fs, e, efh, 0, 4096, &ctx(0))).await.expect("read");
    assert_eq!(b.len(), 40);
    assert_eq!(&b[..16], &id);
    assert!(u64::from_le_bytes(b[16..24].try_into().expect("8")) > 0);
    let u = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    assert_eq!((u(24), u(28), u(32)), (0, libc::ETIME as u32, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_errors_follow_incfs() {
    let s = setup(FillSource::Supplied, Duration::from_secs(1)).await;
    let fs = &s.fs;
    let a = ino(fs, ROOT, "a");
    let id = file_id(fs, a);
    let (f, ffh) = open_ctl(fs, ".fill", libc::O_WRONLY);
    let w = |d: &[u8]| match fs.write(f, ffh, 0, d, &ctx(0)) {
        Reply::Ready(r) => r,
        Reply::Pending(_) => panic!("fill parked"),
    };
    assert_eq!(w(&fill_record(&id, 0, 0, &vec![0u8; 8193])), Err(libc::E2BIG));
    assert_eq!(w(&fill_record(&id, 6, 0, &s.data[..4096])), Err(libc::ERANGE));
    assert_eq!(w(&fill_record(&id, 0, 1, &s.data[..4096])), Err(libc::EINVAL));
    assert_eq!(w(&fill_record(&[9u8; 16], 0, 0, &s.data[..4096])), Err(libc::ENOENT));
    assert_eq!(w(&fill_record(&id, 0, 0, &s.data[..4096])[..100]), Err(libc::EINVAL));
    assert_eq!(w(&[0u8; 10]), Err(libc::EINVAL));
    let mut reserved = fill_record(&id, 0, 0, &s.data[..4096]);
    reserved[30] = 1;
    assert_eq!(w(&reserved), Err(libc::EINVAL));
    // Hash-tree blocks: the host has the tree; accepted and ignored.
    let mut hash = fill_record(&id, 0, 0, &[0u8; 4096]);
    hash[25] = 1;
    assert_eq!(w(&hash), Ok(hash.len() as u32));
    // Several blocks in one write; a bad one stops it with a short count.
    let good0 = fill_record(&id, 0, 0, &s.data[..4096]);
    let good5 = fill_record(&id, 5, 0, &s.data[5 * 4096..]);
    let bad2 = fill_record(&id, 2, 0, &s.data[..4096]);
    let mut batch = [good0.clone(), good5.clone(), bad2, fill_record(&id, 3, 0, &s.data[3 * 4096..4 * 4096])].concat();
    assert_eq!(w(&batch), Ok((good0.len() + good5.len()) as u32));
    // zstd-compressed block.
    let z = zstd::bulk::compress(&s.data[4096..8192], 3).expect("zstd");
    batch = fill_record(&id, 1, 2, &z);
    assert_eq!(w(&batch), Ok(batch.len() as u32));
    // Filled ranges: blocks 0, 1 and 5 of 6.
    let fi = ino(fs, ino(fs, ROOT, ".filled"), &hex::encode(id));
    let (fh, _) = fs.open(fi, libc::O_RDONLY as u32).expect("open");
    let b = done(read(fs, fi, fh, 0, 4096, &ctx(0))).await.expect("read");
    let u = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    assert_eq!(u64::from_le_bytes(b[..8].try_into().expect("8")), s.data.len() as u64);
    assert_eq!((u(8), u(12), u(16), u(20)), (6, 3, 2, 0));
    assert_eq!((u(32), u(36), u(40), u(44)), (0, 2, 5, 6));
    assert_eq!(b.len(), 48);
    // Reading the snapshot at an offset (as `cat` with a small buffer would).
    assert_eq!(done(read(fs, fi, fh, 40, 100, &ctx(0))).await.expect("read"), b[40..].to_vec());
    // Writes to other control files and to image files are refused.
    assert!(matches!(fs.write(a, 0, 0, b"x", &ctx(0)), Reply::Ready(Err(libc::EROFS))));
    let bw = ino(fs, ROOT, ".blocks_written");
    assert_eq!(fs.open(bw, libc::O_WRONLY as u32), Err(libc::EROFS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_index_incomplete_and_hidden_root() {
    let s = setup(FillSource::Supplied, Duration::from_secs(1)).await;
    let fs = &s.fs;
    let a = ino(fs, ROOT, "a");
    let b = ino(fs, ino(fs, ROOT, "sub"), "b");
    let zeros = ino(fs, ROOT, "zeros");
    let (ida, idb, idz) = (hex::encode(file_id(fs, a)), hex::encode(file_id(fs, b)), hex::encode(file_id(fs, zeros)));

    // Root listing: the image only.
    let (dfh, _) = fs.opendir(ROOT, 0).expect("opendir");
    let mut names = Names(Vec::new());
    fs.readdir(ROOT, dfh, 0, &mut names).expect("readdir");
    let root: Vec<&str> = names.0.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(root, vec![".", "..", "a", "sub", "zeros"]);
    for n in [
        ".pending_reads",
        ".log",
        ".blocks_written",
        ".fill",
        ".stats",
        ".last_read_error",
        ".index",
        ".incomplete",
        ".filled",
    ] {
        assert_ne!(ino(fs, ROOT, n) & CTL_BIT, 0, "{n}");
    }
    assert_eq!(fs.lookup(ROOT, b".nope"), Err(libc::ENOENT));

    // .index/<id> is the file itself (a hard link, as incfs).
    let index = ino(fs, ROOT, ".index");
    assert_eq!(ino(fs, index, &ida), a);
    assert_eq!(ino(fs, index, &idb), b);
    assert_eq!(fs.lookup(index, b"00"), Err(libc::ENOENT));
    assert_eq!(fs.lookup(index, &[b'z'; 32]), Err(libc::ENOENT));
    let list = |dir: u64| {
        let (fh, _) = fs.opendir(dir, 0).expect("opendir");
        let mut n = Names(Vec::new());
        fs.readdir(dir, fh, 0, &mut n).expect("readdir");
        n.0.into_iter().skip(2).map(|(_, n)| n).collect::<Vec<_>>()
    };
    let mut all = list(index);
    all.sort();
    let mut want = vec![ida.clone(), idb.clone(), idz.clone()];
    want.sort();
    assert_eq!(all, want);

    // .incomplete: not the all-zero file; b leaves once its one block arrives.
    let incomplete = ino(fs, ROOT, ".incomplete");
    let mut inc = list(incomplete);
    inc.sort();
    let mut want = vec![ida.clone(), idb.clone()];
    want.sort();
    assert_eq!(inc, want);
    assert!(fs.lookup(incomplete, idz.as_bytes()).is_err());
    let e = fs.lookup(incomplete, idb.as_bytes()).expect("b incomplete");
    assert_eq!((e.ino, e.entry_timeout), (b, Duration::ZERO));
    let data_b = pseudo_random(8, 3000);
    let (f, ffh) = open_ctl(fs, ".fill", libc::O_WRONLY);
    let rec = fill_record(&file_id(fs, b), 0, 0, &data_b);
    assert_eq!(done(fs.write(f, ffh, 0, &rec, &ctx(0))).await, Ok(rec.len() as u32));
    assert_eq!(list(incomplete), vec![ida.clone()]);
    assert_eq!(fs.lookup(incomplete, idb.as_bytes()).map(|e| e.ino), Err(libc::ENOENT));
    // Fully loaded flag in .filled.
    let fi = ino(fs, ino(fs, ROOT, ".filled"), &idb);
    let (fh, _) = fs.open(fi, 0).expect("open");
    let bytes = done(read(fs, fi, fh, 0, 4096, &ctx(0))).await.expect("read");
    assert_eq!(u32::from_le_bytes(bytes[20..24].try_into().expect("4")), 1);
    // Control handles are released; a released handle is refused.
    fs.release(fi, fh);
    assert_eq!(done(read(fs, fi, fh, 0, 4096, &ctx(0))).await, Err(libc::EBADF));
    assert!(Control::is_control(fi));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_log_records_every_block_read_in_a_bounded_ring() {
    let s = setup(FillSource::Supplied, Duration::from_secs(1)).await;
    let fs = &s.fs;
    let zeros = ino(fs, ROOT, "zeros");
    let idz = file_id(fs, zeros);
    let (l, lfh) = open_ctl(fs, ".log", libc::O_RDWR);
    assert_eq!(done(read(fs, l, lfh, 0, 4096, &ctx(0))).await, Ok(vec![]));
    // One read of 3 blocks by uid 5.
    assert_eq!(done(read(fs, zeros, 0, 4096, 3 * 4096, &ctx(5))).await.map(|d| d.len()), Ok(3 * 4096));
    let recs = records(&done(read(fs, l, lfh, 0, 4096, &ctx(0))).await.expect("log"));
    assert_eq!(
        recs.iter().map(|r| (r.id, r.block, r.uid)).collect::<Vec<_>>(),
        vec![(idz, 1, 5), (idz, 2, 5), (idz, 3, 5)]
    );
    assert!(recs.windows(2).all(|w| w[1].serial == w[0].serial + 1));

    // Long poll on the log wakes on a read.
    set_timeout(fs, l, lfh, 5000);
    let poll = match read(fs, l, lfh, 0, 4096, &ctx(0)) {
        Reply::Pending(f) => tokio::spawn(f),
        Reply::Ready(r) => panic!("answered at once: {r:?}"),
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = done(read(fs, zeros, 0, 0, 100, &ctx(6))).await;
    let recs =
        records(&tokio::time::timeout(Duration::from_secs(2), poll).await.expect("woke").expect("join").expect("log"));
    assert_eq!(recs.iter().map(|r| (r.block, r.uid)).collect::<Vec<_>>(), vec![(0, 6)]);

    // Overflow the ring: memory stays bounded and a new reader starts at the oldest kept.
    for i in 0..(LOG_CAPACITY as u64 / 16 + 10) {
        let _ = done(read(fs, zeros, 0, (i % 4) * 4096, 16 * 4096, &ctx(0))).await;
    }
    let (_, fh2) = open_ctl(fs, ".log", libc::O_RDONLY);
    let mut n = 0;
    loop {
        let b = done(read(fs, l, fh2, 0, 40 * 1000, &ctx(0))).await.expect("log");
        if b.is_empty() {
            break;
        }
        n += b.len() / RECORD_SIZE;
    }
    assert_eq!(n, LOG_CAPACITY);
    assert!(stat(fs, "log_records_dropped") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_fetch_shows_pending_reads_while_under_way() {
    // Remote mode against a store directory: the fetch is quick, but the pending record
    // exists from the miss until the read completes, and is gone afterwards.
    let s = setup(FillSource::Remote, Duration::from_secs(5)).await;
    let fs = &s.fs;
    let a = ino(fs, ROOT, "a");
    let r = match read(fs, a, 0, 0, 8192, &ctx(3)) {
        Reply::Pending(f) => f,
        Reply::Ready(_) => panic!("expected a miss"),
    };
    let pending: Vec<u32> = s.fs.control().pending_now().iter().map(|r| r.block).collect();
    assert_eq!(pending, vec![0, 1]);
    assert_eq!(r.await.expect("read"), s.data[..8192]);
    assert!(s.fs.control().pending_now().is_empty());
    assert!(stat(fs, "blocks_written") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_file_snapshots_are_bounded() {
    let (engine, _data, _dir) = engine(FillSource::Remote, Duration::from_secs(10)).await;
    let c = Control::with_snapshot_limit(engine, 2000);
    let stats = |c: &Arc<Control>, fh: u64, size: u32| match c.read(incfs::control::INO_STATS, fh, 0, size, &ctx(0)) {
        Reply::Ready(r) => r,
        Reply::Pending(_) => panic!("generated files answer at once"),
    };
    let open = |c: &Arc<Control>| c.open(incfs::control::INO_STATS, libc::O_RDONLY as u32).expect("open").0;
    // A READ that takes the whole file keeps nothing, however many handles do it.
    let whole: Vec<u64> = (0..20).map(|_| open(&c)).collect();
    for &fh in &whole {
        assert!(stats(&c, fh, 65536).expect("read").len() > 100);
    }
    // Reading in pieces keeps a snapshot per handle, until the limit.
    let pieces: Vec<u64> = (0..20).map(|_| open(&c)).collect();
    let results: Vec<_> = pieces.iter().map(|&fh| stats(&c, fh, 16)).collect();
    assert!(results.iter().take(2).all(|r| r.is_ok()), "the first snapshots fit");
    assert!(results.contains(&Err(libc::ENOMEM)), "past the limit: ENOMEM, not more memory");
    // Releasing a handle gives its snapshot back.
    for &fh in &pieces[..2] {
        c.release(fh);
    }
    assert_eq!(stats(&c, *pieces.last().expect("handle"), 16).map(|d| d.len()), Ok(16));
}

/// Keeps what the control channel reports, as the worker's state region does.
#[derive(Default)]
struct Kept(std::sync::Mutex<SavedHandles>);

impl HandleObserver for Kept {
    fn handles_changed(&self, handles: SavedHandles) {
        *self.0.lock().expect("lock") = handles;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_handles_are_taken_over_by_a_successor() {
    let (engine, _data, _dir) = engine(FillSource::Supplied, Duration::from_secs(1)).await;
    let old = MountFs::new(engine.clone());
    let kept = Arc::new(Kept::default());
    old.control().set_observer(kept.clone());
    let zeros = ino(&old, ROOT, "zeros");
    let (l, lfh) = open_ctl(&old, ".log", libc::O_RDWR);
    let (stats, gone) = open_ctl(&old, ".stats", libc::O_RDONLY);
    set_timeout(&old, l, lfh, 700);
    let _ = done(read(&old, zeros, 0, 0, 2 * 4096, &ctx(3))).await;
    let seen = records(&done(read(&old, l, lfh, 0, 4096, &ctx(0))).await.expect("log"));
    assert_eq!(seen.len(), 2);
    old.release(stats, gone);
    let saved = kept.0.lock().expect("lock").clone();
    assert_eq!(saved.handles.len(), 1, "the released handle is not kept: {saved:?}");
    assert_eq!((saved.handles[0].fh, saved.handles[0].timeout_ms), (lfh, 700));
    assert_eq!(saved.handles[0].cursor, u64::from(seen[1].serial), "the cursor follows what was read");

    // The successor: a new process, its own read log.
    let new = MountFs::new(engine);
    new.control().restore(&saved);
    // The handle reads on; what it had seen is not repeated, what comes after is there.
    let _ = done(read(&new, zeros, 0, 4096 * 5, 4096, &ctx(4))).await;
    let after = records(&done(read(&new, l, lfh, 0, 4096, &ctx(0))).await.expect("log"));
    assert_eq!(after.iter().map(|r| (r.block, r.uid)).collect::<Vec<_>>(), vec![(5, 4)]);
    assert!(after[0].serial > seen[1].serial, "serials go on above every saved cursor");
    // The released one is gone; new handles do not reuse a saved number.
    assert_eq!(done(read(&new, l, gone, 0, 4096, &ctx(0))).await, Err(libc::EBADF));
    let (_, fresh) = open_ctl(&new, ".log", libc::O_RDONLY);
    assert!(fresh > lfh.max(gone));
    // Handles naming no control file are dropped.
    let nothing = CTL_BIT | 0x99;
    let bogus =
        SavedHandles { next_fh: 1, handles: vec![SavedHandle { fh: 77, ino: nothing, cursor: 0, timeout_ms: 0 }] };
    new.control().restore(&bogus);
    assert!(matches!(done(read(&new, nothing, 77, 0, 4096, &ctx(0))).await, Err(libc::EBADF)));
}
