//! The image's own inodes: names, attributes and reads over the block engine.
//!
//! FUSE inode numbers are image inode indexes plus one (the root is 1): stable for the life of
//! the mount and shared by hard links. The image never changes, so the guest may cache names,
//! attributes and pages for as long as it likes. Reads are reported to a [`ReadObserver`]
//! (the control channel's pending reads and read log), which never reads data itself.

use std::sync::Arc;
use std::time::Duration;

use std::time::Instant;

use incfs_buf::ScatterBuf;
use incfs_fuse::{abi, Attr, Context, DirEntry, DirSink, Entry, Errno, ReadFill, ReadReply, StatFs};

use crate::engine::{Engine, ReadOutcome};
use crate::image::{Image, Inode, InodeKind, BLOCK_SIZE};

/// Immutable data: a day is as good as forever, and stays well inside every guest's limits.
const TTL: Duration = Duration::from_secs(86400);

/// incfs's xattrs on every file: its 16-byte id (as 32 hex digits) and its size (le64).
pub const XATTR_INCFS_ID: &[u8] = b"user.incfs.id";
pub const XATTR_INCFS_SIZE: &[u8] = b"user.incfs.size";

/// What watches reads of image files (the control channel's pending reads, read log and
/// last error). Called on the data path, so quick; never reads data itself.
pub trait ReadObserver: Send + Sync + 'static {
    /// A guest read of blocks [first, last) of image file `file` began.
    fn read_started(&self, file: u32, first: u32, last: u32, uid: u32);
    /// The read waits for `missing`; what it returns is handed back to `read_ended`.
    fn read_parked(&self, file: u32, missing: &[u32], uid: u32) -> Vec<u64>;
    /// A parked read ended (filled, failed or abandoned) after `waited`.
    fn read_ended(&self, parked: Vec<u64>, waited: Duration);
    /// A read of `file` failed at `block` with `errno`.
    fn read_failed(&self, file: u32, block: u32, errno: Errno, uid: u32);
}

/// The image's inodes.
pub struct ImageTree {
    engine: Arc<Engine>,
    observer: Arc<dyn ReadObserver>,
}

/// Ends a parked read's observation however its future ends (done or dropped).
struct Parked {
    observer: Arc<dyn ReadObserver>,
    records: Vec<u64>,
    since: Instant,
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.observer.read_ended(std::mem::take(&mut self.records), self.since.elapsed());
    }
}

impl ImageTree {
    pub fn new(engine: Arc<Engine>, observer: Arc<dyn ReadObserver>) -> Self {
        ImageTree { engine, observer }
    }

    pub(super) fn image_entry(&self, idx: u32, entry_timeout: Duration) -> Entry {
        let attr = self.attr(idx, &self.image().manifest.inodes[idx as usize]);
        Entry { ino: attr.ino, generation: 0, attr, entry_timeout, attr_timeout: TTL }
    }

    fn image(&self) -> &Image {
        self.engine.image()
    }

    /// FUSE inode -> image inode index.
    fn index(&self, ino: u64) -> Result<u32, Errno> {
        let i = ino.checked_sub(1).ok_or(libc::ENOENT)?;
        if i < self.image().manifest.inodes.len() as u64 {
            Ok(i as u32)
        } else {
            Err(libc::ENOENT)
        }
    }

    fn node(&self, ino: u64) -> Result<(u32, &Inode), Errno> {
        let i = self.index(ino)?;
        Ok((i, &self.image().manifest.inodes[i as usize]))
    }

    fn attr(&self, idx: u32, node: &Inode) -> Attr {
        let (size, rdev) = match &node.kind {
            InodeKind::File(f) => (f.size, 0),
            InodeKind::Symlink(t) => (t.len() as u64, 0),
            InodeKind::Dir(e) => (e.len() as u64, 0),
            InodeKind::Special { rdev } => (0, *rdev),
        };
        let (sec, nsec) = (node.mtime_sec.max(0) as u64, node.mtime_nsec);
        Attr {
            ino: idx as u64 + 1,
            size,
            blocks: size.div_ceil(512),
            atime: sec,
            atimensec: nsec,
            mtime: sec,
            mtimensec: nsec,
            ctime: sec,
            ctimensec: nsec,
            mode: node.mode,
            nlink: self.image().nlink[idx as usize],
            uid: node.uid,
            gid: node.gid,
            rdev: linux_rdev(rdev),
            blksize: BLOCK_SIZE as u32,
        }
    }
}

