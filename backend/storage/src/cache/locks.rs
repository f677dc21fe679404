//! The cache's locks: open-file-description (OFD) locks on single bytes of the `lock` file,
//! which the kernel drops when the process holding them dies, so a killed daemon never
//! wedges the others. OFD locks belong to an open file, not to a thread: each comes with an
//! in-process guard that keeps this process's own threads apart where the kernel lock cannot.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::layout::{
    le32, LOCK_ALLOC, LOCK_BUCKETS, LOCK_BUCKETS_BASE, LOCK_EVICT, LOCK_RANGES_BASE, LOCK_RANGE_BLOBS, LOCK_RANGE_SPAN,
    LOCK_WRITERS,
};
use super::BlockCache;
use crate::error::{Error, Result};
use crate::image::Hash;

pub(super) struct Locks {
    file: File,
    alloc: Mutex<()>,
    evicting: Mutex<()>,
    /// Inserts in flight in this process. They share one OFD lock on LOCK_WRITERS, taken by
    /// the first and released by the last: released by whichever finished first, it would
    /// let gc take the others' slots for orphans.
    writers: Mutex<u32>,
    /// Held shared by this process's inserts and exclusively by its gc, which the OFD lock
    /// cannot do (one open file's shared lock would just be converted).
    gc_threads: RwLock<()>,
    /// Fetch-lock buckets this process holds, with how many holds each.
    buckets_held: Mutex<HashMap<u32, u32>>,
}

/// An OFD lock on one byte, released when dropped.
pub(super) struct OfdLock<'a> {
    file: &'a File,
    byte: i64,
}

impl Drop for OfdLock<'_> {
    fn drop(&mut self) {
        let _ = ofd_unlock(self.file, self.byte);
    }
}

/// An OFD lock together with the in-process guard that goes with it (the kernel lock is
/// released first, as the fields drop in order).
pub(super) struct ProcessLock<'a> {
    _ofd: OfdLock<'a>,
    _threads: MutexGuard<'a, ()>,
}

/// One insert's share of the writers lock: the last of a process's inserts to finish
/// releases the OFD lock.
pub(super) struct WriterLock<'a> {
    locks: &'a Locks,
    _threads: RwLockReadGuard<'a, ()>,
}

impl Drop for WriterLock<'_> {
    fn drop(&mut self) {
        let mut n = self.locks.writers.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            let _ = ofd_unlock(&self.locks.file, LOCK_WRITERS);
        }
    }
}

/// The writers lock held exclusively (gc), in this process and against the others.
pub(super) struct GcLock<'a> {
    _ofd: OfdLock<'a>,
    _threads: RwLockWriteGuard<'a, ()>,
}

impl Locks {
    pub(super) fn new(file: File) -> Self {
        Locks {
            file,
            alloc: Mutex::new(()),
            evicting: Mutex::new(()),
            writers: Mutex::new(0),
            gc_threads: RwLock::new(()),
            buckets_held: Mutex::new(HashMap::new()),
        }
    }

