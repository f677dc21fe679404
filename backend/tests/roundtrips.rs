//! Hiding round trips on a first boot (issue 15, item 2), against a real nginx store: the
//! fetch of a file's head on OPEN, readahead that adapts per stream, and a read's blocks in a
//! request of their own beside its readahead. Each test shows the request pattern with the
//! change and without it, so it fails without the change.

mod support;

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use incfs::engine::{Engine, EngineConfig, MAX_INTENT_FETCHES};
use incfs::fs::MountFs;
use incfs::image::ImageId;
use incfs_fuse::{abi, FileSystem};
use support::*;

const BS: u64 = 4096;

/// Plaintext blocks of each blob range nginx served, in order (random data is stored raw, so
/// a block is 4096 bytes on the wire).
fn request_blocks(nginx: &Nginx) -> Vec<u64> {
    nginx.blob_ranges().iter().map(|(_, a, b)| (b + 1 - a).div_ceil(BS)).collect()
}

/// Waits until `cond` holds (a background fetch landed), for at most 10 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A tree of `n` files of `size` random bytes each, packed and served by nginx (`rate` as
/// nginx's `limit_rate`, 0 for none).
fn files_store(t: &Path, n: usize, size: usize, rate: u64) -> (ImageId, Nginx, Vec<Vec<u8>>) {
    let src = t.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let files: Vec<Vec<u8>> = (0..n).map(|i| pseudo_random(100 + i as u64, size)).collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(src.join(format!("f{i:05}")), d).expect("write");
    }
    let store = t.join("store");
    let id = pack_default(&src, &store);
    (id, Nginx::start(&store, rate), files)
}

