//! Making room: LRU eviction down to the size limit, pins that eviction spares, and gc
//! (orphan reclaim, eviction to a given size, log compaction).

use std::fs::File;
use std::os::unix::fs::FileExt;

use rustix::fs::{fallocate, FallocateFlags};

use super::layout::{
    encode_log_record, le64, FLAG_PINNED, FREE_ENTRY_LEN, H_LIVE, H_LOG_END, H_NEXT_SLOT, H_NFREE, LOG_FILE,
    LOG_RECORD_LEN, STATE_EVICTED, STATE_VALID,
};
use super::{read_full_at, BlockCache};
use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, BLOCK_SIZE};

/// Eviction frees down to this share of the limit, so it runs in batches.
const LOW_WATER_PERCENT: u64 = 90;

/// What `gc` did.
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub orphans_reclaimed: u64,
    pub evicted: u64,
    pub log_records_before: u64,
    pub log_records_after: u64,
}

impl BlockCache {
    /// Evicts least recently used blocks while the cache is over its limit (one process at
    /// a time; the others go on).
    pub fn evict_if_needed(&self) -> Result<u64> {
        let Some(limit) = self.limit_slots else { return Ok(0) };
        if self.read_header_field(H_LIVE)? <= limit {
            return Ok(0);
        }
        let Some(_evicting) = self.locks.try_evict().map_err(|e| Error::io("lock cache for eviction", e))? else {
            return Ok(0);
        };
        self.evict_to(limit * LOW_WATER_PERCENT / 100)
    }

    /// Evicts the least recently used unpinned blocks until at most `target` remain.
    fn evict_to(&self, target: u64) -> Result<u64> {
        let live = self.read_header_field(H_LIVE)?;
        if live <= target {
            return Ok(0);
        }
        let mut cand: Vec<(u32, u64)> = Vec::new();
        self.scan_records(|slot, rec| {
            if rec.state() == STATE_VALID && rec.flags() & FLAG_PINNED == 0 {
                cand.push((rec.atime(), slot));
            }
        })?;
        let need = ((live - target) as usize).min(cand.len());
        if need == 0 {
            return Ok(0);
        }
        // Oldest access first; ties by slot, so older inserts go first.
        cand.select_nth_unstable(need - 1);
        let mut victims: Vec<u64> = cand[..need].iter().map(|&(_, s)| s).collect();
        victims.sort_unstable();
        self.free_slots(&victims)?;
        Ok(victims.len() as u64)
    }

    /// Marks slots evicted, frees their data, then hands them to the free list. (Killed
    /// before the last step, it leaves slots evicted but not listed: gc lists them.)
    pub(super) fn free_slots(&self, victims: &[u64]) -> Result<()> {
        for &s in victims {
            self.records.set_state(s, STATE_EVICTED, true)?;
        }
        self.release_evicted(victims)
    }

    /// Frees the data of slots (sorted) just marked evicted, then hands them to the free
    /// list (under the eviction lock).
    pub(super) fn release_evicted(&self, victims: &[u64]) -> Result<()> {
        punch_slots(&self.blocks, victims);
        let list: Vec<u8> = victims.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.with_header(|h, _| {
            self.free.write_all_at(&list, h.nfree * FREE_ENTRY_LEN as u64)?;
            h.nfree += victims.len() as u64;
            h.live = h.live.saturating_sub(victims.len() as u64);
            Ok(())
        })?;
        self.index_mut().forget_slots(victims);
        Ok(())
    }

    /// Marks slots (sorted) evicted, with a new generation, then frees their data.
    fn evict_slots(&self, victims: &[u64]) -> Result<()> {
        for &s in victims {
            self.records.set_state(s, STATE_EVICTED, true)?;
        }
        punch_slots(&self.blocks, victims);
        Ok(())
    }

