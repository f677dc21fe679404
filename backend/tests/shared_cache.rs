//! Many readers, one cache directory: dedup across images, a size limit, and crashes.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use incfs::cache::{BlockCache, CacheOptions};
use incfs::engine::{Engine, EngineConfig};
use incfs::image::ImageId;
use incfs::store::Remote;
use support::*;

async fn open(url: &str, id: ImageId, cache: &Path, limit: Option<u64>) -> Arc<Engine> {
    let cfg = EngineConfig::default();
    let remote = Remote::open(url, cfg.attempt_timeout).expect("remote");
    let cache = BlockCache::open_with(cache, CacheOptions { limit_bytes: limit }).expect("cache");
    Engine::open(remote, id, Arc::new(cache), cfg).await.expect("engine")
}

async fn read_all(e: &Arc<Engine>, path: &str) -> Vec<u8> {
    let ino = e.image().resolve(path.as_bytes()).expect("path");
    let size = e.image().file(ino).expect("file").size;
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        out.extend(e.read(ino, out.len() as u64, 1 << 20).await.expect("read"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_of_an_image_share_cached_blocks() {
    let t = tempfile::tempdir().expect("tmp");
    let (v1, v2) = (t.path().join("v1"), t.path().join("v2"));
    fs::create_dir_all(&v1).expect("mkdir");
    let system = pseudo_random(1, 16 << 20);
    fs::write(v1.join("system.img"), &system).expect("write");
    fs::write(v1.join("build.prop"), b"ro.build.id=1\n").expect("write");
    // v2: the same system image with 3 blocks patched, a new file, a renamed directory.
    fs::create_dir_all(v2.join("etc")).expect("mkdir");
    let mut patched = system.clone();
    for b in [10usize, 2000, 4000] {
        patched[b * 4096..b * 4096 + 100].copy_from_slice(&pseudo_random(b as u64, 100));
    }
    fs::write(v2.join("etc/system.img"), &patched).expect("write");
    fs::write(v2.join("build.prop"), b"ro.build.id=2\n").expect("write");
    let store = t.path().join("store");
    let (id1, id2) = (pack_default(&v1, &store), pack_default(&v2, &store));
    assert_ne!(id1, id2);
    let nginx = Nginx::start(&store, 0);
    let cache = t.path().join("cache");
    let e1 = open(&nginx.url, id1, &cache, None).await;
    assert!(read_all(&e1, "system.img").await == system);
    let after_v1 = nginx.blob_bytes_sent();
    let e2 = open(&nginx.url, id2, &cache, None).await;
    assert!(read_all(&e2, "etc/system.img").await == patched);
    let v2_bytes = nginx.blob_bytes_sent() - after_v1;
    println!("v1 fetched {after_v1} bytes; v2 then fetched {v2_bytes} bytes");
    assert_eq!(e2.counters.blocks_fetched.load(Relaxed), 3, "only the patched blocks");
    // And v2's index of the file (its blocks' places are its own: 49 bytes a block).
    let index = e2.counters.index_bytes.load(Relaxed);
    assert!(index <= incfs::image::index::index_len(4096), "index {index}");
    assert!(v2_bytes <= 3 * 4096 + index, "v2 fetched {v2_bytes} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_limit_below_the_working_set_keeps_reads_correct_and_the_cache_bounded() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(3, 8 << 20);
    fs::write(src.join("f"), &data).expect("write");
    let store = t.path().join("store");
    let id = pack_default(&src, &store);
    let nginx = Nginx::start(&store, 0);
    let cache = t.path().join("cache");
    let limit = 1u64 << 20;
    let e = open(&nginx.url, id, &cache, Some(limit)).await;
    let ino = e.image().resolve(b"f").expect("f");
    let probe = BlockCache::open(&cache).expect("probe");
    // Two passes in a scattered order, checking every byte and the cache size as we go.
    let mut max_valid = 0;
    for pass in 0..2u64 {
        for k in 0..64u64 {
            let off = ((k * 37 + pass * 11) % 64) * (128 << 10);
            let got = e.read(ino, off, 128 << 10).await.expect("read");
            assert!(got == data[off as usize..off as usize + (128 << 10)], "pass {pass} offset {off}");
            max_valid = max_valid.max(probe.usage().expect("usage").valid);
        }
    }
    let readahead_blocks = EngineConfig::default().readahead / 4096;
    println!("limit {} blocks, largest seen {max_valid} blocks", limit / 4096);
    assert!(max_valid <= limit / 4096 + readahead_blocks, "cache grew to {max_valid} blocks");
    assert!(probe.usage().expect("usage").valid <= limit / 4096);
    let (ok, bad) = incfs::inspect::verify_cache(&probe).expect("verify");
    assert_eq!(bad, 0);
    assert!(ok > 0);
    // Slots are reused: the data file does not keep growing.
    assert!(probe.usage().expect("usage").slots <= 2 * limit / 4096 + readahead_blocks);
}

fn incfsd(args: &[&str]) -> std::process::Output {
    Command::new(INCFSD).args(args).output().expect("incfsd")
}

#[test]
fn killing_any_reader_leaves_the_others_correct_and_the_cache_consistent() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let files: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(10 + i, 12 << 20)).collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(src.join(format!("f{i}")), d).expect("write");
    }
    let store = t.path().join("store");
    let id = pack_default(&src, &store).to_string();
    let nginx = Nginx::start(&store, 20 << 20);
    let cache = t.path().join("cache");
    let c = cache.to_str().expect("utf8");
    let spawn = |path: &str, size: &str| {
        Command::new(INCFSD)
            .args(["cat", "--store", &nginx.url, "--image", &id, "--cache", c, "--cache-size", size, path])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cat")
    };
    for round in 0..3u64 {
        // Three readers at once on one small cache; one of them is killed mid-read.
        let victim = spawn("f0", "16M");
        let others = [spawn("f1", "16M"), spawn("f2", "16M"), spawn("f1", "16M")];
        std::thread::sleep(Duration::from_millis(200 + 150 * round));
        let mut victim = victim;
        victim.kill().expect("kill -9");
        let _ = victim.wait();
        for (p, want) in others.into_iter().zip([&files[1], &files[2], &files[1]]) {
            let out = p.wait_with_output().expect("wait");
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stdout == *want, "round {round}: wrong bytes");
        }
        let v = incfsd(&["cache", "verify", c]);
        assert!(v.status.success(), "round {round}: {}", String::from_utf8_lossy(&v.stdout));
    }
    let status = String::from_utf8_lossy(&incfsd(&["cache", "status", c]).stdout).to_string();
    println!("{status}");
    let field =
        |k: &str| status.lines().find_map(|l| l.strip_prefix(&format!("{k} "))?.trim().parse::<f64>().ok()).expect(k);
    assert!(field("blocks") * 4096.0 <= (16 << 20) as f64);
    assert!(field("hit_ratio") > 0.0, "readers of f1 shared blocks");
    let gc = incfsd(&["cache", "gc", c, "--size", "4M"]);
    assert!(gc.status.success(), "{}", String::from_utf8_lossy(&gc.stderr));
    println!("{}", String::from_utf8_lossy(&gc.stdout));
    let status = String::from_utf8_lossy(&incfsd(&["cache", "status", c]).stdout).to_string();
    assert!(status.contains("empty_slots 0"), "gc reclaimed the killed reader's slots:\n{status}");
    // After gc, a reader still gets the right bytes.
    let out = spawn("f0", "16M").wait_with_output().expect("cat");
    assert!(out.status.success() && out.stdout == files[0]);
    assert!(incfsd(&["cache", "verify", c]).status.success());
}
