//! The on-disk block cache, shared by every daemon on a host.
//!
//! Blocks are keyed by their leaf hash (SHA-256 of the 4096-byte plaintext), so identical
//! blocks of different files and different images are stored once. The directory's files
//! are described in `layout.rs`; `docs/shared-cache.md` tells the whole design.
//!
//! Why it is safe:
//! - A slot's record is written only after its data, and only for verified data; the log
//!   record after both. A process killed mid-insert leaves a slot whose record is empty:
//!   never served (and reclaimed by `gc`).
//! - Readers note a slot's record (valid, hash, generation) before copying its data and
//!   check it unchanged after; eviction and inserts give the record a new generation before
//!   the data changes, so a block evicted (or its slot reused, even for the same block)
//!   under a reader is seen as a miss, never as wrong bytes.
//! - One cache belongs to one user (`files.rs`); nothing read from its files can make a
//!   daemon hang, allocate without bound or panic.
//! - OFD locks vanish with the process that held them: a killed daemon never wedges others.
//!
//! The parts: `layout` (the format), `index` (hash -> slot, tailing the log), `records`
//! (the mapped slot records), `insert`, `evict` (eviction, pins, gc), `locks`, `manifests`,
//! `stats` and `verify`.

mod evict;
mod files;
mod index;
mod insert;
mod layout;
mod locks;
mod manifests;
mod records;
mod stats;
mod verify;

#[cfg(test)]
mod tests;

pub use evict::GcReport;
pub use files::{create_private_dir, UnsafeCacheFile};
pub use layout::BadHeader;
pub use locks::RangeAnnouncement;
pub use stats::CacheUsage;
pub use verify::VerifyReport;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use incfs_buf::ScatterBuf;
use tempfile::NamedTempFile;

use crate::error::{IoContext, Result};
use crate::image::{Hash, BLOCK_SIZE};
use index::Index;
use layout::{
    Header, Record, BLOCKS_FILE, DICTIONARIES_DIR, FREE_FILE, HEADER_FILE, HEADER_LEN, H_NEXT_SLOT, LOCK_FILE,
    LOG_FILE, MANIFESTS_DIR, SLOTS_FILE,
};
use locks::Locks;
use records::{Records, RunSnapshot};

#[derive(Clone, Debug, Default)]
pub struct CacheOptions {
    /// Keep the cache at most this many bytes of blocks (None: unbounded).
    pub limit_bytes: Option<u64>,
}

/// The log file as this process has it open, and the epoch it was opened in.
struct LogFile {
    epoch: u64,
    file: Arc<File>,
}

/// One process's handle on a cache directory (the files are described in `layout.rs`).
pub struct BlockCache {
    dir: PathBuf,
    header: File,
    blocks: File,
    /// The `slots` file.
    records: Records,
    /// The `log` file of the epoch it was opened in: gc renames a new one into place.
    log: RwLock<LogFile>,
    free: File,
    /// The `lock` file.
    locks: Locks,
    /// `CacheOptions::limit_bytes` in blocks.
    limit_slots: Option<u64>,
    index: RwLock<Index>,
    /// Re-hash every block read (`set_verify_reads`).
    verify_reads: AtomicBool,
}

