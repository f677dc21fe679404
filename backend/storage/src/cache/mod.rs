//! The on-disk block cache, shared by every daemon on a host.
//!
//! Blocks are keyed by their leaf hash (SHA-256 of the 4096-byte plaintext), so identical
//! blocks of different files and different images are stored once. The directory:
//!
//! ```text
//! header     magic, version and the shared counters below (u64s, see H_*)
//! blocks     slot i = plaintext at i*4096 (freed slots are hole-punched)
//! slots      slot i = 48-byte record at i*48: hash[32], state u32, atime u32, flags u32, 0 u32
//! log        40-byte insert records (hash[32], slot u64), appended in allocation order;
//!            processes tail it to learn what others stored
//! free       a stack of u64 slot numbers freed by eviction, reused by inserts
//! lock       open-file-description locks only: byte 0 guards allocation and the header,
//!            byte 1 is held shared by writers and exclusively by gc, byte 2 by the one
//!            evicting process, bytes from 4096 are per-hash-bucket fetch locks
//! manifests/ verified image manifests, so a restart needs no remote
//! ```
//!
//! Why it is safe:
//! - A slot's record is written only after its data, and only for verified data; the log
//!   record after both. A process killed mid-insert leaves a slot whose record is empty:
//!   never served (and reclaimed by `gc`).
//! - Readers check a slot's record *after* copying its data, and eviction marks the record
//!   before it frees the data, so a block evicted (or its slot reused) under a reader is seen
//!   as a miss, never as wrong bytes. Evicted slots are reused only after their data is freed.
//! - OFD locks vanish with the process that held them: a killed daemon never wedges others.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use incfs_buf::ScatterBuf;

use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, ImageId, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"INCFSCAC";
const VERSION: u32 = 2;
// Header fields (u64 at these offsets).
const H_NEXT_SLOT: u64 = 16;
const H_LOG_END: u64 = 24;
const H_LIVE: u64 = 32;
const H_NFREE: u64 = 40;
const H_HITS: u64 = 48;
const H_MISSES: u64 = 56;
const H_EPOCH: u64 = 64;
const H_FETCHED: u64 = 72;
const HEADER_LEN: usize = 80;

const META: usize = 48;
const LOG_REC: usize = 40;
/// State 0 is an empty record: allocated, not (yet) written.
const STATE_VALID: u32 = 1;
const STATE_EVICTED: u32 = 2;
const FLAG_PINNED: u32 = 1;

const LOCK_ALLOC: i64 = 0;
const LOCK_WRITERS: i64 = 1;
const LOCK_EVICT: i64 = 2;
const LOCK_BUCKETS_BASE: i64 = 4096;
const LOCK_BUCKETS: u32 = 1 << 20;

/// Access times are written back at most this often per block (seconds).
const TOUCH_EVERY: u32 = 2;
/// Eviction frees down to this share of the limit, so it runs in batches.
const LOW_WATER_PERCENT: u64 = 90;

#[derive(Clone, Debug, Default)]
pub struct CacheOptions {
    /// Keep the cache at most this many bytes of blocks (None: unbounded).
    pub limit_bytes: Option<u64>,
}

pub struct BlockCache {
    dir: PathBuf,
    header: File,
    blocks: File,
    slots: File,
    /// `slots` mapped, for the read path (None if it could not be mapped).
    records: Option<RecordMap>,
    log: File,
    free: File,
    lock: File,
    limit_slots: Option<u64>,
    index: RwLock<Index>,
    /// OFD locks are per open file, not per thread: these keep this process's own threads
    /// apart where the kernel lock cannot.
    alloc: Mutex<()>,
    evicting: Mutex<()>,
    buckets_held: Mutex<HashMap<u32, u32>>,
}

struct Entry {
    slot: u64,
}

#[derive(Default)]
struct Index {
    map: HashMap<Hash, Entry>,
    epoch: u64,
    /// Bytes of the log read so far.
    log_pos: u64,
    /// Log records that were still being written when read (all zero): read again later.
    pending: Vec<u64>,
}

/// What the cache holds, for `cache status`.
#[derive(Debug, Default, Clone)]
pub struct CacheUsage {
    pub slots: u64,
    pub valid: u64,
    pub pinned: u64,
    pub evicted: u64,
    pub empty: u64,
    pub free_listed: u64,
    pub disk_bytes: u64,
    pub manifests: u64,
    pub hits: u64,
    pub misses: u64,
    pub fetched: u64,
}

