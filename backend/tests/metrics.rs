//! The metrics endpoint of `incfsd blk` (`incfsd run`'s is read by tests/trace.rs): the
//! engine's counters and gauges, then the block device's, in the names dashboards use.

mod support;

use std::collections::HashMap;
use std::ffi::OsStr;

use support::*;

/// `NAME VALUE` samples of an exposition, comments left out.
fn samples(body: &str) -> HashMap<&str, u64> {
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
    let m = samples(body);
    assert_eq!(m.get("incfs_image_bytes"), Some(&(1 << 20)), "{body}");
    assert_eq!(m.get("incfs_blk_disk_bytes"), Some(&(1 << 20)), "{body}");
    assert_eq!(m.get("incfs_blk_overlay_blocks"), Some(&0), "{body}");
    for counter in ["incfs_reads_total", "incfs_bytes_fetched_total", "incfs_blk_reads_total", "incfs_blk_writes_total"]
    {
        assert_eq!(m.get(counter), Some(&0), "{counter} in {body}");
    }
    assert!(body.contains("# TYPE incfs_blk_reads counter\n") && body.ends_with("# EOF\n"), "{body}");
}
