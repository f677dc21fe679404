//! The on-disk block cache, shared by every daemon on a host.
//!
//! Blocks are keyed by their leaf hash (SHA-256 of the 4096-byte plaintext), so identical
//! blocks of different files and different images are stored once. Layout of the directory:
//!
//! ```text
//! header     magic, version, next_slot (u64 @16): slots handed out so far
//! blocks     slot i = plaintext at i*4096
//! slots      slot i = 48-byte record at i*48: hash[32], state u32, atime u32, flags u32, 0 u32
//! lock       open-file-description locks only (no data): byte 0 guards slot allocation,
//!            byte 1 is held shared by writers and exclusively by gc, bytes from 4096 on
//!            are per-hash-bucket fetch locks (cross-process single flight)
//! manifests/ verified image manifests, so a restart needs no remote
//! ```
//!
//! Safety argument: a slot's record is written only after its data, and only for data that
//! was verified against its hash. A process killed mid-write leaves a slot whose record is
//! still empty: never served. Readers check the record *after* copying the data (eviction
//! clears the record before it frees the data), so a block evicted under a reader is seen as
//! a miss, never as wrong bytes. OFD locks vanish with the process that held them, so a
//! killed daemon never wedges the others.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, ImageId, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"INCFSCAC";
const VERSION: u32 = 1;
const NEXT_SLOT_OFF: u64 = 16;
const META: usize = 48;
const STATE_EMPTY: u32 = 0;
const STATE_VALID: u32 = 1;
const STATE_EVICTED: u32 = 2;
const LOCK_ALLOC: i64 = 0;
const LOCK_WRITERS: i64 = 1;
const LOCK_BUCKETS_BASE: i64 = 4096;
const LOCK_BUCKETS: u32 = 1 << 20;
/// Slots scanned per read when catching up with other processes' inserts.
const SCAN_CHUNK: u64 = 4096;

pub struct BlockCache {
    dir: PathBuf,
    header: File,
    blocks: File,
    slots: File,
    lock: File,
    index: RwLock<Index>,
    /// OFD locks are per open file, not per thread: these keep this process's own threads
    /// apart where the kernel lock cannot.
    alloc: Mutex<()>,
    buckets_held: Mutex<HashMap<u32, u32>>,
}

#[derive(Default)]
struct Index {
    map: HashMap<Hash, u64>,
    /// Every slot below this has been looked at once.
    scanned: u64,
    /// Slots that were empty when scanned: being written by someone, or orphaned by a crash.
    holes: Vec<u64>,
}

/// What the cache holds, for `cache status` and metrics.
#[derive(Debug, Default, Clone)]
pub struct CacheUsage {
    pub slots: u64,
    pub valid: u64,
    pub evicted: u64,
    pub empty: u64,
    pub disk_bytes: u64,
    pub manifests: u64,
}

fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

