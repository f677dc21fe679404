//! C ABI: the subset of libincfs's NDK functions (incfs_ndk.h) that a virtio-incfs guest
//! supports, with the same names, types and error conventions (0 or a count on success,
//! -errno on failure; functions returning an id return the invalid id on error). Declared in
//! `include/incfs_guest.h`.
//!
//! Every function catches panics at the boundary (a panic must never unwind into C).
//!
//! Pointer arguments: NULL is never dereferenced (it is refused with -EINVAL, the invalid
//! id, false or NULL, as the function returns; IncFs_DeleteControl ignores it); anything else
//! must be valid as that function's `# Safety` section says. An `IncFsControl*` must be NULL
//! or come from `IncFs_Open` and not yet be passed to `IncFs_DeleteControl` (a "live
//! control"); several threads may use one at once.

#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, CStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use incfs_wire::{file_id_from_hex, file_id_to_hex, names, COMPRESSION_NONE, COMPRESSION_ZSTD, FILE_ID_HEX_LEN};

use crate::{file_id_of_fd, lock, DataBlock, Error, FileState, Mount, PendingWatcher, ReadRecord, RecordReader};

#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncFsFileId {
    pub data: [u8; 16],
}

pub const INVALID_ID: IncFsFileId = IncFsFileId { data: [0xff; 16] };

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IncFsReadInfo {
    pub id: IncFsFileId,
    pub bootClockTsUs: u64,
    pub block: i32,
    pub serialNo: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IncFsReadInfoWithUid {
    pub id: IncFsFileId,
    pub bootClockTsUs: u64,
    pub block: i32,
    pub serialNo: u32,
    pub uid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IncFsDataBlock {
    pub fileFd: c_int,
    pub pageIndex: i32,
    pub compression: c_int,
    pub kind: c_int,
    pub dataSize: u32,
    pub data: *const c_char,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IncFsSpan {
    pub data: *const c_char,
    pub size: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IncFsBlockRange {
    pub begin: i32,
    pub end: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IncFsFilledRanges {
    pub dataRanges: *mut IncFsBlockRange,
    pub hashRanges: *mut IncFsBlockRange,
    pub dataRangesCount: i32,
    pub hashRangesCount: i32,
    pub endIndex: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IncFsBlockCounts {
    pub totalDataBlocks: i64,
    pub filledDataBlocks: i64,
    pub totalHashBlocks: i64,
    pub filledHashBlocks: i64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IncFsMetrics {
    pub readsDelayedMin: u32,
    pub readsDelayedMinUs: u64,
    pub readsDelayedPending: u32,
    pub readsDelayedPendingUs: u64,
    pub readsFailedHashVerification: u32,
    pub readsFailedOther: u32,
    pub readsFailedTimedOut: u32,
    pub reserved: u64,
    pub reserved1: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IncFsLastReadError {
    pub id: IncFsFileId,
    pub timestampUs: u64,
    pub block: i32,
    pub errorNo: u32,
    pub uid: i32,
}

pub const CMD: c_int = 0;
pub const PENDING_READS: c_int = 1;
pub const LOGS: c_int = 2;
pub const BLOCKS_WRITTEN: c_int = 3;

pub const INCFS_FEATURE_CORE: c_int = 1;
/// `IncFsBlockKind`: a hash-tree block (sent with the `.fill` hash flag).
const BLOCK_KIND_HASH: c_int = 1;

/// A mount opened by `IncFs_Open`.
pub struct IncFsControl {
    mount: Arc<Mount>,
    watcher: Mutex<Option<PendingWatcher>>,
    log: Mutex<Option<RecordReader>>,
    blocks_written: Mutex<Option<std::fs::File>>,
}

/// Mounts known to this process, by st_dev, for the fd-based functions.
static MOUNTS: Mutex<Vec<(u64, Arc<Mount>)>> = Mutex::new(Vec::new());

fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(fallback)
}

fn neg(e: &Error) -> c_int {
    -e.errno()
}

/// A C path argument; `None` for NULL.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that stays valid and unchanged for `'a`.
unsafe fn path_arg<'a>(p: *const c_char) -> Option<&'a Path> {
    if p.is_null() {
        return None;
    }
    // SAFETY: not NULL, so NUL-terminated and valid for 'a (this function's contract).
    let c = unsafe { CStr::from_ptr(p) };
    Some(Path::new(std::ffi::OsStr::from_bytes(c.to_bytes())))
}

fn dev_of_fd(fd: c_int) -> Option<u64> {
    // SAFETY: `stat` is plain integers, for which all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer; a bad fd fails with EBADF.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_dev)
}

fn dev_of_path(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| m.dev())
}

fn register(mount: &Arc<Mount>) {
    if let Some(dev) = dev_of_path(mount.root()) {
        let mut m = lock(&MOUNTS);
        if !m.iter().any(|(d, _)| *d == dev) {
            m.push((dev, mount.clone()));
        }
    }
}

/// The mount an open file belongs to: a registered one with the same st_dev, else found by
/// walking up from the fd's path.
fn mount_of_fd(fd: c_int) -> Result<Arc<Mount>, c_int> {
    let dev = dev_of_fd(fd).ok_or(-libc::EBADF)?;
    if let Some((_, m)) = lock(&MOUNTS).iter().find(|(d, _)| *d == dev) {
        return Ok(m.clone());
    }
    let path: PathBuf = std::fs::read_link(format!("/proc/self/fd/{fd}")).map_err(|_| -libc::EBADF)?;
    let root = Mount::find_root(&path).ok_or(-libc::EINVAL)?;
    let m = Arc::new(Mount::open(&root).map_err(|e| neg(&e))?);
    register(&m);
    Ok(m)
}

/// The control behind a C handle; `None` for NULL.
///
/// # Safety
/// `c` is NULL or from `IncFs_Open`, and `IncFs_DeleteControl` is not called on it for `'a`.
unsafe fn control<'a>(c: *const IncFsControl) -> Option<&'a IncFsControl> {
    // SAFETY: NULL or a live Box from IncFs_Open (this function's contract); only shared
    // references are ever made to it.
    unsafe { c.as_ref() }
}

#[no_mangle]
pub extern "C" fn IncFs_IsEnabled() -> bool {
    true
}

#[no_mangle]
pub extern "C" fn IncFs_Features() -> c_int {
    INCFS_FEATURE_CORE
}

/// Whether `path` is on a virtio-incfs mount.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string, valid for the call.
#[no_mangle]
pub unsafe extern "C" fn IncFs_IsIncFsPath(path: *const c_char) -> bool {
    guard(false, || {
        // SAFETY: the caller guarantees what path_arg needs (see # Safety).
        let Some(p) = (unsafe { path_arg(path) }) else { return false };
        Mount::find_root(p).is_some()
    })
}

#[no_mangle]
pub extern "C" fn IncFs_IsIncFsFd(fd: c_int) -> bool {
    guard(false, || file_id_of_fd(fd).is_ok() || mount_of_fd(fd).is_ok())
}

/// Writes the 32 hex characters of `id` to `out` (no terminating NUL, as libincfs).
///
/// # Safety
/// `out` is NULL or valid for writes of 32 bytes (`kIncFsFileIdStringLength`).
#[no_mangle]
pub unsafe extern "C" fn IncFs_FileIdToString(id: IncFsFileId, out: *mut c_char) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    let s = file_id_to_hex(&id.data);
    // SAFETY: `s` is FILE_ID_HEX_LEN (32) bytes and the caller provides 32 writable bytes at
    // `out`; a fresh String cannot overlap the caller's buffer.
    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), out, FILE_ID_HEX_LEN) };
    0
}

/// The id written as 32 hex characters at `s`; the invalid id if they are not hex.
///
/// # Safety
/// `s` is NULL or valid for reads of 32 bytes (no NUL needed; bytes after the 32nd are not
/// read).
#[no_mangle]
pub unsafe extern "C" fn IncFs_FileIdFromString(s: *const c_char) -> IncFsFileId {
    if s.is_null() {
        return INVALID_ID;
    }
    // SAFETY: not NULL, so the caller guarantees 32 readable bytes (see # Safety), which
    // nothing writes during the call.
    let bytes = unsafe { std::slice::from_raw_parts(s.cast::<u8>(), FILE_ID_HEX_LEN) };
    file_id_from_hex(bytes).map(|data| IncFsFileId { data }).unwrap_or(INVALID_ID)
}

/// Opens the mount at `dir`; NULL (errno set) if it is not a virtio-incfs mount. The result
/// is released with `IncFs_DeleteControl`.
///
/// # Safety
/// `dir` is NULL or a NUL-terminated string, valid for the call.
#[no_mangle]
pub unsafe extern "C" fn IncFs_Open(dir: *const c_char) -> *mut IncFsControl {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller guarantees what path_arg needs (see # Safety).
        let Some(p) = (unsafe { path_arg(dir) }) else { return std::ptr::null_mut() };
        match Mount::open(p) {
            Ok(m) => {
                let mount = Arc::new(m);
                register(&mount);
                Box::into_raw(Box::new(IncFsControl {
                    mount,
                    watcher: Mutex::new(None),
                    log: Mutex::new(None),
                    blocks_written: Mutex::new(None),
                }))
            }
            Err(e) => {
                // SAFETY: __errno_location returns this thread's errno, valid for writes for
                // the thread's life.
                unsafe { *libc::__errno_location() = e.errno() };
                std::ptr::null_mut()
            }
        }
    })
}

/// Releases a control from `IncFs_Open`, with the fds `IncFs_GetControlFd` returned for it.
///
/// # Safety
/// `c` is NULL or from `IncFs_Open` and not deleted before. No other thread may be using it
/// during the call, and neither it nor the fds `IncFs_GetControlFd` gave for it may be used
/// after.
#[no_mangle]
pub unsafe extern "C" fn IncFs_DeleteControl(c: *mut IncFsControl) {
    if !c.is_null() {
        // SAFETY: a Box leaked by IncFs_Open, deleted once and no longer shared (see # Safety).
        drop(unsafe { Box::from_raw(c) });
    }
}

fn ensure_watcher(c: &IncFsControl) -> Result<(), c_int> {
    let mut w = lock(&c.watcher);
    if w.is_none() {
        *w = Some(PendingWatcher::start(&c.mount).map_err(|e| neg(&e))?);
    }
    Ok(())
}

/// PENDING_READS is an eventfd, readable while pending reads are queued (poll/epoll it, then
/// call IncFs_WaitForPendingReads with timeout 0). CMD is `.fill`, LOGS `.log`,
/// BLOCKS_WRITTEN `.blocks_written`; those are not pollable over virtio-fs. The fd belongs
/// to the control: the caller must not close it, and it is closed by IncFs_DeleteControl.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`.
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetControlFd(c: *const IncFsControl, kind: c_int) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control needs (see # Safety).
        let Some(c) = (unsafe { control(c) }) else { return -libc::EINVAL };
        match kind {
            PENDING_READS => match ensure_watcher(c) {
                Ok(()) => lock(&c.watcher).as_ref().map(|w| w.fd()).unwrap_or(-libc::EIO),
                Err(e) => e,
            },
            CMD => c.mount.fill_fd().unwrap_or_else(|e| neg(&e)),
            LOGS => {
                let mut l = lock(&c.log);
                if l.is_none() {
                    match c.mount.read_log() {
                        Ok(r) => *l = Some(r),
                        Err(e) => return neg(&e),
                    }
                }
                l.as_ref().map(|r| r.fd()).unwrap_or(-libc::EIO)
            }
            BLOCKS_WRITTEN => {
                use std::os::fd::AsRawFd;
                let mut b = lock(&c.blocks_written);
                if b.is_none() {
                    match std::fs::File::open(c.mount.root().join(names::BLOCKS_WRITTEN)) {
                        Ok(f) => *b = Some(f),
                        Err(e) => return -e.raw_os_error().unwrap_or(libc::EIO),
                    }
                }
                b.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-libc::EIO)
            }
            _ => -libc::EINVAL,
        }
    })
}

