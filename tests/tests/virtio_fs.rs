//! End-to-end: a real QEMU guest mounts an incfsd image over vhost-user virtio-fs and reads
//! it. One boot per scenario; each guest script runs every check of its scenario and the host
//! compares the guest's "GC ..." result lines with values computed from the source tree.
//!
//! Needs: `cargo build --release -p incfs-backend` first (or INCFSD=path), nginx, and what
//! `qemu/setup` installs. Run: `cargo test --release -p incfs-e2e`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use incfs_e2e::check::{self, PieceDigest, Spec};
use incfs_e2e::*;

const EROFS: &str = "30";
const ETIME: &str = "62";
const ENOENT: &str = "2";

/// Expected (len, sha256) of a `PATH[@OFF+LEN]` spec whose PATH is under /mnt in the guest.
fn expected_seq(src: &Path, spec: &str) -> (u64, String) {
    let s = Spec::parse(spec);
    let rel = s.path.strip_prefix("/mnt/").unwrap_or_else(|| panic!("spec {spec} is not under /mnt"));
    // Follow symlinks on the host too: the guest reads through them.
    let data = std::fs::read(src.join(rel)).unwrap_or_else(|e| panic!("host read {rel}: {e}"));
    let data = match s.range {
        None => &data[..],
        Some((off, len)) => &data[(off as usize).min(data.len())..((off + len) as usize).min(data.len())],
    };
    (data.len() as u64, check::sha256_hex(data))
}

fn expected_pread(src: &Path, rel: &str, seed: u64, count: usize, max_len: u64) -> String {
    let data = std::fs::read(src.join(rel)).expect("host read");
    let mut d = PieceDigest::default();
    for (off, len) in check::pread_plan(data.len() as u64, seed, count, max_len) {
        d.add(off, &data[off as usize..off as usize + len]);
    }
    d.hex()
}

fn expected_mmap(src: &Path, rel: &str, seed: u64) -> (usize, String) {
    let data = std::fs::read(src.join(rel)).expect("host read");
    let pages = data.len().div_ceil(4096);
    let mut d = PieceDigest::default();
    for i in check::page_order(pages, seed) {
        d.add(i as u64, &data[i * 4096..((i + 1) * 4096).min(data.len())]);
    }
    (pages, d.hex())
}

fn expected_readdir(dir: &Path) -> (usize, String) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("host readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    (names.len(), check::names_digest(&mut names))
}

/// The guest's result lines of one kind, e.g. "SEQ".
fn of_kind<'a>(results: &'a [Vec<String>], kind: &str) -> Vec<&'a Vec<String>> {
    results.iter().filter(|r| r[0] == kind).collect()
}

/// Checks every SEQ/PAR line against the source and that each spec in `specs` was reported
/// at least once.
fn check_reads(src: &Path, results: &[Vec<String>], kind: &str, specs: &[String]) {
    let lines = of_kind(results, kind);
    for spec in specs {
        assert!(lines.iter().any(|l| l[1] == *spec), "no {kind} result for {spec}");
    }
    for l in lines {
        let (len, sha) = expected_seq(src, &l[1]);
        assert_eq!(
            (l[2].as_str(), l[3].as_str()),
            (len.to_string().as_str(), sha.as_str()),
            "{kind} {}: wrong bytes",
            l[1]
        );
    }
}

// ---------------------------------------------------------------------------------------

/// The tree for the main scenario. Returns nothing: the host reads the expected values back
/// from `src` so generated and checked data cannot drift apart.
fn build_main_tree(src: &Path) {
    write_file(src, "hello.txt", b"hello from incfs\n");
    write_file(src, "empty.txt", b"");
    for (i, n) in [1usize, 4095, 4096, 4097, 65537, 1 << 20].into_iter().enumerate() {
        write_file(src, &format!("sizes/r{n}"), &pseudo_random(100 + i as u64, n));
    }
    write_file(src, "sizes/text", &text(7, (1 << 20) + 13));
    // 200 MiB, incompressible.
    write_file(src, "big.bin", &pseudo_random(1, 200 << 20));
    // Partial last page, for the mmap walk.
    write_file(src, "mm.bin", &pseudo_random(2, (6 << 20) + 123));
    write_file(src, "pr.bin", &pseudo_random(3, (16 << 20) + 7));
    for i in 0..4 {
        write_file(src, &format!("par/p{i}"), &pseudo_random(10 + i, 4 << 20));
    }
    write_file(src, "par/halves.bin", &pseudo_random(20, 8 << 20));
    // 2000 entries, one with the longest legal name.
    for i in 0..1999 {
        write_file(src, &format!("dir2000/entry-{i:05}"), format!("entry {i}\n").as_bytes());
    }
    write_file(src, &format!("dir2000/{}", "L".repeat(255)), b"long name\n");
    write_file(src, "sub/deep.txt", &text(99, 3000));
    std::fs::create_dir(src.join("empty-dir")).expect("mkdir");
    let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, src.join(at)).expect("symlink");
    link("hello.txt", "link-hello");
    link("sub", "link-sub");
    link("../hello.txt", "sub/up");
    link("does-not-exist", "dangling");
    write_file(src, "hard-a", &text(5, 5000));
    std::fs::hard_link(src.join("hard-a"), src.join("sub/hard-b")).expect("hard link");
}

