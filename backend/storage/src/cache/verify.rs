//! Re-hashing cached blocks: `cache verify` (and `--repair`, which drops the bad ones), and
//! reads that re-hash every block (`set_verify_reads`, for caches on shared storage).

use std::sync::atomic::Ordering;

use super::layout::STATE_VALID;
use super::{read_full_at, BlockCache};
use crate::error::{Error, IoContext, Result};
use crate::image::merkle::leaf_hash;
use crate::image::{Hash, BLOCK_SIZE};

/// What `cache verify` found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    /// Valid blocks whose data hashes to their record's hash.
    pub good: u64,
    /// Valid blocks whose data does not.
    pub bad: u64,
    /// Bad blocks dropped from the cache (with `repair`).
    pub dropped: u64,
}

/// One slot re-hashed.
enum SlotCheck {
    Good,
    Bad {
        dropped: bool,
    },
    /// Evicted or reused while it was read: says nothing.
    Changed,
}

impl BlockCache {
    /// Every valid slot: (slot, hash). For verification tools and tests.
    pub fn valid_slots(&self) -> Result<Vec<(u64, Hash)>> {
        let mut out = Vec::new();
        self.scan_records(|slot, rec| {
            if rec.state() == STATE_VALID {
                out.push((slot, rec.hash()));
            }
        })?;
        Ok(out)
    }

    /// Reads one slot's data without validation (for `cache verify`).
    pub fn raw_block(&self, slot: u64, out: &mut [u8; BLOCK_SIZE]) -> Result<()> {
        let n = read_full_at(&self.blocks, out, slot * BLOCK_SIZE as u64).ctx(|| "read cache block".into())?;
        out[n..].fill(0);
        Ok(())
    }

    /// Re-hashes every valid block; with `repair`, drops the ones that do not match their
    /// hash (every daemon then misses them and fetches them again). Safe while daemons run:
    /// a slot that changes while it is read is skipped, and one is dropped only if its
    /// record is still the one its data was read under.
    pub fn verify_blocks(&self, repair: bool) -> Result<VerifyReport> {
        let mut rep = VerifyReport::default();
        for (slot, hash) in self.valid_slots()? {
            match self.check_slot(slot, &hash, repair)? {
                SlotCheck::Good => rep.good += 1,
                SlotCheck::Bad { dropped } => {
                    rep.bad += 1;
                    rep.dropped += u64::from(dropped);
                }
                SlotCheck::Changed => {}
            }
        }
        Ok(rep)
    }

    /// Makes every read re-hash the blocks it copies (a mismatch is a miss, and the block
    /// is dropped): for caches on storage other hosts or users can write. Off by default.
    pub fn set_verify_reads(&self, on: bool) {
        self.verify_reads.store(on, Ordering::Relaxed);
    }

    pub(super) fn verifies_reads(&self) -> bool {
        self.verify_reads.load(Ordering::Relaxed)
    }

    /// After a confirmed read of a run into `data` (with `verify_reads`): whether every block
    /// hashes to its hash. Drops the blocks that do not.
    pub(super) fn verify_run(&self, first: u64, hashes: &[Hash], data: &[u8]) -> Result<bool> {
        let mut ok = true;
        for (i, (h, block)) in hashes.iter().zip(data.chunks_exact(BLOCK_SIZE)).enumerate() {
            if leaf_hash(block) != *h {
                ok = false;
                // Checked again from the file: dropped only if still bad and unchanged.
                self.check_slot(first + i as u64, h, true)?;
            }
        }
        if !ok {
            self.forget_run(first, hashes.iter());
        }
        Ok(ok)
    }

    /// Re-hashes one slot's data, dropping it if bad and `drop`.
    fn check_slot(&self, slot: u64, hash: &Hash, drop: bool) -> Result<SlotCheck> {
        let Some(before) = self.records.snapshot_run(slot, std::iter::once(hash))? else {
            return Ok(SlotCheck::Changed);
        };
        let mut buf = [0u8; BLOCK_SIZE];
        self.raw_block(slot, &mut buf)?;
        if leaf_hash(&buf) == *hash {
            return Ok(SlotCheck::Good);
        }
        if !drop {
            if self.records.snapshot_run(slot, std::iter::once(hash))? != Some(before) {
                return Ok(SlotCheck::Changed);
            }
            tracing::error!(slot, "cached block does not match its hash");
            return Ok(SlotCheck::Bad { dropped: false });
        }
        let _evicting = self.locks.evict().map_err(|e| Error::io("lock cache for eviction", e))?;
        if !self.records.evict_if_unchanged(slot, hash, before)? {
            return Ok(SlotCheck::Changed);
        }
        tracing::error!(slot, "cached block does not match its hash: dropped");
        self.release_evicted(&[slot])?;
        Ok(SlotCheck::Bad { dropped: true })
    }
}
