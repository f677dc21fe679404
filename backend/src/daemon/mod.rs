//! The daemon behind `incfsd run` and `incfsd blk`: one runner owns the runtime, the engine,
//! record and replay, the metrics endpoint, signal handling and the serve loop; a [`Device`]
//! supplies only what differs (the server it binds, its metrics, its final flush).

mod error;
mod record;
mod virtio_fs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use incfs_vhost::ServerStopper;
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use tokio::runtime::Handle;

use crate::engine::{Engine, EngineConfig};
use crate::image::ImageId;
use crate::metrics::{self, EngineSnapshot, Metrics, SourceSnapshot};
use crate::sandbox::{self, Access, FsSandbox, Reachable, Sandbox, SandboxConfig};

pub use error::{Error, Result};
pub use record::{Background, FetchAll, Prefetch};
pub use virtio_fs::{run, run_worker, RunConfig};

/// What every device daemon needs: the image and where it comes from, the engine, the
/// metrics address, and what to fetch or record in the background.
#[derive(Clone)]
pub struct DaemonConfig {
    /// vhost-user socket to listen on.
    pub socket: PathBuf,
    pub store: String,
    pub image: ImageId,
    pub cache: PathBuf,
    /// Shared cache size limit in bytes (LRU eviction), None for unbounded.
    pub cache_size: Option<u64>,
    pub engine: EngineConfig,
    /// Runtime worker threads (fetches, the device's async work).
    pub worker_threads: usize,
    pub metrics: Option<SocketAddr>,
    /// When the daemon was started ([`crate::engine::monotonic_ns`]): this process's start,
    /// or its supervisor's; the time to ready counts from it.
    pub started_ns: u64,
    /// Record the order of first reads here.
    pub record_trace: Option<PathBuf>,
    pub background: Background,
    pub sandbox: SandboxConfig,
    /// Paths the device opens by name besides the daemon's own (the blk overlay's
    /// directory): they stay reachable inside the sandbox.
    pub device_paths: Vec<Reachable>,
}

/// The store's URL is shown as logs show it: a signed URL's query is a secret.
impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("socket", &self.socket)
            .field("store", &crate::store::redact_store(&self.store))
            .field("image", &self.image)
            .field("cache", &self.cache)
            .field("cache_size", &self.cache_size)
            .field("engine", &self.engine)
            .field("worker_threads", &self.worker_threads)
            .field("metrics", &self.metrics)
            .field("started_ns", &self.started_ns)
            .field("record_trace", &self.record_trace)
            .field("background", &self.background)
            .field("sandbox", &self.sandbox)
            .field("device_paths", &self.device_paths)
            .finish()
    }
}

impl DaemonConfig {
    /// The paths the daemon opens by name once sandboxed (made absolute, as the sandbox
    /// may change the root): the cache (created if missing), the socket's directory, the
    /// recorded trace's directory, a local store, a trace file to replay, the resolver's
    /// files for an HTTP store, and the device's.
    fn reachable_paths(&mut self) -> Result<Vec<Reachable>> {
        let absolute = |p: &Path| std::path::absolute(p).map_err(|e| Error::io(format!("resolve {}", p.display()), e));
        let dir_of =
            |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).map_or(PathBuf::from("."), Path::to_path_buf);
        let mut paths = Vec::new();
        let mut keep =
            |what, path: PathBuf, access, while_serving| paths.push(Reachable { what, path, access, while_serving });