/// The kernel's dev_t encoding, as FUSE's 32-bit rdev carries it (old_encode_dev-compatible
/// for small numbers, new_encode_dev otherwise).
fn linux_rdev(rdev: u64) -> u32 {
    let major = libc::major(rdev);
    let minor = libc::minor(rdev);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn dtype(mode: u32) -> u32 {
    (mode & libc::S_IFMT) >> 12
}

impl ImageTree {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno> {
        let (p, node) = self.node(parent)?;
        if !matches!(node.kind, InodeKind::Dir(_)) {
            return Err(libc::ENOTDIR);
        }
        let c = self.image().lookup(p, name).ok_or(libc::ENOENT)?;
        if self.engine.config().lookup_prefetch {
            self.hint_intent(c);
        }
        Ok(self.image_entry(c, TTL))
    }

    /// The guest showed it will read image inode `idx` (a regular file): the engine may fetch
    /// its head in the background. Never blocks the reply.
    fn hint_intent(&self, idx: u32) {
        if matches!(self.image().manifest.inodes[idx as usize].kind, InodeKind::File(_)) {
            self.engine.hint_open(idx);
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno> {
        let (i, node) = self.node(ino)?;
        Ok((self.attr(i, node), TTL))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match &self.node(ino)?.1.kind {
            InodeKind::Symlink(t) => Ok(t.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    pub fn open(&self, ino: u64, flags: u32) -> Result<(u64, u32), Errno> {
        let (idx, node) = self.node(ino)?;
        if (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY || (flags as i32) & libc::O_TRUNC != 0 {
            return Err(libc::EROFS);
        }
        match node.kind {
            // Immutable: keep the guest's page cache across opens; never direct I/O, so mmap works.
            InodeKind::File(_) => {
                if self.engine.config().open_prefetch {
                    self.hint_intent(idx);
                }
                Ok((0, abi::FOPEN_KEEP_CACHE))
            }
            InodeKind::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    /// READ of an image file: cached blocks go into `out` now; a miss parks the request until
    /// the engine has the rest (see `incfs_fuse::FileSystem::read`).
    pub fn read(&self, ino: u64, offset: u64, size: u32, ctx: &Context, out: &mut ScatterBuf<'_>) -> ReadReply {
        let idx = match self.node(ino) {
            Ok((i, Inode { kind: InodeKind::File(_), .. })) => i,
            Ok((_, Inode { kind: InodeKind::Dir(_), .. })) => return ReadReply::Done(Err(libc::EISDIR)),
            Ok(_) => return ReadReply::Done(Err(libc::EINVAL)),
            Err(e) => return ReadReply::Done(Err(e)),
        };
        let uid = ctx.uid;
        let (first, last) = self.engine.block_span(idx, offset, size).unwrap_or((0, 0));
        if first < last {
            self.observer.read_started(idx, first, last, uid);
        }
        let miss = match self.engine.read_into(idx, offset, size, out) {
            Ok(ReadOutcome::Done(n)) => {
                self.engine.startup.read_answered();
                return ReadReply::Done(Ok(n));
            }
            Ok(ReadOutcome::Miss(miss)) => miss,
            Err(e) => {
                self.observer.read_failed(idx, first, e.errno(), uid);
                return ReadReply::Done(Err(e.errno()));
            }
        };
        let first_missing = miss.missing_blocks().first().copied().unwrap_or(first);
        let engine = self.engine.clone();
        let parked = Parked {
            observer: self.observer.clone(),
            records: self.observer.read_parked(idx, miss.missing_blocks(), uid),
            since: Instant::now(),
        };
        ReadReply::Pending(Box::pin(async move {
            let res = miss.wait().await;
            let observer = parked.observer.clone();
            drop(parked);
            match res {
                Ok(data) => {
                    engine.startup.read_answered();
                    Ok(Box::new(move |out: &mut ScatterBuf<'_>| data.write_into(out).map_err(|_| libc::EIO))
                        as ReadFill)
                }
                Err(e) => {
                    observer.read_failed(idx, first_missing, e.errno(), uid);
                    Err(e.errno())
                }
            }
        }))
    }

    pub fn opendir(&self, ino: u64, _flags: u32) -> Result<(u64, u32), Errno> {
        match self.node(ino)?.1.kind {
            // Listings never change either.
            InodeKind::Dir(_) => Ok((0, abi::FOPEN_KEEP_CACHE | abi::FOPEN_CACHE_DIR)),
            _ => Err(libc::ENOTDIR),
        }
    }

    pub fn readdir(&self, ino: u64, _fh: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno> {
        // The root lists only the image: control files are reachable by name but hidden, so
        // tree walks and comparisons of the mount see exactly the image.
        let (i, node) = self.node(ino)?;
        let InodeKind::Dir(entries) = &node.kind else { return Err(libc::ENOTDIR) };
        // Cookies: 1 = ".", 2 = "..", 3 + k = entries[k].
        let parent = self.image().parent[i as usize] as u64 + 1;
        let mut cookie = offset;
        while cookie < 2 {
            let (name, target): (&[u8], u64) = if cookie == 0 { (b".", ino) } else { (b"..", parent) };
            if !sink.add(DirEntry { ino: target, offset: cookie + 1, kind: dtype(libc::S_IFDIR), name }) {
                return Ok(());
            }
            cookie += 1;
        }
        let start = usize::try_from(cookie - 2).unwrap_or(usize::MAX);
        for (k, e) in entries.iter().enumerate().skip(start) {
            let mode = self.image().manifest.inodes[e.ino as usize].mode;
            if !sink.add(DirEntry { ino: e.ino as u64 + 1, offset: k as u64 + 3, kind: dtype(mode), name: &e.name }) {
                break;
            }
        }
        Ok(())
    }

    pub fn statfs(&self, _ino: u64) -> Result<StatFs, Errno> {
        let img = self.image();
        Ok(StatFs {
            blocks: img.data_size().div_ceil(BLOCK_SIZE as u64),
            bfree: 0,
            bavail: 0,
            files: img.manifest.inodes.len() as u64,
            ffree: 0,
            ..StatFs::default()
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let (i, node) = self.node(ino)?;
        if let InodeKind::File(f) = &node.kind {
            if name == XATTR_INCFS_ID {
                return Ok(incfs_wire::file_id_to_hex(&self.image().file_id(i)).into_bytes());
            }
            if name == XATTR_INCFS_SIZE {
                return Ok(f.size.to_le_bytes().to_vec());
            }
        }
        node.xattrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).ok_or(libc::ENODATA)
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        let (_, node) = self.node(ino)?;
        let mut names: Vec<Vec<u8>> = node.xattrs.iter().map(|(k, _)| k.clone()).collect();
        if matches!(node.kind, InodeKind::File(_)) {
            names.push(XATTR_INCFS_ID.to_vec());
            names.push(XATTR_INCFS_SIZE.to_vec());
        }
        Ok(names)
    }

    /// Holes are the all-zero blocks the image does not store (of the blocks whose hashes are
    /// loaded: the others count as data, which lseek allows).
    pub fn lseek(&self, ino: u64, _fh: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        let (idx, node) = self.node(ino)?;
        let InodeKind::File(f) = &node.kind else { return Err(libc::EINVAL) };
        if offset >= f.size {
            return Err(libc::ENXIO);
        }
        let first = (offset / BLOCK_SIZE as u64) as usize;
        let found = match whence as i32 {
            libc::SEEK_DATA => self.engine.seek_block(idx, first, false),
            libc::SEEK_HOLE => self.engine.seek_block(idx, first, true),
            _ => return Err(libc::EINVAL),
        }
        .map_err(|e| e.errno())?;
        match (found, whence as i32) {
            (Some(b), _) => Ok(((b * BLOCK_SIZE) as u64).max(offset).min(f.size)),
            (None, libc::SEEK_DATA) => Err(libc::ENXIO),
            (None, _) => Ok(f.size),
        }
    }
}