    fn ofd(&self, byte: i64, exclusive: bool, wait: bool) -> io::Result<OfdLock<'_>> {
        ofd_lock(&self.file, byte, exclusive, wait)?;
        Ok(OfdLock { file: &self.file, byte })
    }

    /// The allocation lock, which also guards the header. Waits.
    pub(super) fn header(&self) -> io::Result<ProcessLock<'_>> {
        let threads = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        Ok(ProcessLock { _ofd: self.ofd(LOCK_ALLOC, true, true)?, _threads: threads })
    }

    /// Held by every insert, so that gc can wait for the inserts in flight. Waits.
    pub(super) fn writer(&self) -> io::Result<WriterLock<'_>> {
        let threads = self.gc_threads.read().unwrap_or_else(|e| e.into_inner());
        let mut n = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        if *n == 0 {
            // Waits for a gc of another process with this process's other writers queued
            // on `writers`: they need the same lock.
            ofd_lock(&self.file, LOCK_WRITERS, false, true)?;
        }
        *n += 1;
        Ok(WriterLock { locks: self, _threads: threads })
    }

    /// Held by gc: no insert is in flight meanwhile, in any process. Waits.
    pub(super) fn writers_excluded(&self) -> io::Result<GcLock<'_>> {
        let threads = self.gc_threads.write().unwrap_or_else(|e| e.into_inner());
        Ok(GcLock { _ofd: self.ofd(LOCK_WRITERS, true, true)?, _threads: threads })
    }

    /// The eviction lock if no other process holds it (None if one does), once this
    /// process's other threads are done evicting: an insert waits for the eviction its
    /// neighbours started, so that one process's inserts cannot outrun it.
    pub(super) fn try_evict(&self) -> io::Result<Option<ProcessLock<'_>>> {
        let threads = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        match self.ofd(LOCK_EVICT, true, false) {
            Ok(ofd) => Ok(Some(ProcessLock { _ofd: ofd, _threads: threads })),
            Err(e) if is_contended(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The eviction lock, waiting for it (gc).
    pub(super) fn evict(&self) -> io::Result<ProcessLock<'_>> {
        let threads = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        Ok(ProcessLock { _ofd: self.ofd(LOCK_EVICT, true, true)?, _threads: threads })
    }

    fn bucket(hash: &Hash) -> u32 {
        le32(&hash[..4]) % LOCK_BUCKETS
    }

    /// Takes `hash`'s fetch lock unless another process holds it; re-entrant in-process.
    fn try_lock_bucket(&self, hash: &Hash) -> io::Result<bool> {
        let b = Self::bucket(hash);
        let mut held = self.buckets_held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = held.get_mut(&b) {
            *c += 1;
            return Ok(true);
        }
        match ofd_lock(&self.file, LOCK_BUCKETS_BASE + b as i64, true, false) {
            Ok(()) => {
                held.insert(b, 1);
                Ok(true)
            }
            Err(e) if is_contended(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives back one hold of `hash`'s fetch lock; the last one releases it.
    fn unlock_bucket(&self, hash: &Hash) {
        let b = Self::bucket(hash);
        let mut held = self.buckets_held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = held.get_mut(&b) {
            *c -= 1;
            if *c == 0 {
                held.remove(&b);
                let _ = ofd_unlock(&self.file, LOCK_BUCKETS_BASE + b as i64);
            }
        }
    }
}

impl BlockCache {
    /// Tries to become the one process on this host fetching `hash`. Non-blocking.
    pub fn try_lock_fetch(&self, hash: &Hash) -> Result<bool> {
        self.locks.try_lock_bucket(hash).map_err(|e| Error::io("lock cache bucket", e))
    }

    pub fn unlock_fetch(&self, hash: &Hash) {
        self.locks.unlock_bucket(hash)
    }

    /// Tells the other processes on this cache that this one is fetching `len` bytes of blob
    /// `blob` at `offset`, until the announcement is dropped. A hint, never an exclusion: a
    /// daemon about to fetch what another is bringing waits a little for it instead
    /// ([`BlockCache::range_in_flight`]). None if the lock cannot be taken.
    pub fn announce_range(&self, blob: &Hash, offset: u64, len: u64) -> Option<RangeAnnouncement<'_>> {
        let (start, len) = range_bytes(blob, offset, len);
        match ofd_fcntl(&self.locks.file, libc::F_OFD_SETLK, libc::F_RDLCK, start, len) {
            Ok(_) => Some(RangeAnnouncement { file: &self.locks.file, start, len }),
            Err(e) => {
                tracing::debug!("announcing a fetch: {e}");
                None
            }
        }
    }

    /// Whether another process announced a fetch of bytes of blob `blob` that overlap
    /// [offset, offset + len).
    pub fn range_in_flight(&self, blob: &Hash, offset: u64, len: u64) -> bool {
        let (start, len) = range_bytes(blob, offset, len);
        ofd_fcntl(&self.locks.file, libc::F_OFD_GETLK, libc::F_WRLCK, start, len)
            .is_ok_and(|t| t != libc::F_UNLCK as libc::c_short)
    }
}

/// A fetch announced to the other processes on the cache; withdrawn when dropped (or when the
/// process dies). Announcements of one process that overlap merge: withdrawing one withdraws
/// the overlap, which costs at most a fetch made twice.
pub struct RangeAnnouncement<'a> {
    file: &'a File,
    start: i64,
    len: i64,
}

impl Drop for RangeAnnouncement<'_> {
    fn drop(&mut self) {
        let _ = ofd_fcntl(self.file, libc::F_OFD_SETLK, libc::F_UNLCK, self.start, self.len);
    }
}

