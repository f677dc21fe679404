//! The on-disk format of a cache directory, shared by every daemon of a host: a change here
//! is a change of [`VERSION`].
//!
//! ```text
//! header     magic, version and the shared counters below (u64s, see H_*)
//! blocks     slot i = plaintext at i*4096 (freed slots are hole-punched)
//! slots      slot i = 48-byte record at i*48: hash[32], state u32, generation u32,
//!            atime u32, flags u32 (state and generation form one aligned u64, read and
//!            written atomically: see `records.rs`)
//! log        40-byte insert records (hash[32], slot u64), appended in allocation order;
//!            processes tail it to learn what others stored
//! free       a stack of u64 slot numbers freed by eviction, reused by inserts
//! lock       open-file-description locks only: byte 0 guards allocation and the header,
//!            byte 1 is held shared by writers and exclusively by gc, byte 2 by the one
//!            evicting process, bytes from 4096 are per-hash-bucket fetch locks, bytes
//!            from 2^61 announce blob ranges being fetched (shared locks, one 2^40-byte
//!            span per blob-id bucket; a hint, which older daemons ignore)
//! manifests/ verified image manifests, so a restart needs no remote
//! dictionaries/ verified image zstd dictionaries, named by their SHA-256
//! ```
//!
//! All integers are little-endian.

use crate::image::Hash;

pub(super) const HEADER_FILE: &str = "header";
pub(super) const BLOCKS_FILE: &str = "blocks";
pub(super) const SLOTS_FILE: &str = "slots";
pub(super) const LOG_FILE: &str = "log";
pub(super) const FREE_FILE: &str = "free";
pub(super) const LOCK_FILE: &str = "lock";
pub(super) const MANIFESTS_DIR: &str = "manifests";
pub(super) const DICTIONARIES_DIR: &str = "dictionaries";

pub(super) const MAGIC: &[u8; 8] = b"INCFSCAC";
/// 3: slot records carry a generation (2 had none; a version-2 cache is refused).
pub(super) const VERSION: u32 = 3;
// Header fields (u64 at these offsets).
pub(super) const H_NEXT_SLOT: u64 = 16;
pub(super) const H_LOG_END: u64 = 24;
pub(super) const H_LIVE: u64 = 32;
pub(super) const H_NFREE: u64 = 40;
pub(super) const H_HITS: u64 = 48;
pub(super) const H_MISSES: u64 = 56;
pub(super) const H_EPOCH: u64 = 64;
pub(super) const H_FETCHED: u64 = 72;
pub(super) const HEADER_LEN: usize = 80;

/// Bytes of one slot record in `slots`.
pub(super) const RECORD_LEN: usize = 48;
// Fields of a slot record (byte offsets).
pub(super) const REC_STATE: usize = 32;
/// Bumped whenever the slot's data may change (eviction, and an insert before its data).
pub(super) const REC_GEN: usize = 36;
pub(super) const REC_ATIME: usize = 40;
pub(super) const REC_FLAGS: usize = 44;
/// The most slots a cache may have: 64 GiB of records (5.7 TB of blocks). Bounds every
/// slot number read from a cache file.
pub(super) const MAX_SLOTS: u64 = (1 << 36) / RECORD_LEN as u64;
/// The longest log a cache may have (gc compacts it): bounds `log_end`, so that appending
/// cannot overflow.
pub(super) const MAX_LOG_BYTES: u64 = 1 << 50;
/// Bytes of one insert record in `log`.
pub(super) const LOG_RECORD_LEN: usize = 40;
/// Bytes of one slot number in `free`.
pub(super) const FREE_ENTRY_LEN: usize = 8;

/// An empty record: allocated, not (yet) written.
pub(super) const STATE_EMPTY: u32 = 0;
pub(super) const STATE_VALID: u32 = 1;
pub(super) const STATE_EVICTED: u32 = 2;
pub(super) const FLAG_PINNED: u32 = 1;

// Bytes of `lock` that the OFD locks are taken on.
pub(super) const LOCK_ALLOC: i64 = 0;
pub(super) const LOCK_WRITERS: i64 = 1;
pub(super) const LOCK_EVICT: i64 = 2;
pub(super) const LOCK_BUCKETS_BASE: i64 = 4096;
pub(super) const LOCK_BUCKETS: u32 = 1 << 20;
pub(super) const LOCK_RANGES_BASE: i64 = 1 << 61;
pub(super) const LOCK_RANGE_BLOBS: u32 = 1 << 20;
/// Bytes of blob per blob-id bucket (a blob's offsets past it share its last byte).
pub(super) const LOCK_RANGE_SPAN: u64 = 1 << 40;

