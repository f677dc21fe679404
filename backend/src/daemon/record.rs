//! Record and replay of first reads, and the whole-image background fetch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Error, Result};
use crate::engine::Engine;
use crate::trace;

/// How often a recorded trace is rewritten while the daemon runs.
const RECORD_INTERVAL: Duration = Duration::from_secs(2);

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

/// The trace to replay. A trace is a hint: bad lines are skipped (counted in the log line),
/// a published one that cannot be fetched is none; only a `--prefetch-trace` file that
/// cannot be read fails start-up.
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
/// fetches, as configured. Call `write_trace` at the end.
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
                tokio::time::sleep(RECORD_INTERVAL).await;
                // A file write may block (a stuck network filesystem): not on a worker, or
                // the runtime's timers and sockets would stop with it.
                let (e, path) = (e.clone(), path.clone());
                last = match tokio::task::spawn_blocking(move || write_trace(&e, &path, last)).await {
                    Ok(len) => len,
                    Err(err) => {
                        tracing::warn!("trace writer: {err}");
                        return;
                    }
                };
            }
        });
    }
    let ranges = rt.block_on(load_trace(engine, &background.trace))?;
    let fetch_all = background.fetch_all.clone();
    let e = engine.clone();
    rt.spawn(async move {
        let start = Instant::now();
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

/// Writes the recorded trace if it grew since `last_len` entries; returns its length now
/// (`last_len` again if the write failed). Called now and then, and once at the end.
pub(crate) fn write_trace(engine: &Engine, path: &Path, last_len: usize) -> usize {
    let Some((len, text)) = engine.recorded_trace() else { return last_len };
    if len == last_len {
        return last_len;
    }
    let tmp = path.with_extension("tmp");
    match std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => len,
        Err(e) => {
            tracing::warn!("writing trace {}: {e}", path.display());
            last_len
        }
    }
}
