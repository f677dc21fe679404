//! `.fill`: blocks a guest data loader supplies, each verified by the engine before it is
//! stored.

use std::sync::atomic::Ordering::Relaxed;

use incfs_fuse::Errno;
use incfs_wire::{FillBlock, COMPRESSION_NONE, COMPRESSION_ZSTD, FILL_FLAG_HASH, FILL_HEADER_SIZE};

use super::Control;
use crate::error::Error;
use crate::image::BlockKind;

impl Control {
    /// Processes the blocks of one `.fill` write in order. Returns the bytes of the blocks
    /// processed (a short count stops at the first block that failed); the error of the first
    /// block if it failed.
    pub fn fill(&self, data: &[u8]) -> Result<u32, Errno> {
        let mut at = 0usize;
        while at < data.len() {
            match self.fill_one(&data[at..]) {
                Ok(n) => at += n,
                Err(e) if at == 0 => return Err(e),
                Err(e) => {
                    tracing::debug!(errno = e, at, "fill stopped early");
                    break;
                }
            }
        }
        Ok(at as u32)
    }

    /// One block: header + data. Returns the bytes it took.
    fn fill_one(&self, rec: &[u8]) -> Result<usize, Errno> {
        let block = FillBlock::decode(rec).map_err(|e| match e {
            incfs_wire::DecodeError::DataTooLarge { .. } => libc::E2BIG,
            _ => libc::EINVAL,
        })?;
        let (id, index, flags, payload) = (block.header.file_id, block.header.block, block.header.flags, block.data);
        let len = payload.len();
        let kind = match block.header.compression {
            COMPRESSION_NONE => BlockKind::Raw,
            COMPRESSION_ZSTD => BlockKind::Zstd,
            _ => return Err(libc::EINVAL),
        };
        let idx = self.file_by_id(&id).ok_or(libc::ENOENT)?;
        let blocks = self.engine.image().file(idx).map(|f| f.nblocks()).unwrap_or(0);
        if flags & FILL_FLAG_HASH != 0 {
            // The host holds the whole hash tree already: hash blocks are accepted and ignored.
            return Ok(FILL_HEADER_SIZE + len);
        }
        if index as usize >= blocks {
            return Err(libc::ERANGE);
        }
        match self.engine.supply_block(idx, index, kind, payload) {
            Ok(true) => {
                self.counters.fill_blocks_written.fetch_add(1, Relaxed);
                Ok(FILL_HEADER_SIZE + len)
            }
            Ok(false) => {
                self.counters.fill_blocks_present.fetch_add(1, Relaxed);
                Ok(FILL_HEADER_SIZE + len)
            }
            Err(e) => {
                if matches!(e, Error::Corrupt(_)) {
                    self.counters.fill_blocks_rejected.fetch_add(1, Relaxed);
                    tracing::info!(file = %hex::encode(id), block = index, "guest-supplied block failed verification");
                }
                Err(e.errno())
            }
        }
    }
}