/// FUSE inode of `name` at the root (image inode + 1).
fn ino(e: &Engine, name: &str) -> u64 {
    u64::from(e.image().resolve(name.as_bytes()).expect("file")) + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_of_an_uncached_file_fetches_its_head_before_any_read() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, nginx, files) = files_store(t.path(), 4, 40_000, 0);
    for (open_prefetch, cache) in [(true, "c1"), (false, "c2")] {
        let cfg = EngineConfig { open_prefetch, cross_file_readahead: false, ..EngineConfig::default() };
        let e = open_engine(&nginx.url, id, &t.path().join(cache), cfg).await;
        let fs = MountFs::new(e.clone());
        let f1 = ino(&e, "f00001");
        let (_, flags) = fs.open(f1, libc::O_RDONLY as u32).expect("open");
        assert_ne!(flags & abi::FOPEN_KEEP_CACHE, 0);
        if !open_prefetch {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(e.counters.remote_requests.load(Relaxed), 0, "without --no-open-prefetch, no fetch on OPEN");
            continue;
        }
        // The whole small file arrives with no READ at all, and it is not a read.
        until("the head of f00001", || e.counters.blocks_fetched.load(Relaxed) == 10).await;
        let c = &e.counters;
        assert_eq!(c.intents.intent_fetches.load(Relaxed), 1);
        assert_eq!(c.intents.intent_blocks.load(Relaxed), 10);
        assert_eq!(c.reads.load(Relaxed), 0, "a hint is not a read");
        assert_eq!(c.cache_misses.load(Relaxed), 0, "a hint is not a miss");
        assert!(fs.control().pending_now().is_empty(), "a hint is no pending read");
        let got = e.read_cached(f1 as u32 - 1, 0, 40_000).expect("read").expect("cached after OPEN");
        assert_eq!(got, files[1]);
        // A second OPEN of a cached file fetches nothing more.
        fs.open(f1, libc::O_RDONLY as u32).expect("open");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(c.intents.intent_fetches.load(Relaxed), 1);
        assert_eq!(c.remote_requests.load(Relaxed), 1);
        // A directory's OPENDIR and a LOOKUP fetch nothing (LOOKUP only with lookup_prefetch).
        fs.lookup(abi::ROOT_ID, b"f00002").expect("lookup");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(c.remote_requests.load(Relaxed), 1, "a LOOKUP (stat, ls -l) fetches nothing by default");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_flood_keeps_intent_fetches_bounded() {
    let t = tempfile::tempdir().expect("tmp");
    // Blobs at 1 KiB/s per connection: no fetch ends while the flood lasts.
    let (id, mut nginx, _) = files_store(t.path(), 2000, 5000, 0);
    nginx.reconfigure("location /blobs/ { limit_rate 1024; }");
    let cfg = EngineConfig { lookup_prefetch: true, cross_file_readahead: false, ..EngineConfig::default() };
    let e = open_engine(&nginx.url, id, &t.path().join("cache"), cfg).await;
    let fs = MountFs::new(e.clone());
    let start = Instant::now();
    for i in 0..2000 {
        fs.lookup(abi::ROOT_ID, format!("f{i:05}").as_bytes()).expect("lookup");
    }
    let took = start.elapsed();
    let c = &e.counters.intents;
    let (started, dropped) = (c.intent_fetches.load(Relaxed), c.intent_dropped.load(Relaxed));
    println!("2000 LOOKUPs in {took:?}: {started} intent fetches, {dropped} hints dropped");
    assert_eq!(started, MAX_INTENT_FETCHES as u64, "at most {MAX_INTENT_FETCHES} intent fetches at once");
    assert_eq!(started + dropped, 2000, "every other hint dropped, none queued");
    assert!(took < Duration::from_secs(5), "the LOOKUPs never waited for a fetch ({took:?})");
    assert!(e.inflight_count() <= 2 * MAX_INTENT_FETCHES, "{} blocks in flight", e.inflight_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_s_fetches_grow() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, nginx, files) = files_store(t.path(), 1, 8 << 20, 0);
    let mut counts = Vec::new();
    for (adaptive_readahead, cache) in [(true, "c1"), (false, "c2")] {
        let before = request_blocks(&nginx).len();
        let cfg = EngineConfig {
            readahead: 64 << 10,
            readahead_max: 1 << 20,
            adaptive_readahead,
            split_fetch: false,
            ..EngineConfig::default()
        };
        let e = open_engine(&nginx.url, id, &t.path().join(cache), cfg).await;
        let f = e.image().resolve(b"f00000").expect("file");
        // The file's index first: the data requests are what is measured.
        e.file_blocks(f).await.expect("index");
        until("nginx's log", || request_blocks(&nginx).len() > before).await;
        let before = request_blocks(&nginx).len();
        for off in (0..8 << 20).step_by(32 << 10) {
            let got = e.read(f, off, 32 << 10).await.expect("read");
            assert_eq!(got, files[0][off as usize..off as usize + (32 << 10)]);
        }
        // nginx logs a request once it has sent it all, which may be after the read ended.
        until("nginx's log", || request_blocks(&nginx)[before..].iter().sum::<u64>() >= 2048).await;
        let sizes = request_blocks(&nginx)[before..].to_vec();
        println!("adaptive {adaptive_readahead}: {} requests, blocks each {sizes:?}", sizes.len());
        assert_eq!(sizes.iter().sum::<u64>(), 2048, "every block once");
        if adaptive_readahead {
            // 16, 32, 64, 128, 256, then 256 (the cap) each, and the rest of the file.
            assert_eq!(&sizes[..5], &[16, 32, 64, 128, 256]);
            assert!(sizes[5..sizes.len() - 1].iter().all(|&s| s == 256), "{sizes:?}");
        } else {
            assert!(sizes.iter().all(|&s| s == 16), "{sizes:?}");
        }
        counts.push(sizes.len());
    }
    assert!(counts[0] * 10 < counts[1], "grown windows: {} requests against {}", counts[0], counts[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_reader_does_not_fetch_the_readahead_window() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, nginx, files) = files_store(t.path(), 1, 16 << 20, 0);
    let mut fetched = Vec::new();
    for (adaptive_readahead, cache) in [(true, "c1"), (false, "c2")] {
        let cfg = EngineConfig {
            readahead: 256 << 10,
            readahead_random: 4096,
            adaptive_readahead,
            split_fetch: false,
            ..EngineConfig::default()
        };
        let e = open_engine(&nginx.url, id, &t.path().join(cache), cfg).await;
        let f = e.image().resolve(b"f00000").expect("file");
        // The first read of the file gets the base window; 20 reads of 4 KiB all over it then.
        e.read(f, 0, 4096).await.expect("read");
        assert_eq!(e.counters.blocks_fetched.load(Relaxed), 64);
        let mut x = 12345u64;
        for _ in 0..20 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 33) % ((16 << 20) - 4096) / BS * BS;
            let got = e.read(f, off, 4096).await.expect("read");
            assert_eq!(got, files[0][off as usize..off as usize + 4096]);
        }
        let blocks = e.counters.blocks_fetched.load(Relaxed) - 64;
        println!("adaptive {adaptive_readahead}: 20 random 4 KiB reads fetched {blocks} blocks");
        fetched.push(blocks);
    }
    assert!(fetched[0] <= 20, "only what was asked: {} blocks", fetched[0]);
    assert!(fetched[1] >= 20 * 32, "a fixed window fetches it each time: {} blocks", fetched[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_s_blocks_come_in_a_request_of_their_own_beside_its_readahead() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, nginx, files) = files_store(t.path(), 1, 4 << 20, 0);
    for (split_fetch, cache) in [(true, "c1"), (false, "c2")] {
        let before = request_blocks(&nginx).len();
        let cfg = EngineConfig { readahead: 512 << 10, split_fetch, ..EngineConfig::default() };
        let e = open_engine(&nginx.url, id, &t.path().join(cache), cfg).await;
        let f = e.image().resolve(b"f00000").expect("file");
        // The file's index first: the data requests are what is measured.
        e.file_blocks(f).await.expect("index");
        until("nginx's log", || request_blocks(&nginx).len() > before).await;
        let before = request_blocks(&nginx).len();
        assert_eq!(e.read(f, 0, 8192).await.expect("read"), files[0][..8192]);
        until("the readahead", || e.counters.blocks_fetched.load(Relaxed) == 128).await;
        until("nginx's log", || request_blocks(&nginx)[before..].iter().sum::<u64>() >= 128).await;
        let mut sizes = request_blocks(&nginx)[before..].to_vec();
        sizes.sort_unstable();
        println!("split {split_fetch}: requests of {sizes:?} blocks");
        if split_fetch {
            assert_eq!(sizes, [2, 126], "the read's 2 blocks alone, the rest of the window beside them");
        } else {
            assert_eq!(sizes, [128]);
        }
    }
}
