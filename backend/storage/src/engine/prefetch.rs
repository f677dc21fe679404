//! Record and replay: traces of first reads, prefetched in order by later runs, and the
//! background fetch of a whole image.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::fetch::InFlight;
use super::table::Speculation;
use super::{Engine, FillSource};
use crate::image::index::SEGMENT_BLOCKS;
use crate::image::{BlockKind, BlockRef, Hash, BLOCK_SIZE};
use crate::trace::{self, Recorder};

impl Engine {
    /// The distinct blocks of the image that must come from a remote (zero blocks excluded).
    /// Every file index not loaded yet is fetched.
    pub async fn unique_blocks(self: &Arc<Self>) -> crate::error::Result<HashSet<Hash>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = HashSet::new();
        for (ino, _) in self.image.files() {
            let hashes = self.file_hashes(ino, deadline).await?;
            out.extend(hashes.into_iter().filter(|h| !crate::image::merkle::is_zero_leaf(h)));
        }
        Ok(out)
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
            .filter_map(|file| Some((file, 0, u32::try_from(self.image.file(file)?.nblocks()).ok()?)))
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
        // Blocks an index range brings come with it: counted as asked for.
        let harvested = self.counters.blocks_harvested.load(Relaxed);
        let located = self.locate_ranges(&ranges, &mut run).await;
        run.asked += self.counters.blocks_harvested.load(Relaxed) - harvested;
        if !located {
            return run.asked;
        }
        for (file, first, count) in ranges {
            let Ok(f) = self.file(file) else { continue };
            let end = (first as usize + count as usize).min(f.nblocks());
            for b in first as usize..end {
                // Not located: its index could not be fetched (logged); demand reads try again.
                let Some(r) = self.block_ref(file, b) else { continue };
                // A block the trace names again (or a duplicate of one) would break a run.
                if r.kind == BlockKind::Zero || !run.queued.insert(r.hash) || self.cache.lookup(&r.hash).is_some() {
                    continue;
                }
                let full = run.blocks.last().is_some_and(|last| !last.adjoins(&r))
                    || run.blocks.len() >= PREFETCH_REQUEST_BLOCKS;
                if full && !self.prefetch_run(&mut run).await {
                    return run.asked;
                }
                run.blocks.push(r);
            }
        }
        self.prefetch_run(&mut run).await;
        run.asked
    }

    /// Loads the indexes of the files of `ranges` (version 3), `PREFETCH_REQUESTS` at once
    /// under the prefetch's rate, in the ranges' order. Each index range goes on past the
    /// index for the bytes of the blocks asked for (up to `PREFETCH_REQUEST_BLOCKS`): as
    /// `pack` lays blobs out, that is the file's data, and everything it holds is kept. False
    /// if the prefetch must stop.
    async fn locate_ranges(self: &Arc<Self>, ranges: &[trace::Range], p: &mut Prefetch) -> bool {
        let files: Arc<HashSet<u32>> = Arc::new(ranges.iter().map(|r| r.0).collect());
        // Bytes from each range to the end of the trace (its blocks at most 8 KiB stored, and
        // each file's index once): in an access-ordered pack, what lies after the range.
        let mut after = vec![0u64; ranges.len() + 1];
        let mut indexed: HashSet<u32> = HashSet::new();
        for (i, &(file, _, count)) in ranges.iter().enumerate().rev() {
            let index = match (indexed.insert(file), self.file(file)) {
                (true, Ok(f)) if f.inline().is_none() => crate::image::index::index_len(f.nblocks() as u64),
                _ => 0,
            };
            after[i] = after[i + 1] + count as u64 * BLOCK_SIZE as u64 + index;
        }
        let mut asked: HashSet<(u32, usize)> = HashSet::new();
        // Where the ranges under way will reach (blob, from, to): a file whose index lies in
        // one waits for it (in an access-ordered pack, one range brings many files).
        let mut reach: Vec<(u32, u64, u64)> = Vec::new();
        let mut later: Vec<usize> = Vec::new();
        // Rounds: each starts the ranges no earlier range of the round reaches; the ones it
        // reaches wait for the next round (by which most came along). The last defers none.
        const ROUNDS: usize = 8;
        for round in 0..ROUNDS {
            let todo: Vec<usize> = match round {
                0 => (0..ranges.len()).collect(),
                _ => std::mem::take(&mut later),
            };
            if todo.is_empty() {
                break;
            }
            for i in todo {
                let (file, first, count) = ranges[i];
                let Ok(f) = self.file(file) else { continue };
                let (first, last) = (first as usize, (first as usize + count as usize).min(f.nblocks()));
                if first >= last || self.located(file, first, last) {
                    continue;
                }
                let place = match f.table {
                    crate::image::BlockTable::Index { blob, offset } => Some((blob, offset)),
                    crate::image::BlockTable::Inline(_) => None,
                };
                if round + 1 < ROUNDS
                    && place.is_some_and(|(b, o)| reach.iter().any(|&(rb, lo, hi)| rb == b && lo < o && o < hi))
                {
                    later.push(i);
                    continue;
                }
                if !asked.insert((file, first / SEGMENT_BLOCKS)) {
                    continue;
                }
                let bytes = after[i].min((PREFETCH_REQUEST_BLOCKS * BLOCK_SIZE) as u64);
                if let Some((b, o)) = place {
                    let index = crate::image::index::index_len(f.nblocks() as u64);
                    reach.push((b, o, o + index + self.stored_estimate(bytes)));
                }
                let Some(permit) = self.prefetch_slot(p, bytes).await else { return false };
                let me = self.clone();
                let spec = Speculation { bytes, files: Some(files.clone()) };
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    if let Err(e) = me.locate(file, first, last, spec, deadline).await {
                        tracing::warn!(inode = file, "prefetch: loading the file's index: {e}");
                    }
                    drop(permit);
                });
            }
            // Every index loaded (or given up) before the next round, and before the runs.
            match p.slots.acquire_many(PREFETCH_REQUESTS as u32).await {
                Ok(all) => drop(all),
                Err(_) => return false,
            }
            reach.clear();
        }
        true
    }

    /// A request slot, once one is free and the rate allows `bytes` more.
    async fn prefetch_slot(&self, p: &mut Prefetch, bytes: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let permit = p.slots.clone().acquire_owned().await.ok()?;
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
        p.requested += bytes;
        Some(permit)
    }

    /// Starts the fetch of `p.blocks` (emptied) once a request slot is free and the rate
    /// allows; blocks someone else fetched or started meanwhile are left to them. False if
    /// the prefetch must stop.
    async fn prefetch_run(self: &Arc<Self>, p: &mut Prefetch) -> bool {
        let blocks = std::mem::take(&mut p.blocks);
        if blocks.is_empty() {
            return true;
        }
        let bytes = blocks.iter().map(|r| r.len as u64).sum::<u64>();
        let Some(permit) = self.prefetch_slot(p, bytes).await else { return false };
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
