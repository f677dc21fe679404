//! Mirrors (`--mirror URL`, repeatable) in front of an origin, all real nginx servers: a dead
//! first mirror is passed over, a mirror serving corrupt bytes is a verification failure that
//! sends the request on (never an error to the reader while the origin can answer), and a
//! failing mirror is skipped for its back-off period, then probed again and used once it
//! answers. Counted at each server (its access log) and in the daemon's per-source metrics.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use incfs::image::ImageId;
use incfs::pack::{pack, PackOptions};
use incfs::store::Store;
use support::*;

/// The image of one file (incompressible, 40 blocks) in `root/www/store`.
fn packed(root: &Path) -> (ImageId, Vec<u8>) {
    let src = root.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(3, 40 * 4096);
    fs::write(src.join("f"), &data).expect("write");
    let id = pack(&src, &Store::new(root.join("www/store")), &PackOptions::default()).expect("pack").0;
    (id, data)
}

/// A copy of `root/www` in `root/<name>`, its blobs' bytes inverted if `corrupt`.
fn copy_store(root: &Path, name: &str, corrupt: bool) -> std::path::PathBuf {
    let dst = root.join(name);
    for sub in ["images", "blobs"] {
        fs::create_dir_all(dst.join("store").join(sub)).expect("mkdir");
        for e in fs::read_dir(root.join("www/store").join(sub)).expect("ls") {
            let e = e.expect("entry");
            let mut bytes = fs::read(e.path()).expect("read");
            if corrupt && sub == "blobs" {
                bytes.iter_mut().for_each(|b| *b = !*b);
            }
            fs::write(dst.join("store").join(sub).join(e.file_name()), bytes).expect("write");
        }
    }
    dst
}

fn cat(origin: &str, id: ImageId, mirrors: &[&str]) -> Output {
    let cache = tempfile::tempdir().expect("tmp");
    let mut c = Command::new(INCFSD);
    c.args(["cat", "--store", origin, "--image", &id.to_string(), "--cache"]).arg(cache.path());
    for m in mirrors {
        c.args(["--mirror", m]);
    }
    c.arg("f").output().expect("incfsd cat")
}

fn assert_served(out: &Output, data: &[u8]) {
    assert!(out.status.success(), "cat failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == data, "cat printed {} bytes, not the file's {}", out.stdout.len(), data.len());
}

/// nginx's access log, once it stops growing: nginx logs a request after sending its answer, so
/// a line can land just after the client has it.
fn settled_log(n: &Nginx) -> Vec<(u16, u64, String, String)> {
    let mut last = n.log();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = n.log();
        if now.len() == last.len() {
            break;
        }
        last = now;
    }
    last
}

fn requests(n: &Nginx, prefix: &str) -> usize {
    settled_log(n).iter().filter(|r| r.3.starts_with(prefix)).count()
}

#[test]
fn a_dead_mirror_is_passed_over_and_a_corrupt_one_never_served() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, data) = packed(t.path());
    let origin = Nginx::start(&t.path().join("www"), 0);
    let good = Nginx::start(&copy_store(t.path(), "good", false), 0);
    let bad = Nginx::start(&copy_store(t.path(), "bad", true), 0);
    let dead = format!("http://127.0.0.1:{}/store", free_port());
    let o = format!("{}/store", origin.url);

    // Dead, then good: everything from the good mirror, nothing from the origin.
    assert_served(&cat(&o, id, &[&dead, &format!("{}/store", good.url)]), &data);
    assert!(requests(&good, "/store/blobs/") > 0 && requests(&good, "/store/images/") == 1);
    assert_eq!(requests(&origin, "/store/"), 0, "the origin was asked: {:?}", origin.log());

    // Corrupt: its blocks fail verification and the origin serves them. Its manifest is
    // intact (it verifies) and is used.
    assert_served(&cat(&o, id, &[&format!("{}/store", bad.url)]), &data);
    assert!(requests(&bad, "/store/blobs/") > 0, "{:?}", bad.log());
    assert!(requests(&origin, "/store/blobs/") > 0, "{:?}", origin.log());
    // A corrupt manifest too: bytes that do not hash to the image id.
    for e in fs::read_dir(t.path().join("bad/store/images")).expect("ls") {
        fs::write(e.expect("entry").path(), b"not the manifest").expect("write");
    }
    assert_served(&cat(&o, id, &[&format!("{}/store", bad.url)]), &data);
    assert_eq!(requests(&origin, "/store/images/"), 1, "{:?}", origin.log());
    // Mirrors that are store directories work the same.
    assert_served(&cat(&o, id, &[&t.path().join("good/store").to_string_lossy()]), &data);
}

