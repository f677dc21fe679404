//! Fetch on intent: when a guest opens a regular file whose head is not cached, the head (the
//! whole file when it fits in the readahead window) is fetched in the background, so the READ
//! that follows finds it in flight or cached instead of paying a round trip of its own.
//!
//! A hint never blocks its caller and never waits: it looks at one block, and when the head is
//! missing it takes one of `MAX_INTENT_FETCHES` slots or is dropped (counted). A guest that
//! opens a million files makes at most that many fetches at once, and nothing queues. Hints
//! are not reads: they are not logged, recorded in a trace or shown as pending reads.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::time::Instant;

use super::{Engine, FillSource};
use crate::image::{merkle, BLOCK_SIZE};

/// Intent fetches in flight at once; hints past it are dropped.
pub const MAX_INTENT_FETCHES: usize = 8;

#[derive(Default, Debug)]
pub struct IntentCounters {
    /// Hints that started a fetch of a file's head.
    pub intent_fetches: AtomicU64,
    /// Blocks those fetches asked for.
    pub intent_blocks: AtomicU64,
    /// Hints dropped because `MAX_INTENT_FETCHES` were in flight.
    pub intent_dropped: AtomicU64,
}

impl IntentCounters {
    pub fn snapshot(&self) -> [(&'static str, u64); 3] {
        [
            ("intent_fetches", self.intent_fetches.load(Relaxed)),
            ("intent_blocks", self.intent_blocks.load(Relaxed)),
            ("intent_dropped", self.intent_dropped.load(Relaxed)),
        ]
    }
}

pub(super) struct Intents {
    /// The runtime fetches run on (a hint comes from a device's worker thread).
    rt: Option<Handle>,
    in_flight: Arc<AtomicUsize>,
}

impl Intents {
    pub(super) fn new() -> Self {
        Intents { rt: Handle::try_current().ok(), in_flight: Arc::new(AtomicUsize::new(0)) }
    }

    /// The runtime background work runs on.
    pub(super) fn runtime(&self) -> Option<&Handle> {
        self.rt.as_ref()
    }
}

/// Gives an intent slot back however its task ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Engine {
    /// The guest opened image file `file` (OPEN, or LOOKUP with `lookup_prefetch`): starts a
    /// background fetch of its head unless it is cached, in flight, or the intent slots are
    /// full. Returns whether a fetch was started. Never blocks.
    pub fn hint_open(self: &Arc<Self>, file: u32) -> bool {
        if self.cfg.fill != FillSource::Remote {
            return false;
        }
        let Some(rt) = &self.intents.rt else { return false };
        let Ok(f) = self.file(file) else { return false };
        let head = usize::try_from(f.size.min(self.cfg.readahead).div_ceil(BLOCK_SIZE as u64))
            .unwrap_or(usize::MAX)
            .min(f.nblocks());
        // One look: a file whose first data block is cached or on its way was read before. A
        // file whose index is not loaded was not (or not since the cache lost its tree block).
        if let Some(hashes) = self.block_hashes(file, f, 0, head) {
            let Some(first) = hashes.iter().position(|h| !merkle::is_zero_leaf(h)) else { return false };
            if self.hint(file, first).is_some_and(|h| h.load(Relaxed) != 0)
                || self.cache.lookup(&hashes[first]).is_some()
                || self.inflight.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&hashes[first])
            {
                return false;
            }
        }
        let slots = &self.intents.in_flight;
        if slots.fetch_update(Relaxed, Relaxed, |n| (n < MAX_INTENT_FETCHES).then_some(n + 1)).is_err() {
            self.counters.intents.intent_dropped.fetch_add(1, Relaxed);
            return false;
        }
        let slot = Slot(slots.clone());
        self.counters.intents.intent_fetches.fetch_add(1, Relaxed);
        let me = self.clone();
        rt.spawn(async move {
            let _slot = slot;
            let Ok(f) = me.file(file) else { return };
            let deadline = Instant::now() + me.cfg.read_timeout;
            // As a read's fetch: the readahead window past the head (the next small files).
            let extra = ((head * BLOCK_SIZE) as u64).max(me.cfg.readahead);
            // The head may come with the file's index: counted as what the hint asked for.
            let harvested = me.counters.blocks_harvested.load(Relaxed);
            let located = me.locate(file, 0, head, extra, deadline).await;
            let came = me.counters.blocks_harvested.load(Relaxed) - harvested;
            me.counters.intents.intent_blocks.fetch_add(came, Relaxed);
            if let Err(e) = located {
                tracing::debug!(inode = file, "intent: loading the file's index: {e}");
                return;
            }
            let Some(hashes) = me.block_hashes(file, f, 0, head) else { return };
            let missing: Vec<usize> = (0..head)
                .filter(|&b| !merkle::is_zero_leaf(&hashes[b]) && me.cache.lookup(&hashes[b]).is_none())
                .collect();
            me.counters.intents.intent_blocks.fetch_add(missing.len() as u64, Relaxed);
            let waits = me.request(file, f, &missing, head, deadline);
            for (_, w) in waits {
                let mut rx = w.done.subscribe();
                let _ = rx.wait_for(|o| o.is_some()).await;
            }
        });
        true
    }
}
