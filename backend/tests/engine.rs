//! The image format and block engine against real HTTP servers (nginx, and a fault injector).

mod support;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use incfs::cache::{BlockCache, CacheOptions};
use incfs::engine::{Engine, EngineConfig, ReadOutcome};
use incfs::image::{ImageId, InodeKind};
use incfs::pack::{pack, PackOptions};
use incfs::store::{Remote, Store};
use incfs_buf::ScatterBuf;
use support::*;

const GIB: u64 = 1 << 30;

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let n = std::ffi::CString::new(name).expect("name");
    // SAFETY: valid C strings and a valid buffer.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
}

/// Every edge case the format must handle, in one tree.
fn edge_tree(root: &Path, many: usize) {
    let w = |p: &str, d: &[u8]| {
        let path = root.join(p);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, d).expect("write");
    };
    w("empty", b"");
    for (i, n) in [1usize, 4095, 4096, 4097, 3 * 4096, (1 << 20) + 3].iter().enumerate() {
        w(&format!("sizes/s{n}"), &pseudo_random(i as u64, *n));
    }
    w("text/compressible", &compressible(0, 3 << 20));
    w("text/same-as-compressible", &compressible(0, 3 << 20));
    // Data, then zero blocks, then data again.
    let mut holes = pseudo_random(9, 8192);
    holes.extend(vec![0u8; 5 * 4096]);
    holes.extend(pseudo_random(10, 5000));
    w("zeros/mixed", &holes);
    w("zeros/all", &vec![0u8; 40000]);
    // Over 4 GiB, sparse, with data at the start, across the 4 GiB line, and at the end.
    let big = root.join("big/over4g");
    fs::create_dir_all(big.parent().expect("parent")).expect("mkdir");
    let f = fs::File::create(&big).expect("big");
    let size = 4 * GIB + 12345;
    f.set_len(size).expect("truncate");
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pseudo_random(1, 10000), 0).expect("w");
    f.write_all_at(&pseudo_random(2, 9000), 4 * GIB - 4000).expect("w");
    f.write_all_at(&pseudo_random(3, 300), size - 300).expect("w");
    // Long and non-UTF-8 names.
    w(&"n".repeat(255), b"long name");
    let odd = root.join(OsStr::from_bytes(b"caf\xe9-\xff\xfe"));
    fs::write(&odd, b"latin-1 name").expect("odd");
    // A deep tree.
    let mut deep = root.join("deep");
    for i in 0..100 {
        deep = deep.join(format!("d{i}"));
    }
    fs::create_dir_all(&deep).expect("deep");
    fs::write(deep.join("leaf"), b"at the bottom").expect("leaf");
    // Links, modes, xattrs, an empty dir, a fifo.
    std::os::unix::fs::symlink("../sizes/s4097", root.join("text/link")).expect("symlink");
    std::os::unix::fs::symlink("/absolute/dangling", root.join("dangling")).expect("symlink");
    fs::hard_link(root.join("sizes/s4097"), root.join("text/hardlink")).expect("hardlink");
    fs::set_permissions(root.join("sizes/s1"), fs::Permissions::from_mode(0o4751)).expect("chmod");
    set_xattr(&root.join("sizes/s1"), "user.incfs.test", b"value\0with nul");
    set_xattr(&root.join("text"), "user.dir", b"d");
    fs::create_dir_all(root.join("emptydir")).expect("emptydir");
    let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_bytes()).expect("fifo");
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    // Many files in one directory (contents repeat: dedup keeps the store small).
    let dir = root.join("many");
    fs::create_dir_all(&dir).expect("many");
    for i in 0..many {
        fs::write(dir.join(format!("f{i:06}")), format!("file {} of many\n", i % 997)).expect("many file");
    }
}

