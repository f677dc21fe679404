//! What the cache holds and how well it serves, for `cache status`.

use std::fs;
use std::os::unix::fs::MetadataExt;

use super::layout::{
    FLAG_PINNED, H_FETCHED, H_HITS, H_MISSES, H_NEXT_SLOT, H_NFREE, MANIFESTS_DIR, STATE_EVICTED, STATE_VALID,
};
use super::BlockCache;
use crate::error::Result;

/// What the cache holds, for `cache status`.
#[derive(Debug, Default, Clone)]
pub struct CacheUsage {
    pub slots: u64,
    pub valid: u64,
    pub pinned: u64,
    pub evicted: u64,
    pub empty: u64,
    pub free_listed: u64,
    pub disk_bytes: u64,
    pub manifests: u64,
    pub hits: u64,
    pub misses: u64,
    pub fetched: u64,
}

impl BlockCache {
    /// Adds this process's hit and miss counts to the cache-wide totals.
    pub fn add_stats(&self, hits: u64, misses: u64) -> Result<()> {
        if hits == 0 && misses == 0 {
            return Ok(());
        }
        self.with_header(|h, _| {
            h.hits = h.hits.saturating_add(hits);
            h.misses = h.misses.saturating_add(misses);
            Ok(())
        })
    }

    /// Counts slots by state by reading every record (for status, not the hot path).
    pub fn usage(&self) -> Result<CacheUsage> {
        let mut u = CacheUsage {
            slots: self.read_header_field(H_NEXT_SLOT)?,
            free_listed: self.read_header_field(H_NFREE)?,
            hits: self.read_header_field(H_HITS)?,
            misses: self.read_header_field(H_MISSES)?,
            fetched: self.read_header_field(H_FETCHED)?,
            ..Default::default()
        };
        self.scan_records(|_, rec| match rec.state() {
            STATE_VALID => {
                u.valid += 1;
                if rec.flags() & FLAG_PINNED != 0 {
                    u.pinned += 1;
                }
            }
            STATE_EVICTED => u.evicted += 1,
            _ => u.empty += 1,
        })?;
        // Slots allocated past the records on file: not yet written (or never will be).
        u.empty += u.slots - self.records.scan_end(u.slots)?;
        let (_, log) = self.log();
        for f in [&self.blocks, &self.records.file, &log, &self.free] {
            if let Ok(m) = f.metadata() {
                u.disk_bytes += m.blocks() * 512;
            }
        }
        u.manifests = fs::read_dir(self.dir.join(MANIFESTS_DIR)).map(|d| d.count() as u64).unwrap_or(0);
        Ok(u)
    }
}
