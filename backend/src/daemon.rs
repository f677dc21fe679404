//! `incfsd run`: the vhost-user-fs daemon. Owns the runtime, the engine, the metrics endpoint
//! and the device server; serves one frontend after another until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use incfs_fuse::{DeviceConfig, VirtioFsServer};
use incfs_vhost::ServerStopper;

use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::fs::ImageFs;
use crate::image::ImageId;
use crate::metrics;
use crate::trace;

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
    /// Longest adaptive poll of a queue that ran dry.
    pub poll_max: std::time::Duration,
    pub metrics: Option<SocketAddr>,
    /// Record the order of first reads here.
    pub record_trace: Option<PathBuf>,
    pub background: Background,
}

/// What a daemon fetches on its own from start-up, in this order; demand reads always go
/// first.
#[derive(Clone, Debug)]
pub struct Background {
    pub trace: Prefetch,
    pub fetch_all: Option<FetchAll>,
}

/// Which trace to replay from start-up.
#[derive(Clone, Debug)]
pub enum Prefetch {
    None,
    /// The one published beside the image (STORE/traces/ID), if any.
    Published,
    File(PathBuf),
}

/// Fetch every block of the image, at most `rate` bytes per second (None: no cap).
#[derive(Clone, Debug)]
pub struct FetchAll {
    pub rate: Option<u64>,
}

/// The trace to replay, read and checked now so that a bad one fails start-up.
async fn load_trace(engine: &Arc<Engine>, how: &Prefetch) -> Result<Vec<trace::Range>> {
    let text = match how {
        Prefetch::None => return Ok(Vec::new()),
        Prefetch::File(p) => {
            tokio::fs::read_to_string(p).await.map_err(|e| Error::io(format!("read trace {}", p.display()), e))?
        }
        Prefetch::Published => match engine.remote().trace(&engine.image().id).await {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(Vec::new()),
            Err(e) => {
                tracing::warn!("no published trace: {e}");
                return Ok(Vec::new());
            }
        },
    };
    let (ranges, skipped) = trace::parse(engine.image(), &text)?;
    let blocks: u64 = ranges.iter().map(|r| r.2 as u64).sum();
    tracing::info!(runs = ranges.len(), blocks, skipped, "prefetching a trace");
    Ok(ranges)
}

/// Starts recording first reads (rewriting `record` every 2 s), then the background
/// fetches, as configured; shared by the virtio-fs and the block daemon. Call
/// `write_trace` at the end.
pub(crate) fn start_record_and_replay(
    rt: &tokio::runtime::Runtime,
    engine: &Arc<Engine>,
    record: Option<PathBuf>,
    background: &Background,
) -> Result<()> {
    if let Some(path) = record {
        engine.start_recording();
        let e = engine.clone();
        rt.spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                write_trace(&e, &path, &mut last);
            }
        });
    }
    let ranges = rt.block_on(load_trace(engine, &background.trace))?;
    let fetch_all = background.fetch_all.clone();
    let e = engine.clone();
    rt.spawn(async move {
        let start = std::time::Instant::now();
        if !ranges.is_empty() {
            let asked = e.prefetch(ranges, None).await;
            tracing::info!(asked, secs = start.elapsed().as_secs_f64(), "trace prefetch issued");
        }
        if let Some(FetchAll { rate }) = fetch_all {
            let asked = e.fetch_all(rate).await;
            tracing::info!(asked, secs = start.elapsed().as_secs_f64(), rate, "whole-image fetch issued");
        }
    });
    Ok(())
}

/// Stops `server` on SIGINT or SIGTERM.
pub(crate) fn stop_on_signals(rt: &tokio::runtime::Runtime, server: ServerStopper) {
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received, stopping");
        server.stop();
    });
}

/// Writes the recorded trace now and then, and once more at the end.
pub(crate) fn write_trace(engine: &Engine, path: &std::path::Path, last_len: &mut usize) {
    let Some((len, text)) = engine.recorded_trace() else { return };
    if len == *last_len {
        return;
    }
    let tmp = path.with_extension("tmp");
    match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => *last_len = len,
        Err(e) => tracing::warn!("writing trace {}: {e}", path.display()),
    }
}

pub fn run(cfg: RunConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(1))
        .thread_name("incfsd-io")
        .enable_all()
        .build()
        .map_err(|e| Error::io("start runtime", e))?;
    let engine = rt.block_on(Engine::connect(&cfg.store, cfg.image, &cfg.cache, cfg.cache_size, cfg.engine.clone()))?;
    let img = engine.image();
    tracing::info!(image = %img.id, inodes = img.manifest.inodes.len(), bytes = img.data_size(), "image loaded");

    start_record_and_replay(&rt, &engine, cfg.record_trace.clone(), &cfg.background)?;

    if let Some(addr) = cfg.metrics {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .map_err(|e| Error::io(format!("metrics listen on {addr}"), e))?;
        rt.spawn(metrics::serve(listener, engine.clone()));
    }

    let fs = Arc::new(ImageFs::new(engine.clone()));
    let dev = DeviceConfig {
        request_queues: cfg.queues.max(1),
        threads: cfg.threads.clamp(1, cfg.queues.max(1)),
        poll_max: cfg.poll_max,
        ..DeviceConfig::default()
    };
    let mut server =
        VirtioFsServer::bind(&cfg.socket, fs, dev, rt.handle().clone()).map_err(|e| Error::Invalid(e.to_string()))?;
    stop_on_signals(&rt, server.stopper());
    // Ready: tests and scripts wait for this line before starting the VM.
    eprintln!("incfsd: serving image {} on {}", cfg.image, cfg.socket.display());
    loop {
        match server.serve_one() {
            Ok(true) => tracing::info!("frontend gone; waiting for the next one"),
            Ok(false) => break,
            Err(e) => return Err(Error::Invalid(format!("vhost-user: {e}"))),
        }
    }
    if let Some(path) = &cfg.record_trace {
        write_trace(&engine, path, &mut 0);
    }
    engine.flush_stats();
    for (k, v) in engine.counters.snapshot() {
        tracing::info!("{k} {v}");
    }
    Ok(())
}
