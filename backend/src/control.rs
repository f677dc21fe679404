//! The control channel inside the mount: Incremental FS's special files, carried over plain
//! FUSE READ/WRITE so that a virtio-fs guest can use them. Specified in docs/pending-reads.md.
//!
//! A virtio-fs guest never receives FUSE notifications, so poll() on a file of the mount
//! cannot be woken by the host. Instead a READ of `.pending_reads` or `.log` may be held by
//! the host (a long poll, [`Reply::Pending`]) until records newer than the handle's cursor
//! exist or the handle's timeout passes. Blocks supplied by a guest data loader arrive as
//! WRITEs to `.fill` and go through the engine's verification before anything is stored.
//!
//! Control inodes live in their own number space (bit 62 set), far above any image inode
//! (image inodes are an index + 1, a u32), so the two can never collide.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use incfs_fuse::{abi, Attr, Context, DirEntry, DirSink, Entry, Errno, Reply};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::engine::Engine;
use crate::error::Error;
use crate::fs::ReadObserver;
use crate::image::{BlockKind, BLOCK_SIZE};

/// Set in every control inode number.
pub const CTL_BIT: u64 = 1 << 62;
pub const INO_PENDING_READS: u64 = CTL_BIT | 1;
pub const INO_LOG: u64 = CTL_BIT | 2;
pub const INO_BLOCKS_WRITTEN: u64 = CTL_BIT | 3;
pub const INO_FILL: u64 = CTL_BIT | 4;
pub const INO_STATS: u64 = CTL_BIT | 5;
pub const INO_LAST_READ_ERROR: u64 = CTL_BIT | 6;
pub const INO_INDEX: u64 = CTL_BIT | 7;
pub const INO_INCOMPLETE: u64 = CTL_BIT | 8;
pub const INO_FILLED: u64 = CTL_BIT | 9;
/// `.filled/<id>` of image inode index i is `INO_FILLED_BASE + i`.
pub const INO_FILLED_BASE: u64 = CTL_BIT | (1 << 32);

/// Names at the mount root, as incfs names them where incfs has the file.
pub const ROOT_NAMES: &[(&[u8], u64)] = &[
    (b".pending_reads", INO_PENDING_READS),
    (b".log", INO_LOG),
    (b".blocks_written", INO_BLOCKS_WRITTEN),
    (b".fill", INO_FILL),
    (b".stats", INO_STATS),
    (b".last_read_error", INO_LAST_READ_ERROR),
    (b".index", INO_INDEX),
    (b".incomplete", INO_INCOMPLETE),
    (b".filled", INO_FILLED),
];

/// `incfs_pending_read_info2`: file_id[16], timestamp_us u64, block_index u32, serial u32,
/// uid u32, reserved u32.
pub const RECORD_SIZE: usize = 40;
/// Header of one block in a `.fill` write.
pub const FILL_HEADER_SIZE: usize = 32;
/// incfs's limit for one block's data (E2BIG above it).
pub const MAX_FILL_DATA: usize = 2 * BLOCK_SIZE;
/// Size of the `.filled/<id>` header before the ranges.
pub const FILLED_HEADER_SIZE: usize = 32;
/// `.last_read_error` is one record of this size.
pub const LAST_ERROR_SIZE: usize = 40;
/// Read log ring: 16384 records of 40 bytes = 640 KiB at most.
pub const LOG_CAPACITY: usize = 16384;
/// Longest long poll: a guest thread in a FUSE request that the host has started answering
/// cannot be interrupted (not even by SIGKILL), and the guest's hung-task detector complains
/// after 120 s, so keep well below that.
pub const MAX_POLL: Duration = Duration::from_secs(60);
/// Open control handles at once; each costs a little memory the guest could otherwise grow.
pub const MAX_HANDLES: usize = 4096;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 2;
const FILL_FLAG_HASH: u8 = 1;

/// One read of one block, as `.pending_reads` and `.log` show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    pub file_id: [u8; 16],
    pub timestamp_us: u64,
    pub block: u32,
    /// Internally 64-bit (never wraps); the record carries the low 32 bits, as incfs.
    pub serial: u64,
    pub uid: u32,
}

impl ReadRecord {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.file_id);
        out.extend_from_slice(&self.timestamp_us.to_le_bytes());
        out.extend_from_slice(&self.block.to_le_bytes());
        out.extend_from_slice(&(self.serial as u32).to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
}

