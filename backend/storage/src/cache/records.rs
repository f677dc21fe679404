//! The slot records (`slots`): checked on every read, written by inserts, eviction and pins.
//!
//! The file is mapped shared into every daemon, so that checking a record and noting its
//! access time on the read path are memory accesses, not system calls. Other processes write
//! the same file with pwrite: mapped and written pages are the same page cache pages.
//!
//! A record's state and generation are one aligned u64, loaded and stored atomically. The
//! generation is bumped before a slot's data may change (eviction marks the slot evicted,
//! an insert marks it empty, both with a new generation, before touching the data), so a
//! reader that sees the same valid (state, generation) before and after copying the data
//! copied data that no one changed meanwhile (a seqlock across processes).

use std::fs::File;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};

use super::layout::{
    le64, Record, MAX_SLOTS, RECORD_LEN, REC_ATIME, REC_FLAGS, REC_STATE, STATE_EMPTY, STATE_EVICTED, STATE_VALID,
};
use super::read_full_at;
use crate::error::{IoContext, Result};
use crate::image::Hash;

/// Access times are written back at most this often per block (seconds).
const TOUCH_EVERY: u32 = 2;

/// Address space reserved for the mapped slots file: the records of MAX_SLOTS slots.
const RECORD_MAP_BYTES: u64 = MAX_SLOTS * RECORD_LEN as u64;

pub(super) fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

/// The (state, generation) word of a record: state in the low half, as stored.
fn state_of(word: u64) -> u32 {
    word as u32
}

fn generation_of(word: u64) -> u32 {
    (word >> 32) as u32
}

fn word(state: u32, generation: u32) -> u64 {
    u64::from(state) | u64::from(generation) << 32
}

/// What a reader saw of a run's records before copying its data: every slot valid with
/// the expected hash, and the sum of their generations. Generations only grow, so an equal
/// sum after the copy, every slot still valid, means no slot changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RunSnapshot(u64);

/// Which look at a run's records: before the copy (checks the file still holds them) or
/// after it (notes the accesses, at most every TOUCH_EVERY seconds per block).
#[derive(Clone, Copy)]
enum Pass {
    Snapshot,
    Confirm { now: u32 },
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

    /// The file's length now. fstat(2), not `File::metadata` (statx asking for every
    /// field): this runs on every cached read.
    fn file_len(&self) -> Result<u64> {
        let st = rustix::fs::fstat(&self.file).map_err(std::io::Error::from).ctx(|| "stat cache slots".into())?;
        Ok(u64::try_from(st.st_size).unwrap_or(0))
    }