#[test]
fn reads_match_the_packed_tree() {
    let work = WorkDir::new("main");
    let src = work.join("src");
    build_main_tree(&src);
    let store = work.join("store");
    let image = pack(&src, &store);
    let nginx = Nginx::start(&store, &work.path);
    let daemon = Daemon::start(&work.path, &nginx.url, &image, &[]);

    let seq: Vec<String> = [
        "big.bin",
        "hello.txt",
        "empty.txt",
        "sizes/r1",
        "sizes/r4095",
        "sizes/r4096",
        "sizes/r4097",
        "sizes/r65537",
        "sizes/r1048576",
        "sizes/text",
        "sizes/r1048576@1000+5000",
        "sizes/text@1048000+100000",
        "link-hello",
        "link-sub/deep.txt",
        "sub/up",
        "hard-a",
        "sub/hard-b",
        "dir2000/entry-01234",
    ]
    .iter()
    .map(|s| format!("/mnt/{s}"))
    .collect();
    let par: Vec<String> =
        ["par/p0", "par/p1", "par/p2", "par/p3", "par/halves.bin@0+4194304", "par/halves.bin@4194304+4194304"]
            .iter()
            .map(|s| format!("/mnt/{s}"))
            .collect();
    let script = format!(
        r#"#!/bin/sh
mount -t virtiofs incfs /mnt || {{ echo "MOUNT FAILED"; exit 10; }}
G=/bin/guest-check
rc=0
$G seq {seq} || rc=1
$G pread /mnt/pr.bin 42 3000 70000 || rc=1
$G mmap /mnt/mm.bin 7 || rc=1
$G par {par} || rc=1
$G readdir /mnt/dir2000 || rc=1
$G readdir /mnt/empty-dir || rc=1
$G readdir /mnt || rc=1
$G stat /mnt/hard-a /mnt/sub/hard-b /mnt/link-hello /mnt/empty-dir /mnt/hello.txt || rc=1
$G readlink /mnt/link-hello /mnt/link-sub /mnt/sub/up /mnt/dangling || rc=1
$G seq /mnt/dangling && rc=1
$G mutate /mnt/hello.txt /mnt/sub /mnt/empty-dir || rc=1
echo SHELL-CHECKS
echo x > /mnt/hello.txt
echo x > /mnt/new-file
mkdir /mnt/new-dir
rm -f /mnt/sub/deep.txt
mv /mnt/hello.txt /mnt/moved
echo END-SHELL-CHECKS
# The mount keeps working after all those refusals.
$G seq /mnt/hello.txt /mnt/sub/deep.txt /mnt/sizes/r65537 || rc=1
echo AFTER-MUTATE-OK
exit $rc
"#,
        seq = seq.join(" "),
        par = par.join(" "),
    );
    let _vm = vm_lock();
    let run = run_vm(&work.path, &daemon, &script, 240, |_| {});
    let r = run.results();
    assert!(!run.console.contains("MOUNT FAILED"), "mount failed");

    check_reads(&src, &r, "SEQ", &seq);
    check_reads(&src, &r, "PAR", &par);

    let pr = of_kind(&r, "PREAD");
    assert_eq!(pr.len(), 1, "one PREAD result expected");
    assert_eq!(pr[0][3], expected_pread(&src, "pr.bin", 42, 3000, 70000), "random preads returned wrong bytes");

    let mm = of_kind(&r, "MMAP");
    assert_eq!(mm.len(), 1, "one MMAP result expected");
    let (pages, digest) = expected_mmap(&src, "mm.bin", 7);
    assert_eq!(
        (mm[0][2].as_str(), mm[0][3].as_str()),
        (pages.to_string().as_str(), digest.as_str()),
        "mmap page walk saw wrong bytes"
    );

    let dirs: HashMap<&str, (&str, &str)> =
        of_kind(&r, "READDIR").iter().map(|l| (l[1].as_str(), (l[2].as_str(), l[3].as_str()))).collect();
    for (guest, host) in
        [("/mnt/dir2000", src.join("dir2000")), ("/mnt/empty-dir", src.join("empty-dir")), ("/mnt", src.clone())]
    {
        let (n, d) = expected_readdir(&host);
        let got = dirs.get(guest).unwrap_or_else(|| panic!("no READDIR result for {guest}"));
        assert_eq!(*got, (n.to_string().as_str(), d.as_str()), "readdir {guest}: wrong entries (count, names digest)");
    }
    assert_eq!(dirs["/mnt/dir2000"].0, "2000");
    assert_eq!(dirs["/mnt/empty-dir"].0, "0");

    let st: HashMap<&str, &Vec<String>> = of_kind(&r, "STAT").into_iter().map(|l| (l[1].as_str(), l)).collect();
    let (a, b) = (st["/mnt/hard-a"], st["/mnt/sub/hard-b"]);
    assert_eq!(a[2], b[2], "hard links must share an inode number");
    assert_eq!((a[3].as_str(), b[3].as_str()), ("2", "2"), "hard links: nlink");
    assert_ne!(a[2], st["/mnt/hello.txt"][2], "distinct files must have distinct inodes");
    assert_eq!(st["/mnt/link-hello"][4], "symlink");
    assert_eq!(st["/mnt/empty-dir"][4], "dir");
    assert_eq!(st["/mnt/hello.txt"][5], "17");

    let links: HashMap<&str, &str> = of_kind(&r, "LINK").iter().map(|l| (l[1].as_str(), l[2].as_str())).collect();
    assert_eq!(links.get("/mnt/link-hello"), Some(&"hello.txt"));
    assert_eq!(links.get("/mnt/link-sub"), Some(&"sub"));
    assert_eq!(links.get("/mnt/sub/up"), Some(&"../hello.txt"));
    assert_eq!(links.get("/mnt/dangling"), Some(&"does-not-exist"));
    assert!(
        r.iter().any(|l| l[..] == ["ERR", "SEQ", "/mnt/dangling", ENOENT]),
        "reading a dangling symlink should fail with ENOENT"
    );

    let mutates = of_kind(&r, "MUTATE");
    assert_eq!(mutates.len(), 11, "all mutation attempts reported");
    for m in &mutates {
        assert_eq!(m[2], EROFS, "{} should fail with EROFS (errno 30), got errno {}", m[1], m[2]);
    }
    let shell = run
        .console
        .split("SHELL-CHECKS")
        .nth(1)
        .and_then(|s| s.split("END-SHELL-CHECKS").next())
        .expect("shell checks ran");
    assert_eq!(shell.matches("Read-only file system").count(), 5, "each shell mutation should say EROFS:\n{shell}");
    assert!(run.console.contains("AFTER-MUTATE-OK"));
    // The three reads after the refusals: reported twice in all for hello.txt and deep.txt
    // (once before), and they passed check_reads above.
    assert!(
        of_kind(&r, "SEQ").iter().filter(|l| l[1] == "/mnt/hello.txt").count() == 2,
        "reads after the refusals ran"
    );

    assert_eq!(run.status, 0, "guest script failed");
    assert!(!r.iter().any(|l| l[0] == "ERR" && l[2] != "/mnt/dangling"), "unexpected guest read errors");
    let mut daemon = daemon;
    assert!(daemon.is_running(), "incfsd exited");
    assert_eq!(daemon.metric("incfs_read_errors_total"), 0, "backend counted read errors");
    assert_eq!(daemon.metric("incfs_verify_failures_total"), 0);
}

