//! Access for verification tools (`cache verify`, in `inspect`): every valid slot and the
//! raw data of a slot, which these re-hash.

use super::layout::STATE_VALID;
use super::{read_full_at, BlockCache};
use crate::error::{IoContext, Result};
use crate::image::{Hash, BLOCK_SIZE};

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
}
