//! Blocks supplied by someone other than the remote (a guest data loader), and what is
//! present of a file (for the control channel's `.filled` and `.incomplete`).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::fetch::{decode_verified, Outcome};
use super::Engine;
use crate::error::{Error, Result};
use crate::image::index::SEGMENT_BLOCKS;
use crate::image::{merkle, BlockKind, BlockRef, BLOCK_SIZE};

impl Engine {
    /// A block supplied by someone other than the remote (a guest data loader): verified,
    /// stored, and any reads waiting on it are woken. Ok(false) if it was already present.
    /// NotReady if its hash is still to be fetched (a fetch of it is started): supply it again.
    pub fn supply_block(self: &Arc<Self>, file: u32, index: u32, kind: BlockKind, data: &[u8]) -> Result<bool> {
        let f = self.file(file)?;
        let b = index as usize;
        if b >= f.nblocks() {
            return Err(Error::Invalid(format!("block {index} is past the end of the file")));
        }
        let Some(hash) = self.block_hashes(file, f, b, b + 1).and_then(|mut h| h.pop()) else {
            self.locate_in_background(file, b);
            return Err(Error::NotReady(format!("the hash of block {index} is being fetched")));
        };
        if merkle::is_zero_leaf(&hash) || self.cache.lookup(&hash).is_some() {
            return Ok(false);
        }
        let probe = BlockRef { hash, kind, len: data.len() as u32, blob: 0, offset: 0 };
        let Some(plain) = (data.len() <= 2 * BLOCK_SIZE).then(|| decode_verified(&probe, data, None)).flatten() else {
            self.counters.verify_failures.fetch_add(1, Relaxed);
            return Err(Error::Corrupt(format!("block {index} does not match its hash")));
        };
        self.cache.insert_verified(&[(hash, &plain)])?;
        self.counters.blocks_supplied.fetch_add(1, Relaxed);
        if let Some(fl) = self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&hash) {
            fl.done.send_replace(Some(Outcome::Stored(plain.into())));
        }
        Ok(true)
    }

    /// Per block of `file`, whether it is present (zero blocks always are); blocks whose hash
    /// is not loaded count as absent.
    fn presence(&self, file: u32) -> Result<Vec<bool>> {
        let f = self.file(file)?;
        let n = f.nblocks();
        let mut out = Vec::with_capacity(n);
        for first in (0..n).step_by(SEGMENT_BLOCKS) {
            let last = (first + SEGMENT_BLOCKS).min(n);
            match self.block_hashes(file, f, first, last) {
                Some(h) => out.extend(h.iter().map(|h| merkle::is_zero_leaf(h) || self.cache.lookup(h).is_some())),
                None => out.extend(std::iter::repeat_n(false, last - first)),
            }
        }
        Ok(out)
    }

    /// Blocks of a file that are present (zero blocks always are), and its block count.
    pub fn fill_state(&self, file: u32) -> Result<(u64, u64)> {
        let p = self.presence(file)?;
        Ok((p.iter().filter(|&&b| b).count() as u64, p.len() as u64))
    }

    /// Ranges [begin, end) of present blocks.
    pub fn filled_ranges(&self, file: u32) -> Result<Vec<(u32, u32)>> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (i, present) in self.presence(file)?.into_iter().enumerate() {
            if present {
                match out.last_mut() {
                    Some(l) if l.1 == i as u32 => l.1 += 1,
                    _ => out.push((i as u32, i as u32 + 1)),
                }
            }
        }
        Ok(out)
    }

    /// Indexes of the blocks of a read of `len` bytes at `offset` that are not in the cache
    /// (zero blocks are never missing; all of them while the file's index is not loaded).
    /// Never waits; a read past the end has none.
    pub fn missing_blocks(&self, file: u32, offset: u64, len: u32) -> Result<Vec<u32>> {
        let f = self.file(file)?;
        let (_, first, last) = Self::span(f, offset, len);
        let Some(hashes) = self.block_hashes(file, f, first, last) else {
            return Ok((first as u32..last as u32).collect());
        };
        Ok((first..last)
            .zip(hashes)
            .filter(|(_, h)| !merkle::is_zero_leaf(h) && self.cache.lookup(h).is_none())
            .map(|(b, _)| b as u32)
            .collect())
    }

    /// Block range [first, last) a read of `len` bytes at `offset` covers, clamped to the file.
    pub fn block_span(&self, file: u32, offset: u64, len: u32) -> Result<(u32, u32)> {
        let f = self.file(file)?;
        let (_, first, last) = Self::span(f, offset, len);
        Ok((first as u32, last as u32))
    }

    /// The first block from `from` on that is a hole (all zeroes, not stored) if `hole`, else
    /// the first that is data. Blocks whose hash is not loaded count as data.
    pub fn seek_block(&self, file: u32, from: usize, hole: bool) -> Result<Option<usize>> {
        let f = self.file(file)?;
        let n = f.nblocks();
        let mut b = from;
        while b < n {
            let last = ((b / SEGMENT_BLOCKS + 1) * SEGMENT_BLOCKS).min(n);
            let found = match self.block_hashes(file, f, b, last) {
                Some(h) => h.iter().position(|h| merkle::is_zero_leaf(h) == hole),
                None => (!hole).then_some(0),
            };
            if let Some(k) = found {
                return Ok(Some(b + k));
            }
            b = last;
        }
        Ok(None)
    }
}