/// Copies the mount root into `buffer` (NUL-terminated); -ERANGE if it does not fit.
/// `*size` is the buffer's capacity on entry and the root's length (without the NUL) on
/// return.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `size` is NULL or valid for reads and
/// writes of one `size_t`; `buffer` is NULL or valid for writes of `*size` bytes.
#[no_mangle]
pub unsafe extern "C" fn IncFs_Root(c: *const IncFsControl, buffer: *mut c_char, size: *mut usize) -> c_int {
    // SAFETY: the caller guarantees what control needs (see # Safety).
    let (Some(c), false, false) = (unsafe { control(c) }, buffer.is_null(), size.is_null()) else {
        return -libc::EINVAL;
    };
    let root = c.mount.root().as_os_str().as_bytes();
    // SAFETY: `size` is not NULL, so valid for reads and writes (see # Safety).
    let cap = unsafe { *size };
    // SAFETY: as above.
    unsafe { *size = root.len() };
    if root.len() + 1 > cap {
        return -libc::ERANGE;
    }
    // SAFETY: `buffer` has `cap` >= len + 1 writable bytes (see # Safety), and `root` is our
    // own memory, so they do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(root.as_ptr().cast::<c_char>(), buffer, root.len());
        *buffer.add(root.len()) = 0;
    }
    0
}

