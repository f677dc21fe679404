//! Real servers for the integration tests: nginx serving a store (with an access log to count
//! the bytes it sent), and an HTTP server that injects faults in front of a store.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub const INCFSD: &str = env!("CARGO_BIN_EXE_incfsd");

pub mod s3s;

/// `incfsd run` on a socket, with metrics on a free port; killed on drop.
pub struct RunDaemon {
    child: Child,
    pub socket: PathBuf,
    pub metrics: u16,
}

impl RunDaemon {
    /// Starts the daemon and waits for its socket. `store`: directory or URL.
    pub fn start(store: &str, id: &str, cache: &Path, socket: &Path, extra: &[&str]) -> RunDaemon {
        Self::start_env(store, id, cache, socket, extra, |_| {})
    }

    /// As `start`, the command's environment set by `env`.
    pub fn start_env(
        store: &str,
        id: &str,
        cache: &Path,
        socket: &Path,
        extra: &[&str],
        env: impl FnOnce(&mut Command),
    ) -> RunDaemon {
        let metrics = free_port();
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new(INCFSD);
        cmd.args(["run", "--image", id, "--store", store, "--metrics", &format!("127.0.0.1:{metrics}"), "--cache"])
            .arg(cache)
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stderr(Stdio::null());
        env(&mut cmd);
        let child = cmd.spawn().expect("incfsd run");
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        RunDaemon { child, socket: socket.to_path_buf(), metrics }
    }