    /// Before copying a run's data: None unless every slot holds its hash and is valid.
    pub(super) fn snapshot_run<'a>(
        &self,
        first: u64,
        hashes: impl ExactSizeIterator<Item = &'a Hash>,
    ) -> Result<Option<RunSnapshot>> {
        self.sum_generations(first, hashes, Pass::Snapshot)
    }

    /// After copying a run's data: whether every slot is as `before` saw it (noting the
    /// accesses).
    pub(super) fn confirm_run<'a>(
        &self,
        first: u64,
        hashes: impl ExactSizeIterator<Item = &'a Hash>,
        before: RunSnapshot,
    ) -> Result<bool> {
        Ok(self.sum_generations(first, hashes, Pass::Confirm { now: now_secs() })? == Some(before))
    }

    /// The run's snapshot if every slot is valid and holds its hash.
    fn sum_generations<'a>(
        &self,
        first: u64,
        hashes: impl ExactSizeIterator<Item = &'a Hash>,
        pass: Pass,
    ) -> Result<Option<RunSnapshot>> {
        let n = hashes.len();
        if n == 0 {
            return Ok(Some(RunSnapshot(0)));
        }
        let Some(end) = first.checked_add(n as u64).filter(|&e| e <= MAX_SLOTS) else { return Ok(None) };
        // One fstat per read, in the snapshot: the confirmation a few microseconds later
        // reads the same records (the fstat is the one guard against SIGBUS; see RecordMap).
        if let Pass::Snapshot = pass {
            if end * RECORD_LEN as u64 > self.file_len()? {
                return Ok(None);
            }
        }
        let mut sum = 0u64;
        if let Some(run) = self.map.as_ref().map(|m| m.run(first)) {
            for (i, h) in hashes.enumerate() {
                let w = u64::from_le(run.state_word(i).load(Ordering::Acquire));
                if state_of(w) != STATE_VALID || !run.holds(i, h) {
                    return Ok(None);
                }
                sum += u64::from(generation_of(w));
                if let Pass::Confirm { now } = pass {
                    // A memory store, not a pwrite: a write(2) would update the file's mtime
                    // and dirty its inode on every read. If the run turns out stale, a
                    // reused slot's block merely looks recently used.
                    let atime = run.word32(i, REC_ATIME);
                    if now.saturating_sub(u32::from_le(atime.load(Ordering::Relaxed))) >= TOUCH_EVERY {
                        atime.store(now.to_le(), Ordering::Relaxed);
                    }
                }
            }
            // The copy (or the caller's next load) must not move before these loads.
            fence(Ordering::Acquire);
            return Ok(Some(RunSnapshot(sum)));
        }
        // Not mapped: pread (without the map's atomicity; only if mapping failed).
        let mut meta = vec![0u8; n * RECORD_LEN];
        let got = read_full_at(&self.file, &mut meta, first * RECORD_LEN as u64).ctx(|| "read cache slots".into())?;
        if got != meta.len() {
            return Ok(None);
        }
        let mut stale = Vec::new();
        for (i, (h, rec)) in hashes.zip(meta.chunks_exact(RECORD_LEN).map(Record)).enumerate() {
            if rec.state() != STATE_VALID || !rec.holds(h) {
                return Ok(None);
            }
            sum += u64::from(rec.generation());
            if let Pass::Confirm { now } = pass {
                if now.saturating_sub(rec.atime()) >= TOUCH_EVERY {
                    stale.push(first + i as u64);
                }
            }
        }
        if let Pass::Confirm { now } = pass {
            for slot in stale {
                let _ = self.file.write_all_at(&now.to_le_bytes(), slot * RECORD_LEN as u64 + REC_ATIME as u64);
            }
        }
        Ok(Some(RunSnapshot(sum)))
    }

    /// Unmaps this process's pages of the records. They stay in the page cache, which every
    /// daemon on the cache shares and the kernel may reclaim; mapped, every record this
    /// daemon ever read stayed counted in its resident memory (48 bytes per block read, 12
    /// MiB for a 1 GiB image). The next read of a record maps its page again, a minor fault
    /// (which maps the neighbouring pages too: the kernel's fault-around, 64 KiB).
    pub(super) fn release_pages(&self) -> Result<()> {
        let Some(map) = &self.map else { return Ok(()) };
        let len = usize::try_from(self.file_len()?.min(RECORD_MAP_BYTES)).unwrap_or(0);
        map.release(len).ctx(|| "release cache slot pages".into())
    }

    /// Writes a record's hash, access time and flags: not its state and generation, which
    /// only `set_state` changes.
    pub(super) fn write_contents(&self, slot: u64, hash: &Hash, atime: u32, flags: u32) -> Result<()> {
        let at = slot * RECORD_LEN as u64;
        let mut tail = [0u8; 8];
        tail[..4].copy_from_slice(&atime.to_le_bytes());
        tail[4..].copy_from_slice(&flags.to_le_bytes());
        self.file
            .write_all_at(hash, at)
            .and_then(|()| self.file.write_all_at(&tail, at + REC_ATIME as u64))
            .ctx(|| "write cache slots".into())
    }

    /// Sets a slot's state, with a new generation if `bump` (before its data may change),
    /// else keeping it (valid, once the data and the rest of the record are written: the
    /// state is the last word of a record written, readers load it first).
    pub(super) fn set_state(&self, slot: u64, state: u32, bump: bool) -> Result<()> {
        let new = |old: u64| word(state, generation_of(old).wrapping_add(u32::from(bump)));
        let end = (slot + 1) * RECORD_LEN as u64;
        let mapped = slot < MAX_SLOTS && self.map.is_some() && self.file_len()? >= end;
        match self.map.as_ref().filter(|_| mapped) {
            Some(map) => {
                let run = map.run(slot);
                let w = run.state_word(0);
                let mut old = u64::from_le(w.load(Ordering::Acquire));
                while let Err(cur) =
                    w.compare_exchange_weak(old.to_le(), new(old).to_le(), Ordering::AcqRel, Ordering::Acquire)
                {
                    old = u64::from_le(cur);
                }
                Ok(())
            }
            None => {
                // Past the end of the file (a new slot) or not mapped: read and write back.
                let at = slot * RECORD_LEN as u64 + REC_STATE as u64;
                let mut b = [0u8; 8];
                let got = read_full_at(&self.file, &mut b, at).ctx(|| "read cache slots".into())?;
                b[got..].fill(0);
                self.file.write_all_at(&new(le64(&b)).to_le_bytes(), at).ctx(|| "write cache slots".into())
            }
        }
    }

    /// Marks a valid slot evicted, with a new generation, if its record is still as
    /// `before` (a snapshot of that one slot) saw it; false if it changed.
    pub(super) fn evict_if_unchanged(&self, slot: u64, hash: &Hash, before: RunSnapshot) -> Result<bool> {
        // Who could change it meanwhile (eviction) is excluded by the caller's eviction
        // lock, and inserts never touch a valid slot: the check and the store need not be
        // one atomic step.
        if self.sum_generations(slot, std::iter::once(hash), Pass::Snapshot)? != Some(before) {
            return Ok(false);
        }
        self.set_state(slot, STATE_EVICTED, true)?;
        Ok(true)
    }

    /// Makes an evicted slot empty, with a new generation, for reuse; false if it is not
    /// evicted. Under the allocation lock, which every claim takes.
    pub(super) fn claim_evicted(&self, slot: u64) -> Result<bool> {
        let mut b = [0u8; 4];
        let got = read_full_at(&self.file, &mut b, slot * RECORD_LEN as u64 + REC_STATE as u64)
            .ctx(|| "read cache slots".into())?;
        if got != 4 || u32::from_le_bytes(b) != STATE_EVICTED {
            return Ok(false);
        }
        self.set_state(slot, STATE_EMPTY, true)?;
        Ok(true)
    }

    pub(super) fn set_flags(&self, slot: u64, flags: u32) -> Result<()> {
        self.file
            .write_all_at(&flags.to_le_bytes(), slot * RECORD_LEN as u64 + REC_FLAGS as u64)
            .ctx(|| "write cache slots".into())
    }

    /// Slots whose records the file holds, at most `next_slot`: the end of every scan, so
    /// that a header value never drives one past the file.
    pub(super) fn scan_end(&self, next_slot: u64) -> Result<u64> {
        let len = self.file_len()?;
        Ok(next_slot.min(len / RECORD_LEN as u64).min(MAX_SLOTS))
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

/// The slots file mapped shared, reserved once with room for MAX_SLOTS records. A page
/// past the end of the file is SIGBUS, so a record is touched only right after an `fstat`
/// shows the file reaches it: the file may also shrink (nothing of ours truncates it, but
/// a user may), and a record cut off is then a miss. (A truncation between the `fstat` and
/// the access a few instructions later remains fatal; only the cache's owner can do it.)
struct RecordMap {
    /// MmapRaw, not MmapMut: the records change under us (other processes write them), so
    /// they are only ever reached through atomics, never through a `&[u8]`.
    map: MmapRaw,
}

/// Records from `first` on in a [`RecordMap`], that the caller knows the file holds.
struct RecordRun<'a> {
    at: *mut u8,
    _map: PhantomData<&'a RecordMap>,
}

