//! The slot records (`slots`): checked on every read, written by inserts, eviction and pins.
//!
//! The file is mapped shared into every daemon, so that checking a record and noting its
//! access time on the read path are memory accesses, not system calls. Other processes write
//! the same file with pwrite: mapped and written pages are the same page cache pages.

use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};

use super::layout::{Record, RECORD_LEN, REC_ATIME, REC_FLAGS, REC_STATE, STATE_VALID};
use super::read_full_at;
use crate::error::{IoContext, Result};
use crate::image::Hash;

/// Access times are written back at most this often per block (seconds).
const TOUCH_EVERY: u32 = 2;

/// Address space reserved for the mapped slots file: 64 GiB of records cover 5.7 TB of
/// blocks. Records past it are read with pread.
const RECORD_MAP_BYTES: u64 = 1 << 36;

pub(super) fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

pub(super) struct Records {
    pub(super) file: File,
    /// `file` mapped, for the read path (None if it could not be mapped).
    map: Option<RecordMap>,
}

impl Records {
    pub(super) fn new(file: File) -> Self {
        Records { map: RecordMap::new(&file), file }
    }

    /// After the data of a run was copied: whether every slot of the run still holds its
    /// hash and is valid (noting the access if so).
    pub(super) fn check_run<'a>(&self, first: u64, hashes: impl ExactSizeIterator<Item = &'a Hash>) -> Result<bool> {
        let n = hashes.len();
        if let Some(run) = self.map.as_ref().and_then(|m| m.run(&self.file, first, n)) {
            fence(Ordering::Acquire);
            let now = now_secs();
            return Ok(hashes.enumerate().all(|(i, h)| run.check_and_touch(i, h, now)));
        }
        let mut meta = vec![0u8; n * RECORD_LEN];
        let got = read_full_at(&self.file, &mut meta, first * RECORD_LEN as u64).ctx(|| "read cache slots".into())?;
        let ok = got == meta.len()
            && hashes
                .zip(meta.chunks_exact(RECORD_LEN).map(Record))
                .all(|(h, rec)| rec.state() == STATE_VALID && rec.holds(h));
        if ok {
            self.touch(first, &meta);
        }
        Ok(ok)
    }

    /// Writes back access times for LRU, at most every TOUCH_EVERY seconds per block: the
    /// records just read carry the last time, so deciding costs no lookup.
    fn touch(&self, first: u64, meta: &[u8]) {
        let now = now_secs();
        for (i, rec) in meta.chunks_exact(RECORD_LEN).map(Record).enumerate() {
            if now.saturating_sub(rec.atime()) >= TOUCH_EVERY {
                let _ = self
                    .file
                    .write_all_at(&now.to_le_bytes(), (first + i as u64) * RECORD_LEN as u64 + REC_ATIME as u64);
            }
        }
    }

    /// Writes a whole record (its state last: see `set_state`).
    pub(super) fn write(&self, slot: u64, rec: &[u8; RECORD_LEN]) -> Result<()> {
        self.file.write_all_at(rec, slot * RECORD_LEN as u64).ctx(|| "write cache slots".into())
    }

    /// Sets a slot's state: the last word of a record written, so a reader that sees
    /// VALID sees the whole record (readers load the state first).
    pub(super) fn set_state(&self, slot: u64, state: u32) -> Result<()> {
        match self.map.as_ref().and_then(|m| m.run(&self.file, slot, 1)) {
            Some(run) => {
                run.state(0).store(state.to_le(), Ordering::Release);
                Ok(())
            }
            None => self
                .file
                .write_all_at(&state.to_le_bytes(), slot * RECORD_LEN as u64 + REC_STATE as u64)
                .ctx(|| "write cache slots".into()),
        }
    }

    pub(super) fn set_flags(&self, slot: u64, flags: u32) -> Result<()> {
        self.file
            .write_all_at(&flags.to_le_bytes(), slot * RECORD_LEN as u64 + REC_FLAGS as u64)
            .ctx(|| "write cache slots".into())
    }

    /// Calls `f` on the records of slots [0, end), read with pread in chunks (a record past
    /// the end of the file reads as empty).
    pub(super) fn scan(&self, end: u64, mut f: impl FnMut(u64, Record<'_>)) -> Result<()> {
        let chunk = 8192u64;
        let mut buf = vec![0u8; chunk as usize * RECORD_LEN];
        let mut s = 0;
        while s < end {
            let n = (end - s).min(chunk);
            let bytes = &mut buf[..n as usize * RECORD_LEN];
            let got = read_full_at(&self.file, bytes, s * RECORD_LEN as u64).ctx(|| "read cache slots".into())?;
            bytes[got..].fill(0);
            for (i, rec) in bytes.chunks_exact(RECORD_LEN).map(Record).enumerate() {
                f(s + i as u64, rec);
            }
            s += n;
        }
        Ok(())
    }
}

