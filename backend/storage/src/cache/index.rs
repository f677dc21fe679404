//! What this process knows of the cache: hash -> slot, learnt from this process's inserts
//! and by tailing the log the others append to. Optimistic: a slot's record is checked on
//! every read, so an entry that went stale costs a miss, never wrong bytes.
//!
//! Compact, because every daemon on a cache holds one for all the cache's blocks (every
//! image's): an entry is the first 96 bits of the hash and a 32-bit slot, 16 bytes where the
//! whole hash and a u64 took 40. Two blocks sharing a prefix (2^48 work to make on purpose,
//! with blocks the maker's own images hold) cost a miss: the full hash is in the slot's
//! record, which every read and `BlockCache::lookup` check.

use std::collections::HashMap;
use std::fs::File;

use super::layout::{decode_log_record, H_EPOCH, H_LOG_END, LOG_RECORD_LEN, MAX_SLOTS};
use super::{read_full_at, BlockCache};
use crate::error::{IoContext, Result};
use crate::image::Hash;

/// Log records not yet written that an index keeps looking for, at most.
const MAX_PENDING: usize = 1 << 16;

/// The part of a hash an entry keeps.
type Key = [u8; 12];

fn key(hash: &Hash) -> Key {
    let mut k = [0u8; 12];
    k.copy_from_slice(&hash[..12]);
    k
}

#[derive(Default)]
pub(super) struct Index {
    /// Slots are below MAX_SLOTS (< 2^32).
    slots: HashMap<Key, u32>,
    /// The log epoch `log_pos` refers to (gc rewrites the log under a new one).
    epoch: u64,
    /// Bytes of the log read so far.
    log_pos: u64,
    /// Log records that were still being written when read (all zero): read again later.
    pending: Vec<u64>,
}

impl Index {
    pub(super) fn slot(&self, hash: &Hash) -> Option<u64> {
        self.slots.get(&key(hash)).map(|&s| u64::from(s))
    }

    /// Notes where `hash` is; a slot past MAX_SLOTS is not kept (never served anyway).
    pub(super) fn insert(&mut self, hash: &Hash, slot: u64) {
        if slot < MAX_SLOTS {
            if let Ok(s) = u32::try_from(slot) {
                self.slots.insert(key(hash), s);
            }
        }
    }

    /// Drops the entries of these slots (sorted).
    pub(super) fn forget_slots(&mut self, sorted: &[u64]) {
        self.slots.retain(|_, slot| sorted.binary_search(&u64::from(*slot)).is_err());
    }

    /// Drops the entries that point into a run of slots found stale.
    /// Drops the entries of these (slot, block) pairs, if the index still has them there.
    fn forget<'a>(&mut self, gone: impl IntoIterator<Item = (u64, &'a Hash)>) {
        for (slot, h) in gone {
            if self.slot(h) == Some(slot) {
                self.slots.remove(&key(h));
            }
        }
    }

    fn add_log_record(&mut self, rec: &[u8]) {
        let (hash, slot) = decode_log_record(rec);
        // Checked again on every read; bounded (by insert) so that no offset computed from
        // it can overflow.
        self.insert(&hash, slot);
    }

    /// Notes a log record not written yet, to read again later (a bounded number: forgetting
    /// one costs a miss, never wrong bytes).
    fn add_pending(&mut self, pos: u64) {
        if self.pending.len() < MAX_PENDING {
            self.pending.push(pos);
        }
    }

    /// Reads the log of `epoch` up to `end`, or as far as the file goes (the rest is being
    /// written): what is new since the last call, and the records that were pending then.
    fn catch_up(&mut self, log: &File, epoch: u64, end: u64) -> Result<()> {
        if epoch != self.epoch {
            // gc rewrote the log: start over.
            *self = Index { epoch, ..Index::default() };
        }
        let on_file = log.metadata().ctx(|| "stat cache log".into())?.len();
        let end = end.min(on_file - on_file % LOG_RECORD_LEN as u64);
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            for pos in pending {
                let mut rec = [0u8; LOG_RECORD_LEN];
                if read_full_at(log, &mut rec, pos).ctx(|| "read cache log".into())? == LOG_RECORD_LEN
                    && rec != [0u8; LOG_RECORD_LEN]
                {
                    self.add_log_record(&rec);
                } else {
                    self.add_pending(pos);
                }
            }
        }
        let mut buf = vec![0u8; 4096 * LOG_RECORD_LEN];
        while self.log_pos < end {
            let start = self.log_pos;
            let want = ((end - start) as usize).min(buf.len());
            let got = read_full_at(log, &mut buf[..want], start).ctx(|| "read cache log".into())?;
            let got = got - got % LOG_RECORD_LEN;
            for (i, rec) in buf[..want].chunks_exact(LOG_RECORD_LEN).enumerate() {
                let pos = start + (i * LOG_RECORD_LEN) as u64;
                if i * LOG_RECORD_LEN >= got || rec.iter().all(|&b| b == 0) {
                    self.add_pending(pos);
                } else {
                    self.add_log_record(rec);
                }
            }
            self.log_pos = start + (want - want % LOG_RECORD_LEN) as u64;
            if want < LOG_RECORD_LEN {
                break;
            }
        }
        Ok(())
    }
}

