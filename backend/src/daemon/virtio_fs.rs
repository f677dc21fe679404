//! `incfsd run`: the image as a vhost-user virtio-fs device.

use std::path::Path;
use std::sync::Arc;

use incfs_fuse::{VirtioFsConfig, VirtioFsServer};
use incfs_vhost::ServerStopper;
use tokio::runtime::Handle;

use super::{serve_device, DaemonConfig, Device, DeviceServer, Result};
use crate::engine::Engine;
use crate::fs::MountFs;

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub daemon: DaemonConfig,
    /// Queues, queue threads and polling.
    pub device: VirtioFsConfig,
}

/// Serves the image as a virtio-fs device until SIGINT/SIGTERM.
pub fn run(cfg: RunConfig) -> Result<()> {
    serve_device::<FsDevice>(cfg.daemon, cfg.device)
}

struct FsDevice {
    fs: Arc<MountFs>,
    engine: Arc<Engine>,
    cfg: VirtioFsConfig,
}

impl Device for FsDevice {
    type Config = VirtioFsConfig;
    type Server = VirtioFsServer;
    const THREAD_NAME: &'static str = "incfsd-io";

    fn open(cfg: VirtioFsConfig, engine: Arc<Engine>) -> Result<Self> {
        let img = engine.image();
        tracing::info!(image = %img.id, inodes = img.manifest.inodes.len(), bytes = img.data_size(), "image loaded");
        Ok(FsDevice { fs: Arc::new(MountFs::new(engine.clone())), engine, cfg })
    }

    fn bind(&self, socket: &Path, rt: Handle) -> Result<VirtioFsServer> {
        Ok(VirtioFsServer::bind(socket, self.fs.clone(), self.cfg, rt)?)
    }

    fn ready_line(&self, cfg: &DaemonConfig) -> String {
        format!("incfsd: serving image {} on {}", cfg.image, cfg.socket.display())
    }

    fn finish(&self) {
        self.engine.flush_stats();
    }
}

impl DeviceServer for VirtioFsServer {
    fn stopper(&self) -> ServerStopper {
        VirtioFsServer::stopper(self)
    }

    fn serve_one(&mut self) -> Result<bool> {
        Ok(VirtioFsServer::serve_one(self)?)
    }
}