impl RecordMap {
    fn new(file: &File) -> Option<Self> {
        // More than the file holds now: mapping past the end is allowed, touching it is not.
        let len = usize::try_from(RECORD_MAP_BYTES).ok()?;
        match MmapOptions::new().len(len).no_reserve_swap().map_raw(file) {
            Ok(map) => Some(RecordMap { map }),
            Err(e) => {
                tracing::debug!("cannot map cache slots: {e}");
                None
            }
        }
    }

    /// Drops the page mappings of the first `len` bytes.
    fn release(&self, len: usize) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `len` is within the mapping (at most RECORD_MAP_BYTES). The mapping is
        // shared and of a file: MADV_DONTNEED drops only this process's page table entries,
        // never data (stores went to the page cache itself), and a concurrent access faults
        // the page in again. Past the end of the file it drops nothing.
        unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, len) }
    }

    /// Records from `first` on. The caller checked that `first` plus the records it touches
    /// stay within MAX_SLOTS and within the file.
    fn run(&self, first: u64) -> RecordRun<'_> {
        debug_assert!(first < MAX_SLOTS);
        // SAFETY: first < MAX_SLOTS, so the offset is inside the RECORD_MAP_BYTES mapping.
        let at = unsafe { self.map.as_mut_ptr().add((first * RECORD_LEN as u64) as usize) };
        RecordRun { at, _map: PhantomData }
    }
}

