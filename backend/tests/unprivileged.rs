//! `incfsd run` as an unprivileged user (nobody), its default sandbox on: it enters a user
//! and mount namespace (or Landlock) and installs its seccomp filter without any privilege,
//! and serves a frontend the image's bytes. Needs root to become nobody; CI runs as root.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use incfs_testing::FuseFrontend;
use support::*;

const NOBODY: u32 = 65534;
const ROOT: u64 = 1;

fn world_readable(path: &Path) {
    for entry in walk(path) {
        let mode = if entry.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

fn walk(path: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![path.to_path_buf()];
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("readdir") {
            out.extend(walk(&e.expect("entry").path()));
        }
    }
    out
}

/// Kills the daemon however the test ends (it lives in namespaces of its own).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_unprivileged_daemon_serves_inside_its_sandbox() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: becoming another user needs root");
        return;
    }
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path();
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(9, 300 << 10);
    std::fs::write(src.join("f"), &data).expect("write");
    let store = dir.join("store");
    let id = incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0;
    world_readable(dir);
    // The daemon's own places: the cache (created by the daemon, 0700) and the socket's
    // directory belong to nobody.
    let run = dir.join("run");
    std::fs::create_dir(&run).expect("mkdir");
    chown(&run, Some(NOBODY), Some(NOBODY)).expect("chown");
    let socket = run.join("fs.sock");
    let cache = run.join("cache");

    let mut child = Command::new("setpriv")
        .args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".into(), "--".into()])
        .arg(INCFSD)
        .args(["run", "--image", &id.to_string(), "--store"])
        .arg(&store)
        .arg("--cache")
        .arg(&cache)
        .arg("--socket")
        .arg(&socket)
        .env("INCFS_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux)");
    let stderr = child.stderr.take().expect("stderr");
    let child = Killed(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut before_ready = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "not ready in 30 s: {before_ready:#?}");
        match lines.next() {
            Some(Ok(l)) if l.starts_with("incfsd: serving") => break,
            Some(Ok(l)) => before_ready.push(l),
            _ => panic!("incfsd exited before it was ready: {before_ready:#?}"),
        }
    }
    std::thread::spawn(move || lines.for_each(|l| eprintln!("incfsd> {}", l.unwrap_or_default())));
    let log = before_ready.join("\n");
    assert!(log.contains("sandbox in force"), "the full sandbox, unprivileged: {log}");
    assert!(!log.contains("weaker"), "{log}");

    let served = {
        let mut f = FuseFrontend::connect(&socket).expect("connect");
        f.init().expect("init");
        let e = f.lookup(ROOT, b"f").expect("lookup");
        let (fh, _) = f.open(e.nodeid, 0).expect("open");
        let mut got = Vec::new();
        while got.len() < data.len() {
            let chunk = f.read(e.nodeid, fh, got.len() as u64, 128 << 10).expect("read");
            assert!(!chunk.is_empty(), "short file");
            got.extend_from_slice(&chunk);
        }
        got
    };
    drop(child);
    assert!(served == data, "the bytes served differ from the file's");
    let meta = std::fs::metadata(&cache).expect("cache made");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o700), "the cache is the daemon user's own");
}
