//! Format version 3: each file's block index lives in the blobs and is fetched on demand
//! (`engine/table.rs`). The manifest grows with the files, not the blocks; an index from the
//! store is trusted only up to the file's root; a warm start needs no network.

mod support;

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use incfs::engine::EngineConfig;
use incfs::image::{index, BlockTable, ImageId, Manifest};
use incfs::pack::{pack, PackOptions};
use incfs::store::Store;
use support::*;

/// 300 small files, a 6 MiB compressible file and a 3 MiB random one.
fn tree(src: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..300u64 {
        files.push((format!("small/f{i:03}"), compressible(100 + i, 1000 + (i as usize * 37) % 9000)));
    }
    files.push(("big/text".into(), compressible(7, 6 << 20)));
    files.push(("big/random".into(), pseudo_random(8, 3 << 20)));
    for (path, data) in &files {
        let p = src.join(path);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, data).expect("write");
    }
    files
}

/// `tree` written to a temporary directory and packed into a store there.
struct Packed {
    t: tempfile::TempDir,
    src: std::path::PathBuf,
    files: Vec<(String, Vec<u8>)>,
    store: std::path::PathBuf,
    id: ImageId,
}

fn packed() -> Packed {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    let files = tree(&src);
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    Packed { t, src, files, store, id }
}

fn manifest(store: &Path, id: &ImageId) -> (u64, Manifest) {
    let stored = fs::read(store.join("images").join(id.to_string())).expect("manifest");
    let len = stored.len() as u64;
    let bytes = incfs::image::manifest_from_stored(stored).expect("stored form");
    (len, Manifest::decode(&bytes).expect("decode"))
}