/// What `gc` did.
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub orphans_reclaimed: u64,
    pub evicted: u64,
    pub log_records_before: u64,
    pub log_records_after: u64,
}

fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Header values read or written together under the allocation lock.
#[derive(Default)]
struct Header {
    next_slot: u64,
    log_end: u64,
    live: u64,
    nfree: u64,
    hits: u64,
    misses: u64,
    epoch: u64,
    fetched: u64,
}

impl BlockCache {
    /// Opens (creating if needed) a cache directory. Safe from many processes at once.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, CacheOptions::default())
    }

    pub fn open_with(dir: &Path, opts: CacheOptions) -> Result<Self> {
        fs::create_dir_all(dir.join("manifests")).ctx(|| format!("create cache {}", dir.display()))?;
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .ctx(|| format!("open {}", p.display()))
        };
        let slots = open("slots")?;
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            header: open("header")?,
            blocks: open("blocks")?,
            records: RecordMap::new(&slots),
            slots,
            log: open("log")?,
            free: open("free")?,
            lock: open("lock")?,
            limit_slots: opts.limit_bytes.map(|b| (b / BLOCK_SIZE as u64).max(1)),
            index: RwLock::new(Index::default()),
            alloc: Mutex::new(()),
            evicting: Mutex::new(()),
            buckets_held: Mutex::new(HashMap::new()),
        };
        // Creates the header if this is a new cache, checks it otherwise.
        cache.with_header(|_, _| Ok(()))?;
        cache.refresh()?;
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on the header under the allocation lock, writing it back afterwards.
    /// `f` also learns whether the header was just created.
    fn with_header<T>(&self, f: impl FnOnce(&mut Header, bool) -> std::io::Result<T>) -> Result<T> {
        let _g = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        ofd_lock(&self.lock, LOCK_ALLOC, true, true).ctx(|| "lock cache header".into())?;
        let res = (|| {
            let mut b = [0u8; HEADER_LEN];
            let n = read_full_at(&self.header, &mut b, 0)?;
            let fresh = n == 0;
            if !fresh && (n < HEADER_LEN || &b[..8] != MAGIC || le32(&b[8..12]) != VERSION) {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not an incfs cache of this version"));
            }
            let mut h = Header {
                next_slot: le64(&b[H_NEXT_SLOT as usize..]),
                log_end: le64(&b[H_LOG_END as usize..]),
                live: le64(&b[H_LIVE as usize..]),
                nfree: le64(&b[H_NFREE as usize..]),
                hits: le64(&b[H_HITS as usize..]),
                misses: le64(&b[H_MISSES as usize..]),
                epoch: le64(&b[H_EPOCH as usize..]),
                fetched: le64(&b[H_FETCHED as usize..]),
            };
            let out = f(&mut h, fresh)?;
            let mut w = [0u8; HEADER_LEN];
            w[..8].copy_from_slice(MAGIC);
            w[8..12].copy_from_slice(&VERSION.to_le_bytes());
            for (off, v) in [
                (H_NEXT_SLOT, h.next_slot),
                (H_LOG_END, h.log_end),
                (H_LIVE, h.live),
                (H_NFREE, h.nfree),
                (H_HITS, h.hits),
                (H_MISSES, h.misses),
                (H_EPOCH, h.epoch),
                (H_FETCHED, h.fetched),
            ] {
                w[off as usize..off as usize + 8].copy_from_slice(&v.to_le_bytes());
            }
            self.header.write_all_at(&w, 0)?;
            Ok(out)
        })();
        let _ = ofd_unlock(&self.lock, LOCK_ALLOC);
        res.ctx(|| format!("cache header in {}", self.dir.display()))
    }

    fn read_header_field(&self, off: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        match read_full_at(&self.header, &mut b, off).ctx(|| "read cache header".into())? {
            8 => Ok(u64::from_le_bytes(b)),
            _ => Ok(0),
        }
    }

    /// Learns about blocks other processes have stored since the last look.
    pub fn refresh(&self) -> Result<()> {
        let epoch = self.read_header_field(H_EPOCH)?;
        let end = self.read_header_field(H_LOG_END)?;
        let mut idx = self.index.write().unwrap_or_else(|e| e.into_inner());
        if epoch != idx.epoch {
            // gc rewrote the log: start over.
            *idx = Index { epoch, ..Index::default() };
        }
        if !idx.pending.is_empty() {
            let pending = std::mem::take(&mut idx.pending);
            for pos in pending {
                let mut rec = [0u8; LOG_REC];
                if read_full_at(&self.log, &mut rec, pos).ctx(|| "read cache log".into())? == LOG_REC
                    && rec != [0u8; LOG_REC]
                {
                    add_log_record(&mut idx.map, &rec);
                } else {
                    idx.pending.push(pos);
                }
            }
        }
        let mut buf = vec![0u8; 4096 * LOG_REC];
        while idx.log_pos < end {
            let start = idx.log_pos;
            let want = ((end - start) as usize).min(buf.len());
            let got = read_full_at(&self.log, &mut buf[..want], start).ctx(|| "read cache log".into())?;
            let got = got - got % LOG_REC;
            for (i, rec) in buf[..want].chunks_exact(LOG_REC).enumerate() {
                let pos = start + (i * LOG_REC) as u64;
                if i * LOG_REC >= got || rec.iter().all(|&b| b == 0) {
                    idx.pending.push(pos);
                } else {
                    add_log_record(&mut idx.map, rec);
                }
            }
            idx.log_pos = start + (want - want % LOG_REC) as u64;
            if want < LOG_REC {
                break;
            }
        }
        Ok(())
    }

    /// The slot holding `hash`, as far as this process knows.
    pub fn lookup(&self, hash: &Hash) -> Option<u64> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).map.get(hash).map(|e| e.slot)
    }

    /// Slots of several blocks under one lock (the warm read path).
    pub fn lookup_many<'a>(&self, hashes: impl Iterator<Item = &'a Hash>, out: &mut Vec<Option<u64>>) {
        let idx = self.index.read().unwrap_or_else(|e| e.into_inner());
        out.extend(hashes.map(|h| idx.map.get(h).map(|e| e.slot)));
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
        debug_assert_eq!(out.len(), hashes.len() * BLOCK_SIZE);
        let got = read_full_at(&self.blocks, out, first * BLOCK_SIZE as u64).ctx(|| "read cache blocks".into())?;
        if got != out.len() {
            self.forget_run(first, hashes.iter());
            return Ok(false);
        }
        self.check_run(first, hashes.iter())
    }

    /// Like `read_run`, straight into a guest's buffer: the first `len` bytes of the run
    /// (`len` may end inside the last block) go to [at, at + len) of `out`.
    pub fn read_run_into<'a>(
        &self,
        first: u64,
        hashes: impl ExactSizeIterator<Item = &'a Hash> + Clone,
        out: &mut ScatterBuf<'_>,
        at: usize,
        len: usize,
    ) -> Result<bool> {
        debug_assert!(len <= hashes.len() * BLOCK_SIZE);
        let got = out.read_from(&self.blocks, first * BLOCK_SIZE as u64, at, len).ctx(|| "read cache blocks".into())?;
        if got != len {
            self.forget_run(first, hashes);
            return Ok(false);
        }
        self.check_run(first, hashes)
    }

    /// After the data of a run was copied: checks that every slot still holds its hash (and
    /// notes the access), or forgets the run and reports a miss.
    fn check_run<'a>(&self, first: u64, hashes: impl ExactSizeIterator<Item = &'a Hash> + Clone) -> Result<bool> {
        let n = hashes.len();
        let ok = match self.records.as_ref().and_then(|m| m.run(&self.slots, first, n)) {
            Some(run) => {
                fence(Ordering::Acquire);
                let now = now_secs();
                hashes.clone().enumerate().all(|(i, h)| run.check_and_touch(i, h, now))
            }
            None => {
                let mut meta = vec![0u8; n * META];
                let got =
                    read_full_at(&self.slots, &mut meta, first * META as u64).ctx(|| "read cache slots".into())?;
                let ok = got == meta.len()
                    && hashes
                        .clone()
                        .zip(meta.chunks_exact(META))
                        .all(|(h, rec)| le32(&rec[32..36]) == STATE_VALID && &rec[..32] == h);
                if ok {
                    self.touch(first, &meta);
                }
                ok
            }
        };
        if !ok {
            self.forget_run(first, hashes);
        }
        Ok(ok)
    }

    /// Sets a slot's state: the last word of a record written, so a reader that sees
    /// VALID sees the whole record (readers load the state first).
    fn set_state(&self, slot: u64, state: u32) -> Result<()> {
        match self.records.as_ref().and_then(|m| m.run(&self.slots, slot, 1)) {
            Some(run) => {
                run.state(0).store(state.to_le(), Ordering::Release);
                Ok(())
            }
            None => self
                .slots
                .write_all_at(&state.to_le_bytes(), slot * META as u64 + 32)
                .ctx(|| "write cache slots".into()),
        }
    }

    /// Drops index entries that point into a run found stale.
    fn forget_run<'a>(&self, first: u64, hashes: impl Iterator<Item = &'a Hash>) {
        let mut idx = self.index.write().unwrap_or_else(|e| e.into_inner());
        for (i, h) in hashes.enumerate() {
            if idx.map.get(h).map(|e| e.slot) == Some(first + i as u64) {
                idx.map.remove(h);
            }
        }
    }

    /// Writes back access times for LRU, at most every TOUCH_EVERY seconds per block: the
    /// records just read carry the last time, so deciding costs no lookup.
    fn touch(&self, first: u64, meta: &[u8]) {
        let now = now_secs();
        for (i, rec) in meta.chunks_exact(META).enumerate() {
            if now.saturating_sub(le32(&rec[36..40])) >= TOUCH_EVERY {
                let _ = self.slots.write_all_at(&now.to_le_bytes(), (first + i as u64) * META as u64 + 36);
            }
        }
    }

    /// Stores verified blocks (each exactly 4096 bytes, already checked against its hash).
    /// Callers must only pass verified data. Evicts afterwards if over the limit.
    pub fn insert_verified(&self, blocks: &[(Hash, &[u8])]) -> Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        if blocks.iter().any(|(_, b)| b.len() != BLOCK_SIZE) {
            return Err(Error::Invalid("cache blocks are 4096 bytes".into()));
        }
        ofd_lock(&self.lock, LOCK_WRITERS, false, true).ctx(|| "lock cache for writing".into())?;
        let res = self.insert_locked(blocks);
        let _ = ofd_unlock(&self.lock, LOCK_WRITERS);
        res?;
        self.evict_if_needed()?;
        Ok(())
    }

    fn insert_locked(&self, blocks: &[(Hash, &[u8])]) -> Result<()> {
        let n = blocks.len() as u64;
        // Reuse freed slots first, then grow.
        let (slots, log_pos) = self.with_header(|h, _| {
            let k = h.nfree.min(n);
            let mut slots = Vec::with_capacity(n as usize);
            if k > 0 {
                let mut b = vec![0u8; k as usize * 8];
                self.free.read_exact_at(&mut b, (h.nfree - k) * 8)?;
                slots.extend(b.chunks_exact(8).map(le64));
                h.nfree -= k;
            }
            slots.extend(h.next_slot..h.next_slot + (n - k));
            h.next_slot += n - k;
            let log_pos = h.log_end;
            h.log_end += n * LOG_REC as u64;
            h.live += n;
            h.fetched += n;
            Ok((slots, log_pos))
        })?;
        let t = now_secs();
        // Data first (one write per run of consecutive slots), then records, then the log.
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                j += 1;
            }
            let data: Vec<u8> = blocks[i..j].iter().flat_map(|(_, b)| b.iter().copied()).collect();
            self.blocks.write_all_at(&data, slots[i] * BLOCK_SIZE as u64).ctx(|| "write cache blocks".into())?;
            i = j;
        }
        // Each record with an empty state first, then the state: never a VALID state
        // beside a half-written hash.
        for (s, (h, _)) in slots.iter().zip(blocks) {
            let mut rec = [0u8; META];
            rec[..32].copy_from_slice(h);
            rec[36..40].copy_from_slice(&t.to_le_bytes());
            self.slots.write_all_at(&rec, s * META as u64).ctx(|| "write cache slots".into())?;
            self.set_state(*s, STATE_VALID)?;
        }
        let mut log = Vec::with_capacity(blocks.len() * LOG_REC);
        for (s, (h, _)) in slots.iter().zip(blocks) {
            log.extend_from_slice(h);
            log.extend_from_slice(&s.to_le_bytes());
        }
        self.log.write_all_at(&log, log_pos).ctx(|| "write cache log".into())?;
        let mut idx = self.index.write().unwrap_or_else(|e| e.into_inner());
        for (s, (h, _)) in slots.iter().zip(blocks) {
            idx.map.insert(*h, Entry { slot: *s });
        }
        Ok(())
    }

    /// Evicts least recently used blocks while the cache is over its limit (one process at
    /// a time; the others go on).
    pub fn evict_if_needed(&self) -> Result<u64> {
        let Some(limit) = self.limit_slots else { return Ok(0) };
        if self.read_header_field(H_LIVE)? <= limit {
            return Ok(0);
        }
        let Ok(_g) = self.evicting.try_lock() else { return Ok(0) };
        match ofd_lock(&self.lock, LOCK_EVICT, true, false) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => return Ok(0),
            Err(e) => return Err(Error::io("lock cache for eviction", e)),
        }
        let res = self.evict_to(limit * LOW_WATER_PERCENT / 100);
        let _ = ofd_unlock(&self.lock, LOCK_EVICT);
        res
    }

    /// Evicts the least recently used unpinned blocks until at most `target` remain.
    fn evict_to(&self, target: u64) -> Result<u64> {
        let live = self.read_header_field(H_LIVE)?;
        if live <= target {
            return Ok(0);
        }
        let mut cand: Vec<(u32, u64)> = Vec::new();
        self.scan_records(|slot, rec| {
            if le32(&rec[32..36]) == STATE_VALID && le32(&rec[40..44]) & FLAG_PINNED == 0 {
                cand.push((le32(&rec[36..40]), slot));
            }
        })?;
        let need = ((live - target) as usize).min(cand.len());
        if need == 0 {
            return Ok(0);
        }
        // Oldest access first; ties by slot, so older inserts go first.
        cand.select_nth_unstable(need - 1);
        let mut victims: Vec<u64> = cand[..need].iter().map(|&(_, s)| s).collect();
        victims.sort_unstable();
        self.free_slots(&victims)?;
        Ok(victims.len() as u64)
    }

    /// Marks slots evicted, frees their data, then hands them to the free list.
    fn free_slots(&self, victims: &[u64]) -> Result<()> {
        for &s in victims {
            self.set_state(s, STATE_EVICTED)?;
        }
        let mut i = 0;
        while i < victims.len() {
            let mut j = i + 1;
            while j < victims.len() && victims[j] == victims[j - 1] + 1 {
                j += 1;
            }
            punch_hole(&self.blocks, victims[i] * BLOCK_SIZE as u64, (j - i) as u64 * BLOCK_SIZE as u64);
            i = j;
        }
        let list: Vec<u8> = victims.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.with_header(|h, _| {
            self.free.write_all_at(&list, h.nfree * 8)?;
            h.nfree += victims.len() as u64;
            h.live = h.live.saturating_sub(victims.len() as u64);
            Ok(())
        })?;
        let mut idx = self.index.write().unwrap_or_else(|e| e.into_inner());
        idx.map.retain(|_, e| victims.binary_search(&e.slot).is_err());
        Ok(())
    }

    fn scan_records(&self, mut f: impl FnMut(u64, &[u8])) -> Result<()> {
        let end = self.read_header_field(H_NEXT_SLOT)?;
        let chunk = 8192u64;
        let mut buf = vec![0u8; chunk as usize * META];
        let mut s = 0;
        while s < end {
            let n = (end - s).min(chunk);
            let bytes = &mut buf[..n as usize * META];
            let got = read_full_at(&self.slots, bytes, s * META as u64).ctx(|| "read cache slots".into())?;
            bytes[got..].fill(0);
            for i in 0..n as usize {
                f(s + i as u64, &bytes[i * META..(i + 1) * META]);
            }
            s += n;
        }
        Ok(())
    }

    /// Keeps these blocks through eviction (a prefetch list). Returns how many were cached.
    pub fn pin(&self, hashes: &[Hash], pinned: bool) -> Result<u64> {
        let flag = if pinned { FLAG_PINNED } else { 0 };
        let mut n = 0;
        for h in hashes {
            if let Some(s) = self.lookup_fresh(h)? {
                self.slots
                    .write_all_at(&flag.to_le_bytes(), s * META as u64 + 40)
                    .ctx(|| "write cache slots".into())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Adds this process's hit and miss counts to the cache-wide totals.
    pub fn add_stats(&self, hits: u64, misses: u64) -> Result<()> {
        if hits == 0 && misses == 0 {
            return Ok(());
        }
        self.with_header(|h, _| {
            h.hits += hits;
            h.misses += misses;
            Ok(())
        })
    }

    /// Offline maintenance, safe while daemons run: reclaims slots left by killed writers,
    /// evicts down to `limit_bytes` if given, and rewrites the log without dead records.
    pub fn gc(&self, limit_bytes: Option<u64>) -> Result<GcReport> {
        let mut rep = GcReport::default();
        // Exclusive: no insert is in flight, so an empty record below next_slot that is not
        // on the free list belongs to a writer that died.
        ofd_lock(&self.lock, LOCK_WRITERS, true, true).ctx(|| "lock cache for gc".into())?;
        let _g = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        ofd_lock(&self.lock, LOCK_EVICT, true, true).ctx(|| "lock cache for gc".into())?;
        let res = (|| {
            let nfree = self.read_header_field(H_NFREE)?;
            let mut b = vec![0u8; nfree as usize * 8];
            self.free.read_exact_at(&mut b, 0).ctx(|| "read cache free list".into())?;
            let mut listed: Vec<u64> = b.chunks_exact(8).map(le64).collect();
            listed.sort_unstable();
            let mut orphans = Vec::new();
            self.scan_records(|slot, rec| match le32(&rec[32..36]) {
                STATE_VALID | STATE_EVICTED => {}
                _ if listed.binary_search(&slot).is_err() => orphans.push(slot),
                _ => {}
            })?;
            if !orphans.is_empty() {
                // Orphans were never counted live; free_slots subtracts, so add them first.
                self.with_header(|h, _| {
                    h.live += orphans.len() as u64;
                    Ok(())
                })?;
                self.free_slots(&orphans)?;
            }
            rep.orphans_reclaimed = orphans.len() as u64;
            if let Some(l) = limit_bytes {
                rep.evicted = self.evict_to(l / BLOCK_SIZE as u64)?;
            }
            // Rewrite the log from the records still valid, under a new epoch.
            let mut live = Vec::new();
            self.scan_records(|slot, rec| {
                if le32(&rec[32..36]) == STATE_VALID {
                    live.extend_from_slice(&rec[..32]);
                    live.extend_from_slice(&slot.to_le_bytes());
                }
            })?;
            rep.log_records_before = self.read_header_field(H_LOG_END)? / LOG_REC as u64;
            rep.log_records_after = (live.len() / LOG_REC) as u64;
            let tmp = self.dir.join(format!("log.gc.{}", std::process::id()));
            fs::write(&tmp, &live).ctx(|| format!("write {}", tmp.display()))?;
            self.with_header(|h, _| {
                fs::rename(&tmp, self.dir.join("log"))?;
                h.log_end = live.len() as u64;
                h.epoch += 1;
                Ok(())
            })?;
            Ok(())
        })();
        let _ = ofd_unlock(&self.lock, LOCK_EVICT);
        let _ = ofd_unlock(&self.lock, LOCK_WRITERS);
        res.map(|()| rep)
    }

    fn bucket(hash: &Hash) -> u32 {
        le32(&hash[..4]) % LOCK_BUCKETS
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
        let mut u = CacheUsage {
            slots: self.read_header_field(H_NEXT_SLOT)?,
            free_listed: self.read_header_field(H_NFREE)?,
            hits: self.read_header_field(H_HITS)?,
            misses: self.read_header_field(H_MISSES)?,
            fetched: self.read_header_field(H_FETCHED)?,
            ..Default::default()
        };
        self.scan_records(|_, rec| match le32(&rec[32..36]) {
            STATE_VALID => {
                u.valid += 1;
                if le32(&rec[40..44]) & FLAG_PINNED != 0 {
                    u.pinned += 1;
                }
            }
            STATE_EVICTED => u.evicted += 1,
            _ => u.empty += 1,
        })?;
        for f in [&self.blocks, &self.slots, &self.log, &self.free] {
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
        let mut out = Vec::new();
        self.scan_records(|slot, rec| {
            if le32(&rec[32..36]) == STATE_VALID {
                let mut h = [0u8; 32];
                h.copy_from_slice(&rec[..32]);
                out.push((slot, h));
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

/// Address space reserved for the mapped slots file: 64 GiB of records cover 5.7 TB of
/// blocks. Records past it are read with pread.
const RECORD_MAP_BYTES: u64 = 1 << 36;

/// The slots file mapped shared, so that checking and touching records on the read path
/// costs no system call. The mapping is reserved once with room to grow, because the file
/// only ever grows (nothing truncates it); a record is touched only once the file is known
/// to reach it, since a page past the end of a mapped file is SIGBUS. Other processes write
/// the same file with pwrite: mapped and written pages are the same page cache pages.
struct RecordMap {
    base: NonNull<u8>,
    /// File bytes known to exist.
    covered: AtomicU64,
}

// SAFETY: the mapping is only accessed through atomics, like memory shared with other
// processes must be.
unsafe impl Send for RecordMap {}
unsafe impl Sync for RecordMap {}

/// Records [first, first + n) of a [`RecordMap`], known to be inside the file.
struct RecordRun<'a> {
    at: *mut u8,
    _map: PhantomData<&'a RecordMap>,
}

impl RecordMap {
    fn new(file: &File) -> Option<Self> {
        // SAFETY: a fresh shared mapping of our own fd; nothing else is at that address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RECORD_MAP_BYTES as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::debug!("cannot map cache slots: {}", std::io::Error::last_os_error());
            return None;
        }
        Some(RecordMap { base: NonNull::new(p.cast())?, covered: AtomicU64::new(0) })
    }

    /// Records [first, first + n), if mapped and inside the file.
    fn run(&self, file: &File, first: u64, n: usize) -> Option<RecordRun<'_>> {
        let end = first.checked_add(n as u64)?.checked_mul(META as u64)?;
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
        // SAFETY: end <= RECORD_MAP_BYTES, so the offset is inside the mapping.
        let at = unsafe { self.base.as_ptr().add((first * META as u64) as usize) };
        Some(RecordRun { at, _map: PhantomData })
    }
}

impl Drop for RecordMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no RecordRun outlives the map.
        unsafe { libc::munmap(self.base.as_ptr().cast(), RECORD_MAP_BYTES as usize) };
    }
}

impl RecordRun<'_> {
    /// A 32-bit word of record i, as stored (little-endian).
    fn word32(&self, i: usize, off: usize) -> &AtomicU32 {
        // SAFETY: record i of the run is inside the mapping and the file; records are
        // 48-byte aligned in a page-aligned mapping, so `off` (a multiple of 4) is aligned.
        unsafe { AtomicU32::from_ptr(self.at.add(i * META + off).cast()) }
    }

    fn state(&self, i: usize) -> &AtomicU32 {
        self.word32(i, 32)
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
            let atime = self.word32(i, 36);
            if now.saturating_sub(u32::from_le(atime.load(Ordering::Relaxed))) >= TOUCH_EVERY {
                atime.store(now.to_le(), Ordering::Relaxed);
            }
        }
        same
    }
}

fn add_log_record(map: &mut HashMap<Hash, Entry>, rec: &[u8]) {
    let mut h = [0u8; 32];
    h.copy_from_slice(&rec[..32]);
    let slot = le64(&rec[32..40]);
    // Optimistic: the slot's record is checked on every read.
    map.insert(h, Entry { slot });
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

/// Frees the disk space of a range (reads then return zeroes, which no record vouches for).
fn punch_hole(f: &File, off: u64, len: u64) {
    // SAFETY: fallocate on a valid fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off as i64, len as i64)
    };
    if r != 0 {
        tracing::debug!("punch hole: {}", std::io::Error::last_os_error());
    }
}

/// An open-file-description lock on one byte (released when this process's file is closed,
/// including when the process dies).
fn ofd_lock(f: &File, byte: i64, exclusive: bool, wait: bool) -> std::io::Result<()> {
    // SAFETY: flock is plain old data; all-zero is a valid value.
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
    // SAFETY: as above.
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

    fn block(v: u32) -> (Hash, Vec<u8>) {
        let mut d = vec![0u8; BLOCK_SIZE];
        d[..4].copy_from_slice(&v.to_le_bytes());
        d[4] = 1;
        (leaf_hash(&d), d)
    }

    fn insert(c: &BlockCache, vals: std::ops::Range<u32>) -> Vec<Hash> {
        let blocks: Vec<(Hash, Vec<u8>)> = vals.map(block).collect();
        let refs: Vec<(Hash, &[u8])> = blocks.iter().map(|(h, d)| (*h, d.as_slice())).collect();
        c.insert_verified(&refs).expect("insert");
        blocks.iter().map(|(h, _)| *h).collect()
    }

    fn read(c: &BlockCache, h: &Hash) -> Option<Vec<u8>> {
        let s = c.lookup_fresh(h).expect("lookup")?;
        let mut out = vec![0u8; BLOCK_SIZE];
        c.read_run(s, &[*h], &mut out).expect("read").then_some(out)
    }

    #[test]
    fn insert_read_and_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = BlockCache::open(dir.path()).expect("open");
        let hs = insert(&c, 1..3);
        let first = c.lookup(&hs[0]).expect("slot");
        assert_eq!(c.lookup(&hs[1]), Some(first + 1));
        let mut out = vec![0u8; 2 * BLOCK_SIZE];
        assert!(c.read_run(first, &hs, &mut out).expect("read"));
        assert_eq!(out[..BLOCK_SIZE], block(1).1[..]);
        // A second handle (another process, in effect) learns of it from the log.
        let c2 = BlockCache::open(dir.path()).expect("open");
        assert_eq!(c2.lookup(&hs[0]), Some(first));
        let h3 = insert(&c2, 3..4);
        assert_eq!(c.lookup(&h3[0]), None);
        assert!(c.lookup_fresh(&h3[0]).expect("fresh").is_some());
    }

    #[test]
    fn wrong_hash_or_slot_is_a_miss() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = BlockCache::open(dir.path()).expect("open");
        let hs = insert(&c, 1..2);
        let s = c.lookup(&hs[0]).expect("slot");
        let mut out = vec![0u8; BLOCK_SIZE];
        assert!(!c.read_run(s, &[[9; 32]], &mut out).expect("read"));
        assert!(!c.read_run(s + 5, &hs, &mut out).expect("read past end"));
    }

    #[test]
    fn orphans_are_never_served_and_gc_reclaims_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = BlockCache::open(dir.path()).expect("open");
        insert(&c, 1..3);
        // A writer killed after allocating 5 slots and writing data, before its records.
        c.with_header(|h, _| {
            h.next_slot += 5;
            h.log_end += 5 * LOG_REC as u64;
            Ok(())
        })
        .expect("alloc");
        c.blocks.write_all_at(&[7u8; BLOCK_SIZE], 2 * BLOCK_SIZE as u64).expect("data");
        let c2 = BlockCache::open(dir.path()).expect("open");
        assert_eq!(c2.valid_slots().expect("slots").len(), 2);
        assert_eq!(c2.usage().expect("usage").empty, 5);
        let rep = c2.gc(None).expect("gc");
        assert_eq!(rep.orphans_reclaimed, 5);
        assert_eq!(rep.log_records_after, 2);
        // The reclaimed slots are reused; everyone sees the new log epoch.
        let hs = insert(&c2, 10..13);
        for (v, h) in (10..13).zip(&hs) {
            assert!(c2.lookup(h).expect("slot") < 7);
            assert_eq!(read(&c, h).expect("other handle reads it"), block(v).1);
        }
        assert_eq!(c2.usage().expect("usage").valid, 5);
    }

    #[test]
    fn lru_eviction_keeps_the_cache_under_its_limit_and_spares_pinned_and_recent_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let limit = 20 * BLOCK_SIZE as u64;
        let c = BlockCache::open_with(dir.path(), CacheOptions { limit_bytes: Some(limit) }).expect("open");
        let old = insert(&c, 0..10);
        assert_eq!(c.pin(&old[..2], true).expect("pin"), 2);
        // Make blocks 2..10 look old, 0..2 too (they are pinned).
        for s in 0..10u64 {
            c.slots.write_all_at(&1u32.to_le_bytes(), s * META as u64 + 36).expect("age");
        }
        let newer = insert(&c, 10..25);
        let u = c.usage().expect("usage");
        assert!(u.valid <= 20, "{u:?}");
        assert!(read(&c, &old[0]).is_some() && read(&c, &old[1]).is_some(), "pinned blocks stay");
        assert!(read(&c, &old[5]).is_none(), "old blocks go first");
        for h in &newer {
            assert!(read(&c, h).is_some(), "recent blocks stay");
        }
        // Freed slots are reused: the files do not grow past the limit's worth of slots
        // (plus one batch: eviction runs after each insert).
        for b in 0..10 {
            insert(&c, 100 + b * 4..104 + b * 4);
        }
        let u = c.usage().expect("usage");
        assert!(u.valid <= 20 && u.slots <= 26, "{u:?}");
        let c2 = BlockCache::open(dir.path()).expect("open");
        for (slot, h) in c2.valid_slots().expect("valid") {
            let mut b = [0u8; BLOCK_SIZE];
            c2.raw_block(slot, &mut b).expect("raw");
            assert_eq!(leaf_hash(&b), h);
        }
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
