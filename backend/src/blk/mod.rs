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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::runtime::Handle;

use crate::daemon::{self, DaemonConfig, DeviceServer, Error, Result};
use crate::engine::Engine;
use crate::metrics::{Metrics, Snapshot};

pub use device::{BlkDeviceConfig, BlkServer, ServerStopper};
pub use disk::Disk;

#[derive(Clone, Debug)]
pub struct BlkConfig {
    pub daemon: DaemonConfig,
    pub disk: DiskConfig,
}

/// What the block device adds to the daemon: which file is the disk, and its overlay.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// The disk image's path inside the image.
    pub path: String,
    pub overlay: Option<PathBuf>,
    /// The destination of a live migration: the overlay is taken from the source's daemon
    /// when the frontend starts the device, not at start-up.
    pub incoming: bool,
    pub device: BlkDeviceConfig,
}

/// Serves the disk until SIGINT/SIGTERM. Reads served by the overlay are not engine reads
/// and are not recorded in a trace.
pub fn run(cfg: BlkConfig) -> Result<()> {
    // Read while /proc is still there (the sandbox hides it): the overlay's unflushed record
    // is only trusted in the boot that wrote it.
    overlay::boot_id();
    daemon::serve_device::<BlkDevice>(cfg.daemon, cfg.disk)
}

struct BlkDevice {
    disk: Arc<Disk>,
    path: String,
    device: BlkDeviceConfig,
}

impl daemon::Device for BlkDevice {
    type Config = DiskConfig;
    type Server = BlkServer;
    const THREAD_NAME: &'static str = "incfsd-blk-io";

    fn open(cfg: DiskConfig, engine: Arc<Engine>) -> Result<Self> {
        let image = engine.image().id;
        let disk = Arc::new(Disk::new(engine, &cfg.path, cfg.overlay.as_deref(), cfg.incoming)?);
        tracing::info!(%image, path = %cfg.path, bytes = disk.size(), writable = disk.writable(), "disk loaded");
        Ok(BlkDevice { disk, path: cfg.path, device: cfg.device })
    }

    fn bind(&self, socket: &Path, rt: Handle) -> Result<BlkServer> {
        BlkServer::bind(socket, self.disk.clone(), self.device, rt).map_err(Error::Blk)
    }

    fn register_metrics(&self, metrics: &mut Metrics) {
        metrics.register(DiskSnapshot(self.disk.clone()));
    }

    fn ready_line(&self, cfg: &DaemonConfig) -> String {
        format!(
            "incfsd: serving {} of image {} ({} bytes, {}) on {}",
            self.path,
            cfg.image,
            self.disk.size(),
            if self.disk.writable() { "overlay" } else { "read-only" },
            cfg.socket.display()
        )
    }

    fn finish(&self) {
        // Whatever the guest wrote and did not flush is kept as well as we can.
        if let Err(e) = self.disk.flush() {
            tracing::warn!("final overlay flush: {e}");
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.disk.counters.snapshot()
    }
}

impl DeviceServer for BlkServer {
    fn stopper(&self) -> ServerStopper {
        BlkServer::stopper(self)
    }

    fn serve_one(&mut self) -> Result<bool> {
        BlkServer::serve_one(self).map_err(Error::Blk)
    }
}

/// The device's counters, the disk's size and, with an overlay, how many blocks it holds.
struct DiskSnapshot(Arc<Disk>);

impl Snapshot for DiskSnapshot {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.0.counters.snapshot()
    }

    fn gauges(&self) -> Vec<(&'static str, u64)> {
        let mut gauges = vec![("blk_disk_bytes", self.0.size())];
        if let Some(o) = self.0.overlay() {
            gauges.push(("blk_overlay_blocks", o.overlaid_blocks()));
        }
        gauges
    }
}
