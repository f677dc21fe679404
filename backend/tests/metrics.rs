//! The metrics endpoint of `incfsd blk` (`incfsd run`'s is read by tests/trace.rs): the
//! engine's counters and gauges, then the block device's, in the names dashboards use; and
//! the time to ready of `incfsd run` (start-up bytes, seconds to serving and to the first
//! answered READ).

mod support;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::time::{Duration, Instant};

use support::*;

/// `NAME VALUE` samples of an exposition, comments left out.
fn samples<T: std::str::FromStr>(body: &str) -> HashMap<&str, T> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name, value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn blk_exports_engine_and_device_metrics() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("disk.img"), pseudo_random(1, 1 << 20)).expect("write");
    let store = t.path().join("store");
    let id = incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0;
    let port = free_port();
    let (id, metrics) = (id.to_string(), format!("127.0.0.1:{port}"));
    let (cache, socket, overlay) = (t.path().join("cache"), t.path().join("blk.sock"), t.path().join("overlay"));
    let mut args: Vec<&OsStr> =
        ["blk", "--image", &id, "--path", "disk.img", "--metrics", &metrics, "--store"].map(OsStr::new).to_vec();
    args.push(store.as_os_str());
    for (flag, path) in [("--cache", &cache), ("--socket", &socket), ("--overlay", &overlay)] {
        args.extend([OsStr::new(flag), path.as_os_str()]);
    }
    let mut d = start_until_ready(&args);

    let response = http_get_local(port, "/metrics");
    let _ = d.kill();
    let _ = d.wait();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    let m: HashMap<&str, u64> = samples(body);
    assert_eq!(m.get("incfs_image_bytes"), Some(&(1 << 20)), "{body}");
    assert_eq!(m.get("incfs_blk_disk_bytes"), Some(&(1 << 20)), "{body}");
    assert_eq!(m.get("incfs_blk_overlay_blocks"), Some(&0), "{body}");
    for counter in ["incfs_reads_total", "incfs_bytes_fetched_total", "incfs_blk_reads_total", "incfs_blk_writes_total"]
    {
        assert_eq!(m.get(counter), Some(&0), "{counter} in {body}");
    }
    assert!(body.contains("# TYPE incfs_blk_reads counter\n") && body.ends_with("# EOF\n"), "{body}");
}

/// `NAME VALUE` samples of `incfsd run`'s metrics, values as floats (seconds are fractions).
fn scrape(port: u16) -> HashMap<String, f64> {
    let response = http_get_local(port, "/metrics");
    let (_, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    samples(body).into_iter().map(|(name, value)| (name.to_string(), value)).collect()
}

/// `incfsd run` (with its supervisor) against an HTTP store: before any READ it reports the
/// manifest as its start-up bytes (one request) and the seconds to serving, and no first
/// read; the first READ answered sets `incfs_first_read_seconds` once, counted from the
/// daemon's start, and later READs leave it.
#[test]
fn run_reports_its_time_to_ready() {
    use incfs_testing::FuseFrontend;
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(3, 5 * 4096 + 7);
    std::fs::write(src.join("file"), &data).expect("write");
    let store = t.path().join("store");
    let id = incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0;
    let manifest_bytes = std::fs::metadata(store.join("images").join(id.to_string())).expect("manifest").len();
    let nginx = Nginx::start(&store, 0);

    let t0 = Instant::now();
    let d = RunDaemon::start(&nginx.url, &id.to_string(), &t.path().join("cache"), &t.path().join("fs.sock"), &[]);
    // The supervisor binds the socket before its worker serves: wait for the worker's ready.
    let m = loop {
        let m = scrape(d.metrics);
        if m.contains_key("incfs_ready_seconds") {
            break m;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "never ready: {m:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let seen_ready = t0.elapsed().as_secs_f64();
    assert_eq!(m.get("incfs_startup_bytes"), Some(&(manifest_bytes as f64)), "the manifest as stored: {m:?}");
    assert_eq!(m.get("incfs_startup_requests"), Some(&1.0), "{m:?}");
    let ready = *m.get("incfs_ready_seconds").expect("incfs_ready_seconds");
    assert!(ready > 0.0 && ready <= seen_ready, "ready after {ready} s, seen by the test after {seen_ready} s");
    assert_eq!(m.get("incfs_first_read_seconds"), None, "no READ yet: {m:?}");

    std::thread::sleep(Duration::from_millis(300));
    let mut f = FuseFrontend::connect(&d.socket).expect("connect");
    f.init().expect("init");
    let e = f.lookup(1, b"file").expect("lookup");
    let (fh, _) = f.open(e.nodeid, libc::O_RDONLY as u32).expect("open");
    let before_read = t0.elapsed().as_secs_f64();
    assert_eq!(f.read(e.nodeid, fh, 0, 1 << 20).expect("read"), data);
    let after_read = t0.elapsed().as_secs_f64();
    let first = *scrape(d.metrics).get("incfs_first_read_seconds").expect("incfs_first_read_seconds after a READ");
    // Counted from the daemon's start (after t0, before it was ready), not from the worker's
    // or the engine's: at least the 300 ms the test waited after ready, at most the test's own
    // clock.
    assert!(
        first >= ready + 0.3 && first <= after_read,
        "first READ at {first} s, ready {ready} s, test {before_read}..{after_read} s"
    );

    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.read(e.nodeid, fh, 4096, 4096).expect("read again"), data[4096..8192]);
    let m = scrape(d.metrics);
    assert_eq!(m.get("incfs_first_read_seconds"), Some(&first), "set once: {m:?}");
    assert_eq!(m.get("incfs_ready_seconds"), Some(&ready), "{m:?}");
    d.stop();
}
