//! The image as a read-only FUSE filesystem, over the block engine.
//!
//! FUSE inode numbers are image inode indexes plus one (the root is 1): stable for the life of
//! the mount and shared by hard links. The image never changes, so the guest may cache names,
//! attributes and pages for as long as it likes.
//!
//! Control inodes (bit 62 set, see [`crate::control`]) are the incfs-style special files
//! (`.pending_reads`, `.log`, `.fill`, ...); they are dispatched to [`Control`].

use std::sync::Arc;
use std::time::Duration;

use incfs_buf::ScatterBuf;
use incfs_fuse::{abi, Attr, Context, DirEntry, DirSink, Entry, Errno, FileSystem, Reply, StatFs};
use sha2::{Digest, Sha256};

use crate::control::{Control, Lookup};
use crate::engine::Engine;
use crate::image::{BlockKind, Image, Inode, InodeKind, BLOCK_SIZE};

/// Immutable data: a day is as good as forever, and stays well inside every guest's limits.
const TTL: Duration = Duration::from_secs(86400);

/// incfs's xattrs on every file: its 16-byte id (as 32 hex digits) and its size (le64).
pub const XATTR_INCFS_ID: &[u8] = b"user.incfs.id";
pub const XATTR_INCFS_SIZE: &[u8] = b"user.incfs.size";

pub struct ImageFs {
    engine: Arc<Engine>,
    control: Arc<Control>,
}

impl ImageFs {
    pub fn new(engine: Arc<Engine>) -> Self {
        let control = Control::new(engine.clone());
        ImageFs { engine, control }
    }

    /// The control channel (pending reads, read log, fill).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    fn image_entry(&self, idx: u32, entry_timeout: Duration) -> Entry {
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

    /// incfs file id: 16 bytes derived from the image and the inode, stable across mounts.
    pub fn file_id(&self, idx: u32) -> [u8; 16] {
        file_id(&self.image().id.0, idx)
    }
}

pub fn file_id(image: &[u8; 32], idx: u32) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"incfs file id");
    h.update(image);
    h.update(idx.to_le_bytes());
    let d = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    id
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