impl BlockCache {
    /// Opens (creating if needed) a cache directory. Safe to call from many processes at once.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir.join("manifests")).ctx(|| format!("create cache {}", dir.display()))?;
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p).ctx(|| format!("open {}", p.display()))
        };
        let header = open("header")?;
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            blocks: open("blocks")?,
            slots: open("slots")?,
            lock: open("lock")?,
            header,
            index: RwLock::new(Index::default()),
            alloc: Mutex::new(()),
            buckets_held: Mutex::new(HashMap::new()),
        };
        cache.init_header()?;
        cache.refresh()?;
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn init_header(&self) -> Result<()> {
        let _g = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        ofd_lock(&self.lock, LOCK_ALLOC, true, true).ctx(|| "lock cache header".into())?;
        let res = (|| {
            let mut h = [0u8; 24];
            let n = read_full_at(&self.header, &mut h, 0)?;
            if n == 0 {
                let mut init = [0u8; 24];
                init[..8].copy_from_slice(MAGIC);
                init[8..12].copy_from_slice(&VERSION.to_le_bytes());
                self.header.write_all_at(&init, 0)?;
                return Ok(());
            }
            if n < 24 || &h[..8] != MAGIC || u32::from_le_bytes([h[8], h[9], h[10], h[11]]) != VERSION {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not an incfs cache of this version"));
            }
            Ok(())
        })();
        let _ = ofd_unlock(&self.lock, LOCK_ALLOC);
        res.ctx(|| format!("cache header in {}", self.dir.display()))
    }

    fn next_slot(&self) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        self.header.read_exact_at(&mut b, NEXT_SLOT_OFF)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Learns about blocks other processes have added since the last look.
    pub fn refresh(&self) -> Result<()> {
        let end = self.next_slot().ctx(|| "read cache header".into())?;
        let mut idx = self.index.write().unwrap_or_else(|e| e.into_inner());
        // Re-check slots that were being written last time.
        if !idx.holes.is_empty() {
            let holes = std::mem::take(&mut idx.holes);
            for s in holes {
                match self.read_meta(s) {
                    Ok(Some((STATE_VALID, h))) => {
                        idx.map.insert(h, s);
                    }
                    Ok(Some((STATE_EMPTY, _))) => idx.holes.push(s),
                    _ => {}
                }
            }
        }
        let mut buf = vec![0u8; SCAN_CHUNK as usize * META];
        while idx.scanned < end {
            let start = idx.scanned;
            let n = (end - start).min(SCAN_CHUNK);
            let bytes = &mut buf[..n as usize * META];
            let got = read_full_at(&self.slots, bytes, start * META as u64).ctx(|| "read cache slots".into())?;
            for i in 0..n {
                let off = i as usize * META;
                let rec = &bytes[off..off + META];
                let state = if off + META <= got { u32::from_le_bytes([rec[32], rec[33], rec[34], rec[35]]) } else { STATE_EMPTY };
                match state {
                    STATE_VALID => {
                        let mut h = [0u8; 32];
                        h.copy_from_slice(&rec[..32]);
                        idx.map.insert(h, start + i);
                    }
                    STATE_EMPTY => idx.holes.push(start + i),
                    _ => {}
                }
            }
            idx.scanned = start + n;
        }
        Ok(())
    }

    fn read_meta(&self, slot: u64) -> std::io::Result<Option<(u32, Hash)>> {
        let mut rec = [0u8; META];
        if read_full_at(&self.slots, &mut rec, slot * META as u64)? < META {
            return Ok(None);
        }
        let mut h = [0u8; 32];
        h.copy_from_slice(&rec[..32]);
        Ok(Some((u32::from_le_bytes([rec[32], rec[33], rec[34], rec[35]]), h)))
    }

    /// The slot holding `hash`, as far as this process knows.
    pub fn lookup(&self, hash: &Hash) -> Option<u64> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).map.get(hash).copied()
    }

    /// Like lookup, but first catches up with other processes when the hash is unknown.
    pub fn lookup_fresh(&self, hash: &Hash) -> Result<Option<u64>> {
        if let Some(s) = self.lookup(hash) {
            return Ok(Some(s));
        }
        self.refresh()?;
        Ok(self.lookup(hash))
    }

    /// Copies `hashes.len()` consecutive slots from `first` into `out`, then checks that each
    /// slot still holds the expected hash. False (and the stale entries forgotten) if any slot
    /// was evicted or reused meanwhile.
    pub fn read_run(&self, first: u64, hashes: &[Hash], out: &mut [u8]) -> Result<bool> {
        let n = hashes.len();
        debug_assert_eq!(out.len(), n * BLOCK_SIZE);
        let got = read_full_at(&self.blocks, out, first * BLOCK_SIZE as u64).ctx(|| "read cache blocks".into())?;
        let mut meta = vec![0u8; n * META];
        let mgot = read_full_at(&self.slots, &mut meta, first * META as u64).ctx(|| "read cache slots".into())?;
        let mut ok = got == out.len() && mgot == meta.len();
        if ok {
            for (i, h) in hashes.iter().enumerate() {
                let rec = &meta[i * META..(i + 1) * META];
                if &rec[..32] != h || u32::from_le_bytes([rec[32], rec[33], rec[34], rec[35]]) != STATE_VALID {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            let mut idx = self.index.write().unwrap_or_else(|e| e.into_inner());
            for (i, h) in hashes.iter().enumerate() {
                if idx.map.get(h) == Some(&(first + i as u64)) {
                    idx.map.remove(h);
                }
            }
        }
        Ok(ok)
    }

    /// Stores verified blocks (each exactly 4096 bytes, already checked against its hash) in
    /// consecutive slots; returns the first slot. Callers must only pass verified data.
    pub fn insert_verified(&self, blocks: &[(Hash, &[u8])]) -> Result<u64> {
        if blocks.is_empty() {
            return Ok(0);
        }
        let n = blocks.len() as u64;
        ofd_lock(&self.lock, LOCK_WRITERS, false, true).ctx(|| "lock cache for writing".into())?;
        let res = self.insert_locked(blocks, n);
        let _ = ofd_unlock(&self.lock, LOCK_WRITERS);
        res
    }

    fn insert_locked(&self, blocks: &[(Hash, &[u8])], n: u64) -> Result<u64> {
        let first = {
            let _g = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            ofd_lock(&self.lock, LOCK_ALLOC, true, true).ctx(|| "lock cache allocator".into())?;
            let r = self.next_slot().and_then(|s| {
                self.header.write_all_at(&(s + n).to_le_bytes(), NEXT_SLOT_OFF)?;
                Ok(s)
            });
            let _ = ofd_unlock(&self.lock, LOCK_ALLOC);
            r.ctx(|| "allocate cache slots".into())?
        };
        let mut data = Vec::with_capacity(blocks.len() * BLOCK_SIZE);
        let mut meta = Vec::with_capacity(blocks.len() * META);
        let t = now_secs();
        for (h, b) in blocks {
            if b.len() != BLOCK_SIZE {
                return Err(Error::Invalid("cache blocks are 4096 bytes".into()));
            }
            data.extend_from_slice(b);
            meta.extend_from_slice(h);
            meta.extend_from_slice(&STATE_VALID.to_le_bytes());
            meta.extend_from_slice(&t.to_le_bytes());
            meta.extend_from_slice(&[0u8; 8]);
        }
        // Data first, then the records that make it visible.
        self.blocks.write_all_at(&data, first * BLOCK_SIZE as u64).ctx(|| "write cache blocks".into())?;
        self.slots.write_all_at(&meta, first * META as u64).ctx(|| "write cache slots".into())?;
        let mut idx = self.index.write().unwrap_or_else(|e| e.into_inner());
        for (i, (h, _)) in blocks.iter().enumerate() {
            idx.map.insert(*h, first + i as u64);
        }
        Ok(first)
    }

    fn bucket(hash: &Hash) -> u32 {
        u32::from_le_bytes([hash[0], hash[1], hash[2], hash[3]]) % LOCK_BUCKETS
    }

    /// Tries to become the one process on this host fetching `hash`. Non-blocking.
    pub fn try_lock_fetch(&self, hash: &Hash) -> Result<bool> {
        let b = Self::bucket(hash);
        let mut held = self.buckets_held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = held.get_mut(&b) {
            *c += 1;
            return Ok(true);
        }
        match ofd_lock(&self.lock, LOCK_BUCKETS_BASE + b as i64, true, false) {
            Ok(()) => {
                held.insert(b, 1);
                Ok(true)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
            Err(e) => Err(Error::io("lock cache bucket", e)),
        }
    }

    pub fn unlock_fetch(&self, hash: &Hash) {
        let b = Self::bucket(hash);
        let mut held = self.buckets_held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = held.get_mut(&b) {
            *c -= 1;
            if *c == 0 {
                held.remove(&b);
                let _ = ofd_unlock(&self.lock, LOCK_BUCKETS_BASE + b as i64);
            }
        }
    }

    fn manifest_path(&self, id: &ImageId) -> PathBuf {
        self.dir.join("manifests").join(id.to_string())
    }

    /// A manifest saved earlier, if present and still hashing to its id.
    pub fn load_manifest(&self, id: &ImageId) -> Option<Vec<u8>> {
        let bytes = fs::read(self.manifest_path(id)).ok()?;
        (ImageId::of_manifest(&bytes) == *id).then_some(bytes)
    }

    pub fn save_manifest(&self, id: &ImageId, bytes: &[u8]) -> Result<()> {
        let dst = self.manifest_path(id);
        let tmp = dst.with_extension(format!("tmp.{}", std::process::id()));
        fs::write(&tmp, bytes).ctx(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &dst).ctx(|| format!("rename {}", dst.display()))
    }

    /// Counts slots by state by reading every record (for status, not the hot path).
    pub fn usage(&self) -> Result<CacheUsage> {
        let end = self.next_slot().ctx(|| "read cache header".into())?;
        let mut u = CacheUsage { slots: end, ..Default::default() };
        let mut buf = vec![0u8; SCAN_CHUNK as usize * META];
        let mut s = 0;
        while s < end {
            let n = (end - s).min(SCAN_CHUNK);
            let bytes = &mut buf[..n as usize * META];
            let got = read_full_at(&self.slots, bytes, s * META as u64).ctx(|| "read cache slots".into())?;
            for i in 0..n as usize {
                let rec = &bytes[i * META..(i + 1) * META];
                match if (i + 1) * META <= got { u32::from_le_bytes([rec[32], rec[33], rec[34], rec[35]]) } else { STATE_EMPTY } {
                    STATE_VALID => u.valid += 1,
                    STATE_EVICTED => u.evicted += 1,
                    _ => u.empty += 1,
                }
            }
            s += n;
        }
        for f in [&self.blocks, &self.slots] {
            if let Ok(m) = f.metadata() {
                use std::os::unix::fs::MetadataExt;
                u.disk_bytes += m.blocks() * 512;
            }
        }
        u.manifests = fs::read_dir(self.dir.join("manifests")).map(|d| d.count() as u64).unwrap_or(0);
        Ok(u)
    }

    /// Every valid slot: (slot, hash). For verification tools and tests.
    pub fn valid_slots(&self) -> Result<Vec<(u64, Hash)>> {
        let end = self.next_slot().ctx(|| "read cache header".into())?;
        let mut out = Vec::new();
        for s in 0..end {
            if let Some((STATE_VALID, h)) = self.read_meta(s).ctx(|| "read cache slots".into())? {
                out.push((s, h));
            }
        }
        Ok(out)
    }

    /// Reads one slot's data without validation (for `cache verify`).
    pub fn raw_block(&self, slot: u64, out: &mut [u8; BLOCK_SIZE]) -> Result<()> {
        self.blocks.read_exact_at(out, slot * BLOCK_SIZE as u64).ctx(|| "read cache block".into())
    }
}

fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// An open-file-description lock on one byte (released when this process's file is closed,
/// including when the process dies).
fn ofd_lock(f: &File, byte: i64, exclusive: bool, wait: bool) -> std::io::Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    let cmd = if wait { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK };
    loop {
        // SAFETY: fcntl with a valid fd and a pointer to an initialised flock.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn ofd_unlock(f: &File, byte: i64) -> std::io::Result<()> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_UNLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::merkle::leaf_hash;

    fn block(v: u8) -> (Hash, Vec<u8>) {
        let d = vec![v; BLOCK_SIZE];
        (leaf_hash(&d), d)
    }

    #[test]
    fn insert_read_and_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = BlockCache::open(dir.path()).expect("open");
        let (h1, d1) = block(1);
        let (h2, d2) = block(2);
        let first = c.insert_verified(&[(h1, &d1), (h2, &d2)]).expect("insert");
        assert_eq!(c.lookup(&h2), Some(first + 1));
        let mut out = vec![0u8; 2 * BLOCK_SIZE];
        assert!(c.read_run(first, &[h1, h2], &mut out).expect("read"));
        assert_eq!(&out[..BLOCK_SIZE], &d1[..]);
        // A second handle (another process, in effect) sees it after refresh.
        let c2 = BlockCache::open(dir.path()).expect("open");
        assert_eq!(c2.lookup_fresh(&h1).expect("fresh"), Some(first));
        let (h3, d3) = block(3);
        c2.insert_verified(&[(h3, &d3)]).expect("insert");
        assert_eq!(c.lookup(&h3), None);
        assert!(c.lookup_fresh(&h3).expect("fresh").is_some());
    }

    #[test]
    fn wrong_hash_is_a_miss() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = BlockCache::open(dir.path()).expect("open");
        let (h1, d1) = block(1);
        let s = c.insert_verified(&[(h1, &d1)]).expect("insert");
        let mut out = vec![0u8; BLOCK_SIZE];
        assert!(!c.read_run(s, &[[9; 32]], &mut out).expect("read"));
        assert!(!c.read_run(s + 5, &[h1], &mut out).expect("read past end"));
    }

    #[test]
    fn orphan_slots_are_never_served() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = BlockCache::open(dir.path()).expect("open");
        // Simulate a writer killed after allocating and writing data but before its record.
        c.header.write_all_at(&5u64.to_le_bytes(), NEXT_SLOT_OFF).expect("alloc");
        c.blocks.write_all_at(&[7u8; BLOCK_SIZE], 0).expect("data");
        let c2 = BlockCache::open(dir.path()).expect("open");
        assert!(c2.valid_slots().expect("slots").is_empty());
        assert_eq!(c2.usage().expect("usage").empty, 5);
    }

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
}