#[test]
fn a_failing_mirror_backs_off_then_is_probed_and_used_again() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, data) = packed(t.path());
    let origin = Nginx::start(&t.path().join("www"), 0);
    let mut mirror = Nginx::start_with(&copy_store(t.path(), "copy", false), "", "return 503;");
    fs::create_dir_all(t.path().join("run")).expect("mkdir");
    let d = RunDaemon::start(
        &format!("{}/store", origin.url),
        &id.to_string(),
        &t.path().join("cache"),
        &t.path().join("run/fs.sock"),
        &[
            "--mirror",
            &format!("{}/store", mirror.url),
            "--mirror-backoff-ms",
            "3000",
            "--no-prefetch",
            "--readahead-kb",
            "4",
        ],
    );
    let mut f = incfs_testing::FuseFrontend::connect(&d.socket).expect("connect");
    f.init().expect("init");
    let e = f.lookup(1, b"f").expect("lookup");
    let (fh, _) = f.open(e.nodeid, 0).expect("open");
    let mut block = 0u64;
    let mut read_next = |f: &mut incfs_testing::FuseFrontend| {
        let at = block * 4096;
        let got = f.read(e.nodeid, fh, at, 4096).expect("read");
        assert!(got == data[at as usize..at as usize + 4096], "wrong bytes at block {block}");
        block += 1;
    };
    // The manifest: the mirror answered 503, the origin served it; the mirror now backs off.
    assert_eq!(settled_log(&mirror).iter().filter(|r| r.0 == 503).count(), 1, "{:?}", mirror.log());
    assert_eq!(d.metric("incfs_source_mirror0_failures_total"), 1);
    read_next(&mut f);
    read_next(&mut f);
    assert_eq!(settled_log(&mirror).len(), 1, "a backing-off mirror was asked: {:?}", mirror.log());
    assert_eq!(requests(&origin, "/store/blobs/"), 2);
    assert!(d.metric("incfs_source_mirror0_skipped_total") >= 2);

    // The mirror recovers; once its back-off has passed it is probed and used again.
    mirror.reconfigure("");
    std::thread::sleep(Duration::from_millis(3100));
    let t0 = Instant::now();
    while requests(&mirror, "/store/blobs/") == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the mirror was never probed again: {:?}", mirror.log());
        read_next(&mut f);
    }
    let from_origin = requests(&origin, "/store/blobs/");
    for _ in 0..3 {
        read_next(&mut f);
    }
    assert_eq!(requests(&origin, "/store/blobs/"), from_origin, "a healthy mirror was passed over");
    assert!(mirror.log().iter().filter(|r| r.3.starts_with("/store/blobs/")).all(|r| r.0 == 206));
    assert_eq!(d.metric("incfs_source_mirror0_verify_failures_total"), 0);
    assert!(d.metric("incfs_source_mirror0_bytes_total") >= 4 * 4096);
    d.stop();
}

/// nginx running docs/nginx-cache-tier.conf in front of `origin` (host:port), as the
/// document says to: included in an http {} block, its port, cache directory and origin
/// replaced. Killed on drop.
pub struct CacheTier {
    child: std::process::Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl CacheTier {
    pub fn start(origin: &str) -> CacheTier {
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let d = dir.path().display();
        let conf = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/nginx-cache-tier.conf"))
            .expect("docs/nginx-cache-tier.conf");
        let replaced = conf
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"))
            .replace("/var/cache/nginx/incfs", &format!("{d}/cache"))
            .replace("origin.example:80", origin);
        assert!(replaced != conf && replaced.contains(origin), "the document changed: update this test");
        fs::write(dir.path().join("tier.conf"), replaced).expect("write");
        fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off; master_process off; worker_processes 1; error_log {d}/error.log warn; pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  include {d}/tier.conf;
}}"
            ),
        )
        .expect("write");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start nginx");
        wait_for_port(port);
        CacheTier { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }
}