        self.cache = absolute(&self.cache)?;
        // Created as the cache itself would (0700, checked): it must exist to be kept.
        crate::cache::create_private_dir(&self.cache)
            .map_err(|e| Error::io(format!("create cache {}", self.cache.display()), e))?;
        keep("the cache", self.cache.clone(), Access::ReadWrite, false);
        self.socket = absolute(&self.socket)?;
        keep("the socket's directory", dir_of(&self.socket), Access::ReadWrite, false);
        if let Some(t) = &mut self.record_trace {
            *t = absolute(t)?;
            keep("the recorded trace's directory", dir_of(t), Access::ReadWrite, true);
        }
        let registry = crate::store::oci::OciRef::parse(&self.store).ok().flatten().is_some();
        let is_url = |s: &str| ["http://", "https://", "s3://"].iter().any(|p| s.starts_with(p));
        if registry || is_url(&self.store) || self.engine.http.mirrors.iter().any(|m| is_url(m)) {
            if self.sandbox.fs == FsSandbox::Chroot && !store_host_is_an_address(&self.store) {
                tracing::warn!(
                    store = %crate::store::redact_store(&self.store),
                    "--sandbox chroot: new connections to the store cannot resolve its host name; give an address"
                );
            }
            for f in sandbox::RESOLVER_FILES.iter().map(Path::new).filter(|f| f.exists()) {
                keep("a resolver file", f.to_path_buf(), Access::ReadOnly, false);
            }
            if let Some(f) = crate::store::system_ca_file().filter(|f| f.is_file()) {
                keep("the system CA bundle", absolute(&f)?, Access::ReadOnly, false);
            }
            let http = &mut self.engine.http;
            for f in http.ca_files.iter_mut().chain(&mut http.client_cert).chain(&mut http.client_key) {
                *f = absolute(f)?;
                keep("a CA, certificate or key file", f.clone(), Access::ReadOnly, false);
            }
            if let Some(t) = &mut http.bearer_token_file {
                // Its directory, not the file: a token rotated by rename is a new file.
                *t = absolute(t)?;
                keep("the bearer token file's directory", dir_of(t), Access::ReadOnly, true);
            }
            if registry {
                // Read when the store is opened: the default file is named, so it is kept.
                if http.registry_auth.is_none() {
                    http.registry_auth = crate::store::oci::default_credentials_file();
                }
                if let Some(f) = &mut http.registry_auth {
                    *f = absolute(f)?;
                    keep("the registry credentials file", f.clone(), Access::ReadOnly, false);
                }
            }
            if self.store.starts_with("s3://") || http.mirrors.iter().any(|m| m.starts_with("s3://")) {
                // Directories, read while serving: rotated credentials are new files.
                for f in crate::store::s3::credential_files() {
                    let d = dir_of(&absolute(&f)?);
                    if d.is_dir() {
                        keep("the AWS credentials' directory", d, Access::ReadOnly, true);
                    }
                }
            }
        }
        // Mirrors that are store directories.
        for m in self.engine.http.mirrors.iter_mut().filter(|m| !is_url(m)) {
            let dir = absolute(Path::new(m.as_str()))?;
            *m = dir.to_string_lossy().into_owned();
            keep("a mirror", dir, Access::ReadOnly, true);
        }
        if !registry && !is_url(&self.store) {
            let store = absolute(Path::new(&self.store))?;
            self.store = store.to_string_lossy().into_owned();
            keep("the store", store, Access::ReadOnly, true);
        }
        if let Prefetch::File(t) = &mut self.background.trace {
            *t = absolute(t)?;
            keep("the trace to prefetch", t.clone(), Access::ReadOnly, false);
        }
        paths.extend(self.device_paths.iter().cloned());
        for r in paths.iter().filter(|r| r.access == Access::ReadWrite && r.path.parent().is_none()) {
            tracing::warn!(
                "{} is /: the whole filesystem stays writable in the sandbox; use a directory of its own",
                r.what
            );
        }
        Ok(paths)
    }
}

/// Whether an HTTP store's URL names its host by address (no resolver needed).
fn store_host_is_an_address(url: &str) -> bool {
    let host = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok()
}

/// A vhost-user device served by [`serve_device`]: built on the connected engine, it binds
/// its server and adds its own metrics, ready line and final flush.
pub trait Device: Sized {
    /// What the device needs besides the engine.
    type Config;
    type Server: DeviceServer;
    /// Names the runtime's threads.
    const THREAD_NAME: &'static str;

