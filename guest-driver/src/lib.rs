//! Guest side of virtio-incfs's pending-read interface (docs/pending-reads.md): the control
//! files at the root of a virtio-fs mount served by `incfsd run`, wrapped as a library.
//!
//! - [`Mount`]: file ids, filled ranges, fully-loaded state, block writes, counters.
//! - [`RecordReader`]: `.pending_reads` / `.log` with a long-poll timeout.
//! - [`PendingWatcher`]: a pollable fd (eventfd) for pending reads, fed by a thread that holds
//!   the long poll, so an epoll loop (Android's DataLoader shape) can wait on it. The host
//!   cannot wake poll() on a virtio-fs file itself.
//! - [`ffi`]: the C ABI, a subset of libincfs's NDK functions (`include/incfs_guest.h`).

// Most of this crate's unsafe code is the C ABI's: keep every contract written down (CI's
// `-D warnings` makes these errors).
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod ffi;

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use incfs_wire::{names, FillHeader, FILL_FLAG_HASH};

// The wire format is incfs-wire's (shared with the host); re-exported so that users of this
// crate need not depend on it.
pub use incfs_wire::{
    FileId, FileState, LastReadError, ReadRecord, BLOCK_SIZE, COMPRESSION_LZ4, COMPRESSION_NONE, COMPRESSION_ZSTD,
    FILL_HEADER_SIZE, MAX_FILL_DATA, MAX_FILL_WRITE, MAX_POLL_MS, RECORD_SIZE, XATTR_FILE_ID, XATTR_FILE_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a virtio-incfs mount (no .pending_reads)")]
    NotIncfs(PathBuf),
    #[error("{0}: no incfs file id (not a regular file of an incfs mount?)")]
    NoId(PathBuf),
    #[error("malformed control data: {0}")]
    Malformed(String),
    #[error("malformed {what}: {source}")]
    Decode {
        /// Which control file.
        what: &'static str,
        #[source]
        source: incfs_wire::DecodeError,
    },
}

impl Error {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The errno behind this error (EIO when there is none), for the C ABI.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::NotIncfs(_) => libc::EINVAL,
            Error::NoId(_) => libc::ENOENT,
            Error::Malformed(_) | Error::Decode { .. } => libc::EIO,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One block to write through `.fill`.
#[derive(Clone, Copy, Debug)]
pub struct DataBlock<'a> {
    pub file_id: FileId,
    pub block: u32,
    pub compression: u8,
    /// A hash-tree block: accepted and ignored (the host has the tree).
    pub hash: bool,
    pub data: &'a [u8],
}

impl DataBlock<'_> {
    fn encoded_len(&self) -> usize {
        FILL_HEADER_SIZE + self.data.len()
    }

    /// Callers check `data.len() <= MAX_FILL_DATA` first, so the length fits the header.
    fn encode(&self, out: &mut Vec<u8>) {
        FillHeader {
            file_id: self.file_id,
            block: self.block,
            data_len: self.data.len() as u32,
            compression: self.compression,
            flags: if self.hash { FILL_FLAG_HASH } else { 0 },
        }
        .encode_into(out);
        out.extend_from_slice(self.data);
    }
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Malformed(format!("{} contains NUL", p.display())))
}

/// An id written as hex (an xattr value or a directory entry); surrounding whitespace is
/// tolerated.
fn parse_id(hex_id: &[u8]) -> Option<FileId> {
    incfs_wire::file_id_from_hex(hex_id.trim_ascii())
}

/// A file's incfs id from its `user.incfs.id` xattr.
pub fn file_id_of_path(path: &Path) -> Result<FileId> {
    let c = cpath(path)?;
    let mut buf = [0u8; 64];
    // SAFETY: both names are NUL-terminated C strings that outlive the call, and the kernel
    // writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getxattr(c.as_ptr(), XATTR_FILE_ID.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENODATA) {
            Error::NoId(path.into())
        } else {
            Error::io(format!("getxattr {}", path.display()), e)
        });
    }
    parse_id(&buf[..n as usize]).ok_or_else(|| Error::NoId(path.into()))
}