impl Drop for CacheTier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two daemons with separate caches, a dead first mirror and the caching tier second: the
/// origin sends each byte of the blobs once (each 1 MiB slice once), the second daemon is
/// served by the tier alone.
#[test]
fn a_caching_tier_shares_one_download_between_daemons() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    // 3 MiB in two files: several slices, ranges across slice boundaries.
    let (a, b) = (pseudo_random(11, 2 << 20), pseudo_random(12, 1 << 20));
    fs::write(src.join("a"), &a).expect("write");
    fs::write(src.join("b"), &b).expect("write");
    let id = pack(&src, &Store::new(t.path().join("www/store")), &PackOptions::default()).expect("pack").0;
    let blob_bytes: u64 = fs::read_dir(t.path().join("www/store/blobs"))
        .expect("ls")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    let origin = Nginx::start(&t.path().join("www"), 0);
    let tier = CacheTier::start(origin.url.trim_start_matches("http://"));
    let dead = format!("http://127.0.0.1:{}/store", free_port());
    let mirrors = [dead.as_str(), &format!("{}/store", tier.url)];

    let o = format!("{}/store", origin.url);
    let cat_both = || {
        for (name, data) in [("a", &a), ("b", &b)] {
            let cache = tempfile::tempdir().expect("tmp");
            let mut c = Command::new(INCFSD);
            c.args(["cat", "--store", &o, "--image", &id.to_string(), "--cache"]).arg(cache.path());
            for m in mirrors {
                c.args(["--mirror", m]);
            }
            let out = c.arg(name).output().expect("cat");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stdout == **data, "wrong bytes of {name}");
        }
    };
    cat_both();
    let first = origin.log();
    cat_both();
    let log = origin.log();
    assert_eq!(log.len(), first.len(), "the second daemon reached the origin: {:?}", &log[first.len()..]);
    // Each blob byte left the origin once: slices never overlap, and they add up to the blobs.
    let blobs: Vec<_> = log.iter().filter(|r| r.3.starts_with("/store/blobs/")).collect();
    let mut ranges: Vec<(String, u64, u64)> = blobs
        .iter()
        .filter_map(|r| {
            let (a, b) = r.2.strip_prefix("bytes=")?.split_once('-')?;
            Some((r.3.clone(), a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    assert_eq!(ranges.len(), blobs.len(), "every blob request was a range: {log:?}");
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].0 != w[1].0 || w[0].2 < w[1].1, "a range was fetched twice: {ranges:?}");
    }
    assert_eq!(blobs.iter().map(|r| r.1).sum::<u64>(), blob_bytes, "{ranges:?}");
    assert!(log.iter().all(|r| r.0 == 200 || r.0 == 206), "{log:?}");
}

/// The origin's header and bearer token are not sent to a mirror: the mirror (which would
/// refuse a request carrying them) serves, and the origin (which requires them) is not asked.
#[test]
fn a_mirror_never_sees_the_origins_credentials() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, data) = packed(t.path());
    let origin = Nginx::start_with(
        &t.path().join("www"),
        "",
        r#"if ($http_x_token != "s3cret") { return 403; } if ($http_authorization != "Bearer tok-1") { return 401; }"#,
    );
    let mirror = Nginx::start_with(
        &copy_store(t.path(), "copy", false),
        "",
        r#"if ($http_x_token != "") { return 403; } if ($http_authorization != "") { return 401; }"#,
    );
    let token = t.path().join("token");
    fs::write(&token, "tok-1").expect("write");
    let cache = tempfile::tempdir().expect("tmp");
    let out = Command::new(INCFSD)
        .args(["cat", "--store", &format!("{}/store", origin.url), "--image", &id.to_string(), "--cache"])
        .arg(cache.path())
        .args(["--header", "X-Token: s3cret", "--bearer-token-file", &token.to_string_lossy()])
        .args(["--mirror", &format!("{}/store", mirror.url), "f"])
        .output()
        .expect("cat");
    assert_served(&out, &data);
    assert!(mirror.log().iter().all(|r| r.0 == 200 || r.0 == 206), "{:?}", mirror.log());
    assert_eq!(origin.log().len(), 0, "{:?}", origin.log());
    // The origin alone is served with them (the checks above can fail).
    let cache = tempfile::tempdir().expect("tmp");
    let out = Command::new(INCFSD)
        .args(["cat", "--store", &format!("{}/store", origin.url), "--image", &id.to_string(), "--cache"])
        .arg(cache.path())
        .args(["--header", "X-Token: s3cret", "--bearer-token-file", &token.to_string_lossy(), "f"])
        .output()
        .expect("cat");
    assert_served(&out, &data);
}