    /// The supervisor's worker, once it has one other than `old` (within 30 s).
    pub fn worker_pid(&self, old: Option<u32>) -> u32 {
        let pid = self.child.id();
        let t = Instant::now();
        loop {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            let first = children.split_whitespace().next().and_then(|c| c.parse().ok());
            if let Some(w) = first.filter(|w| Some(*w) != old) {
                return w;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no new worker within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One counter from /metrics.
    pub fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        // The supervisor makes the socket; its worker serves the metrics a moment later.
        let t = Instant::now();
        let mut s = loop {
            match std::net::TcpStream::connect(("127.0.0.1", self.metrics)) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(10) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("metrics on port {}: {e}", self.metrics),
            }
        };
        write!(s, "GET /metrics HTTP/1.0\r\n\r\n").expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    /// SIGTERM, and wait for the daemon to exit (it writes its trace first).
    pub fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while self.child.try_wait().expect("wait").is_none() {
            assert!(t.elapsed() < Duration::from_secs(10), "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// nginx serving `root` on a loopback port, logging every request.
pub struct Nginx {
    child: Child,
    pub url: String,
    dir: tempfile::TempDir,
    /// The configuration, "@EXTRA@" standing for the server block's extra directives.
    template: String,
}

impl Nginx {
    /// `rate`: per-connection limit in bytes/s (nginx `limit_rate`), 0 for none.
    pub fn start(root: &Path, rate: u64) -> Nginx {
        Self::start_with(root, "", &format!("limit_rate {rate};"))
    }

    /// Over TLS with `ssl` (the `ssl_*` directives) if not empty, with `extra` directives in
    /// the server block (access checks, say; `reconfigure` replaces them).
    pub fn start_with(root: &Path, ssl: &str, extra: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let d = dir.path().display();
        let (listen, scheme) = if ssl.is_empty() { ("", "http") } else { (" ssl", "https") };
        let template = format!(
            "daemon off; master_process off; worker_processes 1; error_log {d}/error.log warn; pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  log_format counted '$status $body_bytes_sent \"$http_range\" $uri';
  access_log {d}/access.log counted;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  default_type application/octet-stream;
  keepalive_requests 100000;
  server {{ listen 127.0.0.1:{port}{listen}; {ssl} root {root}; @EXTRA@ location / {{ }} }}
}}",
            root = root.display()
        );
        std::fs::write(dir.path().join("nginx.conf"), template.replace("@EXTRA@", extra)).expect("conf");
        let child = Self::spawn(dir.path());
        let n = Nginx { child, url: format!("{scheme}://127.0.0.1:{port}"), dir, template };
        wait_for_port(port);
        n
    }

    /// Replaces the `extra` directives and restarts nginx on the same port. A restart, not
    /// a reload: a reload leaves open connections on the old configuration.
    pub fn reconfigure(&mut self, extra: &str) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::write(self.dir.path().join("nginx.conf"), self.template.replace("@EXTRA@", extra)).expect("conf");
        self.child = Self::spawn(self.dir.path());
        let port = self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
        wait_for_port(port);
    }

    fn spawn(dir: &Path) -> Child {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("nginx is not installed: run .ci/run or `apt-get install nginx-light`");
        Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start nginx")
    }

    /// (status, bytes sent, range, uri) per logged request.
    pub fn log(&self) -> Vec<(u16, u64, String, String)> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut it = l.splitn(3, ' ');
                let status = it.next()?.parse().ok()?;
                let bytes = it.next()?.parse().ok()?;
                let rest = it.next()?;
                let (range, uri) = rest.rsplit_once(' ')?;
                Some((status, bytes, range.trim_matches('"').to_string(), uri.to_string()))
            })
            .collect()
    }

    /// Waits (up to 5 s) until at least `n` blob requests are logged: nginx writes a
    /// request's log line after its last byte, which the client may have read before.
    #[allow(dead_code)]
    pub fn wait_blob_requests(&self, n: u64) {
        let t = Instant::now();
        while (self.log().iter().filter(|r| r.3.starts_with("/blobs/")).count() as u64) < n
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Body bytes sent for blobs (file data), all requests together.
    pub fn blob_bytes_sent(&self) -> u64 {
        self.log().iter().filter(|r| r.3.starts_with("/blobs/")).map(|r| r.1).sum()
    }

    /// The byte ranges served per blob, for overlap checks.
    pub fn blob_ranges(&self) -> Vec<(String, u64, u64)> {
        self.log()
            .iter()
            .filter(|r| r.3.starts_with("/blobs/") && r.0 == 206)
            .filter_map(|r| {
                let (a, b) = r.2.strip_prefix("bytes=")?.split_once('-')?;
                Some((r.3.clone(), a.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "server on port {port} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the fault server does with the next request for a blob.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    Status(u16),
    /// Sends part of the body, then breaks the connection.
    Reset,
    /// Waits this long before answering.
    Stall(Duration),
    /// Flips a byte in every 64 of the body: every stored block is hit.
    Corrupt,
}

#[derive(Default)]
pub struct FaultState {
    pub queue: Mutex<VecDeque<Fault>>,
    /// Applied to every blob request while set (after the queue is empty).
    pub always: Mutex<Option<Fault>>,
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    /// Set while the server is down: connections accepted before then are cut too.
    pub dead: std::sync::atomic::AtomicBool,
}

/// An HTTP server for a store that can be told to misbehave, stopped and started again.
pub struct FaultServer {
    pub state: Arc<FaultState>,
    pub addr: SocketAddr,
    store: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FaultServer {
    pub async fn start(store: &Path) -> FaultServer {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut s =
            FaultServer { state: Arc::new(FaultState::default()), addr, store: store.to_path_buf(), task: None };
        s.up().await;
        s
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening: new connections are refused, and requests on connections a client
    /// kept alive from before are cut off.
    pub fn down(&mut self) {
        self.state.dead.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub async fn up(&mut self) {
        self.state.dead.store(false, Ordering::SeqCst);
        let state = self.state.clone();
        let app =
            incfs::serve::router(&self.store).layer(axum::middleware::from_fn(move |req: Request, next: Next| {
                let state = state.clone();
                async move { inject(state, req, next).await }
            }));
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebind {}: {e}", self.addr),
            }
        };
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    pub fn push(&self, f: Fault) {
        self.state.queue.lock().expect("lock").push_back(f);
    }

    pub fn set_always(&self, f: Option<Fault>) {
        *self.state.always.lock().expect("lock") = f;
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.down();
    }
}

async fn inject(state: Arc<FaultState>, req: Request, next: Next) -> Response {
    if state.dead.load(Ordering::SeqCst) {
        let stream = futures::stream::iter(vec![Err::<bytes::Bytes, _>(std::io::Error::other("server is down"))]);
        return (StatusCode::SERVICE_UNAVAILABLE, Body::from_stream(stream)).into_response();
    }
    let is_blob = req.uri().path().starts_with("/blobs/");
    let fault = if is_blob {
        state.requests.fetch_add(1, Ordering::Relaxed);
        let q = state.queue.lock().expect("lock").pop_front();
        q.or(*state.always.lock().expect("lock"))
    } else {
        None
    };
    match fault {
        Some(Fault::Status(s)) => {
            return StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR).into_response()
        }
        Some(Fault::Stall(d)) => tokio::time::sleep(d).await,
        _ => {}
    }
    let resp = next.run(req).await;
    let (parts, body) = resp.into_parts();
    let Ok(mut bytes) = axum::body::to_bytes(body, 1 << 30).await.map(|b| b.to_vec()) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if is_blob {
        state.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    match fault {
        Some(Fault::Corrupt) => {
            for b in bytes.iter_mut().step_by(64) {
                *b ^= 0x5a;
            }
            Response::from_parts(parts, Body::from(bytes))
        }
        Some(Fault::Reset) => {
            let half = bytes[..bytes.len() / 2].to_vec();
            let stream =
                futures::stream::iter(vec![Ok(bytes::Bytes::from(half)), Err(std::io::Error::other("injected reset"))]);
            Response::from_parts(parts, Body::from_stream(stream))
        }
        _ => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
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
pub fn compressible(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut i = seed;
    while out.len() < len {
        out.extend_from_slice(format!("line {i} of a compressible file\n").as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Starts `incfsd` with `args` and returns once it has printed its ready line
/// (`incfsd: serving ...`); its stderr is copied to the test's from then on.
pub fn start_until_ready(args: &[&std::ffi::OsStr]) -> Child {
    use std::io::BufRead;
    let mut child = Command::new(INCFSD).args(args).stderr(Stdio::piped()).spawn().expect("incfsd");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = std::io::BufReader::new(stderr).lines();
    loop {
        let line = lines.next().expect("incfsd exited before it was ready").expect("stderr");
        if line.starts_with("incfsd: serving") {
            break;
        }
    }
    // Keep draining stderr so that the daemon never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(|l| eprintln!("incfsd> {}", l.unwrap_or_default())));
    child
}

/// GET `path` from a local HTTP server: the whole response, headers included.
pub fn http_get_local(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// Packs `src` into a directory store with the default options (format version 3).
#[allow(dead_code)]
pub fn pack_default(src: &std::path::Path, store: &std::path::Path) -> incfs::image::ImageId {
    incfs::pack::pack(src, &incfs::store::Store::new(store), &incfs::pack::PackOptions::default()).expect("pack").0
}

/// An engine on image `id` from `url`, with its cache in `cache`.
#[allow(dead_code)]
pub async fn open_engine(
    url: &str,
    id: incfs::image::ImageId,
    cache: &std::path::Path,
    cfg: incfs::engine::EngineConfig,
) -> std::sync::Arc<incfs::engine::Engine> {
    let remote = incfs::store::Remote::open(url, cfg.attempt_timeout).expect("remote");
    let cache = std::sync::Arc::new(incfs::cache::BlockCache::open(cache).expect("cache"));
    incfs::engine::Engine::open(remote, id, cache, cfg).await.expect("engine")
}
