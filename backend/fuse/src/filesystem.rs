//! The interface between the FUSE dispatcher and a filesystem.
//!
//! The filesystem is read-only: every mutating opcode is answered with EROFS by the dispatcher
//! without reaching it, except WRITE, which goes to [`FileSystem::write`] (EROFS by default) so
//! that control files can accept writes later.
//!
//! Metadata operations are synchronous and expected to be quick (in-memory lookups). Data
//! operations ([`FileSystem::read`], [`FileSystem::write`]) return a [`Reply`] that may be
//! completed later (lazy fetch, long poll) without holding a thread.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::abi;
use incfs_buf::ScatterBuf;

/// A positive `libc` errno value (`libc::ENOENT`, ...).
pub type Errno = i32;

/// A boxed, sendable future resolving to a result, used by [`Reply::Pending`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Errno>> + Send + 'static>>;

/// The answer to a data operation: available now, or later.
pub enum Reply<T> {
    /// Answered inline on the queue thread.
    Ready(Result<T, Errno>),
    /// Parked: the future is run on the tokio runtime given to the device, and its output is
    /// written back to the guest when it resolves. It must not block the executor.
    Pending(BoxFuture<T>),
}

impl<T> Reply<T> {
    /// A ready success.
    pub fn ok(v: T) -> Self {
        Reply::Ready(Ok(v))
    }

    /// A ready failure.
    pub fn err(e: Errno) -> Self {
        Reply::Ready(Err(e))
    }

    /// Parks `fut` until it resolves.
    pub fn pending<F>(fut: F) -> Self
    where
        F: Future<Output = Result<T, Errno>> + Send + 'static,
    {
        Reply::Pending(Box::pin(fut))
    }
}

/// Writes the rest of a parked READ's data into the reply buffer (based where the data goes)
/// and returns the data's length.
pub type ReadFill = Box<dyn FnOnce(&mut ScatterBuf<'_>) -> Result<u32, Errno> + Send>;

/// The answer to READ.
pub enum ReadReply {
    /// The data (this many bytes) is in the buffer, or the read failed.
    Done(Result<u32, Errno>),
    /// Parked: the future is run on the device's runtime; its [`ReadFill`] then writes the
    /// data once the reply buffer is at hand again.
    Pending(BoxFuture<ReadFill>),
}

impl ReadReply {
    /// A read answered with bytes of its own (generated files, tests), now or later: at most
    /// `size` of them are written into `out`.
    pub fn bytes(reply: Reply<Vec<u8>>, size: u32, out: &mut ScatterBuf<'_>) -> ReadReply {
        let keep = move |mut data: Vec<u8>| {
            data.truncate(size as usize);
            data
        };
        match reply {
            Reply::Ready(r) => ReadReply::Done(r.and_then(|d| write_bytes(&keep(d), out))),
            Reply::Pending(fut) => ReadReply::Pending(Box::pin(async move {
                let data = keep(fut.await?);
                Ok(Box::new(move |out: &mut ScatterBuf<'_>| write_bytes(&data, out)) as ReadFill)
            })),
        }
    }
}

fn write_bytes(data: &[u8], out: &mut ScatterBuf<'_>) -> Result<u32, Errno> {
    out.write(0, data).map_err(|_| libc::EIO)?;
    u32::try_from(data.len()).map_err(|_| libc::EIO)
}

/// Runs [`FileSystem::read`] into a fresh `Vec` (tools and tests that want the bytes).
pub fn read_to_vec(fs: &dyn FileSystem, ino: u64, fh: u64, offset: u64, size: u32, ctx: &Context) -> Reply<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let reply = fs.read(ino, fh, offset, size, ctx, &mut ScatterBuf::from_slice(&mut buf));
    match reply {
        ReadReply::Done(r) => Reply::Ready(r.map(|n| {
            buf.truncate(n as usize);
            buf
        })),
        ReadReply::Pending(fut) => Reply::pending(async move {
            let fill = fut.await?;
            let n = fill(&mut ScatterBuf::from_slice(&mut buf))?;
            buf.truncate(n as usize);
            Ok(buf)
        }),
    }
}

impl<T> From<Result<T, Errno>> for Reply<T> {
    fn from(r: Result<T, Errno>) -> Self {
        Reply::Ready(r)
    }
}

/// Inode attributes, as `struct fuse_attr` carries them (times are seconds + nanoseconds
/// since the epoch).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    /// Number of 512-byte blocks allocated.
    pub blocks: u64,
    pub atime: u64,
    pub atimensec: u32,
    pub mtime: u64,
    pub mtimensec: u32,
    pub ctime: u64,
    pub ctimensec: u32,
    /// File type and permission bits (`libc::S_IFREG | 0o444`, ...).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl From<Attr> for abi::Attr {
    fn from(a: Attr) -> Self {
        abi::Attr {
            ino: a.ino,
            size: a.size,
            blocks: a.blocks,
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            atimensec: a.atimensec,
            mtimensec: a.mtimensec,
            ctimensec: a.ctimensec,
            mode: a.mode,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: a.blksize,
            flags: 0,
        }
    }
}

/// The result of a successful LOOKUP. Returning it counts as one lookup of `ino`, which the
/// guest later gives back through [`FileSystem::forget`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub ino: u64,
    pub generation: u64,
    pub attr: Attr,
    /// How long the guest may cache the name → inode mapping.
    pub entry_timeout: Duration,
    /// How long the guest may cache the attributes.
    pub attr_timeout: Duration,
}

