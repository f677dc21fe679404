//! The generated control files: `.blocks_written`, `.stats`, `.last_read_error` and
//! `.filled/<id>`, made on demand from the engine's and the channel's counters.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use incfs_fuse::Errno;

use super::{lock, Control, INO_BLOCKS_WRITTEN, INO_FILLED_BASE, INO_LAST_READ_ERROR, INO_STATS};

impl Control {
    /// Text and binary files generated on demand. The READ at offset 0 takes a snapshot that
    /// later offsets of the same handle read from, so a reader never sees a torn value; a
    /// READ that takes the whole file needs none. Snapshots count against the channel's
    /// limit: past it, ENOMEM.
    pub(super) fn read_generated(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let cached = lock(&self.handles).get(&fh).and_then(|h| h.snapshot.clone());
        let data = match cached {
            Some(d) if offset != 0 => d,
            _ => {
                let d = Arc::new(self.generate(ino)?);
                let keep = d.len() > size as usize;
                let mut handles = lock(&self.handles);
                if let Some(h) = handles.get_mut(&fh) {
                    let old = h.snapshot.take();
                    self.forget_snapshot(old);
                    if keep {
                        let len = d.len() as u64;
                        let held = self.snapshot_bytes.fetch_add(len, Relaxed);
                        if held.saturating_add(len) > self.snapshot_limit {
                            self.snapshot_bytes.fetch_sub(len, Relaxed);
                            return Err(libc::ENOMEM);
                        }
                        h.snapshot = Some(d.clone());
                    }
                }
                d
            }
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        Ok(data[start..end].to_vec())
    }

    /// Gives a handle's snapshot's bytes back to the limit.
    pub(super) fn forget_snapshot(&self, snapshot: Option<Arc<Vec<u8>>>) {
        if let Some(d) = snapshot {
            self.snapshot_bytes.fetch_sub(d.len() as u64, Relaxed);
        }
    }

    pub fn blocks_written(&self) -> u64 {
        let c = &self.engine.counters;
        c.blocks_fetched.load(Relaxed) + c.blocks_supplied.load(Relaxed)
    }

    /// `name value` lines: incfs's metric names first, then the engine's counters.
    pub fn stats_text(&self) -> String {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Relaxed);
        let mut out = String::new();
        use incfs_wire::stats::*;
        let mut add = |k: &str, v: u64| encode_line(&mut out, k, v);
        add(READS_DELAYED_MIN, 0);
        add(READS_DELAYED_MIN_US, 0);
        add(READS_DELAYED_PENDING, l(&c.reads_delayed_pending));
        add(READS_DELAYED_PENDING_US, l(&c.reads_delayed_pending_us));
        add(READS_FAILED_TIMED_OUT, l(&c.reads_failed_timed_out));
        add(READS_FAILED_HASH_VERIFICATION, l(&c.reads_failed_hash_verification));
        add(READS_FAILED_OTHER, l(&c.reads_failed_other));
        add(FILL_BLOCKS_WRITTEN, l(&c.fill_blocks_written));
        add(FILL_BLOCKS_PRESENT, l(&c.fill_blocks_present));
        add(FILL_BLOCKS_REJECTED, l(&c.fill_blocks_rejected));
        add(LOG_RECORDS_DROPPED, l(&c.log_records_dropped));
        add(PENDING_READS, lock(&self.pending).records.len() as u64);
        add(BLOCKS_WRITTEN, self.blocks_written());
        for (k, v) in self.engine.counters.snapshot() {
            add(&format!("{ENGINE_PREFIX}{k}"), v);
        }
        out
    }

    /// `.filled/<id>`: size u64, total_blocks u32, filled_blocks u32, range_count u32,
    /// flags u32 (bit 0: fully loaded), reserved u64, then `incfs_filled_range` records.
    pub fn filled_bytes(&self, idx: u32) -> Result<Vec<u8>, Errno> {
        let size = self.engine.image().file(idx).map(|f| f.size).ok_or(libc::ENOENT)?;
        let ranges = self.engine.filled_ranges(idx).map_err(|e| e.errno())?;
        let (filled, total) = self.engine.fill_state(idx).map_err(|e| e.errno())?;
        Ok(incfs_wire::FileState {
            size,
            total_blocks: total as u32,
            filled_blocks: filled as u32,
            fully_loaded: filled >= total,
            ranges,
        }
        .encode())
    }

    fn generate(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match ino {
            INO_BLOCKS_WRITTEN => Ok(incfs_wire::encode_blocks_written(self.blocks_written()).into_bytes()),
            INO_STATS => Ok(self.stats_text().into_bytes()),
            INO_LAST_READ_ERROR => {
                // All zero when no read has failed.
                Ok(self.last_error().unwrap_or_default().encode().to_vec())
            }
            _ => {
                let idx = ino.checked_sub(INO_FILLED_BASE).and_then(|i| u32::try_from(i).ok()).ok_or(libc::EINVAL)?;
                self.filled_bytes(idx)
            }
        }
    }
}
