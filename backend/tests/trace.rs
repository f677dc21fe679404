//! Record and replay: one run records the order of first reads; later runs prefetch those
//! blocks from start-up, before anyone asks, from a trace file or one published with the image.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use incfs_testing::FuseFrontend;
use support::*;

const ROOT: u64 = 1;

fn read(f: &mut FuseFrontend, name: &str, off: u64, len: u32) -> Vec<u8> {
    let e = f.lookup(ROOT, name.as_bytes()).expect("lookup");
    let (fh, _) = f.open(e.nodeid, 0).expect("open");
    f.read(e.nodeid, fh, off, len).expect("read")
}

/// The workload: a few files, parts of them, in an order unlike the tree's.
fn workload(f: &mut FuseFrontend, files: &[Vec<u8>]) {
    f.init().expect("init");
    for (i, off, len) in [(17usize, 0u64, 65536u32), (3, 8192, 4096), (30, 0, 200_000), (3, 0, 4096)] {
        let got = read(f, &format!("f{i:02}"), off, len);
        let end = (off as usize + len as usize).min(files[i].len());
        assert!(got == files[i][off as usize..end], "f{i:02} at {off}");
    }
}

#[test]
fn a_recorded_trace_is_prefetched_by_later_runs() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let files: Vec<Vec<u8>> = (0..40).map(|i| pseudo_random(i, 256 << 10)).collect();
    for (i, d) in files.iter().enumerate() {
        std::fs::write(src.join(format!("f{i:02}")), d).expect("write");
    }
    let store = t.path().join("store");
    let id =
        incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0.to_string();
    let nginx = Nginx::start(&store, 0);
    let sock = t.path().join("fs.sock");
    let trace = t.path().join("trace.txt");

    // 1. Record.
    let d = RunDaemon::start(
        &nginx.url,
        &id,
        &t.path().join("c1"),
        &sock,
        &["--record-trace", trace.to_str().expect("utf8"), "--no-prefetch"],
    );
    workload(&mut FuseFrontend::connect(&sock).expect("connect"), &files);
    let demand_requests = d.metric("incfs_remote_requests_total");
    d.stop();
    let text = std::fs::read_to_string(&trace).expect("trace written at exit");
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    println!("{text}");
    assert_eq!(lines, ["f17\t0\t16", "f03\t2\t1", "f30\t0\t49", "f03\t0\t1"], "first reads, in order");

    // 2. Replay from the file into a fresh cache: the blocks arrive before anyone reads.
    // Readahead fetches more than the trace names, in no fixed order: done is when the
    // trace's blocks are in and nothing has arrived for a while.
    let wait_prefetched = |d: &RunDaemon| {
        let t0 = Instant::now();
        let (mut last, mut since) = (0, Instant::now());
        loop {
            let n = d.metric("incfs_blocks_fetched_total");
            if n != last {
                (last, since) = (n, Instant::now());
            } else if n > 16 + 1 + 49 && since.elapsed() > Duration::from_millis(500) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "prefetch did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let d = RunDaemon::start(
        &nginx.url,
        &id,
        &t.path().join("c2"),
        &sock,
        &["--prefetch-trace", trace.to_str().expect("utf8")],
    );
    wait_prefetched(&d);
    assert_eq!(d.metric("incfs_reads_total"), 0, "nobody has read yet");
    workload(&mut FuseFrontend::connect(&sock).expect("connect"), &files);
    assert_eq!(d.metric("incfs_cache_misses_total"), 0, "every read was prefetched");
    assert!(d.metric("incfs_remote_requests_total") <= demand_requests + 1);
    drop(d);

    // 3. Published with the image, which it lays out anew (another image id): used by
    // default, ignored with --no-prefetch.
    let out = Command::new(INCFSD)
        .args([
            "pack",
            src.to_str().expect("utf8"),
            "--store",
            store.to_str().expect("utf8"),
            "--trace",
            trace.to_str().expect("utf8"),
        ])
        .output()
        .expect("pack");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(store.join("traces").join(&id).exists());
    let d = RunDaemon::start(&nginx.url, &id, &t.path().join("c3"), &sock, &[]);
    wait_prefetched(&d);
    drop(d);
    let d = RunDaemon::start(&nginx.url, &id, &t.path().join("c4"), &sock, &["--no-prefetch"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.metric("incfs_blocks_fetched_total"), 0);
}

/// Waits until the daemon has fetched `blocks` blocks; returns how long that took.
fn wait_fetched(d: &RunDaemon, blocks: u64, limit: Duration) -> Duration {
    let t0 = Instant::now();
    while d.metric("incfs_blocks_fetched_total") < blocks {
        assert!(
            t0.elapsed() < limit,
            "only {} of {blocks} blocks after {limit:?}",
            d.metric("incfs_blocks_fetched_total")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

#[test]
fn fetch_all_brings_the_whole_image_in_the_background_under_its_rate_cap() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    // 8 MiB that does not compress, in 32 files.
    let files: Vec<Vec<u8>> = (0..32).map(|i| pseudo_random(100 + i, 256 << 10)).collect();
    for (i, d) in files.iter().enumerate() {
        std::fs::write(src.join(format!("f{i:02}")), d).expect("write");
    }
    let blocks = 32 * 64;
    let store = t.path().join("store");
    let id =
        incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0.to_string();
    let nginx = Nginx::start(&store, 0);
    let sock = t.path().join("fs.sock");

    // No cap: everything arrives with nobody reading, then every read hits.
    let d = RunDaemon::start(&nginx.url, &id, &t.path().join("c1"), &sock, &["--no-prefetch", "--fetch-all"]);
    let uncapped = wait_fetched(&d, blocks, Duration::from_secs(30));
    assert_eq!(d.metric("incfs_reads_total"), 0);
    let mut f = FuseFrontend::connect(&sock).expect("connect");
    f.init().expect("init");
    for (i, want) in files.iter().enumerate() {
        assert!(&read(&mut f, &format!("f{i:02}"), 0, 256 << 10) == want, "f{i:02}");
    }
    assert_eq!(d.metric("incfs_cache_misses_total"), 0, "all fetched before the reads");
    assert_eq!(d.metric("incfs_blocks_fetched_total"), blocks, "each block once");
    drop(f);
    drop(d);

    // At 2 MiB/s the 8 MiB take at least 3.5 s: the cap counts the bytes a request asks for
    // from its start, so at most one request (1 MiB) goes ahead of it.
    let d = RunDaemon::start(
        &nginx.url,
        &id,
        &t.path().join("c2"),
        &sock,
        &["--no-prefetch", "--fetch-all", "--fetch-all-rate", "2M", "--readahead-kb", "64"],
    );
    let capped = wait_fetched(&d, blocks, Duration::from_secs(30));
    println!("whole image: {uncapped:?} uncapped, {capped:?} at 2 MiB/s");
    assert!(capped >= Duration::from_millis(3500), "8 MiB in {capped:?} at 2 MiB/s");
    // A demand read is not held back by the cap: a fresh cache, a read at once.
    drop(d);
    let d = RunDaemon::start(
        &nginx.url,
        &id,
        &t.path().join("c3"),
        &sock,
        &["--no-prefetch", "--fetch-all", "--fetch-all-rate", "4K"],
    );
    let mut f = FuseFrontend::connect(&sock).expect("connect");
    f.init().expect("init");
    let t0 = Instant::now();
    assert!(read(&mut f, "f31", 0, 256 << 10) == files[31]);
    assert!(t0.elapsed() < Duration::from_secs(5), "demand read took {:?}", t0.elapsed());
    assert!(d.metric("incfs_blocks_fetched_total") < blocks, "the background fetch is crawling");
}

#[test]
fn trace_merge_writes_the_merged_trace_and_reports_what_it_skipped() {
    let t = tempfile::tempdir().expect("tmp");
    let a = t.path().join("a");
    let b = t.path().join("b");
    std::fs::write(&a, "# incfs-trace v1 image aa\nlib/x.py\t0\t2\nbin/sh\t0\t1\n").expect("write");
    std::fs::write(&b, "# incfs-trace v1 image bb\nbin/sh\t0\t1\nlib/x.py\t0\t1\nno tabs\n").expect("write");
    let merge = |files: &[&std::path::Path]| {
        Command::new(INCFSD).args(["trace", "merge"]).args(files).output().expect("incfsd trace merge")
    };
    let out = merge(&[&a, &b]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // lib/x.py 0 ranks {0, 1} and bin/sh 0 {2, 0}: both median 0, in two runs, earliest 0:
    // by path. lib/x.py 1 (median 1) follows and joins its neighbour.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "# incfs-trace v1 image aa\n# merged from 2 traces\nbin/sh\t0\t1\nlib/x.py\t0\t2\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("skipped 1 malformed lines"), "{err}");
    assert!(err.contains("is a trace of image bb, not aa"), "{err}");
    // Over the readers' limit: refused, nothing written.
    let big = t.path().join("big");
    std::fs::write(&big, "f\t0\t1\n".repeat((8 << 20) / 6 + 1)).expect("write");
    let out = merge(&[&a, &big]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("over the 8388608 bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
