//! The FUSE kernel ABI (include/uapi/linux/fuse.h), the subset a read-only virtio-fs server
//! needs, as `#[repr(C)]` plain-old-data structs.
//!
//! Every struct is made only of fixed-size integers with explicit padding fields, so any byte
//! pattern is a valid value: that is what makes [`ByteValued`] sound for them and lets
//! [`read_struct`] decode untrusted guest bytes without `unsafe`.

use vm_memory::ByteValued;

/// Protocol major version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// Highest protocol minor version we speak. 7.31 is the first version with everything we use
/// (MAX_PAGES, CACHE_SYMLINKS, map_alignment); newer guests (Linux 6.1 sends 7.37) are
/// answered with 7.31 and behave accordingly.
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// Oldest minor version we accept: init_out with max_pages needs 7.28; virtio-fs itself
/// appeared with 7.31 guests, so nothing older should ever talk to us.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 27;

/// Root inode number, fixed by the protocol.
pub const ROOT_ID: u64 = 1;

// Opcodes.
pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_READLINK: u32 = 5;
pub const FUSE_SYMLINK: u32 = 6;
pub const FUSE_MKNOD: u32 = 8;
pub const FUSE_MKDIR: u32 = 9;
pub const FUSE_UNLINK: u32 = 10;
pub const FUSE_RMDIR: u32 = 11;
pub const FUSE_RENAME: u32 = 12;
pub const FUSE_LINK: u32 = 13;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_SETXATTR: u32 = 21;
pub const FUSE_GETXATTR: u32 = 22;
pub const FUSE_LISTXATTR: u32 = 23;
pub const FUSE_REMOVEXATTR: u32 = 24;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_OPENDIR: u32 = 27;
pub const FUSE_READDIR: u32 = 28;
pub const FUSE_RELEASEDIR: u32 = 29;
pub const FUSE_FSYNCDIR: u32 = 30;
pub const FUSE_GETLK: u32 = 31;
pub const FUSE_SETLK: u32 = 32;
pub const FUSE_SETLKW: u32 = 33;
pub const FUSE_ACCESS: u32 = 34;
pub const FUSE_CREATE: u32 = 35;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_BMAP: u32 = 37;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_IOCTL: u32 = 39;
pub const FUSE_POLL: u32 = 40;
pub const FUSE_NOTIFY_REPLY: u32 = 41;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const FUSE_FALLOCATE: u32 = 43;
pub const FUSE_READDIRPLUS: u32 = 44;
pub const FUSE_RENAME2: u32 = 45;
pub const FUSE_LSEEK: u32 = 46;
pub const FUSE_COPY_FILE_RANGE: u32 = 47;
pub const FUSE_SETUPMAPPING: u32 = 48;
pub const FUSE_REMOVEMAPPING: u32 = 49;
pub const FUSE_SYNCFS: u32 = 50;
pub const FUSE_TMPFILE: u32 = 51;
pub const FUSE_STATX: u32 = 52;

// INIT flags (fuse_init_in.flags / fuse_init_out.flags).
pub const FUSE_ASYNC_READ: u32 = 1 << 0;
pub const FUSE_POSIX_LOCKS: u32 = 1 << 1;
pub const FUSE_FILE_OPS: u32 = 1 << 2;
pub const FUSE_ATOMIC_O_TRUNC: u32 = 1 << 3;
pub const FUSE_EXPORT_SUPPORT: u32 = 1 << 4;
pub const FUSE_BIG_WRITES: u32 = 1 << 5;
pub const FUSE_DONT_MASK: u32 = 1 << 6;
pub const FUSE_SPLICE_WRITE: u32 = 1 << 7;
pub const FUSE_SPLICE_MOVE: u32 = 1 << 8;
pub const FUSE_SPLICE_READ: u32 = 1 << 9;
pub const FUSE_FLOCK_LOCKS: u32 = 1 << 10;
pub const FUSE_HAS_IOCTL_DIR: u32 = 1 << 11;
pub const FUSE_AUTO_INVAL_DATA: u32 = 1 << 12;
pub const FUSE_DO_READDIRPLUS: u32 = 1 << 13;
pub const FUSE_READDIRPLUS_AUTO: u32 = 1 << 14;
pub const FUSE_ASYNC_DIO: u32 = 1 << 15;
pub const FUSE_WRITEBACK_CACHE: u32 = 1 << 16;
pub const FUSE_NO_OPEN_SUPPORT: u32 = 1 << 17;
pub const FUSE_PARALLEL_DIROPS: u32 = 1 << 18;
pub const FUSE_HANDLE_KILLPRIV: u32 = 1 << 19;
pub const FUSE_POSIX_ACL: u32 = 1 << 20;
pub const FUSE_ABORT_ERROR: u32 = 1 << 21;
pub const FUSE_MAX_PAGES: u32 = 1 << 22;
pub const FUSE_CACHE_SYMLINKS: u32 = 1 << 23;
pub const FUSE_NO_OPENDIR_SUPPORT: u32 = 1 << 24;
pub const FUSE_EXPLICIT_INVAL_DATA: u32 = 1 << 25;
pub const FUSE_MAP_ALIGNMENT: u32 = 1 << 26;
pub const FUSE_SUBMOUNTS: u32 = 1 << 27;
pub const FUSE_HANDLE_KILLPRIV_V2: u32 = 1 << 28;
pub const FUSE_SETXATTR_EXT: u32 = 1 << 29;
pub const FUSE_INIT_EXT: u32 = 1 << 30;