/// A file's incfs id from an open fd.
pub fn file_id_of_fd(fd: RawFd) -> Result<FileId> {
    let mut buf = [0u8; 64];
    // SAFETY: the name is a NUL-terminated C string, the kernel writes at most `buf.len()`
    // bytes into `buf`, and a bad fd is reported as EBADF, not undefined behaviour.
    let n = unsafe { libc::fgetxattr(fd, XATTR_FILE_ID.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(Error::io(format!("fgetxattr fd {fd}"), std::io::Error::last_os_error()));
    }
    parse_id(&buf[..n as usize]).ok_or_else(|| Error::NoId(PathBuf::from(format!("fd {fd}"))))
}

/// A mounted virtio-incfs filesystem (guest view).
pub struct Mount {
    root: PathBuf,
    fill: Mutex<Option<File>>,
    paths: Mutex<Option<HashMap<FileId, PathBuf>>>,
}

impl Mount {
    pub fn open(root: impl AsRef<Path>) -> Result<Mount> {
        let root = root.as_ref().to_path_buf();
        match std::fs::metadata(root.join(names::PENDING_READS)) {
            Ok(m) if m.is_file() => {}
            _ => return Err(Error::NotIncfs(root)),
        }
        Ok(Mount { root, fill: Mutex::new(None), paths: Mutex::new(None) })
    }

    /// Walks up from `path` to the directory that has the control files.
    pub fn find_root(path: &Path) -> Option<PathBuf> {
        let mut p = if path.is_dir() { Some(path) } else { path.parent() };
        while let Some(d) = p {
            if d.join(names::PENDING_READS).is_file() && d.join(names::FILL).exists() {
                return Some(d.to_path_buf());
            }
            p = d.parent();
        }
        None
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` relative to the mount root, or as is when absolute.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        let p = path.as_ref();
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        }
    }

    fn ctl(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn read_ctl(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.ctl(name);
        let mut f = File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let mut out = Vec::new();
        // Generated files are snapshotted at offset 0 by the host; read to the end.
        f.read_to_end(&mut out).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        Ok(out)
    }

    pub fn file_id(&self, path: impl AsRef<Path>) -> Result<FileId> {
        file_id_of_path(&self.resolve(path))
    }

    /// Path of a file id, by walking the tree once (then cached).
    pub fn path_of(&self, id: &FileId) -> Option<PathBuf> {
        let mut paths = lock(&self.paths);
        if paths.is_none() {
            let mut map = HashMap::new();
            let mut todo = vec![self.root.clone()];
            while let Some(dir) = todo.pop() {
                let Ok(rd) = std::fs::read_dir(&dir) else { continue };
                for e in rd.flatten() {
                    let Ok(t) = e.file_type() else { continue };
                    if t.is_dir() {
                        todo.push(e.path());
                    } else if t.is_file() {
                        if let Ok(id) = file_id_of_path(&e.path()) {
                            map.insert(id, e.path());
                        }
                    }
                }
            }
            *paths = Some(map);
        }
        paths.as_ref().and_then(|m| m.get(id).cloned())
    }

    pub fn file_state(&self, id: &FileId) -> Result<FileState> {
        FileState::decode(&self.read_ctl(&names::filled_path(id))?)
            .map_err(|source| Error::Decode { what: names::FILLED_DIR, source })
    }

    pub fn file_state_by_path(&self, path: impl AsRef<Path>) -> Result<FileState> {
        self.file_state(&self.file_id(path)?)
    }

    pub fn is_fully_loaded(&self, id: &FileId) -> Result<bool> {
        Ok(self.file_state(id)?.fully_loaded)
    }

    /// Ids of the files not fully loaded yet (`.incomplete`).
    pub fn incomplete_files(&self) -> Result<Vec<FileId>> {
        let dir = self.ctl(names::INCOMPLETE_DIR);
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        Ok(rd.flatten().filter_map(|e| parse_id(e.file_name().as_bytes())).collect())
    }

    pub fn blocks_written(&self) -> Result<u64> {
        let b = self.read_ctl(names::BLOCKS_WRITTEN)?;
        incfs_wire::decode_blocks_written(&b).ok_or_else(|| Error::Malformed(names::BLOCKS_WRITTEN.into()))
    }

    /// `.stats` as (name, value) pairs.
    pub fn stats(&self) -> Result<Vec<(String, u64)>> {
        let b = self.read_ctl(names::STATS)?;
        Ok(incfs_wire::stats::decode(&String::from_utf8_lossy(&b)).map(|(k, v)| (k.to_string(), v)).collect())
    }

    pub fn stat(&self, name: &str) -> Result<u64> {
        self.stats()?
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::Malformed(format!("no {name} in .stats")))
    }

    pub fn last_read_error(&self) -> Result<LastReadError> {
        let b = self.read_ctl(names::LAST_READ_ERROR)?;
        LastReadError::decode(&b).map_err(|source| Error::Decode { what: names::LAST_READ_ERROR, source })
    }

    pub fn pending_reads(&self) -> Result<RecordReader> {
        RecordReader::open(&self.ctl(names::PENDING_READS))
    }

    pub fn read_log(&self) -> Result<RecordReader> {
        RecordReader::open(&self.ctl(names::LOG))
    }

    /// The raw fd of `.fill`, opened on first use.
    pub fn fill_fd(&self) -> Result<RawFd> {
        let mut g = lock(&self.fill);
        if g.is_none() {
            let p = self.ctl(names::FILL);
            // Never O_TRUNC: truncation is a SETATTR, which a read-only filesystem refuses.
            *g = Some(
                OpenOptions::new().write(true).open(&p).map_err(|e| Error::io(format!("open {}", p.display()), e))?,
            );
        }
        Ok(g.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1))
    }

    /// Writes blocks through `.fill`, as incfs's FILL_BLOCKS: the number processed (already
    /// present ones count); an error only when the first block fails. The host verifies each
    /// block against the file's hash tree (EBADMSG when it does not match; nothing stored).
    pub fn write_blocks(&self, blocks: &[DataBlock<'_>]) -> Result<usize> {
        for b in blocks {
            // Checked here too so a bad block never makes a batch ambiguous.
            if b.data.len() > MAX_FILL_DATA {
                return Err(Error::io("fill", std::io::Error::from_raw_os_error(libc::E2BIG)));
            }
        }
        let fd = self.fill_fd()?;
        let mut done = 0;
        while done < blocks.len() {
            let mut buf = Vec::new();
            let mut n = 0;
            while done + n < blocks.len() && (n == 0 || buf.len() + blocks[done + n].encoded_len() <= MAX_FILL_WRITE) {
                blocks[done + n].encode(&mut buf);
                n += 1;
            }
            // SAFETY: `buf` is valid for reads of `buf.len()` bytes; `fd` is our open `.fill` (a
            // bad fd would only fail with EBADF).
            let w = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
            if w < 0 {
                let e = std::io::Error::last_os_error();
                if done == 0 {
                    return Err(Error::io("fill", e));
                }
                return Ok(done);
            }
            // Whole records the host took.
            let mut took = 0usize;
            let mut k = 0;
            while k < n && took + blocks[done + k].encoded_len() <= w as usize {
                took += blocks[done + k].encoded_len();
                k += 1;
            }
            done += k;
            if k < n {
                if done == 0 {
                    // Cannot happen (the host answers an error for a failed first block);
                    // keep the contract anyway.
                    return Err(Error::io("fill", std::io::Error::from_raw_os_error(libc::EIO)));
                }
                return Ok(done);
            }
        }
        Ok(done)
    }

    /// Writes every block, reporting the first failure with its errno.
    pub fn write_all_blocks(&self, blocks: &[DataBlock<'_>]) -> Result<usize> {
        let mut at = 0;
        while at < blocks.len() {
            at += self.write_blocks(&blocks[at..])?;
        }
        Ok(at)
    }

    /// Supplies the missing blocks of `path` from a local copy of the same file, reading
    /// block-sized pieces of it. Returns the number of blocks written.
    pub fn fill_from_copy(&self, path: impl AsRef<Path>, copy: &Path, only: Option<&[u32]>) -> Result<usize> {
        let id = self.file_id(&path)?;
        let state = self.file_state(&id)?;
        let mut want: Vec<u32> = state.missing();
        if let Some(o) = only {
            want.retain(|b| o.contains(b));
        }
        let mut f = File::open(copy).map_err(|e| Error::io(format!("open {}", copy.display()), e))?;
        let mut written = 0;
        for chunk in want.chunks(8) {
            let mut datas = Vec::with_capacity(chunk.len());
            for &b in chunk {
                use std::io::{Seek, SeekFrom};
                let mut d = vec![0u8; BLOCK_SIZE];
                f.seek(SeekFrom::Start(b as u64 * BLOCK_SIZE as u64)).map_err(|e| Error::io("seek copy", e))?;
                let mut n = 0;
                while n < BLOCK_SIZE {
                    let r = f.read(&mut d[n..]).map_err(|e| Error::io("read copy", e))?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                d.truncate(n);
                datas.push((b, d));
            }
            let blocks: Vec<DataBlock<'_>> = datas
                .iter()
                .map(|(b, d)| DataBlock { file_id: id, block: *b, compression: COMPRESSION_NONE, hash: false, data: d })
                .collect();
            written += self.write_all_blocks(&blocks)?;
        }
        Ok(written)
    }
}

/// A handle on `.pending_reads` or `.log`: each read returns records newer than the last one
/// this handle returned.
pub struct RecordReader {
    file: File,
    /// The long-poll timeout the host has for this handle.
    timeout_ms: u32,
}

impl RecordReader {
    pub fn open(path: &Path) -> Result<RecordReader> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        Ok(RecordReader { file, timeout_ms: 0 })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_timeout(&mut self, ms: u32) -> Result<()> {
        if ms != self.timeout_ms {
            self.file
                .write_all(&incfs_wire::encode_poll_timeout(ms))
                .map_err(|e| Error::io("set long-poll timeout", e))?;
            self.timeout_ms = ms;
        }
        Ok(())
    }

    /// Waits up to `timeout` for records (zero: what is there now), at most `max`.
    pub fn wait(&mut self, timeout: Duration, max: usize) -> Result<Vec<ReadRecord>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; max.clamp(1, 4096) * RECORD_SIZE];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = left.as_millis().min(MAX_POLL_MS as u128) as u32;
            self.set_timeout(ms)?;
            let n = self.file.read(&mut buf).map_err(|e| Error::io("read records", e))?;
            if n > 0 || Instant::now() >= deadline {
                return ReadRecord::decode_all(&buf[..n])
                    .map_err(|source| Error::Decode { what: "read records", source });
            }
        }
    }
}

/// A pollable fd for pending reads: an eventfd that becomes readable when records are
/// queued. A thread holds the long poll on its own `.pending_reads` handle.
pub struct PendingWatcher {
    efd: OwnedFd,
    queue: Arc<Mutex<VecDeque<ReadRecord>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long the watcher thread's polls last: bounds how long dropping the watcher takes.
const WATCH_POLL: Duration = Duration::from_millis(1000);
/// Records kept for a consumer that does not read them; older ones are dropped.
const WATCH_QUEUE_MAX: usize = 65536;

impl PendingWatcher {
    pub fn start(mount: &Mount) -> Result<PendingWatcher> {
        let mut reader = mount.pending_reads()?;
        // SAFETY: no pointers are passed; a failure is a negative result, checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns, so OwnedFd may close it.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let queue = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (q, s, fd) = (queue.clone(), stop.clone(), raw);
        let thread = std::thread::Builder::new()
            .name("incfs-pending".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match reader.wait(WATCH_POLL, 256) {
                        Ok(recs) if !recs.is_empty() => {
                            {
                                let mut q = lock(&q);
                                q.extend(recs);
                                while q.len() > WATCH_QUEUE_MAX {
                                    q.pop_front();
                                }
                            }
                            let one: u64 = 1;
                            // SAFETY: `one` is 8 readable bytes, and `fd` stays open (owned by
                            // `efd`) until Drop has joined this thread.
                            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!("pending-read watcher: {e}");
                            std::thread::sleep(WATCH_POLL);
                        }
                    }
                }
            })
            .map_err(|e| Error::io("spawn watcher", e))?;
        Ok(PendingWatcher { efd, queue, stop, thread: Some(thread) })
    }

    /// Readable (EPOLLIN) while records are queued.
    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    /// Takes up to `max` queued records without waiting.
    pub fn take(&self, max: usize) -> Vec<ReadRecord> {
        // Reset the eventfd first: a record queued after this sets it again, so a wake-up is
        // never lost (at worst one is spurious).
        let mut v = 0u64;
        // SAFETY: `v` is 8 writable bytes and the fd is our eventfd, non-blocking (EAGAIN when
        // already zero is fine).
        unsafe { libc::read(self.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        let mut q = lock(&self.queue);
        let n = max.min(q.len());
        let out: Vec<ReadRecord> = q.drain(..n).collect();
        if !q.is_empty() {
            let one: u64 = 1;
            // SAFETY: `one` is 8 readable bytes and the fd is our eventfd.
            unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        out
    }

    /// Waits up to `timeout` for queued records (poll on the eventfd), then takes them.
    pub fn wait(&self, timeout: Duration, max: usize) -> Vec<ReadRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.take(max);
            let left = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || left.is_zero() {
                return got;
            }
            let mut p = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: `p` is one valid, writable pollfd, matching the count of 1.
            unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        }
    }
}

impl Drop for PendingWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records_and_rejects_partial_ones() {
        let mut b = Vec::new();
        for (block, serial) in [(3u32, 1u32), (9, 2)] {
            b.extend_from_slice(&[7u8; 16]);
            b.extend_from_slice(&55u64.to_le_bytes());
            b.extend_from_slice(&block.to_le_bytes());
            b.extend_from_slice(&serial.to_le_bytes());
            b.extend_from_slice(&1000u32.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        let r = ReadRecord::decode_all(&b).expect("parse");
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].file_id, r[1].timestamp_us, r[1].block, r[1].serial, r[1].uid), ([7; 16], 55, 9, 2, 1000));
        assert!(ReadRecord::decode_all(&b[..41]).is_err());
    }

    #[test]
    fn parses_file_state() {
        let mut b = Vec::new();
        b.extend_from_slice(&20580u64.to_le_bytes());
        for v in [6u32, 3, 2, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&0u64.to_le_bytes());
        for v in [0u32, 2, 5, 6] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let s = FileState::decode(&b).expect("parse");
        assert_eq!((s.size, s.total_blocks, s.filled_blocks, s.fully_loaded), (20580, 6, 3, false));
        assert_eq!(s.ranges, vec![(0, 2), (5, 6)]);
        assert_eq!(s.missing(), vec![2, 3, 4]);
        // A range count that does not match the bytes is refused, not trusted.
        b[16] = 200;
        assert!(FileState::decode(&b).is_err());
        assert!(FileState::decode(&b[..10]).is_err());
    }

    #[test]
    fn encodes_fill_blocks_as_documented() {
        let b = DataBlock { file_id: [1; 16], block: 5, compression: COMPRESSION_ZSTD, hash: true, data: b"xyz" };
        let mut out = Vec::new();
        b.encode(&mut out);
        assert_eq!(out.len(), FILL_HEADER_SIZE + 3);
        assert_eq!(&out[16..20], &5u32.to_le_bytes());
        assert_eq!(&out[20..24], &3u32.to_le_bytes());
        assert_eq!((out[24], out[25]), (2, 1));
        assert_eq!(&out[26..32], &[0u8; 6]);
        assert_eq!(&out[32..], b"xyz");
    }

    /// Sizes and offsets as a C compiler lays out `include/incfs_guest.h` on 64-bit Linux, and
    /// the enum values the header shares with the wire format: a field moved on one side only
    /// fails here.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn c_abi_matches_the_header() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!((size_of::<ffi::IncFsFileId>(), align_of::<ffi::IncFsFileId>()), (16, 8));
        assert_eq!(size_of::<ffi::IncFsReadInfo>(), 32);
        assert_eq!((size_of::<ffi::IncFsReadInfoWithUid>(), offset_of!(ffi::IncFsReadInfoWithUid, uid)), (40, 32));
        assert_eq!((size_of::<ffi::IncFsDataBlock>(), offset_of!(ffi::IncFsDataBlock, data)), (32, 24));
        assert_eq!(size_of::<ffi::IncFsSpan>(), 16);
        assert_eq!(size_of::<ffi::IncFsBlockRange>(), 8);
        assert_eq!((size_of::<ffi::IncFsFilledRanges>(), offset_of!(ffi::IncFsFilledRanges, endIndex)), (32, 24));
        assert_eq!(size_of::<ffi::IncFsBlockCounts>(), 32);
        assert_eq!(size_of::<ffi::IncFsMetrics>(), 64);
        assert_eq!((size_of::<ffi::IncFsLastReadError>(), offset_of!(ffi::IncFsLastReadError, errorNo)), (40, 28));
        // IncFsCompressionKind's values are the `.fill` compression byte.
        assert_eq!((COMPRESSION_NONE, COMPRESSION_LZ4, COMPRESSION_ZSTD), (0, 1, 2));
        assert_eq!((ffi::CMD, ffi::PENDING_READS, ffi::LOGS, ffi::BLOCKS_WRITTEN), (0, 1, 2, 3));
    }

    #[test]
    fn file_id_strings_round_trip() {
        let id = ffi::IncFsFileId { data: *b"0123456789abcdef" };
        let mut s = [0 as std::ffi::c_char; 33];
        // SAFETY: `s` has 33 writable bytes (32 are needed), and the zeroed last one keeps it
        // NUL-terminated; FromString reads the 32 written.
        unsafe {
            assert_eq!(ffi::IncFs_FileIdToString(id, s.as_mut_ptr()), 0);
            assert_eq!(ffi::IncFs_FileIdFromString(s.as_ptr()), id);
        }
        let bad = c"zz3456789abcdef0123456789abcdef0";
        // SAFETY: a C string of 32 characters, the number FromString reads.
        assert_eq!(unsafe { ffi::IncFs_FileIdFromString(bad.as_ptr()) }, ffi::INVALID_ID);
        // SAFETY: NULL is allowed (and refused).
        assert!(unsafe { ffi::IncFs_Open(std::ptr::null()) }.is_null());
        let tmp = std::env::temp_dir();
        let p = std::ffi::CString::new(tmp.as_os_str().as_bytes()).expect("path");
        // SAFETY: a NUL-terminated string that outlives the call; not a mount, so NULL.
        assert!(unsafe { ffi::IncFs_Open(p.as_ptr()) }.is_null());
    }
}