fn xattrs_of(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    // Use the packer's own reading via an image of one file would be circular; list directly.
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut names = vec![0u8; 4096];
    // SAFETY: valid buffers.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0);
    let mut out = Vec::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = std::ffi::CString::new(name).expect("name");
        let mut v = vec![0u8; 65536];
        // SAFETY: valid buffers.
        let m = unsafe { libc::lgetxattr(p.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0);
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Walks `src` and checks every entry against the image, reading every byte through `engine`.
async fn compare_tree(engine: &Arc<Engine>, src: &Path, start: u32) -> usize {
    let img = engine.image().clone();
    let mut links: HashMap<(u64, u64), u32> = HashMap::new();
    let mut stack = vec![(src.to_path_buf(), start)];
    let mut checked = 0;
    while let Some((path, ino)) = stack.pop() {
        let m = fs::symlink_metadata(&path).expect("stat");
        let node = img.inode(ino).expect("inode");
        assert_eq!(node.mode, m.mode(), "{}", path.display());
        assert_eq!((node.uid, node.gid), (m.uid(), m.gid()));
        assert_eq!((node.mtime_sec, node.mtime_nsec as i64), (m.mtime(), m.mtime_nsec()), "{}", path.display());
        assert_eq!(node.xattrs, xattrs_of(&path), "{}", path.display());
        checked += 1;
        match &node.kind {
            InodeKind::Dir(entries) => {
                let mut names: Vec<Vec<u8>> = fs::read_dir(&path)
                    .expect("readdir")
                    .map(|e| e.expect("e").file_name().as_bytes().to_vec())
                    .collect();
                names.sort();
                assert_eq!(names, entries.iter().map(|e| e.name.clone()).collect::<Vec<_>>());
                for e in entries {
                    stack.push((path.join(OsStr::from_bytes(&e.name)), e.ino));
                }
            }
            InodeKind::File(f) => {
                assert_eq!(f.size, m.len());
                if m.nlink() > 1 {
                    assert_eq!(*links.entry((m.dev(), m.ino())).or_insert(ino), ino, "hard links share an inode");
                }
                let file = fs::File::open(&path).expect("open");
                let mut off = 0u64;
                let mut want = vec![0u8; 1 << 20];
                while off < f.size {
                    let got = engine.read(ino, off, 1 << 20).await.expect("engine read");
                    let n = got.len();
                    assert!(n > 0);
                    use std::os::unix::fs::FileExt;
                    file.read_exact_at(&mut want[..n], off).expect("read source");
                    assert!(got == want[..n], "{} differs at {off}", path.display());
                    off += n as u64;
                }
                assert!(engine.read(ino, f.size, 4096).await.expect("eof read").is_empty());
            }
            InodeKind::Symlink(t) => {
                assert_eq!(t.as_slice(), fs::read_link(&path).expect("readlink").as_os_str().as_bytes())
            }
            InodeKind::Special { rdev } => assert_eq!(*rdev, m.rdev()),
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_every_edge_case_through_nginx() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    edge_tree(&src, 100_000);
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    // Deterministic: packing again (into another store) gives the same id.
    assert_eq!(pack_default(&src, &t.path().join("store2")), id);
    let nginx = Nginx::start(&store, 0);
    let engine = open_engine(&nginx.url, id, &t.path().join("cache"), EngineConfig::default()).await;
    let checked = compare_tree(&engine, &src, 0).await;
    assert!(checked > 100_000);
    let c = &engine.counters;
    assert_eq!(c.verify_failures.load(Relaxed), 0);
    // Dedup: the two identical 3 MiB files and the 100k files with 997 contents fetched once.
    let unique = engine.unique_blocks().await.expect("the image's blocks").len() as u64;
    assert!(
        c.blocks_fetched.load(Relaxed) <= unique,
        "fetched {} of {unique} unique blocks",
        c.blocks_fetched.load(Relaxed)
    );
    // The store holds no block twice, and no block crossed the wire twice: only index bytes
    // may have (a run of blocks across files carries the indexes between them, which may
    // have come before with their own file's index).
    let blob_total: u64 =
        fs::read_dir(store.join("blobs")).expect("blobs").map(|e| e.expect("e").metadata().expect("m").len()).sum();
    let index_total: u64 =
        engine.image().files().map(|(_, f)| incfs::image::index::index_len(f.nblocks() as u64)).sum();
    assert!(
        nginx.blob_bytes_sent() <= blob_total + index_total,
        "{} > {blob_total} + {index_total}: {:?}",
        nginx.blob_bytes_sent(),
        c.snapshot()
    );
    // Reading again is served from the cache.
    let before = c.remote_requests.load(Relaxed);
    let sizes = engine.image().resolve(b"sizes").expect("sizes");
    compare_tree(&engine, &src.join("sizes"), sizes).await;
    assert_eq!(c.remote_requests.load(Relaxed), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_small_read_of_a_large_file_fetches_at_most_the_readahead_window() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(42, 100 << 20);
    fs::write(src.join("big"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    let readahead = 256 << 10;
    // One request: the read's blocks and their readahead together (not split in two).
    let cfg = EngineConfig { readahead, split_fetch: false, ..EngineConfig::default() };
    let engine = open_engine(&nginx.url, id, &t.path().join("cache"), cfg).await;
    let ino = engine.image().resolve(b"big").expect("big");
    let off = 50 << 20;
    let got = engine.read(ino, off + 100, 4096).await.expect("read");
    assert_eq!(got, &data[(off + 100) as usize..(off + 100 + 4096) as usize]);
    let c = &engine.counters;
    let index = c.index_bytes.load(Relaxed);
    let fetched = c.bytes_fetched.load(Relaxed) - index;
    nginx.wait_blob_requests(c.remote_requests.load(Relaxed));
    let sent = nginx.blob_bytes_sent() - index;
    println!("fetched {fetched} bytes of data and {index} of index for one 4 KiB read of a 100 MiB file");
    assert!(fetched <= readahead, "engine fetched {fetched}");
    assert!(sent <= readahead, "server sent {sent}");
    assert!(sent >= 8192, "the read spans two blocks");
    // The index: the tree's upper levels (3 blocks), then the read's segment and the next
    // (its readahead), then the data.
    assert!(index <= 3 * 4096 + 2 * 128 * 49, "index {index}");
    assert_eq!(c.index_requests.load(Relaxed), 2);
    assert_eq!(c.remote_requests.load(Relaxed), 3);
}

async fn fault_setup(t: &Path, cfg: EngineConfig) -> (FaultServer, Arc<Engine>, u32, Vec<u8>) {
    let src = t.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = compressible(7, 2 << 20);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.join("store");
    let id = pack_default(&src, &store);
    let server = FaultServer::start(&store).await;
    let engine = open_engine(&server.url(), id, &t.join("cache"), cfg).await;
    let ino = engine.image().resolve(b"f").expect("f");
    (server, engine, ino, data)
}

fn fast_cfg() -> EngineConfig {
    EngineConfig {
        read_timeout: Duration::from_secs(5),
        attempt_timeout: Duration::from_millis(400),
        readahead: 64 << 10,
        ..EngineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_and_the_read_succeeds() {
    let t = tempfile::tempdir().expect("tmp");
    let (server, engine, ino, data) = fault_setup(t.path(), fast_cfg()).await;
    let c = &engine.counters;
    let cases = [
        vec![Fault::Status(500), Fault::Status(503)],
        vec![Fault::Reset],
        vec![Fault::Stall(Duration::from_secs(2))],
        vec![Fault::Status(500), Fault::Reset, Fault::Stall(Duration::from_secs(1))],
    ];
    for (i, faults) in cases.iter().enumerate() {
        for f in faults {
            server.push(*f);
        }
        let retries = c.retries.load(Relaxed);
        let off = i as u64 * (256 << 10);
        let got = engine.read(ino, off, 8192).await.unwrap_or_else(|e| panic!("case {i} {faults:?}: {e}"));
        assert_eq!(got, &data[off as usize..off as usize + 8192], "case {i}");
        assert_eq!(c.retries.load(Relaxed) - retries, faults.len() as u64, "case {i}");
    }
    assert_eq!(c.verify_failures.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_data_is_never_served() {
    let t = tempfile::tempdir().expect("tmp");
    let (server, engine, ino, data) = fault_setup(t.path(), fast_cfg()).await;
    let c = &engine.counters;
    // Once corrupt: detected, fetched again, right bytes.
    server.push(Fault::Corrupt);
    let got = engine.read(ino, 0, 4096).await.expect("read after one corrupt answer");
    assert_eq!(got, &data[..4096]);
    assert!(c.verify_failures.load(Relaxed) >= 1);
    // Always corrupt: the read fails with EBADMSG and nothing is stored. (The file's index
    // is loaded first: a corrupt index fails the same way, see tests/index.rs.)
    let blocks = engine.file_blocks(ino).await.expect("blocks");
    server.set_always(Some(Fault::Corrupt));
    let off = 1 << 20;
    let err = match engine.read(ino, off, 4096).await {
        Ok(_) => panic!("corrupt data must not be served"),
        Err(e) => e,
    };
    assert_eq!(err.errno(), libc::EBADMSG, "{err}");
    let (filled, _) = engine.fill_state(ino).expect("fill");
    assert!(engine.cache().lookup(&blocks[(off / 4096) as usize].hash).is_none());
    let (ok, bad) = incfs::inspect::verify_cache(engine.cache()).expect("verify");
    assert_eq!(bad, 0);
    // The filled blocks, and the file's tree blocks (its 512 blocks: four level-0 blocks and
    // the one above them).
    assert_eq!(ok, filled + 5);
    // Healthy again: the same read works.
    server.set_always(None);
    assert_eq!(engine.read(ino, off, 4096).await.expect("read"), &data[off as usize..off as usize + 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_remote_fails_reads_with_etime_then_recovers() {
    let t = tempfile::tempdir().expect("tmp");
    let timeout = Duration::from_millis(1500);
    let cfg = EngineConfig { read_timeout: timeout, ..fast_cfg() };
    let (mut server, engine, ino, data) = fault_setup(t.path(), cfg).await;
    server.down();
    let start = Instant::now();
    let err = engine.read(ino, 0, 4096).await.expect_err("remote is down");
    let took = start.elapsed();
    assert_eq!(err.errno(), libc::ETIME, "{err}");
    assert!(took >= timeout && took < timeout + Duration::from_secs(2), "failed after {took:?}");
    assert_eq!(engine.counters.timeouts.load(Relaxed), 1);
    // A stalled remote is the same to the reader. Stalling before the server comes back:
    // a retry of the timed-out fetch still under way could otherwise land in between and
    // cache the block this read wants.
    server.set_always(Some(Fault::Stall(Duration::from_secs(30))));
    server.up().await;
    let err = engine.read(ino, 8192, 4096).await.expect_err("remote stalls");
    assert_eq!(err.errno(), libc::ETIME);
    server.set_always(None);
    assert_eq!(engine.read(ino, 0, 4096).await.expect("back"), &data[..4096]);
    assert_eq!(engine.read(ino, 8192, 4096).await.expect("back"), &data[8192..12288]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_read_timeout_fails_at_once() {
    let t = tempfile::tempdir().expect("tmp");
    let cfg = EngineConfig { read_timeout: Duration::ZERO, ..fast_cfg() };
    let (_server, engine, ino, _) = fault_setup(t.path(), cfg).await;
    let err = engine.read(ino, 0, 4096).await.expect_err("nothing cached");
    assert_eq!(err.errno(), libc::ETIME);
}

fn cat(url: &str, id: ImageId, cache: &Path, path: &str) -> std::process::Child {
    Command::new(INCFSD)
        .args(["cat", "--store", url, "--image", &id.to_string(), "--cache"])
        .arg(cache)
        .arg(path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("incfsd cat")
}

#[test]
fn two_processes_share_one_cache_without_downloading_a_block_twice() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(5, 24 << 20);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    // Slow enough that both readers are fetching at the same time.
    let nginx = Nginx::start(&store, 24 << 20);
    let cache = t.path().join("cache");
    let a = cat(&nginx.url, id, &cache, "f");
    let b = cat(&nginx.url, id, &cache, "f");
    for p in [a, b] {
        let out = p.wait_with_output().expect("wait");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout == data, "output differs");
    }
    // No byte of data was sent twice: only the file's index (each process keeps its blocks'
    // locations in memory), which the second process fetches alone after the first.
    let (_, m) = stored_manifest(&store, &id);
    let Some(InodeKind::File(f)) = m.inodes.get(1).map(|i| &i.kind) else { panic!("inode 1 is f") };
    let incfs::image::BlockTable::Index { blob, offset } = f.table else { panic!("version 3") };
    let index_path = format!("/blobs/{}", hex::encode(m.blobs[blob as usize].id));
    let index_len = incfs::image::index::index_len(f.nblocks() as u64);
    let index_end = offset + index_len - 1;
    let mut ranges = nginx.blob_ranges();
    ranges.sort();
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            let (lo, hi) = (a.1.max(b.1), a.2.min(b.2));
            let overlap = a.0 == b.0 && lo <= hi;
            let in_index = a.0 == index_path && lo >= offset && hi <= index_end;
            assert!(!overlap || in_index, "overlapping fetches {a:?} {b:?}");
        }
    }
    let sent = nginx.blob_bytes_sent();
    assert!(sent <= data.len() as u64 + 2 * index_len, "sent {sent} for {} bytes of data", data.len());
    let out = Command::new(INCFSD).args(["cache", "verify"]).arg(&cache).output().expect("verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn kill_9_during_fills_leaves_only_verified_blocks() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(6, 32 << 20);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 16 << 20);
    let cache = t.path().join("cache");
    for delay_ms in [150u64, 400, 700, 1000] {
        let mut p = cat(&nginx.url, id, &cache, "f");
        std::thread::sleep(Duration::from_millis(delay_ms));
        p.kill().expect("kill -9");
        let _ = p.wait();
        let out = Command::new(INCFSD).args(["cache", "verify"]).arg(&cache).output().expect("verify");
        assert!(out.status.success(), "after kill at {delay_ms} ms: {}", String::from_utf8_lossy(&out.stdout));
    }
    let out = cat(&nginx.url, id, &cache, "f").wait_with_output().expect("cat");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == data);
    let out = Command::new(INCFSD).args(["cache", "verify"]).arg(&cache).output().expect("verify");
    assert!(out.status.success());
    println!("{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_continues_into_the_files_packed_next() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let files: Vec<Vec<u8>> = (0..20).map(|i| pseudo_random(70 + i, 8192)).collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(src.join(format!("m{i:02}.py")), d).expect("write");
    }
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    for (cross, cache) in [(true, "c1"), (false, "c2")] {
        let cfg = EngineConfig { readahead: 64 << 10, cross_file_readahead: cross, ..EngineConfig::default() };
        let e = open_engine(&nginx.url, id, &t.path().join(cache), cfg).await;
        let ino = |i: usize| e.image().resolve(format!("m{i:02}.py").as_bytes()).expect("file");
        assert_eq!(e.read(ino(0), 0, 8192).await.expect("read"), files[0]);
        assert_eq!(e.counters.remote_requests.load(Relaxed), 1);
        let fetched = e.counters.blocks_fetched.load(Relaxed);
        if cross {
            // A 64 KiB window: this file and the next seven, in one request.
            assert_eq!(fetched, 16);
            for (i, f) in files.iter().enumerate().take(8).skip(1) {
                assert_eq!(e.read_cached(ino(i), 0, 8192).expect("cached").as_ref(), Some(f), "m{i:02} came along");
            }
            assert_eq!(e.read_cached(ino(8), 0, 8192).expect("cached"), None, "but no further");
        } else {
            assert_eq!(fetched, 2);
            assert_eq!(e.read_cached(ino(1), 0, 8192).expect("cached"), None);
        }
    }
}

/// Reads `len` at `off` from the cache straight into a buffer scattered like a guest's
/// pages (a 16-byte out_header descriptor, then odd pieces), returning the data part.
fn read_direct(e: &Arc<Engine>, ino: u32, off: u64, len: u32) -> Option<Vec<u8>> {
    let mut mem = vec![0xeeu8; len as usize + 7000];
    let p = mem.as_mut_ptr();
    let pieces = [(0, 1000), (1000, 3096), (4096, mem.len() - 4096)];
    // SAFETY: disjoint pieces of `mem`, which outlives the buffer.
    let mut buf = unsafe { ScatterBuf::new(pieces.iter().map(|&(at, n)| (p.add(at), n)).collect()) };
    let n = e.read_cached_into(ino, off, len, &mut buf).expect("direct read")?;
    drop(buf);
    assert!(mem[n as usize..].iter().all(|&b| b == 0xee), "nothing written past the data");
    Some(mem[..n as usize].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_go_straight_into_guest_buffers_and_stale_slots_fall_back() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(9, 300_123);
    fs::write(src.join("data"), &data).expect("write");
    // 64 KiB, a 1 MiB hole (zero blocks, never stored), 10 KiB.
    let mut sparse = pseudo_random(10, 64 << 10);
    sparse.resize((64 << 10) + (1 << 20), 0);
    sparse.extend(pseudo_random(11, 10 << 10));
    fs::write(src.join("sparse"), &sparse).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    let cache = t.path().join("cache");
    let e = open_engine(&nginx.url, id, &cache, EngineConfig::default()).await;
    let ino = e.image().resolve(b"data").expect("data");
    let sp = e.image().resolve(b"sparse").expect("sparse");

    assert_eq!(read_direct(&e, ino, 0, 131072), None, "not cached yet: the ordinary path");
    for (i, d) in [(ino, &data), (sp, &sparse)] {
        assert_eq!(&e.read(i, 0, 1 << 20).await.expect("fetch"), &d[..(1 << 20).min(d.len())]);
        assert!(e.read(i, 1 << 20, 1 << 20).await.is_ok());
    }
    let reads = e.counters.reads.load(Relaxed);
    for (off, len) in [(0u64, 131072u32), (4096, 4096), (8192, 1), (262144, 131072), (294912, 8192), (299008, 4096)] {
        let end = (off as usize + len as usize).min(data.len());
        assert_eq!(read_direct(&e, ino, off, len).as_deref(), Some(&data[off as usize..end]), "{off}+{len}");
    }
    assert_eq!(read_direct(&e, ino, 98 * 4096, 4096).as_deref(), Some(&[][..]), "past the end: empty");
    // One READ path: a read that starts inside a block is served from the cache too.
    assert_eq!(read_direct(&e, ino, 100, 4096).as_deref(), Some(&data[100..4196]), "unaligned");
    for off in [0u64, 61440, 1 << 20, (64 << 10) + (1 << 20)] {
        let end = (off as usize + (256 << 10)).min(sparse.len());
        assert_eq!(read_direct(&e, sp, off, 256 << 10).as_deref(), Some(&sparse[off as usize..end]), "sparse at {off}");
    }
    // 11 as before, and the unaligned read, now a hit too.
    assert_eq!(e.counters.reads.load(Relaxed), reads + 12, "direct hits are counted as reads");

    // Another process evicts block 1 (its record says so) after we learnt its slot: the
    // direct read sees it after copying and leaves the read to the ordinary path, which
    // fetches it again.
    let h = e.file_blocks(ino).await.expect("blocks")[1].hash;
    let slot = e.cache().lookup(&h).expect("cached");
    let slots = fs::OpenOptions::new().write(true).open(cache.join("slots")).expect("slots");
    std::os::unix::fs::FileExt::write_all_at(&slots, &2u32.to_le_bytes(), slot * 48 + 32).expect("evict");
    assert_eq!(read_direct(&e, ino, 0, 131072), None, "a stale slot is a miss");
    let fetched = e.counters.blocks_fetched.load(Relaxed);
    assert_eq!(e.read(ino, 0, 131072).await.expect("read"), &data[..131072]);
    assert!(e.counters.blocks_fetched.load(Relaxed) > fetched, "refetched");
    assert_eq!(read_direct(&e, ino, 0, 131072).as_deref(), Some(&data[..131072]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_miss_looks_up_each_block_once_before_it_fetches() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(21, 16 * 4096);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    let cfg = EngineConfig { readahead: 16 * 4096, cross_file_readahead: false, ..EngineConfig::default() };
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), cfg).await;
    let ino = e.image().resolve(b"f").expect("f");
    let lookups = || e.counters.cache_lookups.load(Relaxed);
    // The file's index first (one request): the block engine's part is what is measured.
    e.file_blocks(ino).await.expect("index");
    assert_eq!(e.counters.remote_requests.load(Relaxed), 1);

    // The READ maps its 16 blocks once: one index lookup each, all missing, nothing fetched.
    let mut buf = vec![0u8; data.len()];
    let outcome = e.read_into(ino, 0, data.len() as u32, &mut ScatterBuf::from_slice(&mut buf)).expect("read");
    let ReadOutcome::Miss(miss) = outcome else { panic!("nothing is cached yet") };
    assert_eq!(miss.missing_blocks(), (0..16).collect::<Vec<u32>>());
    assert_eq!(lookups(), 16, "one cache lookup per block");
    assert_eq!(e.counters.remote_requests.load(Relaxed), 1, "nothing fetched while mapping");

    // Awaiting the miss fetches the run in one request; the fetch hands over the blocks'
    // plaintext, so the cache is not looked at again, and only those bytes come back.
    let fetched = miss.wait().await.expect("fetch");
    assert_eq!(e.counters.remote_requests.load(Relaxed), 2);
    assert_eq!(lookups(), 16, "no lookup between the miss and the fetch, nor after it");
    assert_eq!(fetched.write_into(&mut ScatterBuf::from_slice(&mut buf)).expect("write"), data.len() as u32);
    assert_eq!(buf, data);

    // The first cached read looks each block up once and learns its slot; after that the
    // slot hints spare the index entirely.
    for expected in [32, 32] {
        let mut again = vec![0u8; data.len()];
        let outcome = e.read_into(ino, 0, data.len() as u32, &mut ScatterBuf::from_slice(&mut again)).expect("read");
        assert!(matches!(outcome, ReadOutcome::Done(n) if n as usize == data.len()));
        assert_eq!(again, data);
        assert_eq!(lookups(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_smaller_than_one_read_still_serves_it() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(22, 1 << 20);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    // 16 blocks of cache under a 256-block read with 128 blocks of readahead: every fetched
    // run is evicted before the reader could read it back from the cache.
    let cache =
        BlockCache::open_with(&t.path().join("cache"), CacheOptions { limit_bytes: Some(64 << 10) }).expect("cache");
    let cfg = EngineConfig { read_timeout: Duration::from_secs(5), ..EngineConfig::default() };
    let remote = Remote::open(&nginx.url, cfg.attempt_timeout).expect("remote");
    let e = Engine::open(remote, id, Arc::new(cache), cfg).await.expect("engine");
    let ino = e.image().resolve(b"f").expect("f");
    let got = e.read(ino, 0, 1 << 20).await.expect("a small cache must not starve the read");
    assert_eq!(got, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_reads_hold_at_most_the_parked_bytes_budget() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let files: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(30 + i, 64 << 10)).collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(src.join(format!("f{i}")), d).expect("write");
    }
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    // A slow link, so the reads overlap.
    let nginx = Nginx::start(&store, 256 << 10);
    let cfg = EngineConfig {
        max_parked_bytes: 64 << 10,
        cross_file_readahead: false,
        read_timeout: Duration::from_secs(20),
        ..EngineConfig::default()
    };
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), cfg).await;
    let reads: Vec<_> = (0..files.len())
        .map(|i| {
            let e = e.clone();
            let ino = e.image().resolve(format!("f{i}").as_bytes()).expect("file");
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let outcome = e.read_into(ino, 0, 64 << 10, &mut ScatterBuf::from_slice(&mut buf)).expect("read");
                let ReadOutcome::Miss(miss) = outcome else { panic!("nothing cached yet") };
                let data = miss.wait().await.expect("fetch");
                data.write_into(&mut ScatterBuf::from_slice(&mut buf)).expect("write");
                buf
            })
        })
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        assert_eq!(r.await.expect("join"), files[i]);
    }
    // 16 blocks of room for six reads of 16 missing blocks each: all but the first waited.
    assert!(e.counters.parked_waits.load(Relaxed) >= 1, "reads waited for room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_a_guest_never_supplies_leave_nothing_behind() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("f"), pseudo_random(23, 8 * 4096)).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    let cfg = EngineConfig {
        fill: incfs::engine::FillSource::Supplied,
        read_timeout: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), cfg).await;
    let ino = e.image().resolve(b"f").expect("f");
    for off in [0u64, 4096, 5 * 4096] {
        let err = e.read(ino, off, 4096).await.expect_err("nobody supplies the block");
        assert!(matches!(err, incfs::Error::Timeout), "{err}");
    }
    assert_eq!(e.inflight_count(), 0, "timed-out waits are forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_reused_under_a_read_leaves_no_foreign_bytes_in_the_buffer() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(24, 8 * 4096);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    let cache = t.path().join("cache");
    let e = open_engine(&nginx.url, id, &cache, EngineConfig::default()).await;
    let ino = e.image().resolve(b"f").expect("f");
    assert_eq!(e.read(ino, 0, 8 * 4096).await.expect("fetch"), data);
    // Another process evicts block 1 and reuses its slot for another image's block: other
    // bytes in `blocks`, the record no longer valid.
    let h = e.file_blocks(ino).await.expect("blocks")[1].hash;
    let slot = e.cache().lookup(&h).expect("cached");
    let blocks = fs::OpenOptions::new().write(true).open(cache.join("blocks")).expect("blocks");
    std::os::unix::fs::FileExt::write_all_at(&blocks, &[0xab; 4096], slot * 4096).expect("reuse");
    let slots = fs::OpenOptions::new().write(true).open(cache.join("slots")).expect("slots");
    std::os::unix::fs::FileExt::write_all_at(&slots, &2u32.to_le_bytes(), slot * 48 + 32).expect("evict");
    let mut buf = vec![0xeeu8; 8 * 4096];
    let outcome = e.read_into(ino, 0, 8 * 4096, &mut ScatterBuf::from_slice(&mut buf)).expect("read");
    let ReadOutcome::Miss(miss) = outcome else { panic!("block 1 is gone") };
    // Only block 1 is missing: its neighbours in the same run of slots are still cached.
    assert_eq!(miss.missing_blocks(), &[1]);
    for b in 0..8u32 {
        let r = b as usize * 4096..(b as usize + 1) * 4096;
        if miss.missing_blocks().contains(&b) {
            // The other image's bytes (0xab) never stay in the guest's buffer.
            assert!(buf[r].iter().all(|&x| x == 0), "block {b}: the copy the check refused is cleared");
        } else {
            assert_eq!(&buf[r.clone()], &data[r], "block {b} copied");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_cached_never_serves_a_block_changed_on_disk() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(25, 4 * 4096);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    let cache = t.path().join("cache");
    let cfg = EngineConfig { verify_cached: true, ..EngineConfig::default() };
    let e = open_engine(&nginx.url, id, &cache, cfg).await;
    let ino = e.image().resolve(b"f").expect("f");
    assert_eq!(e.read(ino, 0, 4 * 4096).await.expect("fetch"), data);
    // Someone with write access to the cache's storage changes a block's bytes; its record
    // still says valid, with the right hash.
    let h = e.file_blocks(ino).await.expect("blocks")[2].hash;
    let slot = e.cache().lookup(&h).expect("cached");
    let blocks = fs::OpenOptions::new().write(true).open(cache.join("blocks")).expect("blocks");
    std::os::unix::fs::FileExt::write_all_at(&blocks, &[0x5a; 4096], slot * 4096).expect("poison");
    let fetched = e.counters.blocks_fetched.load(Relaxed);
    assert_eq!(e.read(ino, 0, 4 * 4096).await.expect("read"), data, "the changed block is fetched again");
    assert!(e.counters.blocks_fetched.load(Relaxed) > fetched);
}

/// A tree of small files and one large file, for the trace layout and prefetch tests.
fn traced_tree(src: &Path) -> Vec<Vec<u8>> {
    fs::create_dir_all(src.join("lib")).expect("mkdir");
    let files: Vec<Vec<u8>> = (0..20).map(|i| pseudo_random(300 + i, 8192)).collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(src.join(format!("lib/m{i:02}.py")), d).expect("write");
    }
    fs::write(src.join("big"), pseudo_random(299, 4 << 20)).expect("write");
    files
}

/// Waits until the engine has fetched `blocks` blocks and nothing is in flight.
async fn settle(e: &Arc<Engine>, blocks: u64) {
    let until = Instant::now() + Duration::from_secs(30);
    while (e.counters.blocks_fetched.load(Relaxed) < blocks || e.inflight_count() > 0) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Anything still on its way would show now.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_prefetch_fetches_exactly_the_traced_blocks() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    traced_tree(&src);
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    // The default readahead (512 KiB) would stretch every run below to 128 blocks.
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), EngineConfig::default()).await;
    let ino = |p: &str| e.image().resolve(p.as_bytes()).expect("path");
    let ranges = vec![
        // Three whole files packed end to end: one request across them.
        (ino("lib/m03.py"), 0, 2),
        (ino("lib/m04.py"), 0, 2),
        (ino("lib/m05.py"), 0, 2),
        // Blocks apart: a request each.
        (ino("big"), 100, 3),
        (ino("lib/m10.py"), 1, 1),
        (ino("big"), 7, 1),
    ];
    let traced = 6 + 3 + 1 + 1;
    // The files' indexes first (the prefetch's own index ranges would bring data with them:
    // what is measured here is the block runs).
    let mut stored = 0u64;
    for &(i, first, n) in &ranges {
        let blocks = e.file_blocks(i).await.expect("blocks");
        stored += blocks[first as usize..(first + n) as usize].iter().map(|b| b.len as u64).sum::<u64>();
    }
    let (requests, sent) = (e.counters.remote_requests.load(Relaxed), nginx.blob_bytes_sent());
    let asked = e.prefetch(ranges.clone(), None).await;
    settle(&e, traced).await;
    assert_eq!(asked, traced);
    assert_eq!(e.counters.blocks_fetched.load(Relaxed), traced, "only the traced blocks");
    assert_eq!(e.counters.remote_requests.load(Relaxed) - requests, 4, "adjoining runs in one request");
    // No byte beyond the traced blocks but the indexes of m04 and m05 (98 bytes each) between
    // them, which the run across the three files carries.
    assert_eq!(nginx.blob_bytes_sent() - sent, stored + 2 * 98, "no byte beyond the traced blocks");
    // Every traced block is cached and reads back; the blocks around them are not fetched.
    for &(i, first, n) in &ranges {
        for b in first..first + n {
            assert!(e.read_cached(i, b as u64 * 4096, 4096).expect("cached").is_some(), "block {b} of {i}");
        }
    }
    assert_eq!(e.read_cached(ino("lib/m06.py"), 0, 4096).expect("cached"), None);
    assert_eq!(e.read_cached(ino("big"), 103 * 4096, 4096).expect("cached"), None);
    // Once cached, a second prefetch asks for nothing.
    assert_eq!(e.prefetch(ranges, None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_with_a_trace_lays_the_traced_blocks_first_in_trace_order() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    traced_tree(&src);
    let trace = "# incfs-trace v1 image 00\n\
                 lib/m07.py\t1\t1\n\
                 big\t500\t4\n\
                 lib/m02.py\t0\t2\n\
                 no/such\t0\t1\n\
                 big\t501\t1\n\
                 lib/m07.py\t0\t1\n";
    let order = [("lib/m07.py", 1), ("big", 500), ("big", 501), ("big", 502), ("big", 503)].into_iter().chain([
        ("lib/m02.py", 0),
        ("lib/m02.py", 1),
        ("lib/m07.py", 0),
    ]);
    let opts = PackOptions { trace: Some(trace.into()), ..PackOptions::default() };
    let (id, stats) = pack(&src, &Store::new(t.path().join("store")), &opts).expect("pack");
    assert_eq!((stats.traced_blocks, stats.trace_lines_skipped), (8, 1));
    // Deterministic: the same tree and trace give the same image; without the trace another.
    let (again, _) = pack(&src, &Store::new(t.path().join("store2")), &opts).expect("pack");
    assert_eq!(again, id);
    assert_ne!(pack_default(&src, &t.path().join("store3")), id);

    let nginx = Nginx::start(&t.path().join("store"), 0);
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), EngineConfig::default()).await;
    let img = e.image().clone();
    // The traced blocks lead the first blob, in trace order, each right after the one before
    // (or after its file's index, which comes before the file's first block).
    let mut prev: Option<incfs::image::BlockRef> = None;
    let mut seen = std::collections::HashSet::new();
    for (path, b) in order {
        let ino = img.resolve(path.as_bytes()).expect("path");
        let r = e.file_blocks(ino).await.expect("blocks")[b];
        // Nothing between two traced blocks but, before a file's first, the file's index.
        let gap = match seen.insert(ino) {
            true => incfs::image::index::index_len(img.file(ino).expect("file").nblocks() as u64),
            false => 0,
        };
        match prev {
            None => assert_eq!((r.blob, r.offset), (0, gap), "{path} block {b}"),
            Some(p) => assert_eq!((r.blob, r.offset), (p.blob, p.offset + p.len as u64 + gap), "{path} block {b}"),
        }
        prev = Some(r);
    }
    // The rest follow in file order: big's block 0 right after them, then 1.
    let big = e.file_blocks(img.resolve(b"big").expect("big")).await.expect("blocks");
    let last = prev.expect("traced");
    assert_eq!(last.offset + last.len as u64, big[0].offset);
    assert_eq!(big[0].offset + big[0].len as u64, big[1].offset);
    assert!(big[499].adjoins(&big[504]), "the traced blocks left the file's run");
    // Every byte reads back as packed.
    let root = img.resolve(b"").expect("root");
    compare_tree(&e, &src, root).await;
    // A trace prefetch of an ordered pack fetches the whole trace in one request.
    let e = open_engine(&nginx.url, id, &t.path().join("cache2"), EngineConfig::default()).await;
    let (ranges, _) = incfs::trace::parse(&img, trace).expect("parse");
    // The range from the first traced file's index on brings the others' indexes and every
    // traced block; it ends at a guess of their stored size (plus room for the indexes), so
    // a block after them may come along.
    let asked = e.prefetch(ranges, None).await;
    settle(&e, 8).await;
    assert_eq!(e.counters.remote_requests.load(Relaxed), 1);
    assert!((8..=12).contains(&asked), "{asked}");
    assert_eq!(e.counters.blocks_fetched.load(Relaxed), asked);
}

/// A tree a dictionary is for: 200 files of 4 to 40 KiB of text drawn from one vocabulary,
/// plus an incompressible file (its blocks stay raw) and a sparse one (zero blocks).
fn wordy_tree(root: &Path) {
    fs::create_dir_all(root.join("text")).expect("mkdir");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..200 {
        let len = 4096 + (next() % (36 << 10)) as usize;
        let mut f = Vec::with_capacity(len + 64);
        while f.len() < len {
            let w = next() % 700;
            f.extend_from_slice(
                format!("{}_entry{w} = {};\n", ["config", "module", "value"][(w % 3) as usize], w * 31 % 997)
                    .as_bytes(),
            );
        }
        f.truncate(len);
        fs::write(root.join("text").join(format!("f{i:03}.conf")), &f).expect("write");
    }
    fs::write(root.join("random"), pseudo_random(3, 100_000)).expect("write");
    let mut sparse = vec![0u8; 64 << 10];
    sparse[40_000..40_100].copy_from_slice(&[7; 100]);
    fs::write(root.join("sparse"), sparse).expect("write");
}

fn dict_opts() -> PackOptions {
    PackOptions { dict_size: 16 << 10, ..PackOptions::default() }
}

/// The stored manifest of `id` in a directory store, decoded.
fn stored_manifest(store: &Path, id: &ImageId) -> (Vec<u8>, incfs::image::Manifest) {
    let stored = fs::read(store.join("images").join(id.to_string())).expect("manifest");
    let bytes = incfs::image::manifest_from_stored(stored).expect("stored form");
    let m = incfs::image::Manifest::decode(&bytes).expect("decode");
    (bytes, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dictionary_blocks_read_back_byte_identical_and_the_dictionary_is_fetched_once() {
    use incfs::image::BlockKind;
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    wordy_tree(&src);
    let store = t.path().join("store");
    let (id, stats) = pack(&src, &Store::new(&store), &dict_opts()).expect("pack");
    let (bytes, m) = stored_manifest(&store, &id);
    assert_eq!(&bytes[8..12], &3u32.to_le_bytes(), "version 3, with a dictionary");
    let dict = m.blocks_dictionary().expect("a dictionary that pays on this tree").clone();
    assert!(dict.size > 0 && dict.size <= 16 << 10);
    let nginx = Nginx::start(&store, 0);
    // The blocks' kinds, from the file indexes (through a throwaway cache).
    let look = open_engine(&nginx.url, id, &t.path().join("look"), EngineConfig::default()).await;
    let mut kinds: Vec<BlockKind> = Vec::new();
    for (ino, _) in m.inodes.iter().enumerate().filter(|(_, i)| matches!(i.kind, InodeKind::File(_))) {
        kinds.extend(look.file_blocks(ino as u32).await.expect("blocks").iter().map(|b| b.kind));
    }
    drop(look);
    let with_dict = kinds.iter().filter(|k| **k == BlockKind::ZstdDict).count();
    assert!(with_dict * 2 > kinds.len(), "{with_dict} of {} blocks use the dictionary", kinds.len());
    assert!(kinds.contains(&BlockKind::Raw) && kinds.contains(&BlockKind::Zero));
    assert_eq!(stats.dict_blocks as usize, with_dict);
    // Smaller than without the dictionary, dictionary included.
    let (_, plain) = pack(&src, &Store::new(t.path().join("plain")), &PackOptions { dict_size: 0, ..dict_opts() })
        .expect("pack without");
    println!("stored {} + dictionary {} bytes, {} without", stats.stored_bytes, stats.dict_bytes, plain.stored_bytes);
    assert!(stats.stored_bytes + stats.dict_bytes < plain.stored_bytes);
    // Deterministic.
    assert_eq!(pack(&src, &Store::new(t.path().join("again")), &dict_opts()).expect("pack").0, id);

    // Nothing is fetched but the manifest until a block needs the dictionary.
    let cache = t.path().join("cache");
    let engine = open_engine(&nginx.url, id, &cache, EngineConfig::default()).await;
    let dict_path = format!("/blobs/{}", hex::encode(dict.id));
    assert!(nginx.log().iter().all(|r| r.3 != dict_path), "the dictionary is not fetched at start-up");
    let checked = compare_tree(&engine, &src, 0).await;
    assert!(checked > 200);
    let c = &engine.counters;
    assert_eq!(c.verify_failures.load(Relaxed), 0);
    assert_eq!(c.dictionaries_fetched.load(Relaxed), 1);
    assert_eq!(nginx.log().iter().filter(|r| r.3 == dict_path).count(), 1, "fetched once");
    let (ok, bad) = incfs::inspect::verify_cache(engine.cache()).expect("verify");
    assert_eq!(bad, 0);
    assert!(ok > 0);
    drop(engine);

    // Another daemon on the same cache, blocks evicted: the dictionary comes from the cache.
    let fresh = t.path().join("cache2");
    fs::create_dir_all(fresh.join("dictionaries")).expect("mkdir");
    let saved = cache.join("dictionaries").join(hex::encode(dict.id));
    fs::copy(&saved, fresh.join("dictionaries").join(hex::encode(dict.id))).expect("copy dictionary");
    let engine = open_engine(&nginx.url, id, &fresh, EngineConfig::default()).await;
    compare_tree(&engine, &src, 0).await;
    assert_eq!(engine.counters.dictionaries_fetched.load(Relaxed), 0);
    assert_eq!(nginx.log().iter().filter(|r| r.3 == dict_path).count(), 1, "not fetched again");
    // inspect shows the dictionary and the ratio.
    let mut out = Vec::new();
    incfs::inspect::print_tree(&engine, &mut out).expect("inspect");
    let text = String::from_utf8(out).expect("utf-8");
    let want = format!("a {}-byte zstd dictionary): compression ", dict.size);
    assert!(text.lines().last().is_some_and(|l| l.contains(&want)), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_images_still_read() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    wordy_tree(&src);
    let store = t.path().join("store");
    // --inline-hashes --no-dict writes what version-1 packers wrote; with a dictionary, what
    // version-2 packers wrote.
    let v1 = PackOptions { dict_size: 0, inline_hashes: true, ..dict_opts() };
    let (id, stats) = pack(&src, &Store::new(&store), &v1).expect("pack");
    assert_eq!((stats.dict_bytes, stats.dict_blocks, stats.index_bytes), (0, 0, 0));
    let (bytes, m) = stored_manifest(&store, &id);
    assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
    assert_eq!(m.dictionary, None);
    let (id2, _) = pack(&src, &Store::new(&store), &PackOptions { inline_hashes: true, ..dict_opts() }).expect("pack");
    let (bytes, m) = stored_manifest(&store, &id2);
    assert_eq!(&bytes[8..12], &2u32.to_le_bytes());
    assert!(m.dictionary.is_some());
    let nginx = Nginx::start(&store, 0);
    for (id, dicts) in [(id, 0), (id2, 1)] {
        let engine = open_engine(&nginx.url, id, &t.path().join(format!("cache-{id}")), EngineConfig::default()).await;
        compare_tree(&engine, &src, 0).await;
        assert_eq!(engine.counters.verify_failures.load(Relaxed), 0);
        assert_eq!(engine.counters.dictionaries_fetched.load(Relaxed), dicts);
        assert_eq!(engine.counters.index_requests.load(Relaxed), 0, "no index: the manifest has every block");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_dictionary_in_the_store_is_refused_and_no_byte_is_served() {
    use incfs::image::BlockKind;
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    wordy_tree(&src);
    let store = t.path().join("store");
    let (id, _) = pack(&src, &Store::new(&store), &dict_opts()).expect("pack");
    let (_, m) = stored_manifest(&store, &id);
    let dict = m.blocks_dictionary().expect("dictionary").clone();
    let path = store.join("blobs").join(hex::encode(dict.id));
    let good = fs::read(&path).expect("dictionary");
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x40;
    fs::write(&path, &bad).expect("corrupt it");
    let nginx = Nginx::start(&store, 0);
    let cfg = EngineConfig { read_timeout: Duration::from_secs(5), ..EngineConfig::default() };
    let engine = open_engine(&nginx.url, id, &t.path().join("cache"), cfg).await;
    let img = engine.image().clone();
    // A file whose first block needs the dictionary.
    let mut first_dict = None;
    for (ino, _) in img.files() {
        let blocks = engine.file_blocks(ino).await.expect("blocks");
        if blocks.first().is_some_and(|b| b.kind == BlockKind::ZstdDict) {
            first_dict = Some((ino, blocks[0]));
            break;
        }
    }
    let (ino, first) = first_dict.expect("a dictionary block");
    let err = engine.read(ino, 0, 4096).await.expect_err("no byte decoded with a bad dictionary is served");
    assert!(matches!(err, incfs::Error::Corrupt(_)), "{err}");
    assert_eq!(err.errno(), libc::EBADMSG);
    assert!(engine.counters.verify_failures.load(Relaxed) >= 1);
    assert!(engine.cache().lookup(&first.hash).is_none());
    let dicts = t.path().join("cache").join("dictionaries");
    assert_eq!(fs::read_dir(&dicts).expect("ls").count(), 0, "a bad dictionary is not saved");
    // Blocks that do not need it are still served.
    let random = img.resolve(b"random").expect("random");
    let want = pseudo_random(3, 100_000);
    assert_eq!(engine.read(random, 0, 4096).await.expect("raw block"), &want[..4096]);
    // Once the store is repaired, the same read works.
    fs::write(&path, &good).expect("repair");
    let got = engine.read(ino, 0, 4096).await.expect("read after repair");
    assert_eq!(got, &fs::read(src.join(path_of(&img, ino))).expect("src")[..got.len()]);
}

/// The path of inode `ino` from the root (first entry naming it).
fn path_of(img: &incfs::image::Image, ino: u32) -> std::path::PathBuf {
    let mut stack = vec![(0u32, std::path::PathBuf::new())];
    while let Some((d, p)) = stack.pop() {
        if let Some(InodeKind::Dir(entries)) = img.inode(d).map(|n| &n.kind) {
            for e in entries {
                let child = p.join(OsStr::from_bytes(&e.name));
                if e.ino == ino {
                    return child;
                }
                stack.push((e.ino, child));
            }
        }
    }
    panic!("inode {ino} not found");
}
