//! A published trace (STORE/traces/ID) is not covered by the image id: whatever it holds, the
//! daemon starts, and what is usable of it is still prefetched.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[test]
fn a_hostile_published_trace_neither_kills_nor_stops_the_daemon() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for i in 0..3 {
        std::fs::write(src.join(format!("f{i:02}")), pseudo_random(i, 256 << 10)).expect("write");
    }
    let store = t.path().join("store");
    let id = incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0;
    // `..` under a file once indexed parent[u32::MAX] (a panic at start-up); a malformed
    // line once failed start-up. The last line is good: 8 blocks of f02.
    let text = format!(
        "# incfs-trace v1 image {id}\nf00/../..\t0\t1\nf01\tnot-a-number\t1\n{}\t0\t1\n\t\t\n%zz\t0\t1\nf02\t0\t8\n",
        "%41".repeat(20000)
    );
    std::fs::create_dir_all(store.join("traces")).expect("mkdir");
    std::fs::write(store.join("traces").join(id.to_string()), text).expect("trace");

    let d = RunDaemon::start(
        store.to_str().expect("utf8"),
        &id.to_string(),
        &t.path().join("cache"),
        &t.path().join("fs.sock"),
        &[],
    );
    let t0 = Instant::now();
    while d.metric("incfs_blocks_fetched_total") < 8 {
        assert!(t0.elapsed() < Duration::from_secs(20), "the good line of the trace was not prefetched");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.stop();
}