impl BlockCache {
    /// Opens (creating if needed) a cache directory. Safe from many processes at once.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, CacheOptions::default())
    }

    pub fn open_with(dir: &Path, opts: CacheOptions) -> Result<Self> {
        files::create_private_dir(dir)
            .and_then(|()| files::create_private_dir(&dir.join(MANIFESTS_DIR)))
            .and_then(|()| files::create_private_dir(&dir.join(DICTIONARIES_DIR)))
            .ctx(|| format!("cache directory {}", dir.display()))?;
        let open =
            |name: &str| files::open_private_file(dir, name).ctx(|| format!("open {}", dir.join(name).display()));
        let slots = open(SLOTS_FILE)?;
        let cache = BlockCache {
            dir: dir.to_path_buf(),
            header: open(HEADER_FILE)?,
            blocks: open(BLOCKS_FILE)?,
            records: Records::new(slots),
            log: RwLock::new(LogFile { epoch: 0, file: Arc::new(open(LOG_FILE)?) }),
            free: open(FREE_FILE)?,
            locks: Locks::new(open(LOCK_FILE)?),
            limit_slots: opts.limit_bytes.map(|b| (b / BLOCK_SIZE as u64).max(1)),
            index: RwLock::new(Index::default()),
            verify_reads: AtomicBool::new(false),
        };
        // Creates the header if this is a new cache, checks it otherwise; the log opened
        // above may predate a gc that renamed a new one into place before the header was read.
        cache.with_header(|h, _| cache.log_of_epoch_locked(h.epoch).map(drop))?;
        cache.refresh()?;
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Gives back this process's mappings of the slot records (page cache, shared by every
    /// daemon on the cache): call it now and then, so that the records read stay out of the
    /// daemon's resident memory.
    pub fn release_record_pages(&self) -> Result<()> {
        self.records.release_pages()
    }

    /// Copies `hashes.len()` consecutive slots from `first` into `out`, then checks that each
    /// slot still holds the expected hash. False (and the stale entries forgotten) if any slot
    /// was evicted or reused meanwhile.
    pub fn read_run(&self, first: u64, hashes: &[Hash], out: &mut [u8]) -> Result<bool> {
        debug_assert_eq!(out.len(), hashes.len() * BLOCK_SIZE);
        let Some(before) = self.snapshot_run(first, hashes.iter())? else { return Ok(false) };
        let got = read_full_at(&self.blocks, out, first * BLOCK_SIZE as u64).ctx(|| "read cache blocks".into())?;
        if !self.confirm_run(first, hashes.iter(), before, got == out.len())? {
            return Ok(false);
        }
        if self.verifies_reads() {
            return self.verify_run(first, hashes, out);
        }
        Ok(true)
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
        if self.verifies_reads() {
            // Hashed in a bounce buffer of ours: the guest's buffers are its to change.
            let hashes: Vec<Hash> = hashes.copied().collect();
            let mut bounce = vec![0u8; hashes.len() * BLOCK_SIZE];
            if !self.read_run(first, &hashes, &mut bounce)? {
                return Ok(false);
            }
            out.write(at, &bounce[..len]).ctx(|| "copy cached blocks".into())?;
            return Ok(true);
        }
        let Some(before) = self.snapshot_run(first, hashes.clone())? else { return Ok(false) };
        let got = out.read_from(&self.blocks, first * BLOCK_SIZE as u64, at, len).ctx(|| "read cache blocks".into())?;
        self.confirm_run(first, hashes, before, got == len)
    }

    /// Before copying a run's data: what its records say (None, and the run forgotten, if
    /// any slot is not valid with its hash). Slots snapshotted are below MAX_SLOTS, so the
    /// data's offsets cannot overflow.
    fn snapshot_run<'a>(
        &self,
        first: u64,
        hashes: impl ExactSizeIterator<Item = &'a Hash> + Clone,
    ) -> Result<Option<RunSnapshot>> {
        let before = self.records.snapshot_run(first, hashes.clone())?;
        if before.is_none() {
            self.forget_run(first, hashes);
        }
        #[cfg(test)]
        tests::race_point(tests::RacePoint::BeforeCopy);
        Ok(before)
    }

    /// After the data of a run was copied (`complete` if all of it): checks that no slot
    /// changed since `before` (and notes the access), or forgets the run and reports a miss.
    fn confirm_run<'a>(
        &self,
        first: u64,
        hashes: impl ExactSizeIterator<Item = &'a Hash> + Clone,
        before: RunSnapshot,
        complete: bool,
    ) -> Result<bool> {
        #[cfg(test)]
        tests::race_point(tests::RacePoint::AfterCopy);
        let ok = complete && self.records.confirm_run(first, hashes.clone(), before)?;
        if !ok {
            self.forget_run(first, hashes);
        }
        Ok(ok)
    }

    /// Runs `f` on the header under the allocation lock, writing it back afterwards.
    /// `f` also learns whether the header was just created.
    fn with_header<T>(&self, f: impl FnOnce(&mut Header, bool) -> io::Result<T>) -> Result<T> {
        let res = {
            let _alloc = self.locks.header().ctx(|| "lock cache header".into())?;
            (|| {
                let mut b = [0u8; HEADER_LEN];
                let n = read_full_at(&self.header, &mut b, 0)?;
                let fresh = n == 0;
                if !fresh {
                    Header::check(&b[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                let mut h = Header::decode(&b);
                let out = f(&mut h, fresh)?;
                self.header.write_all_at(&h.encode(), 0)?;
                Ok(out)
            })()
        };
        res.ctx(|| format!("cache header in {}", self.dir.display()))
    }

    /// The log file of `epoch`, the header's current one: reopened if gc renamed a new log
    /// into place since this process opened it. Call under the allocation lock, which gc
    /// holds while it renames the log and bumps the epoch.
    fn log_of_epoch_locked(&self, epoch: u64) -> io::Result<Arc<File>> {
        {
            let log = self.log.read().unwrap_or_else(|e| e.into_inner());
            if log.epoch == epoch {
                return Ok(log.file.clone());
            }
        }
        let file = Arc::new(files::open_private_file(&self.dir, LOG_FILE)?);
        *self.log.write().unwrap_or_else(|e| e.into_inner()) = LogFile { epoch, file: file.clone() };
        Ok(file)
    }

    /// The log file this process has open, and its epoch.
    fn log(&self) -> (u64, Arc<File>) {
        let log = self.log.read().unwrap_or_else(|e| e.into_inner());
        (log.epoch, log.file.clone())
    }

    fn read_header_field(&self, off: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        match read_full_at(&self.header, &mut b, off).ctx(|| "read cache header".into())? {
            8 => Ok(u64::from_le_bytes(b)),
            _ => Ok(0),
        }
    }

    /// A new file in `dir` holding `bytes`, to be renamed over one of the cache's files. Its
    /// name is unpredictable and it is created 0600 like every cache file (O_EXCL: a link
    /// planted there is not followed).
    fn new_temp_file(&self, dir: &Path, prefix: &str, bytes: &[u8]) -> Result<NamedTempFile> {
        let mut tmp = tempfile::Builder::new()
            .prefix(prefix)
            .permissions(files::file_permissions())
            .tempfile_in(dir)
            .ctx(|| format!("create a temporary file in {}", dir.display()))?;
        tmp.write_all(bytes).ctx(|| format!("write {}", tmp.path().display()))?;
        Ok(tmp)
    }

    /// Calls `f` on the record of every slot allocated so far that the slots file holds.
    fn scan_records(&self, f: impl FnMut(u64, Record<'_>)) -> Result<()> {
        let end = self.records.scan_end(self.read_header_field(H_NEXT_SLOT)?)?;
        self.records.scan(end, f)
    }
}

/// Reads at `off` until `buf` is full or the file ends: the bytes read (std's
/// `read_exact_at` fails at the end of the file, where a short read is an answer here).
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
