//! Readahead that adapts per stream: a miss that continues where the last fetch of the same
//! file ended is a sequential stream, and its window doubles (up to `readahead_max`); a miss
//! elsewhere in a file already being read is random access, and fetches what was asked plus
//! readahead up to `readahead_random` (by default the base window: on the boot measured in
//! docs/benchmarks.md, fetching only what was asked made more reads wait than it saved). The
//! first miss of a file gets the base window (`readahead`), which also covers small files
//! packed after it.
//!
//! State is one slot per file in a fixed table (a file's slot is its number modulo the table
//! size; a collision replaces the older stream), so memory stays bounded whatever the guest
//! opens.

use std::sync::Mutex;

use super::Engine;
use crate::image::BLOCK_SIZE;

/// Streams tracked at once (a collision only costs a stream its history).
const SLOTS: usize = 1024;

/// Blocks a sequential reader may skip past the end of its last fetch.
const SLACK: usize = 16;

#[derive(Clone, Copy)]
struct Stream {
    /// The file, or `u32::MAX` for a free slot.
    file: u32,
    /// Block just past the end of this stream's last fetch: a miss there continues it.
    next: usize,
    /// Blocks the last fetch was allowed to cover.
    window: usize,
}

const FREE: Stream = Stream { file: u32::MAX, next: 0, window: 0 };

pub(super) struct Streams {
    slots: Mutex<Box<[Stream]>>,
}

impl Streams {
    pub(super) fn new() -> Self {
        Streams { slots: Mutex::new(vec![FREE; SLOTS].into_boxed_slice()) }
    }
}

impl Engine {
    fn window_blocks(bytes: u64) -> usize {
        usize::try_from(bytes / BLOCK_SIZE as u64).unwrap_or(usize::MAX).max(1)
    }

    /// How many blocks a fetch starting at the missing block `b` of `file` may cover, for a
    /// read that ends before block `read_end`.
    pub(super) fn readahead_window(&self, file: u32, b: usize, read_end: usize) -> usize {
        let base = Self::window_blocks(self.cfg.readahead);
        let asked = read_end.saturating_sub(b).max(1);
        if !self.cfg.adaptive_readahead {
            return base.max(asked);
        }
        let max = Self::window_blocks(self.cfg.readahead_max).max(base);
        let slots = self.streams.slots.lock().unwrap_or_else(|e| e.into_inner());
        let s = slots[file as usize % SLOTS];
        if s.file != file {
            return base.max(asked);
        }
        // A little slack: zero blocks and blocks cached by other files end a run early.
        if (s.next..=s.next.saturating_add(SLACK)).contains(&b) {
            // Sequential: the reader came to the end of what was fetched for it.
            return s.window.saturating_mul(2).clamp(base, max).max(asked);
        }
        // Random access within a file: the random window (what was asked, at its smallest).
        Self::window_blocks(self.cfg.readahead_random).min(base).max(asked)
    }

    /// A fetch of `file` starting at block `b` covered `covered` of its blocks with a window
    /// of `window` blocks.
    pub(super) fn note_fetch(&self, file: u32, b: usize, covered: usize, window: usize) {
        if !self.cfg.adaptive_readahead {
            return;
        }
        let mut slots = self.streams.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots[file as usize % SLOTS] = Stream { file, next: b.saturating_add(covered), window };
    }
}