pub(super) fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(super) fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Header values read or written together under the allocation lock.
#[derive(Default)]
pub(super) struct Header {
    pub(super) next_slot: u64,
    pub(super) log_end: u64,
    pub(super) live: u64,
    pub(super) nfree: u64,
    pub(super) hits: u64,
    pub(super) misses: u64,
    pub(super) epoch: u64,
    pub(super) fetched: u64,
}

/// Why a header is refused.
#[derive(Debug, thiserror::Error)]
pub enum BadHeader {
    #[error("not an incfs cache")]
    NotACache,
    #[error(
        "cache format version {found}, this incfsd uses version {VERSION}: delete the directory (it is only a \
         cache) or use another one"
    )]
    OldVersion { found: u32 },
    #[error("corrupt cache header ({0}): delete the directory (it is only a cache) or use another one")]
    Corrupt(&'static str),
}

impl Header {
    /// Checks the first `b.len()` bytes of a header file: magic, version, and values that
    /// every other file's size and every allocation are bounded by.
    pub(super) fn check(b: &[u8]) -> Result<(), BadHeader> {
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            return Err(BadHeader::NotACache);
        }
        let found = le32(&b[8..12]);
        if found != VERSION {
            return Err(BadHeader::OldVersion { found });
        }
        let h = Header::decode(b[..HEADER_LEN].try_into().map_err(|_| BadHeader::NotACache)?);
        if h.next_slot > MAX_SLOTS {
            return Err(BadHeader::Corrupt("next slot past the largest cache"));
        }
        if h.nfree > h.next_slot {
            return Err(BadHeader::Corrupt("more free slots than slots"));
        }
        if h.live > h.next_slot {
            return Err(BadHeader::Corrupt("more live blocks than slots"));
        }
        if h.log_end % LOG_RECORD_LEN as u64 != 0 || h.log_end > MAX_LOG_BYTES {
            return Err(BadHeader::Corrupt("log end inside a record or past the longest log"));
        }
        Ok(())
    }

    pub(super) fn decode(b: &[u8; HEADER_LEN]) -> Self {
        Header {
            next_slot: le64(&b[H_NEXT_SLOT as usize..]),
            log_end: le64(&b[H_LOG_END as usize..]),
            live: le64(&b[H_LIVE as usize..]),
            nfree: le64(&b[H_NFREE as usize..]),
            hits: le64(&b[H_HITS as usize..]),
            misses: le64(&b[H_MISSES as usize..]),
            epoch: le64(&b[H_EPOCH as usize..]),
            fetched: le64(&b[H_FETCHED as usize..]),
        }
    }

    pub(super) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut w = [0u8; HEADER_LEN];
        w[..8].copy_from_slice(MAGIC);
        w[8..12].copy_from_slice(&VERSION.to_le_bytes());
        for (off, v) in [
            (H_NEXT_SLOT, self.next_slot),
            (H_LOG_END, self.log_end),
            (H_LIVE, self.live),
            (H_NFREE, self.nfree),
            (H_HITS, self.hits),
            (H_MISSES, self.misses),
            (H_EPOCH, self.epoch),
            (H_FETCHED, self.fetched),
        ] {
            w[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        w
    }
}

/// One slot record as read from `slots` (RECORD_LEN bytes).
#[derive(Clone, Copy)]
pub(super) struct Record<'a>(pub(super) &'a [u8]);

impl Record<'_> {
    pub(super) fn hash(&self) -> Hash {
        let mut h = [0u8; 32];
        h.copy_from_slice(&self.0[..32]);
        h
    }

    pub(super) fn holds(&self, hash: &Hash) -> bool {
        &self.0[..32] == hash
    }

    pub(super) fn state(&self) -> u32 {
        le32(&self.0[REC_STATE..])
    }

    pub(super) fn generation(&self) -> u32 {
        le32(&self.0[REC_GEN..])
    }

    pub(super) fn atime(&self) -> u32 {
        le32(&self.0[REC_ATIME..])
    }

    pub(super) fn flags(&self) -> u32 {
        le32(&self.0[REC_FLAGS..])
    }
}

/// Appends the log record "`hash` is in `slot`".
pub(super) fn encode_log_record(hash: &Hash, slot: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(hash);
    out.extend_from_slice(&slot.to_le_bytes());
}

/// (hash, slot) of a LOG_RECORD_LEN-byte log record.
pub(super) fn decode_log_record(rec: &[u8]) -> (Hash, u64) {
    let mut h = [0u8; 32];
    h.copy_from_slice(&rec[..32]);
    (h, le64(&rec[32..40]))
}