/// The id of `path` (absolute, or relative to the mount root); the invalid id on error.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `path` is NULL or a NUL-terminated
/// string, valid for the call.
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetId(c: *const IncFsControl, path: *const c_char) -> IncFsFileId {
    guard(INVALID_ID, || {
        // SAFETY: the caller guarantees what control and path_arg need (see # Safety).
        let (Some(c), Some(p)) = (unsafe { control(c) }, unsafe { path_arg(path) }) else { return INVALID_ID };
        c.mount.file_id(p).map(|data| IncFsFileId { data }).unwrap_or(INVALID_ID)
    })
}

fn wait_pending(c: &IncFsControl, timeout_ms: i32, max: usize) -> Result<Vec<ReadRecord>, c_int> {
    ensure_watcher(c)?;
    let w = lock(&c.watcher);
    let w = w.as_ref().ok_or(-libc::EIO)?;
    Ok(w.wait(Duration::from_millis(timeout_ms.max(0) as u64), max))
}

fn wait_log(c: &IncFsControl, timeout_ms: i32, max: usize) -> Result<Vec<ReadRecord>, c_int> {
    let mut l = lock(&c.log);
    if l.is_none() {
        *l = Some(c.mount.read_log().map_err(|e| neg(&e))?);
    }
    let r = l.as_mut().ok_or(-libc::EIO)?;
    r.wait(Duration::from_millis(timeout_ms.max(0) as u64), max).map_err(|e| neg(&e))
}

