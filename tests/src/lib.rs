//! Harness for the end-to-end tests: a work directory, generated trees, packing, nginx or
//! `incfsd serve` as the remote, `incfsd run` as the vhost-user backend, and `qemu/run-vm`
//! booting a real guest. Failures panic with a message saying what to do: this is test code.
//!
//! Binaries it needs:
//! - `incfsd`: `$INCFSD`, else `<workspace>/target/release/incfsd`
//!   (build it with `cargo build --release -p incfs-backend`).
//! - `guest-check` (static, for the guest): `$GUEST_CHECK`, else built on first use with
//!   `cargo build --release --bin guest-check --target x86_64-unknown-linux-gnu` and
//!   `RUSTFLAGS=-C target-feature=+crt-static` into `<workspace>/target/guest-check/`.
//! - `qemu/setup` is run once per test process (idempotent, about 1 s when done).

pub mod check;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub fn incfsd_bin() -> PathBuf {
    let p = std::env::var_os("INCFSD").map(PathBuf::from).unwrap_or_else(|| workspace().join("target/release/incfsd"));
    assert!(
        p.is_file(),
        "incfsd binary not found at {}: run `cargo build --release -p incfs-backend` or set INCFSD=/path/to/incfsd",
        p.display()
    );
    warn_if_stale(&p);
    p
}

/// The tests run whatever binary is there; say so when it is older than the backend sources.
fn warn_if_stale(bin: &Path) {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
        let newest =
            ["backend/src", "backend/fuse/src"].iter().filter_map(|d| newest_mtime(&workspace().join(d))).max();
        if let (Some(b), Some(n)) = (built, newest) {
            if n > b {
                eprintln!(
                    "warning: {} is older than the backend sources: `cargo build --release -p incfs-backend`",
                    bin.display()
                );
            }
        }
    });
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            if m.is_dir() {
                newest_mtime(&e.path())
            } else {
                m.modified().ok()
            }
        })
        .max()
}

/// The static guest helper, built once per test process unless `$GUEST_CHECK` names one.
pub fn guest_check_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("GUEST_CHECK") {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "GUEST_CHECK={} does not exist", p.display());
            return p;
        }
        let target_dir = workspace().join("target/guest-check");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace())
            .args([
                "build",
                "--release",
                "-p",
                "incfs-e2e",
                "--bin",
                "guest-check",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .status()
            .expect("run cargo to build guest-check");
        assert!(status.success(), "building the static guest-check failed");
        target_dir.join("x86_64-unknown-linux-gnu/release/guest-check")
    })
    .clone()
}

/// Runs `qemu/setup` once per process.
pub fn qemu_setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = Command::new(workspace().join("qemu/setup")).output().expect("run qemu/setup");
        assert!(out.status.success(), "qemu/setup failed:\n{}", String::from_utf8_lossy(&out.stderr));
    });
}

/// QEMU 10 from bookworm-backports beside the system's 7.2 (`qemu/install-qemu10`), for
/// the tests that need it (migration of vhost-user devices); run-vm uses it when the
/// environment has `INCFS_QEMU=10` (see [`QEMU10`]).
pub fn qemu10_setup() {
    qemu_setup();
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = Command::new(workspace().join("qemu/install-qemu10")).output().expect("run qemu/install-qemu10");
        assert!(out.status.success(), "qemu/install-qemu10 failed:\n{}", String::from_utf8_lossy(&out.stderr));
    });
}

/// The environment that makes `qemu/run-vm` boot QEMU 10.
pub const QEMU10: &[(&str, &str)] = &[("INCFS_QEMU", "10")];

/// A QEMU human monitor (HMP) on a Unix socket (run-vm `--monitor`).
pub struct Monitor {
    stream: std::os::unix::net::UnixStream,
}

impl Monitor {
    /// Connects, waiting up to 60 s for QEMU to create the socket.
    pub fn connect(path: &Path) -> Monitor {
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("monitor {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
        let mut m = Monitor { stream };
        m.read_to_prompt();
        m
    }

    fn read_to_prompt(&mut self) -> String {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while !out.ends_with(b"(qemu) ") {
            match self.stream.read(&mut byte) {
                Ok(1) => out.push(byte[0]),
                Ok(_) => break,
                Err(e) => panic!("monitor read: {e}; so far: {}", String::from_utf8_lossy(&out)),
            }
        }
        String::from_utf8_lossy(&out).replace('\r', "")
    }

    /// Runs one command and returns what the monitor printed (without the echo and prompt).
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stream, "{line}").expect("monitor write");
        let out = self.read_to_prompt();
        let out = out.strip_suffix("(qemu) ").unwrap_or(&out);
        // HMP echoes the command line (with terminal escapes) before its output.
        out.split_once('\n').map_or("", |(_, rest)| rest).to_string()
    }
}