/// The last read that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastError {
    pub file_id: [u8; 16],
    pub time_us: u64,
    pub block: u32,
    pub errno: u32,
    pub uid: u32,
}

/// Counters of the control channel, in incfs's names where incfs has them.
#[derive(Default, Debug)]
pub struct ControlCounters {
    pub reads_delayed_pending: AtomicU64,
    pub reads_delayed_pending_us: AtomicU64,
    pub reads_failed_timed_out: AtomicU64,
    pub reads_failed_hash_verification: AtomicU64,
    pub reads_failed_other: AtomicU64,
    pub fill_blocks_written: AtomicU64,
    pub fill_blocks_present: AtomicU64,
    pub fill_blocks_rejected: AtomicU64,
    pub log_records_dropped: AtomicU64,
}

struct Handle {
    ino: u64,
    /// Highest serial this handle has been given (`.pending_reads`, `.log`).
    cursor: u64,
    /// How long a READ with nothing new may be held; zero answers at once (incfs's way).
    timeout: Duration,
    /// Contents of a generated file, taken at the READ at offset 0 so later offsets agree.
    snapshot: Option<Arc<Vec<u8>>>,
}

#[derive(Default)]
struct PendingTable {
    records: BTreeMap<u64, ReadRecord>,
    next_serial: u64,
}

#[derive(Default)]
struct ReadLog {
    ring: VecDeque<ReadRecord>,
    next_serial: u64,
}

/// Which of the mount's files a control lookup names.
pub enum Lookup {
    /// A control inode.
    Control(Entry),
    /// An image file (index), reached through `.index` or `.incomplete` (a hard link, as in
    /// incfs); `entry_timeout` is how long the guest may keep the name.
    Image { idx: u32, entry_timeout: Duration },
}