/// Shared body of the four Wait functions: fills `buffer`, sets `*count`; -ETIMEDOUT if
/// nothing came within the timeout.
///
/// # Safety
/// As the Wait functions: `c` is NULL or a live control; `count` is NULL or valid for reads
/// and writes; `buffer` is NULL or valid for writes of `*count` elements.
unsafe fn deliver<T>(
    c: *const IncFsControl,
    timeout_ms: i32,
    buffer: *mut T,
    count: *mut usize,
    log: bool,
    conv: impl Fn(&ReadRecord) -> T,
) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control needs (see # Safety).
        let Some(c) = (unsafe { control(c) }) else { return -libc::EINVAL };
        if buffer.is_null() || count.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: `count` is not NULL, so valid for reads and writes (see # Safety).
        let max = unsafe { *count };
        let got = if log { wait_log(c, timeout_ms, max) } else { wait_pending(c, timeout_ms, max) };
        let recs = match got {
            Ok(r) => r,
            Err(e) => return e,
        };
        if recs.is_empty() {
            // SAFETY: `count` is valid for writes, as above.
            unsafe { *count = 0 };
            return -libc::ETIMEDOUT;
        }
        for (i, r) in recs.iter().take(max).enumerate() {
            // SAFETY: i < max = the caller's `*count`, and `buffer` holds that many writable
            // elements (see # Safety).
            unsafe { buffer.add(i).write(conv(r)) };
        }
        // SAFETY: `count` is valid for writes, as above.
        unsafe { *count = recs.len().min(max) };
        0
    })
}

fn info(r: &ReadRecord) -> IncFsReadInfo {
    IncFsReadInfo {
        id: IncFsFileId { data: r.file_id },
        bootClockTsUs: r.timestamp_us,
        block: r.block as i32,
        serialNo: r.serial,
    }
}

fn info_uid(r: &ReadRecord) -> IncFsReadInfoWithUid {
    IncFsReadInfoWithUid {
        id: IncFsFileId { data: r.file_id },
        bootClockTsUs: r.timestamp_us,
        block: r.block as i32,
        serialNo: r.serial,
        uid: r.uid as i32,
    }
}