/// One directory entry produced by [`FileSystem::readdir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    /// The cookie that resumes the listing *after* this entry (the guest passes it back as
    /// the next `offset`). Must not be 0.
    pub offset: u64,
    /// `libc::DT_*` type of the entry.
    pub kind: u32,
    pub name: &'a [u8],
}

/// Where [`FileSystem::readdir`] puts entries.
pub trait DirSink {
    /// Adds one entry. Returns `false` when the reply buffer is full: the entry was *not*
    /// added and the filesystem must stop (the guest will ask again from that entry's
    /// predecessor's cookie).
    fn add(&mut self, entry: DirEntry<'_>) -> bool;
}

/// Filesystem statistics for STATFS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl Default for StatFs {
    fn default() -> Self {
        StatFs {
            blocks: 0,
            bfree: 0,
            bavail: 0,
            files: 0,
            ffree: 0,
            bsize: 4096,
            namelen: abi::NAME_MAX as u32,
            frsize: 4096,
        }
    }
}

/// The caller of a request, from the FUSE header (guest ids).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// What was agreed at FUSE INIT, for the filesystem's information.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitInfo {
    pub major: u32,
    pub minor: u32,
    /// FUSE_* init flags both sides enabled.
    pub flags: u32,
    pub max_readahead: u32,
    pub max_write: u32,
    pub max_pages: u16,
}

