//! Record and replay: traces of first reads, prefetched in order by later runs, and the
//! background fetch of a whole image.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::fetch::InFlight;
use super::{Engine, FillSource};
use crate::image::{BlockKind, BlockRef, Hash};
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

    /// Fetches the blocks of `ranges` in order, in the background of demand reads: exactly
    /// their missing blocks, no readahead around them. Blocks stored end to end in a blob go
    /// in one request (in an access-ordered pack, consecutive runs of a trace do, across
    /// files), up to `PREFETCH_REQUEST_BLOCKS`; `PREFETCH_REQUESTS` requests of its own are in
    /// flight at once, while a demand miss starts its fetch at once (or joins the prefetch of
    /// its block). With `rate` (bytes per second), it starts a request only while this
    /// daemon's downloads since the call, demand reads included, stay under that rate.
    /// Returns the blocks it asked for.
    pub async fn prefetch(self: &Arc<Self>, ranges: Vec<trace::Range>, rate: Option<u64>) -> u64 {
        if self.cfg.fill == FillSource::Supplied {
            // Only a guest supplies blocks: nothing to fetch.
            return 0;
        }
        let mut run = Prefetch {
            slots: Arc::new(tokio::sync::Semaphore::new(PREFETCH_REQUESTS)),
            rate: rate.filter(|&r| r > 0),
            start: Instant::now(),
            fetched_before: self.counters.bytes_fetched.load(Relaxed),
            blocks: Vec::with_capacity(PREFETCH_REQUEST_BLOCKS),
            queued: HashSet::new(),
            requested: 0,
            asked: 0,
        };
        for (file, first, count) in ranges {
            let Ok(f) = self.file(file) else { continue };
            let end = (first as usize + count as usize).min(f.blocks.len());
            for r in f.blocks.get(first as usize..end).unwrap_or_default() {
                // A block the trace names again (or a duplicate of one) would break a run.
                if r.kind == BlockKind::Zero || !run.queued.insert(r.hash) || self.cache.lookup(&r.hash).is_some() {
                    continue;
                }
                let full = run.blocks.last().is_some_and(|last| !last.adjoins(r))
                    || run.blocks.len() >= PREFETCH_REQUEST_BLOCKS;
                if full && !self.prefetch_run(&mut run).await {
                    return run.asked;
                }
                run.blocks.push(*r);
            }
        }
        self.prefetch_run(&mut run).await;
        run.asked
    }

    /// Starts the fetch of `p.blocks` (emptied) once a request slot is free and the rate
    /// allows; blocks someone else fetched or started meanwhile are left to them. False if
    /// the prefetch must stop.
    async fn prefetch_run(self: &Arc<Self>, p: &mut Prefetch) -> bool {
        let blocks = std::mem::take(&mut p.blocks);
        if blocks.is_empty() {
            return true;
        }
        let Ok(permit) = p.slots.clone().acquire_owned().await else { return false };
        if let Some(rate) = p.rate {
            // Within the cap: what arrived since the call (demand reads included), or what
            // this prefetch asked for if more (its requests in flight count before they land).
            loop {
                let sent = self.counters.bytes_fetched.load(Relaxed).saturating_sub(p.fetched_before).max(p.requested);
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if p.start.elapsed() >= due {
                    break;
                }
                tokio::time::sleep_until(p.start + due).await;
            }
        }
        p.requested += blocks.iter().map(|r| r.len as u64).sum::<u64>();
        let flights = self.fetch_exact(&blocks, Instant::now() + Duration::from_secs(60));
        p.asked += flights.len() as u64;
        self.counters.prefetch_blocks.fetch_add(flights.len() as u64, Relaxed);
        tokio::spawn(async move {
            for fl in flights {
                let mut rx = fl.done.subscribe();
                let _ = rx.wait_for(|o| o.is_some()).await;
            }
            drop(permit);
        });
        true
    }

    /// Starts fetches of exactly `blocks` (adjoining, in order) that nobody has or fetches:
    /// one request per stretch left adjoining. Returns the fetches it started.
    fn fetch_exact(self: &Arc<Self>, blocks: &[BlockRef], deadline: Instant) -> Vec<Arc<InFlight>> {
        let mut runs: Vec<Vec<(BlockRef, Arc<InFlight>)>> = Vec::new();
        let mut gap = true;
        {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for r in blocks {
                if map.contains_key(&r.hash) || self.cache.lookup(&r.hash).is_some() {
                    gap = true;
                    continue;
                }
                let fl = InFlight::new(deadline);
                map.insert(r.hash, fl.clone());
                match runs.last_mut() {
                    Some(run) if !gap => run.push((*r, fl)),
                    _ => runs.push(vec![(*r, fl)]),
                }
                gap = false;
            }
        }
        let flights = runs.iter().flatten().map(|(_, fl)| fl.clone()).collect();
        for run in runs {
            let me = self.clone();
            tokio::spawn(async move { me.fetch_run(run).await });
        }
        flights
    }
}

/// Blocks a prefetch asks for in one request at most (1 MiB before compression): many
/// traced runs per request when the pack laid them end to end, yet several requests share
/// the work and a demand read never waits behind one long transfer.
const PREFETCH_REQUEST_BLOCKS: usize = 256;

/// A prefetch's requests in flight at once (each on its own connection): a trace on a
/// file-order pack is many short requests, where round trips, not bytes, cost the time
/// (288 requests for a 4,908-block trace: 3.4-4.4 s with 4 in flight, 2.0-2.6 s with 8).
const PREFETCH_REQUESTS: usize = 8;

/// A prefetch under way: the run it is collecting and what it has started.
struct Prefetch {
    slots: Arc<tokio::sync::Semaphore>,
    rate: Option<u64>,
    start: Instant,
    fetched_before: u64,
    blocks: Vec<BlockRef>,
    /// Every block put in a run so far.
    queued: HashSet<Hash>,
    /// Stored bytes of the blocks it asked for.
    requested: u64,
    asked: u64,
}
