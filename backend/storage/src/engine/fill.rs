//! Blocks supplied by someone other than the remote (a guest data loader), and what is
//! present of a file (for the control channel's `.filled` and `.incomplete`).

use std::sync::atomic::Ordering::Relaxed;

use super::fetch::{decode_verified, Outcome};
use super::Engine;
use crate::error::{Error, Result};
use crate::image::{BlockKind, BlockRef, BLOCK_SIZE};

impl Engine {
    /// A block supplied by someone other than the remote (a guest data loader): verified,
    /// stored, and any reads waiting on it are woken. Ok(false) if it was already present.
    pub fn supply_block(&self, file: u32, index: u32, kind: BlockKind, data: &[u8]) -> Result<bool> {
        let f = self.file(file)?;
        let r = f
            .blocks
            .get(index as usize)
            .ok_or_else(|| Error::Invalid(format!("block {index} is past the end of the file")))?;
        if r.kind == BlockKind::Zero || self.cache.lookup(&r.hash).is_some() {
            return Ok(false);
        }
        let probe = BlockRef { kind, len: data.len() as u32, ..*r };
        let Some(plain) = (data.len() <= 2 * BLOCK_SIZE).then(|| decode_verified(&probe, data, None)).flatten() else {
            self.counters.verify_failures.fetch_add(1, Relaxed);
            return Err(Error::Corrupt(format!("block {index} does not match its hash")));
        };
        self.cache.insert_verified(&[(r.hash, &plain)])?;
        self.counters.blocks_supplied.fetch_add(1, Relaxed);
        if let Some(fl) = self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.hash) {
            fl.done.send_replace(Some(Outcome::Stored(plain.into())));
        }
        Ok(true)
    }

    /// Blocks of a file that are present (zero blocks always are), and its block count.
    pub fn fill_state(&self, file: u32) -> Result<(u64, u64)> {
        let f = self.file(file)?;
        let filled =
            f.blocks.iter().filter(|r| r.kind == BlockKind::Zero || self.cache.lookup(&r.hash).is_some()).count();
        Ok((filled as u64, f.blocks.len() as u64))
    }

    /// Ranges [begin, end) of present blocks.
    pub fn filled_ranges(&self, file: u32) -> Result<Vec<(u32, u32)>> {
        let f = self.file(file)?;
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (i, r) in f.blocks.iter().enumerate() {
            if r.kind == BlockKind::Zero || self.cache.lookup(&r.hash).is_some() {
                match out.last_mut() {
                    Some(l) if l.1 == i as u32 => l.1 += 1,
                    _ => out.push((i as u32, i as u32 + 1)),
                }
            }
        }
        Ok(out)
    }

    /// Indexes of the blocks of a read of `len` bytes at `offset` that are not in the cache
    /// (zero blocks are never missing). Never waits; a read past the end has none.
    pub fn missing_blocks(&self, file: u32, offset: u64, len: u32) -> Result<Vec<u32>> {
        let f = self.file(file)?;
        let (_, first, last) = Self::span(f, offset, len);
        Ok((first..last)
            .filter(|&b| f.blocks[b].kind != BlockKind::Zero && self.cache.lookup(&f.blocks[b].hash).is_none())
            .map(|b| b as u32)
            .collect())
    }

    /// Block range [first, last) a read of `len` bytes at `offset` covers, clamped to the file.
    pub fn block_span(&self, file: u32, offset: u64, len: u32) -> Result<(u32, u32)> {
        let f = self.file(file)?;
        let (_, first, last) = Self::span(f, offset, len);
        Ok((first as u32, last as u32))
    }
}