/// A read-only filesystem served over FUSE. All methods may be called concurrently from
/// several queue threads. Inode 1 ([`abi::ROOT_ID`]) is the root.
///
/// Names are raw bytes without the trailing NUL, never empty, at most 255 bytes, and never
/// contain `/` or NUL; the dispatcher has already checked that.
pub trait FileSystem: Send + Sync + 'static {
    /// FUSE INIT was negotiated (once per guest mount; again after DESTROY or reconnect).
    fn init(&self, _info: &InitInfo) {}

    /// The guest unmounted (FUSE DESTROY) or the frontend went away. All lookup counts are
    /// implicitly dropped.
    fn destroy(&self) {}

    /// Looks `name` up in directory `parent`; a success counts one lookup of the result.
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno>;

    /// The guest dropped `nlookup` lookups of `ino`.
    fn forget(&self, _ino: u64, _nlookup: u64) {}

    /// Attributes of `ino`, and how long they may be cached.
    fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno>;

    /// Target of symlink `ino`.
    fn readlink(&self, _ino: u64) -> Result<Vec<u8>, Errno> {
        Err(libc::EINVAL)
    }

    /// Opens `ino` with `flags` (O_*). Returns a file handle and FOPEN_* flags.
    /// The default refuses anything but read-only access and hands out handle 0.
    fn open(&self, _ino: u64, flags: u32) -> Result<(u64, u32), Errno> {
        if (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(libc::EROFS);
        }
        Ok((0, 0))
    }

    /// Reads up to `size` bytes at `offset` (`size` is already bounded by max_pages) into
    /// `out`, whose base is where the data goes and which holds at least `size` bytes: a
    /// guest's buffers (zero-copy) or plain memory. A short result means end of file. `ctx`
    /// is the guest caller (who waits on a missing block). A parked read may have written
    /// part of its data already; its [`ReadFill`] writes the rest into a buffer laid out the
    /// same way (the same guest buffers, mapped again).
    fn read(&self, ino: u64, fh: u64, offset: u64, size: u32, ctx: &Context, out: &mut ScatterBuf<'_>) -> ReadReply;

    /// Writes `data` at `offset`, returning how many bytes were taken.
    fn write(&self, _ino: u64, _fh: u64, _offset: u64, _data: &[u8], _ctx: &Context) -> Reply<u32> {
        Reply::err(libc::EROFS)
    }

    /// FLUSH (called on every close of a file descriptor).
    fn flush(&self, _ino: u64, _fh: u64) -> Result<(), Errno> {
        Ok(())
    }

    /// RELEASE: the last reference to the file handle is gone.
    fn release(&self, _ino: u64, _fh: u64) {}

    /// Opens directory `ino`; returns a handle and FOPEN_* flags.
    fn opendir(&self, ino: u64, _flags: u32) -> Result<(u64, u32), Errno> {
        let (attr, _) = self.getattr(ino)?;
        if attr.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        Ok((0, 0))
    }

    /// Lists directory `ino` starting after cookie `offset` (0 = from the start), feeding
    /// entries to `sink` until it reports full or the directory ends. "." and ".." are the
    /// filesystem's to emit if it wants them (the guest does not need them).
    fn readdir(&self, ino: u64, fh: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno>;

    /// RELEASEDIR.
    fn releasedir(&self, _ino: u64, _fh: u64) {}

    /// Filesystem statistics.
    fn statfs(&self, _ino: u64) -> Result<StatFs, Errno> {
        Ok(StatFs::default())
    }

    /// Full value of extended attribute `name` of `ino`. The dispatcher implements the
    /// size-probe protocol (size 0 → length only; too small → ERANGE).
    fn getxattr(&self, _ino: u64, _name: &[u8]) -> Result<Vec<u8>, Errno> {
        Err(libc::ENODATA)
    }

    /// Names of all extended attributes of `ino` (without NULs; the dispatcher builds the
    /// NUL-separated list and applies the size-probe protocol).
    fn listxattr(&self, _ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        Ok(Vec::new())
    }

    /// ACCESS check for `mask` (R_OK/W_OK/X_OK, or F_OK = 0). The default refuses W_OK
    /// (read-only) and otherwise checks the permission bits against the caller.
    fn access(&self, ino: u64, mask: u32, ctx: &Context) -> Result<(), Errno> {
        let (attr, _) = self.getattr(ino)?;
        default_access(&attr, mask, ctx)
    }

    /// LSEEK with SEEK_DATA or SEEK_HOLE (the only whences the kernel forwards). The default
    /// reports ENOSYS, which makes the guest fall back to "all data" for good.
    fn lseek(&self, _ino: u64, _fh: u64, _offset: u64, _whence: u32) -> Result<u64, Errno> {
        Err(libc::ENOSYS)
    }
}

/// Unix permission check of a read-only inode for the guest caller `ctx`.
pub fn default_access(attr: &Attr, mask: u32, ctx: &Context) -> Result<(), Errno> {
    let mask = mask as i32;
    if mask & libc::W_OK != 0 {
        return Err(libc::EROFS);
    }
    if mask == libc::F_OK {
        return Ok(());
    }
    // root may read anything, and execute what has any execute bit.
    let mode = attr.mode;
    if ctx.uid == 0 {
        if mask & libc::X_OK != 0 && mode & libc::S_IFMT != libc::S_IFDIR && mode & 0o111 == 0 {
            return Err(libc::EACCES);
        }
        return Ok(());
    }
    let bits = if ctx.uid == attr.uid {
        (mode >> 6) & 7
    } else if ctx.gid == attr.gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    if (mask as u32) & !bits & 7 != 0 {
        return Err(libc::EACCES);
    }
    Ok(())
}