pub struct Control {
    engine: Arc<Engine>,
    /// Regular files: (image inode index, file id), by index.
    files: Vec<(u32, [u8; 16])>,
    by_id: HashMap<[u8; 16], u32>,
    pending: Mutex<PendingTable>,
    /// Bumped whenever a pending read is registered: wakes long polls.
    pending_tx: watch::Sender<u64>,
    log: Mutex<ReadLog>,
    log_tx: watch::Sender<u64>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    last_error: Mutex<Option<LastError>>,
    started: u64,
    pub counters: ControlCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Control {
    pub fn new(engine: Arc<Engine>) -> Arc<Self> {
        let img = engine.image();
        let mut files: Vec<(u32, [u8; 16])> = img.files().map(|(i, _)| (i, crate::fs::file_id(&img.id.0, i))).collect();
        files.sort_unstable_by_key(|f| f.0);
        let by_id = files.iter().map(|&(i, id)| (id, i)).collect();
        let started = now_us() / 1_000_000;
        Arc::new(Control {
            engine,
            files,
            by_id,
            pending: Mutex::new(PendingTable { next_serial: 1, ..Default::default() }),
            pending_tx: watch::channel(0).0,
            log: Mutex::new(ReadLog { next_serial: 1, ..Default::default() }),
            log_tx: watch::channel(0).0,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            last_error: Mutex::new(None),
            started,
            counters: ControlCounters::default(),
        })
    }

    pub fn is_control(ino: u64) -> bool {
        ino & CTL_BIT != 0
    }

    fn id_of(&self, idx: u32) -> Option<[u8; 16]> {
        self.files.binary_search_by_key(&idx, |f| f.0).ok().map(|k| self.files[k].1)
    }

    /// The image inode index of a file id.
    pub fn file_by_id(&self, id: &[u8; 16]) -> Option<u32> {
        self.by_id.get(id).copied()
    }

    /// Records a failed read of an image file (the last read error and the counters).
    fn note_failure(&self, file_id: [u8; 16], block: u32, errno: Errno, uid: u32) {
        let c = match errno {
            libc::ETIME => &self.counters.reads_failed_timed_out,
            libc::EBADMSG => &self.counters.reads_failed_hash_verification,
            _ => &self.counters.reads_failed_other,
        };
        c.fetch_add(1, Relaxed);
        *lock(&self.last_error) = Some(LastError { file_id, time_us: now_us(), block, errno: errno as u32, uid });
    }

    /// Currently pending reads (for tests and diagnostics).
    pub fn pending_now(&self) -> Vec<ReadRecord> {
        lock(&self.pending).records.values().copied().collect()
    }

    pub fn last_error(&self) -> Option<LastError> {
        *lock(&self.last_error)
    }

    // ---- the namespace ----

    fn ctl_attr(&self, ino: u64) -> Option<Attr> {
        let (mode, nlink) = match ino {
            INO_PENDING_READS | INO_LOG => (libc::S_IFREG | 0o666, 1),
            INO_FILL => (libc::S_IFREG | 0o600, 1),
            INO_BLOCKS_WRITTEN | INO_STATS | INO_LAST_READ_ERROR => (libc::S_IFREG | 0o444, 1),
            INO_INDEX | INO_INCOMPLETE | INO_FILLED => (libc::S_IFDIR | 0o555, 2),
            _ => {
                let idx = ino.checked_sub(INO_FILLED_BASE).and_then(|i| u32::try_from(i).ok())?;
                self.id_of(idx)?;
                (libc::S_IFREG | 0o444, 1)
            }
        };
        Some(Attr {
            ino,
            size: 0,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            mode,
            nlink,
            uid: 0,
            gid: 0,
            blksize: BLOCK_SIZE as u32,
            ..Attr::default()
        })
    }

    fn entry(&self, ino: u64) -> Result<Entry, Errno> {
        let attr = self.ctl_attr(ino).ok_or(libc::ENOENT)?;
        // Names are fixed; attributes are generated, so never let the guest keep them.
        Ok(Entry { ino, generation: 0, attr, entry_timeout: Duration::from_secs(60), attr_timeout: Duration::ZERO })
    }

    /// A control name at the mount root (the image's own entries take precedence).
    pub fn lookup_root(&self, name: &[u8]) -> Result<Entry, Errno> {
        let ino = ROOT_NAMES.iter().find(|(n, _)| *n == name).map(|(_, i)| *i).ok_or(libc::ENOENT)?;
        self.entry(ino)
    }

    fn parse_id(name: &[u8]) -> Option<[u8; 16]> {
        let mut id = [0u8; 16];
        (name.len() == 32).then_some(())?;
        hex::decode_to_slice(name, &mut id).ok()?;
        Some(id)
    }

    fn fully_loaded(&self, idx: u32) -> bool {
        matches!(self.engine.fill_state(idx), Ok((f, t)) if f >= t)
    }

    /// Looks `name` up in control directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Lookup, Errno> {
        let idx = || -> Result<u32, Errno> {
            let id = Self::parse_id(name).ok_or(libc::ENOENT)?;
            self.file_by_id(&id).ok_or(libc::ENOENT)
        };
        match parent {
            INO_INDEX => Ok(Lookup::Image { idx: idx()?, entry_timeout: Duration::from_secs(86400) }),
            INO_INCOMPLETE => {
                let i = idx()?;
                if self.fully_loaded(i) {
                    return Err(libc::ENOENT);
                }
                // Goes away when the file completes: the guest must ask again each time.
                Ok(Lookup::Image { idx: i, entry_timeout: Duration::ZERO })
            }
            INO_FILLED => Ok(Lookup::Control(self.entry(INO_FILLED_BASE + idx()? as u64)?)),
            _ if self.ctl_attr(parent).is_some() => Err(libc::ENOTDIR),
            _ => Err(libc::ENOENT),
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno> {
        self.ctl_attr(ino).map(|a| (a, Duration::ZERO)).ok_or(libc::ENOENT)
    }

    pub fn opendir(&self, ino: u64) -> Result<(u64, u32), Errno> {
        let attr = self.ctl_attr(ino).ok_or(libc::ENOENT)?;
        if attr.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        // Listings change (`.incomplete`): no directory caching.
        Ok((0, 0))
    }

    /// Lists a control directory: one entry per regular file of the image, named by its id.
    /// Cookies: 1 = ".", 2 = "..", 3 + k = the k-th file (by inode index).
    pub fn readdir(&self, ino: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno> {
        if !matches!(ino, INO_INDEX | INO_INCOMPLETE | INO_FILLED) {
            return Err(if self.ctl_attr(ino).is_some() { libc::ENOTDIR } else { libc::ENOENT });
        }
        let mut cookie = offset;
        while cookie < 2 {
            let (name, target): (&[u8], u64) = if cookie == 0 { (b".", ino) } else { (b"..", abi::ROOT_ID) };
            if !sink.add(DirEntry { ino: target, offset: cookie + 1, kind: libc::DT_DIR.into(), name }) {
                return Ok(());
            }
            cookie += 1;
        }
        let start = usize::try_from(cookie - 2).unwrap_or(usize::MAX);
        for (k, &(idx, id)) in self.files.iter().enumerate().skip(start) {
            if ino == INO_INCOMPLETE && self.fully_loaded(idx) {
                continue;
            }
            let target = if ino == INO_FILLED { INO_FILLED_BASE + idx as u64 } else { idx as u64 + 1 };
            let name = hex::encode(id);
            if !sink.add(DirEntry {
                ino: target,
                offset: k as u64 + 3,
                kind: libc::DT_REG.into(),
                name: name.as_bytes(),
            }) {
                break;
            }
        }
        Ok(())
    }

    // ---- open files ----

    pub fn open(&self, ino: u64, flags: u32) -> Result<(u64, u32), Errno> {
        let attr = self.ctl_attr(ino).ok_or(libc::ENOENT)?;
        if attr.mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(libc::EISDIR);
        }
        let writing = (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY;
        if writing && attr.mode & 0o222 == 0 {
            return Err(libc::EROFS);
        }
        let mut handles = lock(&self.handles);
        if handles.len() >= MAX_HANDLES {
            return Err(libc::EMFILE);
        }
        let fh = self.next_fh.fetch_add(1, Relaxed);
        handles.insert(fh, Handle { ino, cursor: 0, timeout: Duration::ZERO, snapshot: None });
        // Direct I/O: every read and write reaches us; the guest never caches these pages.
        Ok((fh, abi::FOPEN_DIRECT_IO))
    }

    pub fn release(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    /// The guest unmounted or went away: its handles will never be released one by one.
    pub fn drop_handles(&self) {
        lock(&self.handles).clear();
    }

    pub fn read(self: &Arc<Self>, ino: u64, fh: u64, offset: u64, size: u32, _ctx: &Context) -> Reply<Vec<u8>> {
        let timeout = match lock(&self.handles).get(&fh) {
            Some(h) if h.ino == ino => h.timeout,
            _ => return Reply::err(libc::EBADF),
        };
        match ino {
            INO_PENDING_READS | INO_LOG => {
                let max = size as usize / RECORD_SIZE;
                if max == 0 {
                    return Reply::err(libc::EINVAL);
                }
                let log = ino == INO_LOG;
                let now = self.take_records(fh, log, max);
                if !now.is_empty() || timeout.is_zero() {
                    return Reply::ok(now);
                }
                let me = self.clone();
                Reply::pending(async move { Ok(me.long_poll(fh, log, max, Instant::now() + timeout).await) })
            }
            INO_FILL => Reply::ok(Vec::new()),
            _ => Reply::from(self.read_generated(ino, fh, offset, size)),
        }
    }

    /// Records with serial above the handle's cursor, at most `max`; advances the cursor.
    fn take_records(&self, fh: u64, log: bool, max: usize) -> Vec<u8> {
        let mut handles = lock(&self.handles);
        let Some(h) = handles.get_mut(&fh) else { return Vec::new() };
        let mut out = Vec::new();
        let mut last = h.cursor;
        if log {
            let l = lock(&self.log);
            // The ring is in serial order: skip what this handle has seen.
            let oldest = l.ring.front().map(|r| r.serial).unwrap_or(l.next_serial);
            let skip = h.cursor.saturating_add(1).saturating_sub(oldest);
            for r in l.ring.iter().skip(usize::try_from(skip).unwrap_or(usize::MAX)).take(max) {
                r.encode(&mut out);
                last = r.serial;
            }
        } else {
            let p = lock(&self.pending);
            for r in p.records.range(h.cursor.saturating_add(1)..).map(|(_, r)| r).take(max) {
                r.encode(&mut out);
                last = r.serial;
            }
        }
        h.cursor = last;
        out
    }

    async fn long_poll(self: Arc<Self>, fh: u64, log: bool, max: usize, deadline: Instant) -> Vec<u8> {
        let mut rx = if log { self.log_tx.subscribe() } else { self.pending_tx.subscribe() };
        loop {
            // Mark the current value seen before looking, so a record registered after the
            // look wakes the wait below.
            rx.borrow_and_update();
            let out = self.take_records(fh, log, max);
            if !out.is_empty() || Instant::now() >= deadline {
                return out;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Vec::new(),
            }
        }
    }

    /// Text and binary files generated on demand. The READ at offset 0 takes a snapshot that
    /// later offsets of the same handle read from, so a reader never sees a torn value.
    fn read_generated(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let cached = lock(&self.handles).get(&fh).and_then(|h| h.snapshot.clone());
        let data = match cached {
            Some(d) if offset != 0 => d,
            _ => {
                let d = Arc::new(self.generate(ino)?);
                if let Some(h) = lock(&self.handles).get_mut(&fh) {
                    h.snapshot = Some(d.clone());
                }
                d
            }
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        Ok(data[start..end].to_vec())
    }

    pub fn blocks_written(&self) -> u64 {
        let c = &self.engine.counters;
        c.blocks_fetched.load(Relaxed) + c.blocks_supplied.load(Relaxed)
    }

    /// `name value` lines: incfs's metric names first, then the engine's counters.
    pub fn stats_text(&self) -> String {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Relaxed);
        let mut out = String::new();
        let mut add = |k: &str, v: u64| {
            out.push_str(k);
            out.push(' ');
            out.push_str(&v.to_string());
            out.push('\n');
        };
        add("reads_delayed_min", 0);
        add("reads_delayed_min_us", 0);
        add("reads_delayed_pending", l(&c.reads_delayed_pending));
        add("reads_delayed_pending_us", l(&c.reads_delayed_pending_us));
        add("reads_failed_timed_out", l(&c.reads_failed_timed_out));
        add("reads_failed_hash_verification", l(&c.reads_failed_hash_verification));
        add("reads_failed_other", l(&c.reads_failed_other));
        add("fill_blocks_written", l(&c.fill_blocks_written));
        add("fill_blocks_present", l(&c.fill_blocks_present));
        add("fill_blocks_rejected", l(&c.fill_blocks_rejected));
        add("log_records_dropped", l(&c.log_records_dropped));
        add("pending_reads", lock(&self.pending).records.len() as u64);
        add("blocks_written", self.blocks_written());
        for (k, v) in self.engine.counters.snapshot() {
            add(&format!("engine_{k}"), v);
        }
        out
    }

    /// `.filled/<id>`: size u64, total_blocks u32, filled_blocks u32, range_count u32,
    /// flags u32 (bit 0: fully loaded), reserved u64, then `incfs_filled_range` records.
    pub fn filled_bytes(&self, idx: u32) -> Result<Vec<u8>, Errno> {
        let size = self.engine.image().file(idx).map(|f| f.size).ok_or(libc::ENOENT)?;
        let ranges = self.engine.filled_ranges(idx).map_err(|e| e.errno())?;
        let (filled, total) = self.engine.fill_state(idx).map_err(|e| e.errno())?;
        let mut out = Vec::with_capacity(FILLED_HEADER_SIZE + ranges.len() * 8);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(total as u32).to_le_bytes());
        out.extend_from_slice(&(filled as u32).to_le_bytes());
        out.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        out.extend_from_slice(&u32::from(filled >= total).to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        for (b, e) in ranges {
            out.extend_from_slice(&b.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        Ok(out)
    }

    fn generate(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match ino {
            INO_BLOCKS_WRITTEN => Ok(self.blocks_written().to_string().into_bytes()),
            INO_STATS => Ok(self.stats_text().into_bytes()),
            INO_LAST_READ_ERROR => {
                let mut out = Vec::with_capacity(LAST_ERROR_SIZE);
                let e =
                    self.last_error().unwrap_or(LastError { file_id: [0; 16], time_us: 0, block: 0, errno: 0, uid: 0 });
                out.extend_from_slice(&e.file_id);
                out.extend_from_slice(&e.time_us.to_le_bytes());
                out.extend_from_slice(&e.block.to_le_bytes());
                out.extend_from_slice(&e.errno.to_le_bytes());
                out.extend_from_slice(&e.uid.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                Ok(out)
            }
            _ => {
                let idx = ino.checked_sub(INO_FILLED_BASE).and_then(|i| u32::try_from(i).ok()).ok_or(libc::EINVAL)?;
                self.filled_bytes(idx)
            }
        }
    }

    pub fn write(&self, ino: u64, fh: u64, data: &[u8], _ctx: &Context) -> Reply<u32> {
        let mut handles = lock(&self.handles);
        let Some(h) = handles.get_mut(&fh).filter(|h| h.ino == ino) else { return Reply::err(libc::EBADF) };
        match ino {
            INO_PENDING_READS | INO_LOG => {
                // The handle's long-poll timeout: u32 LE milliseconds.
                let Ok(ms) = <[u8; 4]>::try_from(data) else { return Reply::err(libc::EINVAL) };
                h.timeout = Duration::from_millis(u32::from_le_bytes(ms) as u64).min(MAX_POLL);
                Reply::ok(4)
            }
            INO_FILL => {
                drop(handles);
                Reply::from(self.fill(data))
            }
            _ => Reply::err(libc::EINVAL),
        }
    }

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
        let Some(hdr) = rec.get(..FILL_HEADER_SIZE) else { return Err(libc::EINVAL) };
        let u32_at = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hdr[..16]);
        let index = u32_at(16);
        let len = u32_at(20) as usize;
        let (compression, flags) = (hdr[24], hdr[25]);
        if len > MAX_FILL_DATA {
            return Err(libc::E2BIG);
        }
        if hdr[26..32].iter().any(|&b| b != 0) || flags & !FILL_FLAG_HASH != 0 {
            return Err(libc::EINVAL);
        }
        let kind = match compression {
            COMPRESSION_NONE => BlockKind::Raw,
            COMPRESSION_ZSTD => BlockKind::Zstd,
            _ => return Err(libc::EINVAL),
        };
        let Some(payload) = rec.get(FILL_HEADER_SIZE..FILL_HEADER_SIZE + len) else { return Err(libc::EINVAL) };
        let idx = self.file_by_id(&id).ok_or(libc::ENOENT)?;
        let blocks = self.engine.image().file(idx).map(|f| f.blocks.len()).unwrap_or(0);
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

/// The control channel watches reads of image files: every read goes to `.log`, a read that
/// waits puts one record per missing block in `.pending_reads` until it ends, a failure
/// becomes `.last_read_error`.
impl ReadObserver for Control {
    fn read_started(&self, file: u32, first: u32, last: u32, uid: u32) {
        let Some(id) = self.id_of(file) else { return };
        let ts = now_us();
        let serial = {
            let mut log = lock(&self.log);
            for block in first..last {
                if log.ring.len() >= LOG_CAPACITY {
                    log.ring.pop_front();
                    self.counters.log_records_dropped.fetch_add(1, Relaxed);
                }
                let serial = log.next_serial;
                log.next_serial += 1;
                log.ring.push_back(ReadRecord { file_id: id, timestamp_us: ts, block, serial, uid });
            }
            log.next_serial
        };
        self.log_tx.send_replace(serial);
    }

    fn read_parked(&self, file: u32, missing: &[u32], uid: u32) -> Vec<u64> {
        let id = self.id_of(file).unwrap_or_default();
        let ts = now_us();
        let serials: Vec<u64> = {
            let mut p = lock(&self.pending);
            missing
                .iter()
                .map(|&block| {
                    let serial = p.next_serial;
                    p.next_serial += 1;
                    p.records.insert(serial, ReadRecord { file_id: id, timestamp_us: ts, block, serial, uid });
                    serial
                })
                .collect()
        };
        if let Some(&last) = serials.last() {
            self.pending_tx.send_replace(last);
        }
        serials
    }

    fn read_ended(&self, parked: Vec<u64>, waited: Duration) {
        {
            let mut p = lock(&self.pending);
            for s in &parked {
                p.records.remove(s);
            }
        }
        self.counters.reads_delayed_pending.fetch_add(1, Relaxed);
        self.counters.reads_delayed_pending_us.fetch_add(waited.as_micros() as u64, Relaxed);
    }

    fn read_failed(&self, file: u32, block: u32, errno: Errno, uid: u32) {
        self.note_failure(self.id_of(file).unwrap_or_default(), block, errno, uid);
    }
}
