//! Storing verified blocks: data, then record, then log (see `docs/shared-cache.md`, rule 2).

use std::os::unix::fs::FileExt;

use super::layout::{empty_record, encode_log_record, le64, FREE_ENTRY_LEN, LOG_RECORD_LEN, STATE_VALID};
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
        let (slots, log_pos, log) = self.with_header(|h, _| {
            // gc may have renamed a new log into place (no gc runs while we hold `writer`).
            let log = self.log_of_epoch_locked(h.epoch)?;
            let k = h.nfree.min(n);
            let mut slots = Vec::with_capacity(n as usize);
            if k > 0 {
                let mut b = vec![0u8; k as usize * FREE_ENTRY_LEN];
                self.free.read_exact_at(&mut b, (h.nfree - k) * FREE_ENTRY_LEN as u64)?;
                slots.extend(b.chunks_exact(FREE_ENTRY_LEN).map(le64));
                h.nfree -= k;
            }
            slots.extend(h.next_slot..h.next_slot + (n - k));
            h.next_slot += n - k;
            let log_pos = h.log_end;
            h.log_end += n * LOG_RECORD_LEN as u64;
            h.live += n;
            h.fetched += n;
            Ok((slots, log_pos, log))
        })?;
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
        // Each record with an empty state first, then the state: never a VALID state
        // beside a half-written hash.
        for (s, (h, _)) in slots.iter().zip(blocks) {
            self.records.write(*s, &empty_record(h, t))?;
            self.records.set_state(*s, STATE_VALID)?;
        }
        let mut log_records = Vec::with_capacity(blocks.len() * LOG_RECORD_LEN);
        for (s, (h, _)) in slots.iter().zip(blocks) {
            encode_log_record(h, *s, &mut log_records);
        }
        log.write_all_at(&log_records, log_pos).ctx(|| "write cache log".into())?;
        let mut idx = self.index_mut();
        for (s, (h, _)) in slots.iter().zip(blocks) {
            idx.insert(*h, *s);
        }
        Ok(())
    }
}
