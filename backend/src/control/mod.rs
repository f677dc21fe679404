//! The control channel inside the mount: Incremental FS's special files, carried over plain
//! FUSE READ/WRITE so that a virtio-fs guest can use them. Specified in docs/pending-reads.md.
//!
//! A virtio-fs guest never receives FUSE notifications, so poll() on a file of the mount
//! cannot be woken by the host. Instead a READ of `.pending_reads` or `.log` may be held by
//! the host (a long poll, [`Reply::Pending`]) until records newer than the handle's cursor
//! exist or the handle's timeout passes. Blocks supplied by a guest data loader arrive as
//! WRITEs to `.fill` and go through the engine's verification before anything is stored.
//!
//! - `pending`: pending reads and the read log (the [`ReadObserver`](crate::fs::ReadObserver)).
//! - `fill`: `.fill` writes.
//! - `generated`: `.stats`, `.blocks_written`, `.last_read_error`, `.filled/<id>`.
//! - The wire format is `incfs_wire`'s, shared with the guest driver.
//!
//! Control inodes live in their own number space (bit 62 set), far above any image inode
//! (image inodes are an index + 1, a u32), so the two can never collide.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use incfs_fuse::{abi, Attr, Context, DirEntry, DirSink, Entry, Errno, Reply};
use tokio::sync::watch;
use tokio::time::Instant;

use incfs_wire::names;

mod fill;
mod generated;
mod pending;

pub use pending::ReadRecord;
use pending::{PendingTable, ReadLog};

use crate::engine::Engine;
use crate::image::BLOCK_SIZE;

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
    (names::PENDING_READS.as_bytes(), INO_PENDING_READS),
    (names::LOG.as_bytes(), INO_LOG),
    (names::BLOCKS_WRITTEN.as_bytes(), INO_BLOCKS_WRITTEN),
    (names::FILL.as_bytes(), INO_FILL),
    (names::STATS.as_bytes(), INO_STATS),
    (names::LAST_READ_ERROR.as_bytes(), INO_LAST_READ_ERROR),
    (names::INDEX_DIR.as_bytes(), INO_INDEX),
    (names::INCOMPLETE_DIR.as_bytes(), INO_INCOMPLETE),
    (names::FILLED_DIR.as_bytes(), INO_FILLED),
];

pub use incfs_wire::{
    FILLED_HEADER_SIZE, FILL_HEADER_SIZE, LAST_READ_ERROR_SIZE as LAST_ERROR_SIZE, MAX_FILL_DATA, RECORD_SIZE,
};
/// Read log ring: 16384 records of 40 bytes = 640 KiB at most.
pub const LOG_CAPACITY: usize = 16384;
/// Longest long poll: a guest thread in a FUSE request that the host has started answering
/// cannot be interrupted (not even by SIGKILL), and the guest's hung-task detector complains
/// after 120 s, so keep well below that.
pub const MAX_POLL: Duration = Duration::from_millis(incfs_wire::MAX_POLL_MS as u64);
/// Open control handles at once; each costs a little memory the guest could otherwise grow.
pub const MAX_HANDLES: usize = 4096;
/// Bytes of generated-file snapshots kept for handles at once (a `.filled` of a large,
/// patchily loaded file runs to megabytes); past it a READ that needs one fails with ENOMEM.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 << 20;

/// The last read that failed.
pub use incfs_wire::LastReadError as LastError;

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

/// An open control handle as kept for a successor process (`incfsd run`'s worker state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedHandle {
    pub fh: u64,
    pub ino: u64,
    pub cursor: u64,
    pub timeout_ms: u32,
}

/// The control channel's open handles, as a successor needs them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SavedHandles {
    pub next_fh: u64,
    pub handles: Vec<SavedHandle>,
}