/// Where file `path`'s index is: (blob path in the store, offset, length).
fn index_of(store: &Path, id: &ImageId, img: &incfs::image::Image, path: &str) -> (std::path::PathBuf, u64, u64) {
    let (_, m) = manifest(store, id);
    let f = img.file(img.resolve(path.as_bytes()).expect("path")).expect("file");
    let BlockTable::Index { blob, offset } = f.table else { panic!("version 3") };
    let blob = store.join("blobs").join(hex::encode(m.blobs[blob as usize].id));
    (blob, offset, index::index_len(f.nblocks() as u64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_grows_with_the_files_and_start_up_fetches_only_it() {
    let Packed { t, src, files, store: v3, id } = packed();
    let (stored, m) = manifest(&v3, &id);
    let entries = m.inodes.len() as u64;
    let budget = (64 << 10) + 100 * entries;
    let (inline_id, _) =
        pack(&src, &Store::new(t.path().join("v2")), &PackOptions { inline_hashes: true, ..PackOptions::default() })
            .expect("pack");
    let (inline, _) = manifest(&t.path().join("v2"), &inline_id);
    println!("manifest: {stored} bytes in version 3, {inline} with every block's hash; budget {budget}");
    assert!(stored <= budget, "{stored} > {budget}");
    assert!(stored * 3 < inline, "{stored} against {inline}");

    // Opening the image fetches the manifest and nothing else; a read fetches the file's
    // index with its data, in one request.
    let nginx = Nginx::start(&v3, 0);
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), EngineConfig::default()).await;
    let (bytes, requests) = (e.startup.fetched_bytes, e.startup.fetched_requests);
    assert_eq!((bytes, requests), (stored, 1));
    assert!(nginx.blob_ranges().is_empty(), "no blob fetched at start-up");
    let (path, data) = &files[10];
    let ino = e.image().resolve(path.as_bytes()).expect("path");
    assert_eq!(&e.read(ino, 0, 1 << 20).await.expect("read"), data);
    assert_eq!(e.counters.remote_requests.load(Relaxed), 1, "the index and the data together");
    assert_eq!(e.counters.index_requests.load(Relaxed), 1);
    // Every byte reads back.
    for (path, data) in &files {
        let ino = e.image().resolve(path.as_bytes()).expect("path");
        assert_eq!(&e.read(ino, 0, data.len() as u32 + 10).await.expect("read"), data, "{path}");
    }
    assert_eq!(e.counters.verify_failures.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_start_reads_the_cache_without_the_network() {
    let Packed { t, files, store, id, .. } = packed();
    let cache = t.path().join("cache");
    let nginx = Nginx::start(&store, 0);
    let e = open_engine(&nginx.url, id, &cache, EngineConfig::default()).await;
    for (path, data) in &files {
        let ino = e.image().resolve(path.as_bytes()).expect("path");
        assert_eq!(&e.read(ino, 0, data.len() as u32).await.expect("read"), data);
    }
    drop(e);
    drop(nginx);
    // The store is gone: the saved manifest, the tree blocks and the data blocks in the cache
    // serve every read, big files' upper tree levels included.
    let cfg = EngineConfig { read_timeout: Duration::from_secs(2), ..EngineConfig::default() };
    let e = open_engine("http://127.0.0.1:9/", id, &cache, cfg).await;
    for (path, data) in &files {
        let ino = e.image().resolve(path.as_bytes()).expect("path");
        assert_eq!(&e.read(ino, 0, data.len() as u32).await.expect("warm read"), data, "{path}");
    }
    assert_eq!(e.counters.remote_requests.load(Relaxed), 0);
    assert_eq!(e.counters.cache_misses.load(Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaded_indexes_stay_within_their_budget_and_come_back_from_the_cache() {
    let Packed { t, files, store, id, .. } = packed();
    let nginx = Nginx::start(&store, 0);
    // The least a user may set (`--index-memory-kb 64`): room for the tables of about 200
    // small files, or 8 segments of a large one (the 6 MiB file has 12).
    let budget = 64 << 10;
    let cfg = EngineConfig { index_memory: budget, ..EngineConfig::default() };
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), cfg).await;
    let mut most = 0;
    for (path, data) in &files {
        let ino = e.image().resolve(path.as_bytes()).expect("path");
        let mut off = 0;
        while off < data.len() {
            let got = e.read(ino, off as u64, 256 << 10).await.expect("read");
            assert_eq!(got, data[off..(off + got.len())], "{path} at {off}");
            off += got.len();
            most = most.max(e.loaded_index_usage().0);
        }
    }
    println!("loaded index tables: at most {most} bytes (budget {budget}), {:?} at the end", e.loaded_index_usage());
    assert!(most <= budget, "{most} > {budget}");
    assert!(e.counters.indexes_loaded.load(Relaxed) >= files.len() as u64);
    // Everything is cached: the dropped tables' hashes come back from the cache's tree
    // blocks, so a second pass reads every byte without a request.
    let requests = e.counters.remote_requests.load(Relaxed);
    for (path, data) in files.iter().rev() {
        let ino = e.image().resolve(path.as_bytes()).expect("path");
        assert_eq!(&e.read(ino, 0, data.len() as u32).await.expect("read"), data, "{path}");
        assert!(e.loaded_index_usage().0 <= budget);
    }
    assert_eq!(e.counters.remote_requests.load(Relaxed), requests, "served from the cache");
    assert_eq!(e.counters.verify_failures.load(Relaxed), 0);

    // Cold again, 8 readers at once at the same budget: their segments push each other's
    // out, and every read still completes with the right bytes.
    let cfg = EngineConfig { index_memory: budget, ..EngineConfig::default() };
    let e = open_engine(&nginx.url, id, &t.path().join("cache2"), cfg).await;
    let files = std::sync::Arc::new(files);
    let readers: Vec<_> = (0..8)
        .map(|r| {
            let (e, files) = (e.clone(), files.clone());
            tokio::spawn(async move {
                for (path, data) in files.iter().skip(r).step_by(8).chain(files.iter().rev().take(2)) {
                    let ino = e.image().resolve(path.as_bytes()).expect("path");
                    assert_eq!(&e.read(ino, 0, data.len() as u32).await.expect("read"), data, "{path}");
                }
            })
        })
        .collect();
    for r in readers {
        r.await.expect("reader");
    }
    assert!(e.loaded_index_usage().0 <= budget);
}

/// Rewrites `len` bytes at `at` of a store's blob through `f`.
fn tamper(blob: &Path, at: u64, len: usize, f: impl Fn(&mut [u8])) -> Vec<u8> {
    let good = fs::read(blob).expect("blob");
    let mut bad = good.clone();
    f(&mut bad[at as usize..at as usize + len]);
    fs::write(blob, &bad).expect("write");
    good
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_index_is_refused_and_no_byte_it_points_at_is_served() {
    let Packed { t, files, store, id, .. } = packed();
    let nginx = Nginx::start(&store, 0);
    let cfg = EngineConfig { read_timeout: Duration::from_secs(3), ..EngineConfig::default() };
    let look = open_engine(&nginx.url, id, &t.path().join("look"), cfg.clone()).await;
    let img = look.image().clone();
    let cases: [(&str, &str); 4] = [
        ("small/f010", "a leaf hash"),
        ("small/f020", "a block's offset"),
        ("small/f030", "a block's length past its blob"),
        ("big/text", "an upper tree level"),
    ];
    for (n, (path, what)) in cases.into_iter().enumerate() {
        let (blob, at, len) = index_of(&store, &id, &img, path);
        let ino = img.resolve(path.as_bytes()).expect("path");
        let nblocks = img.file(ino).expect("file").nblocks() as u64;
        let hashes = index::segment_offset(nblocks, 0);
        let locs = hashes + 32 * index::segment_len(nblocks, 0) as u64;
        let good = match n {
            0 => tamper(&blob, at + hashes + 5, 1, |b| b[0] ^= 1),
            // Block 0's offset (after kind and blob): one byte on.
            1 => tamper(&blob, at + locs + 5, 8, |b| b[0] = b[0].wrapping_add(1)),
            2 => tamper(&blob, at + locs + 13, 4, |b| b.copy_from_slice(&u32::MAX.to_le_bytes())),
            _ => tamper(&blob, at + 100, 1, |b| b[0] ^= 0x80),
        };
        assert!(len > 0);
        let e = open_engine(&nginx.url, id, &t.path().join(format!("cache{n}")), cfg.clone()).await;
        let err = e.read(ino, 0, 4096).await.expect_err(what);
        assert_eq!(err.errno(), libc::EBADMSG, "{what}: {err}");
        assert!(e.counters.verify_failures.load(Relaxed) >= 1, "{what}");
        let (ok, bad) = incfs::inspect::verify_cache(e.cache()).expect("verify");
        assert_eq!(bad, 0, "{what}");
        // Whatever was stored is verified: the file's data blocks are not there.
        assert_eq!(e.fill_state(ino).expect("fill").0, 0, "{what}: {ok} blocks cached");
        // Repaired, the same engine reads the file.
        fs::write(&blob, good).expect("repair");
        let data = &files.iter().find(|(p, _)| p == path).expect("file").1;
        assert_eq!(&e.read(ino, 0, 4096).await.expect("repaired"), &data[..4096.min(data.len())], "{what}");
    }
}

/// Small files in the order their indexes lie in the blobs: (path, blob, index offset).
fn small_files_in_blob_order(store: &Path, id: &ImageId, img: &incfs::image::Image) -> Vec<(String, u64)> {
    let mut order: Vec<(String, u64)> = (0..300)
        .map(|i| format!("small/f{i:03}"))
        .map(|p| {
            let (_, at, _) = index_of(store, id, img, &p);
            (p, at)
        })
        .collect();
    order.sort_by_key(|&(_, at)| at);
    order
}

/// Two daemons on one cache: what the first one's range brought (or is bringing) past the
/// file it read, the second one does not fetch again: only the next file's index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_fetches_only_the_index_of_what_another_brought_or_is_bringing() {
    let Packed { t, files, store, id, .. } = packed();
    let nginx = Nginx::start(&store, 0);
    let cache = t.path().join("cache");
    let first = open_engine(&nginx.url, id, &cache, EngineConfig::default()).await;
    let img = first.image().clone();
    let order = small_files_in_blob_order(&store, &id, &img);
    let ino = |p: &str| img.resolve(p.as_bytes()).expect("path");
    let data = |p: &str| files.iter().find(|(q, _)| q == p).expect("file").1.clone();
    let index_len = |p: &str| index::index_len(img.file(ino(p)).expect("file").nblocks() as u64);

    // Pairs of neighbours, the second of more than one block.
    let pairs: Vec<(String, String)> =
        order.windows(2).filter(|w| data(&w[1].0).len() > 4096).map(|w| (w[0].0.clone(), w[1].0.clone())).collect();

    // Brought: the first daemon's read of one file brought the next one's data, and the
    // tree block that holds its hashes: the second daemon, running since before, fetches
    // nothing.
    let second = open_engine(&nginx.url, id, &cache, EngineConfig::default()).await;
    let (x, y) = (&pairs[5].0, &pairs[5].1);
    assert_eq!(first.read(ino(x), 0, 1 << 20).await.expect("read"), data(x));
    assert!(first.fill_state(ino(y)).expect("fill").0 > 0, "the range went on over {y}");
    assert_eq!(second.read(ino(y), 0, 1 << 20).await.expect("read"), data(y));
    let fetched = second.counters.bytes_fetched.load(Relaxed);
    println!("{y}: {fetched} bytes fetched by the second daemon, its index {} bytes", index_len(y));
    assert_eq!(fetched, 0, "the second daemon fetched {y} again");

    // Bringing: a third daemon, on a slow store (a second or so for its range), reads a file;
    // the second daemon, reading the next one meanwhile, waits for that range and again
    // fetches only the index.
    let untouched = |p: &str| first.fill_state(ino(p)).expect("fill").0 == 0;
    let (x, y) = pairs.iter().rev().find(|(x, y)| untouched(x) && untouched(y)).expect("files not read yet").clone();
    let slow = Nginx::start(&store, 512);
    let third = open_engine(&slow.url, id, &cache, EngineConfig::default()).await;
    let before = second.counters.bytes_fetched.load(Relaxed);
    let late = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        second.read(ino(&y), 0, 1 << 20).await
    };
    let (brought, got) = tokio::join!(third.read(ino(&x), 0, 1 << 20), late);
    assert_eq!(brought.expect("read"), data(&x));
    assert_eq!(got.expect("read"), data(&y));
    assert!(third.fill_state(ino(&y)).expect("fill").0 > 0, "the slow range went on over {y}");
    let fetched = second.counters.bytes_fetched.load(Relaxed) - before;
    println!("{y}: {fetched} bytes fetched by the second daemon, its index {} bytes", index_len(&y));
    assert!(fetched <= index_len(&y), "the second daemon fetched {y}'s data while another brought it");
}
