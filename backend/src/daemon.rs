//! `incfsd run`: the vhost-user-fs daemon. Owns the runtime, the engine, the metrics endpoint
//! and the device server; serves one frontend after another until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use incfs_fuse::{DeviceConfig, VirtioFsServer};

use crate::cache::{BlockCache, CacheOptions};
use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::fs::ImageFs;
use crate::image::ImageId;
use crate::metrics;
use crate::store::Remote;

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub socket: PathBuf,
    pub store: String,
    pub image: ImageId,
    pub cache: PathBuf,
    /// Shared cache size limit in bytes (LRU eviction), None for unbounded.
    pub cache_size: Option<u64>,
    pub engine: EngineConfig,
    /// Request queues offered to the guest.
    pub queues: usize,
    /// Threads serving the queues, and as many runtime workers for fetches.
    pub threads: usize,
    pub metrics: Option<SocketAddr>,
}

pub fn run(cfg: RunConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(1))
        .thread_name("incfsd-io")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start runtime", e))?;
    let remote = Remote::open(&cfg.store, cfg.engine.attempt_timeout)?;
    let cache = Arc::new(BlockCache::open_with(&cfg.cache, CacheOptions { limit_bytes: cfg.cache_size })?);
    let engine = rt.block_on(Engine::open(remote, cfg.image, cache, cfg.engine.clone()))?;
    let img = engine.image();
    tracing::info!(image = %img.id, inodes = img.manifest.inodes.len(), bytes = img.data_size(), "image loaded");

    if let Some(addr) = cfg.metrics {
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).map_err(|e| Error::io(format!("metrics listen on {addr}"), e))?;
        rt.spawn(metrics::serve(listener, engine.clone()));
    }

    let fs = Arc::new(ImageFs::new(engine.clone()));
    let dev = DeviceConfig { request_queues: cfg.queues.max(1), threads: cfg.threads.clamp(1, cfg.queues.max(1)), ..DeviceConfig::default() };
    let mut server = VirtioFsServer::bind(&cfg.socket, fs, dev, rt.handle().clone()).map_err(|e| Error::Invalid(e.to_string()))?;
    let stopper = server.stopper();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else { return };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received, stopping");
        stopper.stop();
    });
    // Ready: tests and scripts wait for this line before starting the VM.
    eprintln!("incfsd: serving image {} on {}", cfg.image, cfg.socket.display());
    loop {
        match server.serve_one() {
            Ok(true) => tracing::info!("frontend gone; waiting for the next one"),
            Ok(false) => break,
            Err(e) => return Err(Error::Invalid(format!("vhost-user: {e}"))),
        }
    }
    for (k, v) in engine.counters.snapshot() {
        tracing::info!("{k} {v}");
    }
    Ok(())
}