#[test]
fn reading_one_file_fetches_a_small_fraction() {
    let work = WorkDir::new("lazy");
    let src = work.join("src");
    // 32 MiB of incompressible data in 16 files, and one small file among them.
    for i in 0..16 {
        write_file(&src, &format!("data/d{i:02}.bin"), &pseudo_random(200 + i, 2 << 20));
    }
    write_file(&src, "data/d07-small.txt", &pseudo_random(300, 20_000));
    let store = work.join("store");
    let image = pack(&src, &store);
    let blob_bytes = dir_bytes(&store.join("blobs"));
    let nginx = Nginx::start(&store, &work.path);
    let daemon = Daemon::start(&work.path, &nginx.url, &image, &[]);
    assert_eq!(daemon.metric("incfs_bytes_fetched_total"), 0, "nothing fetched before the guest reads");
    let image_bytes = daemon.metric("incfs_image_bytes");
    assert!(image_bytes >= 32 << 20, "image_bytes {image_bytes}");

    let script = "#!/bin/sh\nmount -t virtiofs incfs /mnt || exit 10\nls /mnt/data | wc -l\n/bin/guest-check seq /mnt/data/d07-small.txt\n";
    let _vm = vm_lock();
    let run = run_vm(&work.path, &daemon, script, 120, |_| {});
    assert_eq!(run.status, 0, "guest script failed");
    check_reads(&src, &run.results(), "SEQ", &["/mnt/data/d07-small.txt".to_string()]);

    let fetched = daemon.metric("incfs_bytes_fetched_total");
    let sent = nginx.blob_bytes_sent();
    println!("fetched {fetched} bytes (nginx sent {sent} blob bytes) of a {image_bytes}-byte image ({blob_bytes} bytes of blobs)");
    // At least the file itself (incompressible, so stored about as large) came over the wire.
    assert!(fetched >= 20_000 && sent >= 20_000, "the file's data must have been fetched");
    assert_eq!(sent, fetched, "nginx's byte count and incfs_bytes_fetched_total should agree");
    assert!(fetched * 20 < image_bytes, "fetched {fetched} of {image_bytes}: more than 5%");
    assert!(sent * 20 < blob_bytes, "nginx sent {sent} of {blob_bytes} blob bytes: more than 5%");
}