// Hand-written atomics over the mapping (no crate offers them): a record is shared memory
// that other processes change, so plain references to it would be undefined behaviour.
impl RecordRun<'_> {
    /// A 32-bit word of record i, as stored (little-endian).
    fn word32(&self, i: usize, off: usize) -> &AtomicU32 {
        // SAFETY: record i of the run is inside the mapping and the file (the caller's
        // check); records are 48-byte aligned in a page-aligned mapping, so `off` (a multiple
        // of 4) is aligned.
        unsafe { AtomicU32::from_ptr(self.at.add(i * RECORD_LEN + off).cast()) }
    }

    /// Record i's (state, generation), as stored (little-endian).
    fn state_word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: as in word32; REC_STATE (32) is a multiple of 8 and records are 48-byte
        // aligned, so the word is 8-byte aligned.
        unsafe { AtomicU64::from_ptr(self.at.add(i * RECORD_LEN + REC_STATE).cast()) }
    }

    /// Whether record i holds `hash` (read after its state: see `Records::set_state`).
    fn holds(&self, i: usize, hash: &Hash) -> bool {
        hash.chunks_exact(4).enumerate().all(|(k, w)| self.word32(i, k * 4).load(Ordering::Relaxed).to_ne_bytes() == w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> (tempfile::TempDir, Records) {
        let dir = tempfile::tempdir().expect("tmp");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("slots"))
            .expect("open");
        (dir, Records::new(file))
    }

    fn fill(records: &Records, slot: u64, hash: &Hash) {
        records.set_state(slot, 0, true).expect("empty");
        records.write_contents(slot, hash, 0, 0).expect("write");
        records.set_state(slot, STATE_VALID, false).expect("valid");
    }

    #[test]
    fn the_map_and_pread_pwrite_see_the_same_records() {
        let (_dir, records) = records();
        assert!(records.map.is_some(), "slots are mapped");
        let hash = [5u8; 32];
        // Past the end of the file: not looked at through the map, and a miss.
        assert_eq!(records.snapshot_run(3, [hash].iter()).expect("check"), None);
        records.set_state(3, 0, true).expect("empty");
        records.write_contents(3, &hash, 0, 0).expect("write");
        assert_eq!(records.snapshot_run(3, [hash].iter()).expect("check"), None, "an empty record is never served");
        records.set_state(3, STATE_VALID, false).expect("state");
        let snap = records.snapshot_run(3, [hash].iter()).expect("check").expect("valid");
        assert!(records.confirm_run(3, [hash].iter(), snap).expect("check"));
        assert_eq!(records.snapshot_run(3, [[6u8; 32]].iter()).expect("check"), None, "another hash is a miss");
        let mut seen = Vec::new();
        records.scan(4, |slot, rec| seen.push((slot, rec.state(), rec.generation(), rec.atime() > 0))).expect("scan");
        assert_eq!(seen[3], (3, STATE_VALID, 1, true), "pread sees the state and access time stored through the map");
    }

    #[test]
    fn a_slot_evicted_and_refilled_with_the_same_hash_between_snapshot_and_check_is_a_miss() {
        let (_dir, records) = records();
        let hash = [5u8; 32];
        fill(&records, 0, &hash);
        fill(&records, 1, &[6u8; 32]);
        let run = [hash, [6u8; 32]];
        let snap = records.snapshot_run(0, run.iter()).expect("snapshot").expect("valid");
        // Meanwhile: evicted, then the same block stored in the same slot again.
        records.set_state(0, STATE_EVICTED, true).expect("evict");
        fill(&records, 0, &hash);
        assert!(!records.confirm_run(0, run.iter(), snap).expect("confirm"), "the copy may be torn");
        let again = records.snapshot_run(0, run.iter()).expect("snapshot").expect("valid");
        assert!(records.confirm_run(0, run.iter(), again).expect("confirm"));
    }
}