/// Guests run one at a time: the machine has few cores, TCG is CPU-bound, and the timing
/// checks (read timeouts) should not depend on what the other tests are doing.
pub fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh directory under the system temp dir; removed on drop unless the test is failing
/// (then its path is printed, to look at the logs inside).
pub struct WorkDir {
    pub path: PathBuf,
}

impl WorkDir {
    pub fn new(name: &str) -> WorkDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("incfs-e2e-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        WorkDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping work dir {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Deterministic incompressible bytes (xorshift64), fast enough for hundreds of MiB.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Text-like bytes that compress well.
pub fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(format!("line {i} of a text file\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Writes `data` at `root/rel`, creating parent directories.
pub fn write_file(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    }
    std::fs::write(&p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// `incfsd pack SRC --store STORE`; returns the image id (its last stdout line).
pub fn pack(src: &Path, store: &Path) -> String {
    let out =
        Command::new(incfsd_bin()).arg("pack").arg(src).arg("--store").arg(store).output().expect("run incfsd pack");
    assert!(out.status.success(), "incfsd pack failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().expect("incfsd pack printed no image id").trim().to_string()
}

/// Total size of the files under `dir` (for "fraction of the image" checks on the store).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())).flatten() {
        let m = e.metadata().expect("metadata");
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub fn wait_for_port(port: u16, what: &str) {
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what} did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nginx serving a store directory on a free loopback port, with an access log of the body
/// bytes it sent (`$body_bytes_sent`) per request.
pub struct Nginx {
    _proc: Proc,
    pub url: String,
    log: PathBuf,
}

impl Nginx {
    pub fn start(root: &Path, work: &Path) -> Nginx {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx is not installed: `apt-get install nginx-light`");
        let dir = work.join("nginx");
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; error_log {d}/error.log warn; pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  log_format counted '$status $body_bytes_sent $uri';
  access_log {d}/access.log counted;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  default_type application/octet-stream;
  keepalive_requests 100000;
  server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}
}}",
            root = root.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx");
        let n = Nginx {
            _proc: Proc { child, name: "nginx".into() },
            url: format!("http://127.0.0.1:{port}"),
            log: dir.join("access.log"),
        };
        wait_for_port(port, "nginx");
        n
    }

    /// (status, body bytes, uri) per logged request. nginx writes the log line when the
    /// response is done, so call this after the reads.
    pub fn requests(&self) -> Vec<(u16, u64, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.to_string()))
            })
            .collect()
    }

    /// Body bytes sent for blobs (file data).
    pub fn blob_bytes_sent(&self) -> u64 {
        self.requests().iter().filter(|r| r.2.starts_with("/blobs/")).map(|r| r.1).sum()
    }
}

/// `incfsd serve STORE` on a fixed loopback port, so it can be stopped and started again at
/// the same address (the daemon keeps its URL).
pub struct Serve {
    proc: Option<Proc>,
    store: PathBuf,
    pub port: u16,
}