#[test]
fn remote_outage_times_out_then_recovers() {
    let work = WorkDir::new("outage");
    let src = work.join("src");
    write_file(&src, "a.txt", b"read while the remote is up\n");
    // Far from a.txt in the blob, so readahead of a.txt cannot have fetched it.
    write_file(&src, "m-filler.bin", &pseudo_random(400, 8 << 20));
    write_file(&src, "z.bin", &pseudo_random(401, 300_000));
    let store = work.join("store");
    let image = pack(&src, &store);
    let mut serve = Serve::start(&store);
    let mut daemon = Daemon::start(&work.path, &serve.url(), &image, &["--read-timeout-ms", "2000"]);

    // The guest reads a.txt, announces the outage window, gives the host time to kill the
    // server, then reads z.bin (unfetched): that must fail with ETIME. It then retries until
    // the host has restarted the server.
    let script = r#"#!/bin/sh
mount -t virtiofs incfs /mnt || exit 10
/bin/guest-check seq /mnt/a.txt || exit 11
echo STOP-REMOTE-NOW
sleep 2
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/mnt/z.bin of=/dev/null bs=4096 count=1 iflag=direct
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
echo "OUTAGE-READ rc=$rc t0=$t0 t1=$t1"
[ $rc -ne 0 ] || exit 12
cat /mnt/z.bin > /dev/null && exit 13
/bin/guest-check seq /mnt/z.bin && exit 13
echo START-REMOTE-NOW
i=0
while [ $i -lt 30 ]; do
    if /bin/guest-check seq /mnt/z.bin; then echo RECOVERED; exit 0; fi
    i=$((i + 1))
    sleep 1
done
exit 14
"#;
    let _vm = vm_lock();
    let mut stopped_at = None;
    let mut restarted = false;
    let run = run_vm(&work.path, &daemon, script, 180, |line| {
        if line.contains("STOP-REMOTE-NOW") && stopped_at.is_none() {
            serve.down();
            stopped_at = Some(Instant::now());
        }
        if line.contains("START-REMOTE-NOW") && !restarted {
            serve.up();
            restarted = true;
        }
    });
    assert!(stopped_at.is_some() && restarted, "the guest never reached the outage steps");
    let r = run.results();
    check_reads(&src, &r, "SEQ", &["/mnt/a.txt".to_string(), "/mnt/z.bin".to_string()]);

    // The failed reads: after about the read timeout, with ETIME. The O_DIRECT dd is one
    // FUSE READ; a buffered read(2) costs two or three (readahead, then the page itself),
    // each waiting out the timeout, so only the dd is timed.
    let line = run.console.lines().find(|l| l.contains("OUTAGE-READ")).expect("outage read reported");
    let field = |k: &str| -> f64 {
        line.split(' ')
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    assert_ne!(field("rc="), 0.0);
    let took = field("t1=") - field("t0=");
    println!("failed read took {took:.2} s in the guest");
    assert!(run.console.contains("cat: read error: Timer expired"), "cat should fail with ETIME (\"Timer expired\")");
    assert!(r.iter().any(|l| l[..] == ["ERR", "SEQ", "/mnt/z.bin", ETIME]), "guest-check should see errno 62 (ETIME)");
    assert!((1.8..4.5).contains(&took), "failed read took {took:.2} s, expected about the 2 s read timeout");
    assert!(run.console.contains("RECOVERED"));
    assert_eq!(run.status, 0, "guest script failed");

    assert!(daemon.is_running(), "incfsd must survive the outage");
    assert!(daemon.metric("incfs_timeouts_total") >= 1, "timeouts counted");
}
