//! `incfsd blk`: one regular file of an image (a raw disk image: ext4, erofs, an Android
//! system.img) served as a vhost-user-blk device, fetched lazily through the block engine,
//! read-only or with a per-VM copy-on-write overlay. See docs/vhost-user-blk.md.
//!
//! - [`request`]: virtio-blk wire format, chain walking and validation.
//! - [`overlay`]: the crash-safe copy-on-write overlay file.
//! - [`disk`]: engine + overlay, sync (never waits) and async forms of every operation.
//! - [`device`]: the vhost-user backend and the socket server.

pub mod device;
pub mod disk;
pub mod overlay;
pub mod request;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::image::ImageId;

pub use device::{BlkServer, DeviceConfig, ServerStopper};
pub use disk::Disk;

#[derive(Clone, Debug)]
pub struct BlkConfig {
    pub socket: PathBuf,
    pub store: String,
    pub image: ImageId,
    /// The disk image's path inside the image.
    pub path: String,
    pub cache: PathBuf,
    /// Limit of the shared cache (None: unbounded).
    pub cache_size: Option<u64>,
    pub overlay: Option<PathBuf>,
    pub engine: EngineConfig,
    pub device: DeviceConfig,
    pub metrics: Option<SocketAddr>,
    /// Record the order of first reads here (reads served by the overlay are not engine
    /// reads and are not recorded).
    pub record_trace: Option<PathBuf>,
    pub background: crate::daemon::Background,
}

/// Prometheus text: the engine's counters, then the device's.
pub fn render_metrics(disk: &Disk) -> String {
    let mut out = crate::metrics::render(disk.engine());
    for (name, v) in disk.counters.snapshot() {
        let _ = writeln!(out, "# TYPE incfs_{name}_total counter\nincfs_{name}_total {v}");
    }
    let _ = writeln!(out, "# TYPE incfs_blk_disk_bytes gauge\nincfs_blk_disk_bytes {}", disk.size());
    if let Some(o) = disk.overlay() {
        let _ =
            writeln!(out, "# TYPE incfs_blk_overlay_blocks gauge\nincfs_blk_overlay_blocks {}", o.overlaid_blocks());
    }
    out
}

async fn serve_metrics(listener: tokio::net::TcpListener, disk: Arc<Disk>) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let d = disk.clone();
            async move { render_metrics(&d) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server: {e}");
    }
}

/// Runs the daemon: serves one frontend after another until SIGINT/SIGTERM.
pub fn run(cfg: BlkConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.device.threads.max(2))
        .thread_name("incfsd-blk-io")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start runtime", e))?;
    let engine = rt.block_on(Engine::connect(&cfg.store, cfg.image, &cfg.cache, cfg.cache_size, cfg.engine.clone()))?;
    let disk = Arc::new(Disk::new(engine, &cfg.path, cfg.overlay.as_deref())?);
    tracing::info!(image = %cfg.image, path = %cfg.path, bytes = disk.size(), writable = disk.writable(), "disk loaded");
    crate::daemon::start_record_and_replay(&rt, disk.engine(), cfg.record_trace.clone(), &cfg.background)?;

    if let Some(addr) = cfg.metrics {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| Error::io(format!("metrics listen on {addr}"), e))?;
        rt.spawn(serve_metrics(listener, disk.clone()));
    }

    let mut server = BlkServer::bind(&cfg.socket, disk.clone(), cfg.device, rt.handle().clone())?;
    crate::daemon::stop_on_signals(&rt, server.stopper());
    // Ready: tests and scripts wait for this line before starting the VM.
    eprintln!(
        "incfsd: serving {} of image {} ({} bytes, {}) on {}",
        cfg.path,
        cfg.image,
        disk.size(),
        if disk.writable() { "overlay" } else { "read-only" },
        cfg.socket.display()
    );
    let res = loop {
        match server.serve_one() {
            Ok(true) => tracing::info!("frontend gone; waiting for the next one"),
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    // Whatever the guest wrote and did not flush is kept as well as we can.
    if let Err(e) = disk.flush() {
        tracing::warn!("final overlay flush: {e}");
    }
    if let Some(path) = &cfg.record_trace {
        crate::daemon::write_trace(disk.engine(), path, &mut 0);
    }
    for (k, v) in disk.engine().counters.snapshot().into_iter().chain(disk.counters.snapshot()) {
        tracing::info!("{k} {v}");
    }
    res
}