/// Waits up to `timeout_ms` for pending reads (reads waiting for missing blocks).
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `count` is NULL or valid for reads
/// and writes of one `size_t` (in: `buffer`'s capacity in elements, out: how many were
/// written); `buffer` is NULL or valid for writes of `*count` elements.
#[no_mangle]
pub unsafe extern "C" fn IncFs_WaitForPendingReads(
    c: *const IncFsControl,
    timeout_ms: i32,
    buffer: *mut IncFsReadInfo,
    count: *mut usize,
) -> c_int {
    // SAFETY: the caller guarantees what deliver needs (see # Safety).
    unsafe { deliver(c, timeout_ms, buffer, count, false, info) }
}

/// As IncFs_WaitForPendingReads, with the uid of each reader.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `count` is NULL or valid for reads
/// and writes of one `size_t` (in: `buffer`'s capacity in elements, out: how many were
/// written); `buffer` is NULL or valid for writes of `*count` elements.
#[no_mangle]
pub unsafe extern "C" fn IncFs_WaitForPendingReadsWithUid(
    c: *const IncFsControl,
    timeout_ms: i32,
    buffer: *mut IncFsReadInfoWithUid,
    count: *mut usize,
) -> c_int {
    // SAFETY: the caller guarantees what deliver needs (see # Safety).
    unsafe { deliver(c, timeout_ms, buffer, count, false, info_uid) }
}

/// Waits up to `timeout_ms` for read-log records (every block read that reached the host).
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `count` is NULL or valid for reads
/// and writes of one `size_t` (in: `buffer`'s capacity in elements, out: how many were
/// written); `buffer` is NULL or valid for writes of `*count` elements.
#[no_mangle]
pub unsafe extern "C" fn IncFs_WaitForPageReads(
    c: *const IncFsControl,
    timeout_ms: i32,
    buffer: *mut IncFsReadInfo,
    count: *mut usize,
) -> c_int {
    // SAFETY: the caller guarantees what deliver needs (see # Safety).
    unsafe { deliver(c, timeout_ms, buffer, count, true, info) }
}

/// As IncFs_WaitForPageReads, with the uid of each reader.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `count` is NULL or valid for reads
/// and writes of one `size_t` (in: `buffer`'s capacity in elements, out: how many were
/// written); `buffer` is NULL or valid for writes of `*count` elements.
#[no_mangle]
pub unsafe extern "C" fn IncFs_WaitForPageReadsWithUid(
    c: *const IncFsControl,
    timeout_ms: i32,
    buffer: *mut IncFsReadInfoWithUid,
    count: *mut usize,
) -> c_int {
    // SAFETY: the caller guarantees what deliver needs (see # Safety).
    unsafe { deliver(c, timeout_ms, buffer, count, true, info_uid) }
}

