//! Record and replay: traces of first reads, prefetched in order by later runs, and the
//! background fetch of a whole image.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Engine;
use crate::image::{BlockKind, Hash, BLOCK_SIZE};
use crate::trace::{self, Recorder};

impl Engine {
    /// The distinct blocks of the image that must come from a remote (zero blocks excluded).
    pub fn unique_blocks(&self) -> HashSet<Hash> {
        self.image
            .files()
            .flat_map(|(_, f)| f.blocks.iter())
            .filter(|r| r.kind != BlockKind::Zero)
            .map(|r| r.hash)
            .collect()
    }

    /// From now on, note the first read of every block (see `recorded`).
    pub fn start_recording(&self) {
        let _ = self.recorder.set(Recorder::new(self.block_base.clone(), self.slot_hints.len() as u64));
    }

    /// The trace so far, in the text format of `trace`, or None when not recording.
    pub fn recorded_trace(&self) -> Option<(usize, String)> {
        let r = self.recorder.get()?;
        Some((r.len(), trace::format(&self.image, &r.ranges())))
    }

    /// Fetches every block of the image that is not cached, file by file in pack order (so
    /// neighbouring blocks go in one request), in the background of demand reads and under
    /// `rate` as `prefetch`. Returns the blocks it asked for.
    pub async fn fetch_all(self: &Arc<Self>, rate: Option<u64>) -> u64 {
        let ranges = (0..self.image.manifest.inodes.len() as u32)
            .filter_map(|file| Some((file, 0, u32::try_from(self.image.file(file)?.blocks.len()).ok()?)))
            .filter(|r| r.2 > 0)
            .collect();
        self.prefetch(ranges, rate).await
    }

    /// Fetches the blocks of `ranges` in order, in the background of demand reads: at most
    /// `PREFETCH_RUNS` fetches of its own in flight, while a demand miss starts its fetch at
    /// once (or joins the prefetch of its block). With `rate` (bytes per second), it starts
    /// a fetch only while this daemon's downloads since the call, demand reads included,
    /// stay under that rate. Returns the blocks it asked for.
    pub async fn prefetch(self: &Arc<Self>, ranges: Vec<trace::Range>, rate: Option<u64>) -> u64 {
        const PREFETCH_RUNS: usize = 2;
        let window = (self.cfg.readahead as usize / BLOCK_SIZE).max(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(PREFETCH_RUNS));
        let mut asked = 0u64;
        let (start, fetched_before) = (Instant::now(), self.counters.bytes_fetched.load(Relaxed));
        // Within the cap, give or take the fetches in flight (a window each).
        let under_cap = |rate: u64| async move {
            loop {
                let sent = self.counters.bytes_fetched.load(Relaxed).saturating_sub(fetched_before);
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if start.elapsed() >= due {
                    return;
                }
                tokio::time::sleep_until(start + due).await;
            }
        };
        for (file, first, count) in ranges {
            let Ok(f) = self.file(file) else { continue };
            let end = (first as usize + count as usize).min(f.blocks.len());
            let mut at = first as usize;
            while at < end {
                let piece_end = (at + window).min(end);
                let missing: Vec<usize> = (at..piece_end)
                    .filter(|&b| f.blocks[b].kind != BlockKind::Zero && self.cache.lookup(&f.blocks[b].hash).is_none())
                    .collect();
                at = piece_end;
                if missing.is_empty() {
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                if let Some(rate) = rate.filter(|&r| r > 0) {
                    under_cap(rate).await;
                }
                asked += missing.len() as u64;
                self.counters.prefetch_blocks.fetch_add(missing.len() as u64, Relaxed);
                let waits = self.request(file, f, &missing, piece_end, Instant::now() + Duration::from_secs(60));
                tokio::spawn(async move {
                    for (_, w) in waits {
                        let mut rx = w.done.subscribe();
                        let _ = rx.wait_for(|o| o.is_some()).await;
                    }
                    drop(permit);
                });
            }
        }
        asked
    }
}