    /// Keeps these blocks through eviction (a prefetch list). Returns how many were cached.
    pub fn pin(&self, hashes: &[Hash], pinned: bool) -> Result<u64> {
        let flags = if pinned { FLAG_PINNED } else { 0 };
        let mut n = 0;
        for h in hashes {
            if let Some(s) = self.lookup_fresh(h)? {
                self.records.set_flags(s, flags)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Offline maintenance, safe while daemons run: reclaims slots left by killed writers
    /// and evictors, recounts live blocks, evicts down to `limit_bytes` if given, and
    /// rewrites the log without dead records.
    pub fn gc(&self, limit_bytes: Option<u64>) -> Result<GcReport> {
        let mut rep = GcReport::default();
        // Exclusive: no insert or eviction is in flight, so every slot that is not valid is
        // free: the listed ones, and orphans (empty: a killed insert; evicted but not listed:
        // a killed evictor).
        let _writers = self.locks.writers_excluded().ctx(|| "lock cache for gc".into())?;
        let _evicting = self.locks.evict().ctx(|| "lock cache for gc".into())?;
        let listed = self.free_list()?;
        let (mut valid, mut free, mut orphans) = (0u64, Vec::new(), Vec::new());
        self.scan_records(|slot, rec| match rec.state() {
            STATE_VALID => valid += 1,
            state => {
                free.push(slot);
                if state != STATE_EVICTED || listed.binary_search(&slot).is_err() {
                    orphans.push(slot);
                }
            }
        })?;
        self.evict_slots(&orphans)?;
        let next_slot = self.read_header_field(H_NEXT_SLOT)?;
        let scanned = self.records.scan_end(next_slot)?;
        rep.orphans_reclaimed = orphans.len() as u64 + (next_slot - scanned);
        // Rebuild the free list. Emptied first: killed midway, this leaves free slots
        // unlisted (the next gc lists them), never one slot listed twice.
        self.with_header(|h, _| {
            h.nfree = 0;
            Ok(())
        })?;
        let list: Vec<u8> = free.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.free.write_all_at(&list, 0).ctx(|| "write cache free list".into())?;
        self.with_header(|h, _| {
            h.nfree = free.len() as u64;
            h.live = valid;
            // Slots allocated past the records on file were never written: not slots.
            h.next_slot = scanned;
            Ok(())
        })?;
        if let Some(l) = limit_bytes {
            rep.evicted = self.evict_to(l / BLOCK_SIZE as u64)?;
        }
        // Rewrite the log from the records still valid, under a new epoch.
        let mut live = Vec::new();
        self.scan_records(|slot, rec| {
            if rec.state() == STATE_VALID {
                encode_log_record(&rec.hash(), slot, &mut live);
            }
        })?;
        rep.log_records_before = self.read_header_field(H_LOG_END)? / LOG_RECORD_LEN as u64;
        rep.log_records_after = (live.len() / LOG_RECORD_LEN) as u64;
        let tmp = self.new_temp_file(&self.dir, "log.gc.", &live)?;
        self.with_header(|h, _| {
            tmp.persist(self.dir.join(LOG_FILE)).map_err(|e| e.error)?;
            h.log_end = live.len() as u64;
            h.epoch = h.epoch.wrapping_add(1);
            Ok(())
        })?;
        Ok(rep)
    }

    /// The free list's slots, sorted, bounded by what the file holds and by `next_slot`.
    fn free_list(&self) -> Result<Vec<u64>> {
        let on_file = self.free.metadata().ctx(|| "stat cache free list".into())?.len() / FREE_ENTRY_LEN as u64;
        let next_slot = self.read_header_field(H_NEXT_SLOT)?;
        let n = self.read_header_field(H_NFREE)?.min(on_file).min(next_slot);
        let mut b = vec![0u8; n as usize * FREE_ENTRY_LEN];
        let got = read_full_at(&self.free, &mut b, 0).ctx(|| "read cache free list".into())?;
        let mut listed: Vec<u64> = b[..got].chunks_exact(FREE_ENTRY_LEN).map(le64).filter(|&s| s < next_slot).collect();
        listed.sort_unstable();
        listed.dedup();
        Ok(listed)
    }
}

/// Frees the disk space of slots (sorted), one call per run of consecutive slots.
fn punch_slots(blocks: &File, slots: &[u64]) {
    let mut i = 0;
    while i < slots.len() {
        let mut j = i + 1;
        while j < slots.len() && slots[j] == slots[j - 1] + 1 {
            j += 1;
        }
        punch_hole(blocks, slots[i] * BLOCK_SIZE as u64, (j - i) as u64 * BLOCK_SIZE as u64);
        i = j;
    }
}

/// Frees the disk space of a range (reads then return zeroes, which no record vouches for).
fn punch_hole(f: &File, off: u64, len: u64) {
    if let Err(e) = fallocate(f, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, off, len) {
        tracing::debug!("punch hole: {}", std::io::Error::from(e));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn punched_blocks_give_their_disk_space_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("blocks"))
            .expect("open");
        file.write_all_at(&[7u8; 16 * BLOCK_SIZE], 0).expect("write");
        file.sync_all().expect("sync");
        let before = file.metadata().expect("stat").blocks();
        punch_hole(&file, 4 * BLOCK_SIZE as u64, 8 * BLOCK_SIZE as u64);
        let meta = file.metadata().expect("stat");
        assert_eq!(meta.len(), 16 * BLOCK_SIZE as u64, "the size stays");
        if before >= 16 * BLOCK_SIZE as u64 / 512 {
            // (A file system without extents to free, or without hole punching, keeps them.)
            assert!(meta.blocks() <= before - 8 * BLOCK_SIZE as u64 / 512, "{before} -> {}", meta.blocks());
        }
        let mut b = [1u8; BLOCK_SIZE];
        file.read_exact_at(&mut b, 5 * BLOCK_SIZE as u64).expect("read");
        assert!(b.iter().all(|&x| x == 0), "a punched block reads as zeroes");
    }
}
