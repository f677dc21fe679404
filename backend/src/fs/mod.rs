//! The mount a guest sees: the image's inodes ([`image`]) with the control channel's special
//! files ([`crate::control`]) beside them. [`MountFs`] is the FUSE filesystem; it routes each
//! request once, by inode number, to the side that owns it. Control inodes live in their own
//! number space (bit 62 set), far above any image inode.

pub mod image;

use std::sync::Arc;
use std::time::Duration;

use incfs_buf::ScatterBuf;
use incfs_fuse::{abi, Attr, Context, DirSink, Entry, Errno, FileSystem, ReadReply, Reply, StatFs};

pub use image::{ImageTree, ReadObserver, XATTR_INCFS_ID, XATTR_INCFS_SIZE};

use crate::control::{Control, Lookup};
use crate::engine::Engine;

/// Which side of the mount an inode belongs to.
enum Side {
    Image,
    Control,
}

fn side(ino: u64) -> Side {
    if Control::is_control(ino) {
        Side::Control
    } else {
        Side::Image
    }
}

pub struct MountFs {
    image: ImageTree,
    control: Arc<Control>,
}

impl MountFs {
    pub fn new(engine: Arc<Engine>) -> Self {
        let control = Control::new(engine.clone());
        MountFs { image: ImageTree::new(engine, control.clone()), control }
    }

    /// The control channel (pending reads, read log, fill).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }
}

impl FileSystem for MountFs {
    fn destroy(&self) {
        self.control.drop_handles();
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno> {
        match side(parent) {
            Side::Control => match self.control.lookup(parent, name)? {
                Lookup::Control(e) => Ok(e),
                Lookup::Image { idx, entry_timeout } => Ok(self.image.image_entry(idx, entry_timeout)),
            },
            // The image's own entries win: control names only fill the gaps at the root.
            Side::Image => match self.image.lookup(parent, name) {
                Err(libc::ENOENT) if parent == abi::ROOT_ID => self.control.lookup_root(name),
                r => r,
            },
        }
    }

    fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno> {
        match side(ino) {
            Side::Control => self.control.getattr(ino),
            Side::Image => self.image.getattr(ino),
        }
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        match side(ino) {
            Side::Control => Err(libc::ENOENT),
            Side::Image => self.image.readlink(ino),
        }
    }

    fn open(&self, ino: u64, flags: u32) -> Result<(u64, u32), Errno> {
        match side(ino) {
            Side::Control => self.control.open(ino, flags),
            Side::Image => self.image.open(ino, flags),
        }
    }

    fn read(&self, ino: u64, fh: u64, offset: u64, size: u32, ctx: &Context, out: &mut ScatterBuf<'_>) -> ReadReply {
        match side(ino) {
            Side::Control => ReadReply::bytes(self.control.read(ino, fh, offset, size, ctx), size, out),
            Side::Image => self.image.read(ino, offset, size, ctx, out),
        }
    }

    fn write(&self, ino: u64, fh: u64, _offset: u64, data: &[u8], ctx: &Context) -> Reply<u32> {
        match side(ino) {
            Side::Control => self.control.write(ino, fh, data, ctx),
            Side::Image => Reply::err(libc::EROFS),
        }
    }

    fn release(&self, ino: u64, fh: u64) {
        if let Side::Control = side(ino) {
            self.control.release(fh);
        }
    }

    fn opendir(&self, ino: u64, flags: u32) -> Result<(u64, u32), Errno> {
        match side(ino) {
            Side::Control => self.control.opendir(ino),
            Side::Image => self.image.opendir(ino, flags),
        }
    }

    fn readdir(&self, ino: u64, fh: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno> {
        match side(ino) {
            Side::Control => self.control.readdir(ino, offset, sink),
            Side::Image => self.image.readdir(ino, fh, offset, sink),
        }
    }

    fn statfs(&self, ino: u64) -> Result<StatFs, Errno> {
        self.image.statfs(ino)
    }

    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        match side(ino) {
            Side::Control => Err(libc::ENODATA),
            Side::Image => self.image.getxattr(ino, name),
        }
    }

    fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        match side(ino) {
            Side::Control => Ok(Vec::new()),
            Side::Image => self.image.listxattr(ino),
        }
    }

    fn lseek(&self, ino: u64, fh: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        match side(ino) {
            Side::Control => Err(libc::EINVAL),
            Side::Image => self.image.lseek(ino, fh, offset, whence),
        }
    }
}