impl Serve {
    pub fn start(store: &Path) -> Serve {
        let mut s = Serve { proc: None, store: store.to_path_buf(), port: free_port() };
        s.up();
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn up(&mut self) {
        assert!(self.proc.is_none(), "incfsd serve is already running");
        let child = Command::new(incfsd_bin())
            .arg("serve")
            .arg(&self.store)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start incfsd serve");
        self.proc = Some(Proc { child, name: "incfsd serve".into() });
        wait_for_port(self.port, "incfsd serve");
    }

    /// Kills the server: new connections are refused, open ones are reset.
    pub fn down(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// `incfsd run`: the vhost-user-fs backend under test, with its metrics endpoint on a free
/// port. Its stderr is collected and printed if the test fails.
pub struct Daemon {
    proc: Proc,
    pub socket: PathBuf,
    pub metrics_port: u16,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    /// `store`: URL or directory. `extra`: more `incfsd run` flags (e.g. `--read-timeout-ms`).
    pub fn start(work: &Path, store: &str, image: &str, extra: &[&str]) -> Daemon {
        Self::start_with(&work.join("incfsd.sock"), &work.join("cache"), store, image, extra)
    }

    /// Like `start`, with the socket and the cache directory chosen (several daemons
    /// sharing one cache).
    pub fn start_with(socket: &Path, cache: &Path, store: &str, image: &str, extra: &[&str]) -> Daemon {
        Self::start_binary(&incfsd_bin(), socket, cache, store, image, extra)
    }

    /// Like `start_with`, `incfsd run` started from the binary `bin` (an upgrade test
    /// replaces it under the running daemon).
    pub fn start_binary(bin: &Path, socket: &Path, cache: &Path, store: &str, image: &str, extra: &[&str]) -> Daemon {
        let mut args: Vec<String> = vec!["run".into(), "--socket".into(), socket.display().to_string()];
        args.extend(["--store", store, "--image", image].map(String::from));
        args.extend(["--cache".to_string(), cache.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn_binary(bin, "incfsd run", socket, &args)
    }

    /// `incfsd blk`: file `path` of the image as a vhost-user-blk disk on `socket`, with
    /// `extra` flags (e.g. `--overlay FILE`).
    pub fn start_blk(socket: &Path, cache: &Path, store: &str, image: &str, path: &str, extra: &[&str]) -> Daemon {
        let mut args: Vec<String> = vec!["blk".into(), "--socket".into(), socket.display().to_string()];
        args.extend(["--store", store, "--image", image, "--path", path].map(String::from));
        args.extend(["--cache".to_string(), cache.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn("incfsd blk", socket, &args)
    }

    /// Starts `incfsd ARGS --metrics <free port>` and waits for its ready line. Unless
    /// `INCFS_LOG` says otherwise, blk and run daemons log the vhost layer's connection events
    /// (what a restart resubmitted), run daemons also their supervisor's.
    fn spawn(name: &str, socket: &Path, args: &[String]) -> Daemon {
        Self::spawn_binary(&incfsd_bin(), name, socket, args)
    }

    fn spawn_binary(bin: &Path, name: &str, socket: &Path, args: &[String]) -> Daemon {
        let log = match args.first().map(String::as_str) {
            Some("blk") => Some("warn,incfs_vhost=info"),
            // And what the supervisor did (workers started, state replayed).
            Some("run") => Some("warn,incfs_vhost=info,incfs::supervisor=info"),
            _ => None,
        };
        let log = std::env::var("INCFS_LOG").ok().or(log.map(str::to_string));
        Self::spawn_logging(bin, name, socket, args, log.as_deref())
    }

    fn spawn_logging(bin: &Path, name: &str, socket: &Path, args: &[String], log: Option<&str>) -> Daemon {
        let metrics_port = free_port();
        let mut cmd = Command::new(bin);
        if let Some(log) = log {
            cmd.env("INCFS_LOG", log);
        }
        let mut child = cmd
            .args(args)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().expect("stderr pipe");
        let sink = stderr.clone();
        // Keep draining stderr for the daemon's whole life so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.starts_with("incfsd: serving") {
                    let _ = ready_tx.send(());
                }
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        let d = Daemon { proc: Proc { child, name: name.into() }, socket: socket.to_path_buf(), metrics_port, stderr };
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!("{name} did not print its ready line within 30 s; stderr:\n{}", d.stderr());
        }
        d
    }

    /// The daemon's process id (`incfsd run`: the supervisor's).
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// `incfsd run`'s worker: the supervisor's one child (None between two workers).
    pub fn worker_pid(&self) -> Option<u32> {
        let pid = self.pid();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Kills the daemon with SIGKILL and reaps it; its stderr stays readable.
    pub fn kill_9(&mut self) {
        self.proc.kill();
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// The Prometheus counters and gauges, by name.
    pub fn metrics(&self) -> HashMap<String, f64> {
        let body = http_get(self.metrics_port, "/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// One metric; panics if the daemon does not export it.
    pub fn metric(&self, name: &str) -> u64 {
        let m = self.metrics();
        *m.get(name).unwrap_or_else(|| panic!("no metric {name} in {m:?}")) as u64
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("---- {} stderr ----\n{}---- end ----", self.proc.name, self.stderr());
        }
    }
}

/// A plain HTTP/1.0 GET on loopback; returns the body (panics unless 200).
pub fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("bad HTTP response: {resp:?}"));
    assert!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "GET {path}: {head}");
    body.to_string()
}

/// What a guest run produced.
pub struct VmRun {
    /// The guest script's exit status (run-vm: 124 timeout, 1 no marker, 2 usage).
    pub status: i32,
    pub console: String,
    pub seconds: f64,
}

impl VmRun {
    pub fn results(&self) -> Vec<Vec<String>> {
        check::result_lines(&self.console)
    }
}

/// Boots a guest with the daemon's socket as tag `incfs`, the guest helper at
/// /bin/guest-check and `script` as /run.sh. `on_line` sees each console line as it arrives
/// (for tests that act on the host while the guest runs).
pub fn run_vm(work: &Path, daemon: &Daemon, script: &str, timeout_s: u32, on_line: impl FnMut(&str)) -> VmRun {
    let fs = format!("{}:incfs", daemon.socket.display());
    run_vm_with(work, &["--fs", &fs], script, timeout_s, on_line)
}

/// Like `run_vm` with the devices (and any other `qemu/run-vm` options) given as `args`,
/// e.g. `["--blk", SOCK, "--reconnect", "1"]`.
pub fn run_vm_with(work: &Path, args: &[&str], script: &str, timeout_s: u32, on_line: impl FnMut(&str)) -> VmRun {
    run_vm_env(work, args, &[], script, timeout_s, on_line)
}

/// Like `run_vm_with`, run-vm with `env` added to its environment (e.g. [`QEMU10`]).
pub fn run_vm_env(
    work: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    script: &str,
    timeout_s: u32,
    mut on_line: impl FnMut(&str),
) -> VmRun {
    qemu_setup();
    let script_path = work.join("run.sh");
    std::fs::write(&script_path, script).expect("write guest script");
    let start = Instant::now();
    let mut child = Command::new(workspace().join("qemu/run-vm"))
        .envs(env.iter().copied())
        .args(args)
        .arg("--script")
        .arg(&script_path)
        .arg("--add")
        .arg(format!("{}:/bin/guest-check", guest_check_bin().display()))
        .args(["--timeout", &timeout_s.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start qemu/run-vm");
    let mut console = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("stdout pipe"));
    let mut buf = Vec::new();
    // Lines as bytes: the console may carry stray non-UTF-8 bytes.
    while out.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        println!("guest| {line}");
        on_line(line);
        console.push_str(line);
        console.push('\n');
        buf.clear();
    }
    let status = child.wait().expect("wait for run-vm").code().unwrap_or(-1);
    let seconds = start.elapsed().as_secs_f64();
    println!("guest run: status {status}, {seconds:.1} s");
    VmRun { status, console, seconds }
}

/// Builds an ext4 image of `tree` (mkfs.ext4 -d), `size_mb` MiB, as `src/disk.img`.
pub fn mkfs_ext4(tree: &Path, src: &Path, size_mb: u64) {
    std::fs::create_dir_all(src).expect("mkdir src");
    let img = src.join("disk.img");
    let f = std::fs::File::create(&img).expect("img");
    f.set_len(size_mb << 20).expect("size");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
        .arg(tree)
        .arg(&img)
        .status()
        .expect("mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(st.success(), "mkfs.ext4");
}

/// `--add` options that put the host's e2fsck, with the libraries it links, into the guest.
pub fn e2fsck_in_guest() -> Vec<String> {
    let bin = ["/usr/sbin/e2fsck", "/sbin/e2fsck"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("e2fsck (apt-get install e2fsprogs)");
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    let mut adds = vec!["--add".to_string(), format!("{bin}:/sbin/e2fsck")];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            adds.extend(["--add".to_string(), format!("{p}:{p}")]);
        }
    }
    adds
}

/// A slow link in front of nginx (tests/src/bin/delay-proxy.rs).
pub struct DelayProxy {
    _proc: Proc,
    pub url: String,
}

impl DelayProxy {
    /// `bin`: the `delay-proxy` binary (`env!("CARGO_BIN_EXE_delay-proxy")` in a test).
    pub fn start(bin: &str, to: &str, rtt_ms: u32) -> DelayProxy {
        let port = free_port();
        let to = to.trim_start_matches("http://");
        let child = Command::new(bin)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--to", to, "--rtt-ms", &rtt_ms.to_string()])
            .args(["--mbit", "1000"])
            .stderr(Stdio::null())
            .spawn()
            .expect("start delay-proxy");
        let p =
            DelayProxy { _proc: Proc { child, name: "delay-proxy".into() }, url: format!("http://127.0.0.1:{port}") };
        wait_for_port(port, "delay-proxy");
        p
    }
}

/// Lines the guest prints when something went wrong with the disk.
pub const DMESG_ERRORS: &str =
    "I/O error|EXT4-fs error|EXT4-fs warning|Aborting journal|Remounting filesystem read-only|is not a head|virtio.*broken|Buffer I/O";

/// `text` without its terminal colour sequences (the daemon's log has them).
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// xorshift, for the kill moments.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