/// Writes blocks of files opened on a virtio-incfs mount. Returns how many were processed
/// (already present ones count), or -errno when the first one failed: -EBADMSG (does not
/// match the hash tree; not stored), -E2BIG, -ERANGE, -EINVAL, -EBADF.
///
/// # Safety
/// When `count` > 0, `blocks` is NULL or valid for reads of `count` `IncFsDataBlock`s, and
/// the `data` of each is NULL or valid for reads of its `dataSize` bytes, all for the call.
#[no_mangle]
pub unsafe extern "C" fn IncFs_WriteBlocks(blocks: *const IncFsDataBlock, count: usize) -> c_int {
    guard(-libc::EIO, || {
        if count == 0 {
            return 0;
        }
        if blocks.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: not NULL, so valid for reads of `count` blocks (see # Safety); IncFsDataBlock
        // is plain data, and nothing writes the blocks during the call.
        let blocks = unsafe { std::slice::from_raw_parts(blocks, count) };
        let mut done = 0usize;
        // Group consecutive blocks of the same mount into one call.
        while done < blocks.len() {
            let first = &blocks[done];
            let mount = match mount_of_fd(first.fileFd) {
                Ok(m) => m,
                Err(e) => return if done == 0 { e } else { done as c_int },
            };
            let dev = dev_of_fd(first.fileFd);
            let mut batch = Vec::new();
            let mut ids = Vec::new();
            for b in &blocks[done..] {
                // A block of another mount ends this batch; the next round takes it.
                if !batch.is_empty() && dev_of_fd(b.fileFd) != dev {
                    break;
                }
                let id = match file_id_of_fd(b.fileFd) {
                    Ok(id) => id,
                    Err(e) if batch.is_empty() && done == 0 => return neg(&e),
                    Err(_) => break,
                };
                if b.data.is_null() && b.dataSize > 0 {
                    if batch.is_empty() && done == 0 {
                        return -libc::EINVAL;
                    }
                    break;
                }
                // LZ4 (between the two) passes, and the host refuses it with EINVAL.
                let compression_known =
                    (c_int::from(COMPRESSION_NONE)..=c_int::from(COMPRESSION_ZSTD)).contains(&b.compression);
                if b.pageIndex < 0 || !compression_known {
                    if batch.is_empty() && done == 0 {
                        return if b.pageIndex < 0 { -libc::ERANGE } else { -libc::EINVAL };
                    }
                    break;
                }
                ids.push(id);
                batch.push(b);
            }
            let datas: Vec<DataBlock<'_>> = batch
                .iter()
                .zip(&ids)
                .map(|(b, id)| DataBlock {
                    file_id: *id,
                    block: b.pageIndex as u32,
                    compression: b.compression as u8,
                    hash: b.kind == BLOCK_KIND_HASH,
                    data: if b.dataSize == 0 {
                        &[]
                    } else {
                        // SAFETY: not NULL here (checked above), so valid for reads of
                        // `dataSize` bytes for the call (see # Safety).
                        unsafe { std::slice::from_raw_parts(b.data.cast::<u8>(), b.dataSize as usize) }
                    },
                })
                .collect();
            match mount.write_blocks(&datas) {
                Ok(n) => {
                    done += n;
                    if n < datas.len() || datas.is_empty() {
                        break;
                    }
                }
                Err(e) if done == 0 => return neg(&e),
                Err(_) => break,
            }
        }
        done.min(c_int::MAX as usize) as c_int
    })
}

fn state_of_fd(fd: c_int) -> Result<FileState, c_int> {
    let id = file_id_of_fd(fd).map_err(|e| neg(&e))?;
    mount_of_fd(fd)?.file_state(&id).map_err(|e| neg(&e))
}

/// Filled data ranges of the file open as `fd`, from block `start`, into `out` (an array of
/// IncFsBlockRange). -ERANGE when `out` is too small (the ranges that fit are valid).
/// `ranges->dataRanges` and `hashRanges` point into `out`'s buffer.
///
/// # Safety
/// `ranges` is NULL or valid for writes of one `IncFsFilledRanges`; `out.data` is NULL with
/// `out.size` 0, or valid for writes of `out.size` bytes and aligned for `IncFsBlockRange`
/// (4 bytes).
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetFilledRangesStartingFrom(
    fd: c_int,
    start: c_int,
    out: IncFsSpan,
    ranges: *mut IncFsFilledRanges,
) -> c_int {
    guard(-libc::EIO, || {
        if ranges.is_null() || start < 0 || out.size < 0 || (out.data.is_null() && out.size > 0) {
            return -libc::EINVAL;
        }
        let st = match state_of_fd(fd) {
            Ok(s) => s,
            Err(e) => return e,
        };
        let cap = out.size as usize / std::mem::size_of::<IncFsBlockRange>();
        let buf = out.data as *mut IncFsBlockRange;
        let mut n = 0usize;
        let mut end_index = st.total_blocks as i32;
        let mut res = 0;
        for &(b, e) in &st.ranges {
            if e as i64 <= start as i64 {
                continue;
            }
            let b = b.max(start as u32);
            if n == cap {
                res = -libc::ERANGE;
                end_index = b as i32;
                break;
            }
            // SAFETY: n < cap, and the caller's buffer holds `cap` aligned, writable
            // IncFsBlockRange (out.size bytes, see # Safety).
            unsafe { buf.add(n).write(IncFsBlockRange { begin: b as i32, end: e as i32 }) };
            n += 1;
        }
        // SAFETY: `ranges` is not NULL, so valid for writes (see # Safety).
        unsafe {
            *ranges = IncFsFilledRanges {
                dataRanges: buf,
                hashRanges: buf.wrapping_add(n),
                dataRangesCount: n as i32,
                hashRangesCount: 0,
                endIndex: end_index,
            }
        };
        res
    })
}

/// IncFs_GetFilledRangesStartingFrom from block 0.
///
/// # Safety
/// As IncFs_GetFilledRangesStartingFrom.
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetFilledRanges(fd: c_int, out: IncFsSpan, ranges: *mut IncFsFilledRanges) -> c_int {
    // SAFETY: the same contract, forwarded unchanged.
    unsafe { IncFs_GetFilledRangesStartingFrom(fd, 0, out, ranges) }
}

fn loaded(r: Result<FileState, c_int>) -> c_int {
    match r {
        Ok(s) if s.fully_loaded => 0,
        Ok(_) => -libc::ENODATA,
        Err(e) => e,
    }
}

/// 0 when every block of the file is present, -ENODATA when some are missing.
#[no_mangle]
pub extern "C" fn IncFs_IsFullyLoaded(fd: c_int) -> c_int {
    guard(-libc::EIO, || loaded(state_of_fd(fd)))
}

/// As IncFs_IsFullyLoaded, by path (absolute, or relative to the mount root).
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `path` is NULL or a NUL-terminated
/// string, valid for the call.
#[no_mangle]
pub unsafe extern "C" fn IncFs_IsFullyLoadedByPath(c: *const IncFsControl, path: *const c_char) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control and path_arg need (see # Safety).
        let (Some(c), Some(p)) = (unsafe { control(c) }, unsafe { path_arg(path) }) else { return -libc::EINVAL };
        loaded(c.mount.file_state_by_path(p).map_err(|e| neg(&e)))
    })
}