    fn open(cfg: Self::Config, engine: Arc<Engine>) -> Result<Self>;
    fn bind(&self, socket: &Path, rt: Handle) -> Result<Self::Server>;
    /// Adds the device's metrics after the engine's.
    fn register_metrics(&self, _metrics: &mut Metrics) {}
    /// A metrics listener bound by someone else (a supervisor), to serve instead of binding.
    fn metrics_listener(&self) -> Option<std::net::TcpListener> {
        None
    }
    /// The line printed on stderr once the socket listens: tests and scripts wait for it.
    fn ready_line(&self, cfg: &DaemonConfig) -> String;
    /// After the last frontend, before the trace is written: keep what must be kept.
    fn finish(&self);
    /// The device's own counters, logged at exit after the engine's.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// The socket server of a device: serves one frontend after another until stopped.
pub trait DeviceServer {
    fn stopper(&self) -> ServerStopper;
    /// Serves one frontend until it disconnects: true, or false once stopped.
    fn serve_one(&mut self) -> Result<bool>;
    /// Says the daemon serves: the device's ready line on stderr.
    fn announce_ready(&mut self, line: &str) {
        eprintln!("{line}");
    }
}

/// Runs a device daemon until SIGINT/SIGTERM stops it (a second signal exits at once).
pub fn serve_device<D: Device>(mut cfg: DaemonConfig, device_cfg: D::Config) -> Result<()> {
    // Before any thread: namespaces, Landlock and capabilities are per thread.
    let paths = cfg.reachable_paths()?;
    let sandbox = Sandbox::enter(&cfg.sandbox, &paths)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads.max(1))
        .thread_name(D::THREAD_NAME)
        .enable_all()
        .build()
        .map_err(|e| Error::io("start runtime", e))?;
    let engine = rt.block_on(Engine::connect(&cfg.store, cfg.image, &cfg.cache, cfg.cache_size, cfg.engine.clone()))?;
    engine.startup.set_started(cfg.started_ns);
    let device = D::open(device_cfg, engine.clone())?;

    record::start_record_and_replay(&rt, &engine, cfg.record_trace.clone(), &cfg.background)?;

    if let Some(addr) = cfg.metrics {
        let mut metrics = Metrics::new();
        metrics.register(EngineSnapshot(engine.clone()));
        if let Some(sources) = SourceSnapshot::new(engine.clone()) {
            metrics.register(sources);
        }
        device.register_metrics(&mut metrics);
        let listener = match device.metrics_listener() {
            Some(l) => l
                .set_nonblocking(true)
                .and_then(|()| {
                    let _guard = rt.enter();
                    tokio::net::TcpListener::from_std(l)
                })
                .map_err(|e| Error::io("serve the supervisor's metrics listener", e))?,
            None => rt
                .block_on(tokio::net::TcpListener::bind(addr))
                .map_err(|e| Error::io(format!("metrics listen on {addr}"), e))?,
        };
        rt.spawn(metrics::run_http_endpoint(listener, Arc::new(metrics)));
    }