impl FileSystem for ImageFs {
    fn destroy(&self) {
        self.control.drop_handles();
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno> {
        if Control::is_control(parent) {
            return match self.control.lookup(parent, name)? {
                Lookup::Control(e) => Ok(e),
                Lookup::Image { idx, entry_timeout } => Ok(self.image_entry(idx, entry_timeout)),
            };
        }
        let (p, node) = self.node(parent)?;
        if !matches!(node.kind, InodeKind::Dir(_)) {
            return Err(libc::ENOTDIR);
        }
        match self.image().lookup(p, name) {
            Some(c) => Ok(self.image_entry(c, TTL)),
            // The image's own entries win: control names only fill the gaps at the root.
            None if parent == abi::ROOT_ID => self.control.lookup_root(name),
            None => Err(libc::ENOENT),
        }
    }

    fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno> {
        if Control::is_control(ino) {
            return self.control.getattr(ino);
        }
        let (i, node) = self.node(ino)?;
        Ok((self.attr(i, node), TTL))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match &self.node(ino)?.1.kind {
            InodeKind::Symlink(t) => Ok(t.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    fn open(&self, ino: u64, flags: u32) -> Result<(u64, u32), Errno> {
        if Control::is_control(ino) {
            return self.control.open(ino, flags);
        }
        let (_, node) = self.node(ino)?;
        if (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY || (flags as i32) & libc::O_TRUNC != 0 {
            return Err(libc::EROFS);
        }
        match node.kind {
            // Immutable: keep the guest's page cache across opens; never direct I/O, so mmap works.
            InodeKind::File(_) => Ok((0, abi::FOPEN_KEEP_CACHE)),
            InodeKind::Dir(_) => Err(libc::EISDIR),
            _ => Err(libc::EINVAL),
        }
    }

    fn read(&self, ino: u64, fh: u64, offset: u64, size: u32, ctx: &Context) -> Reply<Vec<u8>> {
        if Control::is_control(ino) {
            return self.control.read(ino, fh, offset, size, ctx);
        }
        let idx = match self.node(ino) {
            Ok((i, Inode { kind: InodeKind::File(_), .. })) => i,
            Ok((_, Inode { kind: InodeKind::Dir(_), .. })) => return Reply::err(libc::EISDIR),
            Ok(_) => return Reply::err(libc::EINVAL),
            Err(e) => return Reply::err(e),
        };
        self.control.note_read(idx, offset, size, ctx.uid);
        // Cached blocks are answered inline; a miss registers pending reads (one per missing
        // block, for `.pending_reads`) and parks the request on the runtime.
        match self.engine.read_cached(idx, offset, size) {
            Ok(Some(data)) => Reply::ok(data),
            Ok(None) => Reply::Pending(self.control.park_read(idx, offset, size, ctx.uid)),
            Err(e) => {
                let first = (offset / BLOCK_SIZE as u64).min(u32::MAX as u64) as u32;
                self.control.read_failed(self.control.file_id_of(idx), first, e.errno(), ctx.uid);
                Reply::err(e.errno())
            }
        }
    }

    fn read_direct(
        &self,
        ino: u64,
        _fh: u64,
        offset: u64,
        size: u32,
        ctx: &Context,
        buf: &mut ScatterBuf<'_>,
    ) -> Option<u32> {
        if Control::is_control(ino) {
            return None;
        }
        let Ok((idx, Inode { kind: InodeKind::File(_), .. })) = self.node(ino) else { return None };
        // Misses and errors take the ordinary path, which parks or reports them.
        let n = self.engine.read_cached_into(idx, offset, size, buf).ok()??;
        self.control.note_read(idx, offset, size, ctx.uid);
        Some(n)
    }

    fn write(&self, ino: u64, fh: u64, _offset: u64, data: &[u8], ctx: &Context) -> Reply<u32> {
        if Control::is_control(ino) {
            return self.control.write(ino, fh, data, ctx);
        }
        Reply::err(libc::EROFS)
    }

    fn release(&self, ino: u64, fh: u64) {
        if Control::is_control(ino) {
            self.control.release(fh);
        }
    }

    fn opendir(&self, ino: u64, _flags: u32) -> Result<(u64, u32), Errno> {
        if Control::is_control(ino) {
            return self.control.opendir(ino);
        }
        match self.node(ino)?.1.kind {
            // Listings never change either.
            InodeKind::Dir(_) => Ok((0, abi::FOPEN_KEEP_CACHE | abi::FOPEN_CACHE_DIR)),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn readdir(&self, ino: u64, _fh: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno> {
        if Control::is_control(ino) {
            return self.control.readdir(ino, offset, sink);
        }
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

    fn statfs(&self, _ino: u64) -> Result<StatFs, Errno> {
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

    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        if Control::is_control(ino) {
            return Err(libc::ENODATA);
        }
        let (i, node) = self.node(ino)?;
        if let InodeKind::File(f) = &node.kind {
            if name == XATTR_INCFS_ID {
                return Ok(hex::encode(self.file_id(i)).into_bytes());
            }
            if name == XATTR_INCFS_SIZE {
                return Ok(f.size.to_le_bytes().to_vec());
            }
        }
        node.xattrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).ok_or(libc::ENODATA)
    }

    fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        if Control::is_control(ino) {
            return Ok(Vec::new());
        }
        let (_, node) = self.node(ino)?;
        let mut names: Vec<Vec<u8>> = node.xattrs.iter().map(|(k, _)| k.clone()).collect();
        if matches!(node.kind, InodeKind::File(_)) {
            names.push(XATTR_INCFS_ID.to_vec());
            names.push(XATTR_INCFS_SIZE.to_vec());
        }
        Ok(names)
    }

    /// Holes are the all-zero blocks the image does not store.
    fn lseek(&self, ino: u64, _fh: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        if Control::is_control(ino) {
            return Err(libc::EINVAL);
        }
        let (_, node) = self.node(ino)?;
        let InodeKind::File(f) = &node.kind else { return Err(libc::EINVAL) };
        if offset >= f.size {
            return Err(libc::ENXIO);
        }
        let first = (offset / BLOCK_SIZE as u64) as usize;
        let is_hole = |r: &crate::image::BlockRef| r.kind == BlockKind::Zero;
        let found = match whence as i32 {
            libc::SEEK_DATA => f.blocks[first..].iter().position(|r| !is_hole(r)),
            libc::SEEK_HOLE => f.blocks[first..].iter().position(is_hole),
            _ => return Err(libc::EINVAL),
        };
        match (found, whence as i32) {
            (Some(k), _) => Ok((((first + k) * BLOCK_SIZE) as u64).max(offset).min(f.size)),
            (None, libc::SEEK_DATA) => Err(libc::ENXIO),
            (None, _) => Ok(f.size),
        }
    }
}