/// As IncFs_IsFullyLoaded, by file id.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`.
#[no_mangle]
pub unsafe extern "C" fn IncFs_IsFullyLoadedById(c: *const IncFsControl, id: IncFsFileId) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control needs (see # Safety).
        let Some(c) = (unsafe { control(c) }) else { return -libc::EINVAL };
        loaded(c.mount.file_state(&id.data).map_err(|e| neg(&e)))
    })
}

/// 0 when no file of the mount has missing blocks, -ENODATA otherwise.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`.
#[no_mangle]
pub unsafe extern "C" fn IncFs_IsEverythingFullyLoaded(c: *const IncFsControl) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control needs (see # Safety).
        let Some(c) = (unsafe { control(c) }) else { return -libc::EINVAL };
        match c.mount.incomplete_files() {
            Ok(v) if v.is_empty() => 0,
            Ok(_) => -libc::ENODATA,
            Err(e) => neg(&e),
        }
    })
}

/// Writes a file's block counts to `out`.
///
/// # Safety
/// `out` is NULL or valid for writes of one `IncFsBlockCounts`.
unsafe fn counts(r: Result<FileState, Error>, out: *mut IncFsBlockCounts) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    match r {
        Ok(s) => {
            // SAFETY: `out` is not NULL, so valid for writes (this function's contract).
            unsafe {
                *out = IncFsBlockCounts {
                    totalDataBlocks: s.total_blocks as i64,
                    filledDataBlocks: s.filled_blocks as i64,
                    totalHashBlocks: 0,
                    filledHashBlocks: 0,
                }
            };
            0
        }
        Err(e) => neg(&e),
    }
}

/// Data block counts; hash blocks are the host's business and reported as 0.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `path` is NULL or a NUL-terminated
/// string, valid for the call; `out` is NULL or valid for writes of one `IncFsBlockCounts`.
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetFileBlockCountByPath(
    c: *const IncFsControl,
    path: *const c_char,
    out: *mut IncFsBlockCounts,
) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control and path_arg need (see # Safety).
        let (Some(c), Some(p)) = (unsafe { control(c) }, unsafe { path_arg(path) }) else { return -libc::EINVAL };
        // SAFETY: the caller guarantees what counts needs (see # Safety).
        unsafe { counts(c.mount.file_state_by_path(p), out) }
    })
}

/// As IncFs_GetFileBlockCountByPath, by file id.
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `out` is NULL or valid for writes of one
/// `IncFsBlockCounts`.
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetFileBlockCountById(
    c: *const IncFsControl,
    id: IncFsFileId,
    out: *mut IncFsBlockCounts,
) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control needs (see # Safety).
        let Some(c) = (unsafe { control(c) }) else { return -libc::EINVAL };
        // SAFETY: the caller guarantees what counts needs (see # Safety).
        unsafe { counts(c.mount.file_state(&id.data), out) }
    })
}