/// The bytes of `lock` that stand for [offset, offset + len) of blob `blob`.
fn range_bytes(blob: &Hash, offset: u64, len: u64) -> (i64, i64) {
    let bucket = (le32(&blob[..4]) % LOCK_RANGE_BLOBS) as i64;
    let first = offset.min(LOCK_RANGE_SPAN - 1);
    let end = offset.saturating_add(len.max(1)).clamp(first + 1, LOCK_RANGE_SPAN);
    (LOCK_RANGES_BASE + (bucket << 40) + first as i64, (end - first) as i64)
}

/// Whether a non-blocking lock failed because someone else holds it.
fn is_contended(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

/// An open-file-description lock on one byte (released when this process's file is closed,
/// including when the process dies), waiting for it if `wait`.
fn ofd_lock(f: &File, byte: i64, exclusive: bool, wait: bool) -> io::Result<()> {
    let l_type = if exclusive { libc::F_WRLCK } else { libc::F_RDLCK };
    let cmd = if wait { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK };
    loop {
        match ofd_fcntl(f, cmd, l_type, byte, 1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(|_| ()),
        }
    }
}

/// One OFD lock command on [start, start + len) of `f`; the lock type that `F_OFD_GETLK`
/// found (F_UNLCK if none conflicts). By hand: rustix's `fcntl_lock` locks only whole files,
/// and nix would build libc with `extra_traits` everywhere for this one call.
fn ofd_fcntl(f: &File, cmd: libc::c_int, l_type: libc::c_int, start: i64, len: i64) -> io::Result<libc::c_short> {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl with a valid fd and a pointer to an initialised flock.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r == 0 {
        Ok(fl.l_type)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn ofd_unlock(f: &File, byte: i64) -> io::Result<()> {
    ofd_fcntl(f, libc::F_OFD_SETLK, libc::F_UNLCK, byte, 1).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_locks_exclude_other_open_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = BlockCache::open(dir.path()).expect("open");
        let b = BlockCache::open(dir.path()).expect("open");
        let h = [3u8; 32];
        assert!(a.try_lock_fetch(&h).expect("lock"));
        assert!(a.try_lock_fetch(&h).expect("re-entrant in-process"));
        assert!(!b.try_lock_fetch(&h).expect("other"));
        a.unlock_fetch(&h);
        assert!(!b.try_lock_fetch(&h).expect("still held once"));
        a.unlock_fetch(&h);
        assert!(b.try_lock_fetch(&h).expect("free now"));
    }

    #[test]
    fn fetches_announced_are_seen_by_other_processes_only_while_announced() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = BlockCache::open(dir.path()).expect("open");
        let b = BlockCache::open(dir.path()).expect("open");
        let (blob, other) = ([5u8; 32], [6u8; 32]);
        let ann = a.announce_range(&blob, 1000, 500).expect("announce");
        assert!(b.range_in_flight(&blob, 1400, 1000), "overlap");
        assert!(!b.range_in_flight(&blob, 1500, 10), "after it");
        assert!(!b.range_in_flight(&blob, 0, 1000), "before it");
        assert!(!b.range_in_flight(&other, 1000, 500), "another blob");
        assert!(!a.range_in_flight(&blob, 1000, 500), "its own");
        let far = a.announce_range(&blob, u64::MAX - 10, 100).expect("offsets past the span");
        assert!(b.range_in_flight(&blob, u64::MAX - 1, 1));
        drop((ann, far));
        assert!(!b.range_in_flight(&blob, 1000, 500), "withdrawn");
        std::mem::forget(a.announce_range(&blob, 0, 10).expect("announce"));
        drop(a);
        assert!(!b.range_in_flight(&blob, 0, 10), "a closed cache announces nothing");
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;

    #[test]
    fn gc_cannot_run_while_any_thread_of_a_process_is_still_inserting() {
        let dir = tempfile::tempdir().expect("tmp");
        let daemon = BlockCache::open(dir.path()).expect("open");
        let gc = BlockCache::open(dir.path()).expect("open");
        let slow = daemon.locks.writer().expect("writer");
        let fast = daemon.locks.writer().expect("writer");
        drop(fast);
        let got = ofd_lock(&gc.locks.file, LOCK_WRITERS, true, false);
        assert!(
            matches!(&got, Err(e) if is_contended(e)),
            "gc took the writers lock while an insert was in flight: {got:?}"
        );
        drop(slow);
        ofd_lock(&gc.locks.file, LOCK_WRITERS, true, false).expect("free once every insert is done");
    }
}
