//! Storing verified blocks: data, then record, then log (see `docs/shared-cache.md`, rule 2).

use std::io;
use std::os::unix::fs::FileExt;

use super::layout::{
    encode_log_record, le64, Header, FREE_ENTRY_LEN, LOG_RECORD_LEN, MAX_LOG_BYTES, MAX_SLOTS, STATE_EMPTY, STATE_VALID,
};
use super::records::now_secs;
use super::BlockCache;
use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, BLOCK_SIZE};

impl BlockCache {
    /// Stores verified blocks (each exactly 4096 bytes, already checked against its hash).
    /// Callers must only pass verified data. Evicts afterwards if over the limit.
    pub fn insert_verified(&self, blocks: &[(Hash, &[u8])]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        if blocks.iter().any(|(_, b)| b.len() != BLOCK_SIZE) {
            return Err(Error::Invalid("cache blocks are 4096 bytes".into()));
        }
        {
            let _writer = self.locks.writer().ctx(|| "lock cache for writing".into())?;
            self.insert_locked(blocks)?;
        }
        self.evict_if_needed()?;
        Ok(())
    }

    fn insert_locked(&self, blocks: &[(Hash, &[u8])]) -> Result<()> {
        let n = blocks.len() as u64;
        // Reuse freed slots first, then grow.
        let (slots, popped, log_pos, log) = self.with_header(|h, _| {
            // gc may have renamed a new log into place (no gc runs while we hold `writer`).
            let log = self.log_of_epoch_locked(h.epoch)?;
            // Checked before claiming any slot: an error leaves the header as it was.
            if h.log_end + n * LOG_RECORD_LEN as u64 > MAX_LOG_BYTES {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "the cache log is full: run `incfsd cache gc`"));
            }
            let full = || io::Error::new(io::ErrorKind::StorageFull, "the cache has its most slots");
            if h.next_slot + n.saturating_sub(h.nfree) > MAX_SLOTS {
                return Err(full());
            }
            let mut slots = self.pop_free(h, n)?;
            let popped = slots.len();
            let grow = n - popped as u64;
            if h.next_slot + grow > MAX_SLOTS {
                // Only with a free list naming slots that are not free; gc rebuilds it.
                return Err(full());
            }
            slots.extend(h.next_slot..h.next_slot + grow);
            h.next_slot += grow;
            let log_pos = h.log_end;
            h.log_end += n * LOG_RECORD_LEN as u64;
            h.live += n;
            h.fetched = h.fetched.saturating_add(n);
            Ok((slots, popped, log_pos, log))
        })?;
        // A new slot's record may hold anything a killed insert left: a new generation
        // before the data (reused slots got theirs in pop_free), as for reuse (rule 3).
        for &s in &slots[popped..] {
            self.records.set_state(s, STATE_EMPTY, true)?;
        }
        let t = now_secs();
        // Data first (one write per run of consecutive slots), then records, then the log.
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                j += 1;
            }
            let data: Vec<u8> = blocks[i..j].iter().flat_map(|(_, b)| b.iter().copied()).collect();
            self.blocks.write_all_at(&data, slots[i] * BLOCK_SIZE as u64).ctx(|| "write cache blocks".into())?;
            i = j;
        }
        // The rest of each record, then its state: never a VALID state beside a
        // half-written hash.
        for (s, (h, _)) in slots.iter().zip(blocks) {
            self.records.write_contents(*s, h, t, 0)?;
            self.records.set_state(*s, STATE_VALID, false)?;
        }
        let mut log_records = Vec::with_capacity(blocks.len() * LOG_RECORD_LEN);
        for (s, (h, _)) in slots.iter().zip(blocks) {
            encode_log_record(h, *s, &mut log_records);
        }
        log.write_all_at(&log_records, log_pos).ctx(|| "write cache log".into())?;
        let mut idx = self.index_mut();
        for (s, (h, _)) in slots.iter().zip(blocks) {
            idx.insert(h, *s);
        }
        Ok(())
    }

    /// Takes up to `n` slots off the free list (under the allocation lock), each marked
    /// empty with a new generation. Entries that are not evicted slots (past `next_slot`,
    /// repeated, valid) are dropped: two inserts must never share a slot.
    fn pop_free(&self, h: &mut Header, n: u64) -> io::Result<Vec<u64>> {
        let on_file = self.free.metadata()?.len() / FREE_ENTRY_LEN as u64;
        if h.nfree > on_file {
            tracing::warn!(nfree = h.nfree, on_file, "cache free list shorter than its header says; truncated");
            h.nfree = on_file;
        }
        let k = h.nfree.min(n);
        let mut b = vec![0u8; k as usize * FREE_ENTRY_LEN];
        self.free.read_exact_at(&mut b, (h.nfree - k) * FREE_ENTRY_LEN as u64)?;
        h.nfree -= k;
        let mut slots = Vec::with_capacity(k as usize);
        for s in b.chunks_exact(FREE_ENTRY_LEN).map(le64) {
            if s < h.next_slot && self.records.claim_evicted(s).map_err(io::Error::other)? {
                slots.push(s);
            } else {
                tracing::warn!(slot = s, "cache free list names a slot that is not free; skipped");
            }
        }
        Ok(slots)
    }
}