/// Ids of incomplete files; -E2BIG when `ids` cannot hold them all (`*count` is then the
/// number needed).
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `count` is NULL or valid for reads and
/// writes of one `size_t` (in: `ids`' capacity, out: the number of incomplete files); `ids`
/// is NULL or valid for writes of `*count` ids.
#[no_mangle]
pub unsafe extern "C" fn IncFs_ListIncompleteFiles(
    c: *const IncFsControl,
    ids: *mut IncFsFileId,
    count: *mut usize,
) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control needs (see # Safety).
        let Some(c) = (unsafe { control(c) }) else { return -libc::EINVAL };
        if count.is_null() {
            return -libc::EINVAL;
        }
        let v = match c.mount.incomplete_files() {
            Ok(v) => v,
            Err(e) => return neg(&e),
        };
        // SAFETY: `count` is not NULL, so valid for reads and writes; `ids` holds `cap` writable
        // ids and is written only when not NULL and v.len() <= cap (see # Safety).
        unsafe {
            let cap = *count;
            *count = v.len();
            if v.len() > cap || (ids.is_null() && !v.is_empty()) {
                return -libc::E2BIG;
            }
            for (i, id) in v.iter().enumerate() {
                ids.add(i).write(IncFsFileId { data: *id });
            }
        }
        0
    })
}

/// incfs reads these from sysfs by instance name; here `sysfs_name` is the mount directory.
///
/// # Safety
/// `sysfs_name` is NULL or a NUL-terminated string, valid for the call; `out` is NULL or
/// valid for writes of one `IncFsMetrics`.
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetMetrics(sysfs_name: *const c_char, out: *mut IncFsMetrics) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what path_arg needs (see # Safety).
        let Some(p) = (unsafe { path_arg(sysfs_name) }) else { return -libc::EINVAL };
        if out.is_null() {
            return -libc::EINVAL;
        }
        let m = match Mount::open(p).and_then(|m| m.stats()) {
            Ok(s) => s,
            Err(e) => return neg(&e),
        };
        let g = |k: &str| m.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap_or(0);
        // SAFETY: `out` is not NULL, so valid for writes (see # Safety).
        unsafe {
            *out = IncFsMetrics {
                readsDelayedMin: g("reads_delayed_min") as u32,
                readsDelayedMinUs: g("reads_delayed_min_us"),
                readsDelayedPending: g("reads_delayed_pending") as u32,
                readsDelayedPendingUs: g("reads_delayed_pending_us"),
                readsFailedHashVerification: g("reads_failed_hash_verification") as u32,
                readsFailedOther: g("reads_failed_other") as u32,
                readsFailedTimedOut: g("reads_failed_timed_out") as u32,
                reserved: 0,
                reserved1: 0,
            }
        };
        0
    })
}

/// The last failed read; all zero when none failed. `errorNo` is the negative errno (as
/// libincfs documents: -ETIME for a timeout, -EBADMSG for a verification failure).
///
/// # Safety
/// `c` is NULL or a live control from `IncFs_Open`; `out` is NULL or valid for writes of one
/// `IncFsLastReadError`.
#[no_mangle]
pub unsafe extern "C" fn IncFs_GetLastReadError(c: *const IncFsControl, out: *mut IncFsLastReadError) -> c_int {
    guard(-libc::EIO, || {
        // SAFETY: the caller guarantees what control needs (see # Safety).
        let Some(c) = (unsafe { control(c) }) else { return -libc::EINVAL };
        if out.is_null() {
            return -libc::EINVAL;
        }
        match c.mount.last_read_error() {
            Ok(e) => {
                // SAFETY: `out` is not NULL, so valid for writes (see # Safety).
                unsafe {
                    *out = IncFsLastReadError {
                        id: IncFsFileId { data: e.file_id },
                        timestampUs: e.time_us,
                        block: e.block as i32,
                        errorNo: (e.errno as i32).wrapping_neg() as u32,
                        uid: e.uid as i32,
                    }
                };
                0
            }
            Err(e) => neg(&e),
        }
    })
}