impl BlockCache {
    /// Learns about blocks other processes have stored since the last look.
    pub fn refresh(&self) -> Result<()> {
        let epoch = self.read_header_field(H_EPOCH)?;
        let (mut log_epoch, mut log) = self.log();
        if log_epoch != epoch {
            // gc renamed a new log into place: open it (the header names its epoch).
            (log_epoch, log) = self.with_header(|h, _| Ok((h.epoch, self.log_of_epoch_locked(h.epoch)?)))?;
        }
        let end = self.read_header_field(H_LOG_END)?;
        if self.read_header_field(H_EPOCH)? != log_epoch {
            // Another gc meanwhile: `end` may be the newer log's; catch up next time.
            return Ok(());
        }
        self.index_mut().catch_up(&log, log_epoch, end)
    }

    /// The slot holding `hash`, as far as this process knows, checked against the slot's
    /// record: a block another process evicted, or an entry of another block sharing its
    /// index key, is None.
    pub fn lookup(&self, hash: &Hash) -> Option<u64> {
        let slot = self.index().slot(hash)?;
        matches!(self.records.snapshot_run(slot, std::iter::once(hash)), Ok(Some(_))).then_some(slot)
    }

    /// Slots of several blocks under one lock (the warm read path), unchecked: the read
    /// that follows checks each slot's record.
    pub fn lookup_many<'a>(&self, hashes: impl Iterator<Item = &'a Hash>, out: &mut Vec<Option<u64>>) {
        let idx = self.index();
        out.extend(hashes.map(|h| idx.slot(h)));
    }

    /// Like lookup, but first catches up with other processes when the hash is unknown.
    pub fn lookup_fresh(&self, hash: &Hash) -> Result<Option<u64>> {
        if let Some(s) = self.lookup(hash) {
            return Ok(Some(s));
        }
        self.refresh()?;
        Ok(self.lookup(hash))
    }

    /// Drops index entries that point into a run found stale.
    /// After a read of a run failed its check: drops the index entries of the blocks whose
    /// slot no longer holds them. The others still do (one slot evicted must not make the
    /// whole run look missing and be fetched again).
    pub(super) fn forget_run<'a>(&self, first: u64, hashes: impl Iterator<Item = &'a Hash>) {
        let gone: Vec<(u64, &Hash)> = (first..)
            .zip(hashes)
            .filter(|&(slot, h)| !matches!(self.records.snapshot_run(slot, std::iter::once(h)), Ok(Some(_))))
            .collect();
        if !gone.is_empty() {
            self.index_mut().forget(gone);
        }
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn index_mut(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::super::layout::encode_log_record;
    use super::*;

    /// A log record is another process's word (or a corrupt file's): a slot the cache cannot
    /// have, or one that does not fit the index's 32 bits, is not kept.
    #[test]
    fn log_records_naming_impossible_slots_are_dropped() {
        let mut idx = Index::default();
        for (i, slot) in [u64::MAX, MAX_SLOTS, 1 << 32, (1 << 32) + 7, MAX_SLOTS - 1, 5].into_iter().enumerate() {
            let mut rec = Vec::new();
            encode_log_record(&[i as u8 + 1; 32], slot, &mut rec);
            idx.add_log_record(&rec);
        }
        for i in 0..4u8 {
            assert_eq!(idx.slot(&[i + 1; 32]), None, "record {i}");
        }
        assert_eq!(idx.slot(&[5; 32]), Some(MAX_SLOTS - 1));
        assert_eq!(idx.slot(&[6; 32]), Some(5));
    }
}