/// The slots file mapped shared. The mapping is reserved once with room to grow, because the
/// file only ever grows (nothing truncates it); a record is touched only once the file is
/// known to reach it, since a page past the end of a mapped file is SIGBUS.
struct RecordMap {
    /// MmapRaw, not MmapMut: the records change under us (other processes write them), so
    /// they are only ever reached through atomics, never through a `&[u8]`.
    map: MmapRaw,
    /// File bytes known to exist.
    covered: AtomicU64,
}

/// Records [first, first + n) of a [`RecordMap`], known to be inside the file.
struct RecordRun<'a> {
    at: *mut u8,
    _map: PhantomData<&'a RecordMap>,
}

impl RecordMap {
    fn new(file: &File) -> Option<Self> {
        // More than the file holds now: mapping past the end is allowed, touching it is not.
        let len = usize::try_from(RECORD_MAP_BYTES).ok()?;
        match MmapOptions::new().len(len).no_reserve_swap().map_raw(file) {
            Ok(map) => Some(RecordMap { map, covered: AtomicU64::new(0) }),
            Err(e) => {
                tracing::debug!("cannot map cache slots: {e}");
                None
            }
        }
    }

    /// Records [first, first + n), if mapped and inside the file.
    fn run(&self, file: &File, first: u64, n: usize) -> Option<RecordRun<'_>> {
        let end = first.checked_add(n as u64)?.checked_mul(RECORD_LEN as u64)?;
        if end > RECORD_MAP_BYTES {
            return None;
        }
        if end > self.covered.load(Ordering::Acquire) {
            let len = file.metadata().ok()?.len();
            self.covered.fetch_max(len, Ordering::AcqRel);
            if end > len {
                return None;
            }
        }
        // SAFETY: end <= RECORD_MAP_BYTES, the mapping's length, so the offset is inside it.
        let at = unsafe { self.map.as_mut_ptr().add((first * RECORD_LEN as u64) as usize) };
        Some(RecordRun { at, _map: PhantomData })
    }
}

// Hand-written atomics over the mapping (no crate offers them): a record is shared memory
// that other processes change, so plain references to it would be undefined behaviour.
impl RecordRun<'_> {
    /// A 32-bit word of record i, as stored (little-endian).
    fn word32(&self, i: usize, off: usize) -> &AtomicU32 {
        // SAFETY: record i of the run is inside the mapping and the file; records are
        // 48-byte aligned in a page-aligned mapping, so `off` (a multiple of 4) is aligned.
        unsafe { AtomicU32::from_ptr(self.at.add(i * RECORD_LEN + off).cast()) }
    }

    fn state(&self, i: usize) -> &AtomicU32 {
        self.word32(i, REC_STATE)
    }

    /// Whether record i holds `hash` and is valid (state first: see `set_state`); notes the
    /// access time at most every TOUCH_EVERY seconds.
    fn check_and_touch(&self, i: usize, hash: &Hash, now: u32) -> bool {
        if u32::from_le(self.state(i).load(Ordering::Acquire)) != STATE_VALID {
            return false;
        }
        let same = hash
            .chunks_exact(4)
            .enumerate()
            .all(|(k, w)| self.word32(i, k * 4).load(Ordering::Relaxed).to_ne_bytes() == w);
        if same {
            let atime = self.word32(i, REC_ATIME);
            if now.saturating_sub(u32::from_le(atime.load(Ordering::Relaxed))) >= TOUCH_EVERY {
                atime.store(now.to_le(), Ordering::Relaxed);
            }
        }
        same
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::layout::empty_record;

    #[test]
    fn the_map_and_pread_pwrite_see_the_same_records() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("slots"))
            .expect("open");
        let records = Records::new(file);
        assert!(records.map.is_some(), "slots are mapped");
        let hash = [5u8; 32];
        // Past the end of the file: not looked at through the map, and a miss.
        assert!(!records.check_run(3, [hash].iter()).expect("check"));
        records.write(3, &empty_record(&hash, 0)).expect("write");
        assert!(!records.check_run(3, [hash].iter()).expect("check"), "an empty record is never served");
        records.set_state(3, STATE_VALID).expect("state");
        assert!(records.check_run(3, [hash].iter()).expect("check"));
        assert!(!records.check_run(3, [[6u8; 32]].iter()).expect("check"), "another hash is a miss");
        let mut seen = Vec::new();
        records.scan(4, |slot, rec| seen.push((slot, rec.state(), rec.atime() > 0))).expect("scan");
        assert_eq!(seen[3], (3, STATE_VALID, true), "pread sees the state and access time stored through the map");
    }
}