// fuse_open_out.open_flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_NONSEEKABLE: u32 = 1 << 2;
pub const FOPEN_CACHE_DIR: u32 = 1 << 3;
pub const FOPEN_STREAM: u32 = 1 << 4;
pub const FOPEN_NOFLUSH: u32 = 1 << 5;

// fuse_getattr_in.getattr_flags.
pub const FUSE_GETATTR_FH: u32 = 1 << 0;

// fuse_ioctl_in.flags.
pub const FUSE_IOCTL_COMPAT: u32 = 1 << 0;
pub const FUSE_IOCTL_UNRESTRICTED: u32 = 1 << 1;
pub const FUSE_IOCTL_RETRY: u32 = 1 << 2;
pub const FUSE_IOCTL_32BIT: u32 = 1 << 3;
pub const FUSE_IOCTL_DIR: u32 = 1 << 4;

/// Longest name the kernel sends in LOOKUP and friends (NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest xattr name (XATTR_NAME_MAX) and value / list (XATTR_SIZE_MAX).
pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_SIZE_MAX: usize = 65536;

macro_rules! pod {
    ($($t:ident),* $(,)?) => {
        $(
            // SAFETY: `$t` is `#[repr(C)]`, made only of integer fields (arrays of integers
            // included) with explicit padding, so it has no padding bytes and every bit
            // pattern is a valid value.
            unsafe impl ByteValued for $t {}
        )*
    };
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
    pub padding: u16,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutHeader {
    pub len: u32,
    /// Zero or a negative errno.
    pub error: i32,
    pub unique: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    // Present only since 7.36 (the guest then sets FUSE_INIT_EXT); older guests send the first
    // 16 bytes only, and the decoder zero-fills the rest.
    pub flags2: u32,
    pub unused: [u32; 11],
}

/// Size of the pre-7.36 init_in, the least a guest may send.
pub const INIT_IN_COMPAT_SIZE: usize = 16;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
    pub map_alignment: u16,
    pub flags2: u32,
    pub unused: [u32; 7],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetattrIn {
    pub getattr_flags: u32,
    pub dummy: u32,
    pub fh: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForgetIn {
    pub nlookup: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchForgetIn {
    pub count: u32,
    pub dummy: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ForgetOne {
    pub nodeid: u64,
    pub nlookup: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushIn {
    pub fh: u64,
    pub unused: u32,
    pub padding: u32,
    pub lock_owner: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub write_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteOut {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Kstatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatfsOut {
    pub st: Kstatfs,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetxattrIn {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GetxattrOut {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AccessIn {
    pub mask: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InterruptIn {
    pub unique: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LseekIn {
    pub fh: u64,
    pub offset: u64,
    pub whence: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LseekOut {
    pub offset: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoctlIn {
    pub fh: u64,
    pub flags: u32,
    pub cmd: u32,
    pub arg: u64,
    pub in_size: u32,
    pub out_size: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoctlOut {
    pub result: i32,
    pub flags: u32,
    pub in_iovs: u32,
    pub out_iovs: u32,
}

/// Fixed part of a READDIR entry; the name follows, then zero padding to 8 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub typ: u32,
}

/// Fixed part of a READDIRPLUS entry; the name follows, then zero padding to 8 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Direntplus {
    pub entry_out: EntryOut,
    pub dirent: Dirent,
}

pod!(
    InHeader,
    OutHeader,
    InitIn,
    InitOut,
    Attr,
    EntryOut,
    AttrOut,
    GetattrIn,
    ForgetIn,
    BatchForgetIn,
    ForgetOne,
    OpenIn,
    OpenOut,
    ReleaseIn,
    FlushIn,
    ReadIn,
    WriteIn,
    WriteOut,
    Kstatfs,
    StatfsOut,
    GetxattrIn,
    GetxattrOut,
    AccessIn,
    InterruptIn,
    LseekIn,
    LseekOut,
    IoctlIn,
    IoctlOut,
    Dirent,
    Direntplus,
);

// The sizes the kernel uses; a mismatch here would be a silent protocol break.
const _: () = {
    use std::mem::size_of;
    assert!(size_of::<InHeader>() == 40);
    assert!(size_of::<OutHeader>() == 16);
    assert!(size_of::<InitIn>() == 64);
    assert!(size_of::<InitOut>() == 64);
    assert!(size_of::<Attr>() == 88);
    assert!(size_of::<EntryOut>() == 128);
    assert!(size_of::<AttrOut>() == 104);
    assert!(size_of::<GetattrIn>() == 16);
    assert!(size_of::<ForgetOne>() == 16);
    assert!(size_of::<OpenOut>() == 16);
    assert!(size_of::<ReleaseIn>() == 24);
    assert!(size_of::<FlushIn>() == 24);
    assert!(size_of::<ReadIn>() == 40);
    assert!(size_of::<WriteIn>() == 40);
    assert!(size_of::<Kstatfs>() == 80);
    assert!(size_of::<LseekIn>() == 24);
    assert!(size_of::<IoctlIn>() == 32);
    assert!(size_of::<IoctlOut>() == 16);
    assert!(size_of::<Dirent>() == 24);
    assert!(size_of::<Direntplus>() == 152);
};

/// Rounds a dirent record length up to the 8-byte alignment the kernel expects
/// (FUSE_DIRENT_ALIGN).
pub const fn dirent_align(len: usize) -> usize {
    (len + 7) & !7
}

/// Decodes a `T` from the front of `buf`, returning it and the rest of the buffer, or `None`
/// if `buf` is too short. Never reads past `buf` and has no alignment requirement.
pub fn read_struct<T: ByteValued + Default>(buf: &[u8]) -> Option<(T, &[u8])> {
    let size = std::mem::size_of::<T>();
    let bytes = buf.get(..size)?;
    let mut val = T::default();
    val.as_mut_slice().copy_from_slice(bytes);
    Some((val, &buf[size..]))
}

/// Like [`read_struct`], but accepts a prefix of at least `min` bytes and zero-fills the rest:
/// for structs that grew over protocol versions (init_in).
pub fn read_struct_prefix<T: ByteValued + Default>(buf: &[u8], min: usize) -> Option<(T, &[u8])> {
    let size = std::mem::size_of::<T>();
    if buf.len() < min {
        return None;
    }
    let take = buf.len().min(size);
    let mut val = T::default();
    val.as_mut_slice()[..take].copy_from_slice(&buf[..take]);
    Some((val, &buf[take..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_struct_checks_length() {
        let bytes = [1u8; 39];
        assert!(read_struct::<InHeader>(&bytes).is_none());
        let bytes = [1u8; 41];
        let (h, rest) = read_struct::<InHeader>(&bytes).expect("long enough");
        assert_eq!(h.len, 0x0101_0101);
        assert_eq!(rest.len(), 1);
    }

    #[test]
    fn read_struct_unaligned() {
        let mut bytes = [0u8; 17];
        bytes[1..9].copy_from_slice(&7u64.to_ne_bytes());
        let (v, _) = read_struct::<ForgetIn>(&bytes[1..]).expect("long enough");
        assert_eq!(v.nlookup, 7);
    }

    #[test]
    fn prefix_zero_fills() {
        let bytes = [2u8; 16];
        let (v, rest) = read_struct_prefix::<InitIn>(&bytes, INIT_IN_COMPAT_SIZE).expect("ok");
        assert_eq!(v.flags, 0x0202_0202);
        assert_eq!(v.flags2, 0);
        assert!(rest.is_empty());
        assert!(read_struct_prefix::<InitIn>(&bytes[..15], INIT_IN_COMPAT_SIZE).is_none());
    }

    #[test]
    fn align() {
        assert_eq!(dirent_align(24), 24);
        assert_eq!(dirent_align(25), 32);
        assert_eq!(dirent_align(31), 32);
    }
}