/// Told whenever a handle is opened, released, or its cursor or timeout changes, so that a
/// successor process serves the guest's open handles on (docs/restart.md).
pub trait HandleObserver: Send + Sync {
    fn handles_changed(&self, handles: SavedHandles);
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
    /// Bytes of the snapshots handles keep, and the most they may.
    snapshot_bytes: AtomicU64,
    snapshot_limit: u64,
    observer: std::sync::OnceLock<Arc<dyn HandleObserver>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Control {
    pub fn new(engine: Arc<Engine>) -> Arc<Self> {
        Self::with_snapshot_limit(engine, MAX_SNAPSHOT_BYTES)
    }

    /// With at most `snapshot_limit` bytes of generated-file snapshots kept at once.
    pub fn with_snapshot_limit(engine: Arc<Engine>, snapshot_limit: u64) -> Arc<Self> {
        let img = engine.image();
        let mut files: Vec<(u32, [u8; 16])> = img.files().map(|(i, _)| (i, img.file_id(i))).collect();
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
            snapshot_bytes: AtomicU64::new(0),
            snapshot_limit,
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Reports every change of the open handles to `observer` (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn HandleObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Called with the handles locked, so that reports reach the observer in order.
    fn handles_changed(&self, handles: &HashMap<u64, Handle>) {
        if let Some(o) = self.observer.get() {
            o.handles_changed(self.saved_from(handles));
        }
    }

    fn saved_from(&self, handles: &HashMap<u64, Handle>) -> SavedHandles {
        let mut saved: Vec<SavedHandle> = handles
            .iter()
            .map(|(&fh, h)| SavedHandle {
                fh,
                ino: h.ino,
                cursor: h.cursor,
                timeout_ms: u32::try_from(h.timeout.as_millis()).unwrap_or(u32::MAX),
            })
            .collect();
        saved.sort_unstable_by_key(|h| h.fh);
        SavedHandles { next_fh: self.next_fh.load(Relaxed), handles: saved }
    }

    /// The open handles as [`restore`](Control::restore) takes them (a migration's state).
    pub fn saved(&self) -> SavedHandles {
        self.saved_from(&lock(&self.handles))
    }

    /// Takes over the handles a previous process had open (same guest, same session). The
    /// pending-read and log serials of this process start above every saved cursor, so each
    /// handle sees every record made from now on. Handles naming no control file are dropped.
    pub fn restore(&self, saved: &SavedHandles) {
        let mut handles = lock(&self.handles);
        let mut top_fh = saved.next_fh;
        let mut top_cursor = 0;
        for s in saved.handles.iter().take(MAX_HANDLES) {
            if self.ctl_attr(s.ino).is_none() || s.fh == 0 {
                continue;
            }
            let timeout = Duration::from_millis(u64::from(s.timeout_ms)).min(MAX_POLL);
            handles.insert(s.fh, Handle { ino: s.ino, cursor: s.cursor, timeout, snapshot: None });
            top_fh = top_fh.max(s.fh.saturating_add(1));
            top_cursor = top_cursor.max(s.cursor);
        }
        self.next_fh.fetch_max(top_fh.max(1), Relaxed);
        let first = top_cursor.saturating_add(1);
        let mut p = lock(&self.pending);
        p.next_serial = p.next_serial.max(first);
        drop(p);
        let mut l = lock(&self.log);
        l.next_serial = l.next_serial.max(first);
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
        incfs_wire::file_id_from_hex(name)
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
            let name = incfs_wire::file_id_to_hex(&id);
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
        self.handles_changed(&handles);
        // Direct I/O: every read and write reaches us; the guest never caches these pages.
        Ok((fh, abi::FOPEN_DIRECT_IO))
    }

    pub fn release(&self, fh: u64) {
        let mut handles = lock(&self.handles);
        if let Some(h) = handles.remove(&fh) {
            self.handles_changed(&handles);
            drop(handles);
            self.forget_snapshot(h.snapshot);
        }
    }

    /// The guest unmounted or went away: its handles will never be released one by one.
    pub fn drop_handles(&self) {
        let mut handles = lock(&self.handles);
        let dropped: Vec<Handle> = handles.drain().map(|(_, h)| h).collect();
        self.handles_changed(&handles);
        drop(handles);
        for h in dropped {
            self.forget_snapshot(h.snapshot);
        }
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

    pub fn write(&self, ino: u64, fh: u64, data: &[u8], _ctx: &Context) -> Reply<u32> {
        let mut handles = lock(&self.handles);
        let Some(h) = handles.get_mut(&fh).filter(|h| h.ino == ino) else { return Reply::err(libc::EBADF) };
        match ino {
            INO_PENDING_READS | INO_LOG => {
                // The handle's long-poll timeout: u32 LE milliseconds.
                let Ok(ms) = incfs_wire::decode_poll_timeout(data) else { return Reply::err(libc::EINVAL) };
                h.timeout = Duration::from_millis(ms as u64).min(MAX_POLL);
                self.handles_changed(&handles);
                Reply::ok(4)
            }
            INO_FILL => {
                drop(handles);
                Reply::from(self.fill(data))
            }
            _ => Reply::err(libc::EINVAL),
        }
    }
}