    rt.spawn(give_back_idle_memory(engine.clone()));
    let mut server = device.bind(&cfg.socket, rt.handle().clone())?;
    stop_on_signals(server.stopper())?;
    // Everything is open and every thread but the frontend's runs: lock before serving.
    sandbox.lock()?;
    engine.startup.mark_ready();
    server.announce_ready(&device.ready_line(&cfg));
    let served = loop {
        match server.serve_one() {
            Ok(true) => tracing::info!("frontend gone; waiting for the next one"),
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    device.finish();
    if let Some(path) = &cfg.record_trace {
        record::write_trace(&engine, path, 0);
    }
    for (k, v) in engine.counters.snapshot().into_iter().chain(device.counters()) {
        tracing::info!("{k} {v}");
    }
    served
}

/// Hands memory the daemon holds without using back to the kernel now and then:
/// - freed heap pages: a miss allocates and frees a plaintext buffer per block between the
///   engine's long-lived tables, and glibc returns only the top of its heaps by itself, so
///   the freed pages in between would stay resident for the daemon's life;
/// - the mapped pages of the cache's slot records (page cache every daemon on the cache
///   shares), which otherwise count every record ever read in this daemon's memory.
async fn give_back_idle_memory(engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory; it takes the allocator's own locks.
        unsafe {
            libc::malloc_trim(0);
        }
        if let Err(e) = engine.cache().release_record_pages() {
            tracing::debug!("cannot release the cache's record pages: {e}");
        }
    }
}

/// Longest wait of a draining worker for the requests it took.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Stops `server` on the first SIGINT or SIGTERM. Shutdown waits for the frontend to let
/// go and for the final flush and trace; a second signal exits at once, with 128 + its
/// number as a shell reports a process killed by it, for when that takes too long. The
/// signals are taken on a thread of their own, so that they work even when the runtime is
/// stuck.
///
/// SIGUSR1 hands over to a successor (the supervisor's upgrade): take nothing more from the
/// rings, wait up to [`DRAIN_TIMEOUT`] for what was taken, and exit at once, without a device
/// reset, so that the FUSE session and the inflight marks stay for the successor.
fn stop_on_signals(server: ServerStopper) -> Result<()> {
    let mut drain = Signals::new([SIGUSR1]).map_err(|e| Error::io("handle SIGUSR1", e))?;
    let drainer = server.clone();
    std::thread::Builder::new()
        .name("incfsd-drain".into())
        .spawn(move || {
            if drain.forever().next().is_some() {
                let left = drainer.drain(DRAIN_TIMEOUT);
                tracing::info!(left_in_flight = left, "drained for a successor; exiting");
                std::process::exit(0);
            }
        })
        .map_err(|e| Error::io("start the drain thread", e))?;
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(|e| Error::io("handle SIGTERM and SIGINT", e))?;
    std::thread::Builder::new()
        .name("incfsd-signals".into())
        .spawn(move || {
            let mut signals = signals.forever();
            if signals.next().is_none() {
                return;
            }
            tracing::info!("signal received, stopping");
            server.stop();
            if let Some(second) = signals.next() {
                eprintln!("incfsd: second signal, exiting without finishing the shutdown");
                std::process::exit(128 + second);
            }
        })
        .map_err(|e| Error::io("start the signal thread", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_hosts_given_by_address() {
        assert!(store_host_is_an_address("http://127.0.0.1:8080/store"));
        assert!(store_host_is_an_address("https://[::1]:8443"));
        assert!(!store_host_is_an_address("https://images.example.com/store"));
    }

    #[test]
    fn an_https_store_keeps_its_tls_files_and_the_token_directory() {
        let t = tempfile::tempdir().expect("tmp");
        let mut cfg = DaemonConfig {
            socket: t.path().join("fs.sock"),
            store: "https://127.0.0.1:8443/store?sig=1".into(),
            image: "0000000000000000000000000000000000000000000000000000000000000000".parse().expect("id"),
            cache: t.path().join("cache"),
            cache_size: None,
            engine: EngineConfig::default(),
            worker_threads: 1,
            metrics: None,
            started_ns: 0,
            record_trace: None,
            background: Background { trace: Prefetch::None, fetch_all: None },
            sandbox: SandboxConfig::default(),
            device_paths: Vec::new(),
        };
        cfg.engine.http.ca_files = vec![t.path().join("ca.pem")];
        cfg.engine.http.client_key = Some(t.path().join("key.pem"));
        cfg.engine.http.bearer_token_file = Some(t.path().join("secrets/token"));
        let paths = cfg.reachable_paths().expect("paths");
        let kept = |p: PathBuf| paths.iter().find(|r| r.path == p).map(|r| (r.access, r.while_serving));
        assert_eq!(kept(t.path().join("ca.pem")), Some((Access::ReadOnly, false)));
        assert_eq!(kept(t.path().join("key.pem")), Some((Access::ReadOnly, false)));
        assert_eq!(kept(t.path().join("secrets")), Some((Access::ReadOnly, true)), "the directory, read while serving");
        assert!(kept(t.path().join("secrets/token")).is_none(), "not the file: a rotated token is a new file");
        let shown = format!("{cfg:?}");
        assert!(shown.contains("https://127.0.0.1:8443/store") && !shown.contains("sig=1"), "{shown}");
    }
}
