//! The incremental image format: a manifest (the tree, and each file's root hash and where its
//! block index is) and content-addressed blobs of compressed blocks and file indexes.
//! Specified in docs/image-format.md.

pub mod index;
pub mod merkle;

use std::fmt;
use std::io::{Read, Write};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const BLOCK_SIZE: usize = 4096;
pub const MAGIC: &[u8; 8] = b"INCFSIMG";
/// The version the packer writes: each file's block index in the blobs (`index.rs`).
/// Versions 1 (every block's hash and location in the manifest) and 2 (the same with a
/// dictionary) are still read, and written by `pack --inline-hashes`.
pub const VERSION: u32 = 3;
/// Versions this reader decodes.
pub const VERSIONS: std::ops::RangeInclusive<u32> = 1..=3;
/// Largest zstd dictionary a manifest may name: a reader holds it, prepared, per image.
pub const DICT_MAX: u64 = 1 << 20;
/// `dict_blob` of a version-2 manifest without a dictionary.
const NO_DICT: u32 = u32::MAX;

/// Longest name, symlink target and xattr the format accepts; Linux's own limits.
pub const NAME_MAX: usize = 255;
pub const PATH_MAX: usize = 4096;
pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_VALUE_MAX: usize = 65536;

pub type Hash = [u8; 32];

/// A stored manifest is the canonical bytes, or those bytes in one zstd frame.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Largest manifest a reader accepts (after decompression): the format's limit
/// (docs/image-format.md). A manifest costs 33 to 49 bytes per 4 KiB block, so this covers
/// images of some 170 GiB of data, and more of zero blocks.
pub const MANIFEST_MAX: u64 = 1 << 31;
/// zstd level for stored manifests: block hashes do not compress, everything else does.
const MANIFEST_LEVEL: i32 = 12;

/// The bytes to store for a manifest.
pub fn store_manifest(canonical: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(canonical, MANIFEST_LEVEL)
        .ok()
        .filter(|c| c.len() < canonical.len())
        .unwrap_or_else(|| canonical.to_vec())
}

/// Writes the canonical bytes of a stored manifest to `sink` (decompressed if need be, never
/// past MANIFEST_MAX); returns how many.
fn unstore_into(stored: &[u8], sink: &mut impl Write) -> Result<u64> {
    let too_big = || Error::Manifest(format!("manifest larger than {MANIFEST_MAX} bytes"));
    if !stored.starts_with(&ZSTD_MAGIC) {
        if stored.len() as u64 > MANIFEST_MAX {
            return Err(too_big());
        }
        sink.write_all(stored).map_err(|e| Error::Manifest(format!("copy: {e}")))?;
        return Ok(stored.len() as u64);
    }
    let dec = zstd::stream::read::Decoder::with_buffer(stored).map_err(|e| Error::Manifest(format!("zstd: {e}")))?;
    let n = std::io::copy(&mut dec.take(MANIFEST_MAX + 1), sink).map_err(|e| Error::Manifest(format!("zstd: {e}")))?;
    if n > MANIFEST_MAX {
        return Err(too_big());
    }
    Ok(n)
}

/// The canonical manifest bytes from stored ones (decompressed if need be, never past
/// MANIFEST_MAX). Stored bytes from a store are hostile until `verify_stored_manifest`
/// passed: a small zstd frame can claim gigabytes.
pub fn manifest_from_stored(stored: Vec<u8>) -> Result<Vec<u8>> {
    if !stored.starts_with(&ZSTD_MAGIC) {
        return Ok(stored);
    }
    let mut out = Vec::new();
    unstore_into(&stored, &mut out)?;
    Ok(out)
}

/// Checks that stored manifest bytes are the manifest of `id`, without holding the
/// decompressed bytes: they are hashed as they come out of the decoder, so hostile bytes cost
/// at most MANIFEST_MAX bytes of decompression work and no memory.
pub fn verify_stored_manifest(stored: &[u8], id: &ImageId) -> Result<()> {
    struct HashSink(Sha256);
    impl Write for HashSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.update(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut sink = HashSink(Sha256::new());
    unstore_into(stored, &mut sink)?;
    let actual = ImageId(sink.0.finalize().into());
    if actual != *id {
        return Err(Error::ImageIdMismatch { expected: id.to_string(), actual: actual.to_string() });
    }
    Ok(())
}

/// SHA-256 of the manifest bytes: names an image and, through the manifest, every byte of it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId(pub Hash);

impl ImageId {
    pub fn of_manifest(bytes: &[u8]) -> Self {
        ImageId(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageId({self})")
    }
}

impl FromStr for ImageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_hash(s).map(ImageId)
    }
}

pub fn parse_hash(s: &str) -> Result<Hash> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut h)
        .map_err(|_| Error::Invalid(format!("{s:?} is not a 64-digit hex SHA-256")))?;
    Ok(h)
}

/// How one block is stored in its blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockKind {
    /// Stored as is (compression did not shrink it); incfs COMPRESSION_NONE.
    Raw = 0,
    /// zstd frame; incfs COMPRESSION_ZSTD.
    Zstd = 2,
    /// All zeroes: not stored, never fetched.
    Zero = 3,
    /// zstd frame compressed with the image's dictionary (format version 2); decompresses to
    /// at most 4096 bytes.
    ZstdDict = 4,
}

impl BlockKind {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(BlockKind::Raw),
            2 => Some(BlockKind::Zstd),
            3 => Some(BlockKind::Zero),
            4 => Some(BlockKind::ZstdDict),
            _ => None,
        }
    }
}

/// One 4096-byte block of a file: its leaf hash and where its stored bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    pub hash: Hash,
    pub kind: BlockKind,
    pub blob: u32,
    pub len: u32,
    pub offset: u64,
}

/// Bytes a range request may carry between two blocks it fetches together: a one-segment
/// file's index (6,272 bytes at most) between two files' data costs less than a round trip.
pub const MAX_GAP: u64 = 8 << 10;

impl BlockRef {
    /// True when `next` is stored after `self` in the same blob, at most `MAX_GAP` bytes on:
    /// one range covers both.
    pub fn adjoins(&self, next: &BlockRef) -> bool {
        let end = self.offset + self.len as u64;
        self.kind != BlockKind::Zero
            && next.kind != BlockKind::Zero
            && self.blob == next.blob
            && next.offset >= end
            && next.offset - end <= MAX_GAP
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    pub id: Hash,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileData {
    pub size: u64,
    /// Merkle root (the file's digest), fs-verity layout.
    pub root: Hash,
    pub table: BlockTable,
}

/// Where a file's block hashes and locations are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockTable {
    /// In the manifest (versions 1 and 2; and every empty file).
    Inline(Vec<BlockRef>),
    /// In the file's index, stored in a blob (version 3): fetched on demand.
    Index { blob: u32, offset: u64 },
}

impl FileData {
    pub fn nblocks(&self) -> usize {
        usize::try_from(index::blocks_of(self.size)).unwrap_or(usize::MAX)
    }

    /// The blocks, when the manifest holds them.
    pub fn inline(&self) -> Option<&[BlockRef]> {
        match &self.table {
            BlockTable::Inline(b) => Some(b),
            BlockTable::Index { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InodeKind {
    /// Entries sorted by name bytes.
    Dir(Vec<DirEntry>),
    File(FileData),
    Symlink(Vec<u8>),
    /// Device node, fifo or socket: metadata only.
    Special {
        rdev: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// st_mode, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub kind: InodeKind,
}

/// The decoded manifest. Inode 0 is the root directory.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Manifest {
    pub blobs: Vec<Blob>,
    pub inodes: Vec<Inode>,
    /// The blob holding the image's zstd dictionary (the whole blob; its id is its SHA-256),
    /// if any: blocks of kind `ZstdDict` need it. Only version 2 can name one.
    pub dictionary: Option<u32>,
}

// Inode kinds on disk.
const K_DIR: u8 = 1;
const K_FILE: u8 = 2;
const K_SYMLINK: u8 = 3;
const K_SPECIAL: u8 = 4;

impl Manifest {
    /// The canonical encoding; its SHA-256 is the image id.
    /// Version 3 when any file's blocks are in an index, else 1 or 2 (with a dictionary).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::with_capacity(64 + self.inodes.len() * 64);
        w.extend_from_slice(MAGIC);
        let indexed = self.is_indexed();
        match (indexed, self.dictionary) {
            (false, None) => {
                put32(&mut w, 1);
                put32(&mut w, 0);
            }
            (false, Some(d)) => {
                put32(&mut w, 2);
                put32(&mut w, 0);
                put32(&mut w, d);
            }
            (true, d) => {
                put32(&mut w, 3);
                put32(&mut w, 0);
                put32(&mut w, d.unwrap_or(NO_DICT));
            }
        }
        put32(&mut w, self.blobs.len() as u32);
        for b in &self.blobs {
            w.extend_from_slice(&b.id);
            put64(&mut w, b.size);
        }
        put32(&mut w, self.inodes.len() as u32);
        for ino in &self.inodes {
            let kind = match ino.kind {
                InodeKind::Dir(_) => K_DIR,
                InodeKind::File(_) => K_FILE,
                InodeKind::Symlink(_) => K_SYMLINK,
                InodeKind::Special { .. } => K_SPECIAL,
            };
            w.push(kind);
            put32(&mut w, ino.mode);
            put32(&mut w, ino.uid);
            put32(&mut w, ino.gid);
            put64(&mut w, ino.mtime_sec as u64);
            put32(&mut w, ino.mtime_nsec);
            put32(&mut w, ino.xattrs.len() as u32);
            for (k, v) in &ino.xattrs {
                put16(&mut w, k.len() as u16);
                w.extend_from_slice(k);
                put32(&mut w, v.len() as u32);
                w.extend_from_slice(v);
            }
            match &ino.kind {
                InodeKind::Dir(entries) => {
                    put32(&mut w, entries.len() as u32);
                    for e in entries {
                        put16(&mut w, e.name.len() as u16);
                        w.extend_from_slice(&e.name);
                        put32(&mut w, e.ino);
                    }
                }
                InodeKind::File(f) => {
                    put64(&mut w, f.size);
                    w.extend_from_slice(&f.root);
                    match (&f.table, indexed) {
                        (BlockTable::Inline(blocks), false) => {
                            for b in blocks {
                                w.push(b.kind as u8);
                                w.extend_from_slice(&b.hash);
                                if b.kind != BlockKind::Zero {
                                    put32(&mut w, b.blob);
                                    put64(&mut w, b.offset);
                                    put32(&mut w, b.len);
                                }
                            }
                        }
                        _ if f.size == 0 => {}
                        (BlockTable::Index { blob, offset }, _) => {
                            put32(&mut w, *blob);
                            put64(&mut w, *offset);
                        }
                        // Never written by the packer (it does not mix the two); decoding
                        // refuses it.
                        (BlockTable::Inline(_), true) => {
                            put32(&mut w, u32::MAX);
                            put64(&mut w, 0);
                        }
                    }
                }
                InodeKind::Symlink(t) => {
                    put32(&mut w, t.len() as u32);
                    w.extend_from_slice(t);
                }
                InodeKind::Special { rdev } => put64(&mut w, *rdev),
            }
        }
        w
    }

    /// Whether files keep their blocks in indexes (version 3).
    pub fn is_indexed(&self) -> bool {
        self.inodes.iter().any(|i| matches!(&i.kind, InodeKind::File(FileData { table: BlockTable::Index { .. }, .. })))
    }

    /// The blob holding the dictionary, if any.
    pub fn blocks_dictionary(&self) -> Option<&Blob> {
        self.blobs.get(self.dictionary? as usize)
    }

    /// Decodes and validates a manifest. Every count and length is checked against the bytes
    /// that remain, so a hostile manifest cannot make us allocate or index out of bounds.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(bad("not an incfs image manifest (bad magic)"));
        }
        let version = r.u32()?;
        if !VERSIONS.contains(&version) {
            return Err(bad(&format!(
                "image format version {version}, this incfsd reads versions {} to {}: re-pack the image or use a newer incfsd",
                VERSIONS.start(),
                VERSIONS.end()
            )));
        }
        let _flags = r.u32()?;
        let dict_blob = if version >= 2 { r.u32()? } else { NO_DICT };
        let nblobs = r.count(40)?;
        let mut blobs = Vec::with_capacity(nblobs);
        for _ in 0..nblobs {
            blobs.push(Blob { id: r.hash()?, size: r.u64()? });
        }
        // Version 2 names its dictionary: a whole blob, at most DICT_MAX bytes, holding no block.
        let dictionary = match dict_blob {
            NO_DICT => None,
            d => match blobs.get(d as usize) {
                Some(b) if b.size > 0 && b.size <= DICT_MAX => Some(d),
                Some(_) => return Err(bad(&format!("dictionary blob empty or larger than {DICT_MAX} bytes"))),
                None => return Err(bad("dictionary in an unknown blob")),
            },
        };
        if version == 2 && dictionary.is_none() {
            return Err(bad("version 2 manifest without a dictionary (written as version 1)"));
        }
        let ninodes = r.count(29)?;
        let mut inodes = Vec::with_capacity(ninodes);
        for _ in 0..ninodes {
            let kind = r.u8()?;
            let mode = r.u32()?;
            let uid = r.u32()?;
            let gid = r.u32()?;
            let mtime_sec = r.u64()? as i64;
            let mtime_nsec = r.u32()?;
            let nx = r.count(6)?;
            let mut xattrs = Vec::with_capacity(nx);
            for _ in 0..nx {
                let kl = r.u16()? as usize;
                if kl == 0 || kl > XATTR_NAME_MAX {
                    return Err(bad("xattr name length out of range"));
                }
                let k = r.take(kl)?.to_vec();
                let vl = r.u32()? as usize;
                if vl > XATTR_VALUE_MAX {
                    return Err(bad("xattr value too long"));
                }
                xattrs.push((k, r.take(vl)?.to_vec()));
            }
            if !xattrs.windows(2).all(|p| p[0].0 < p[1].0) {
                return Err(bad("xattrs not sorted or duplicated"));
            }
            let kind = match kind {
                K_DIR => {
                    let n = r.count(7)?;
                    let mut entries = Vec::with_capacity(n);
                    for _ in 0..n {
                        let nl = r.u16()? as usize;
                        let name = r.take(nl)?.to_vec();
                        if !valid_name(&name) {
                            return Err(bad("invalid directory entry name"));
                        }
                        entries.push(DirEntry { name, ino: r.u32()? });
                    }
                    if !entries.windows(2).all(|p| p[0].name < p[1].name) {
                        return Err(bad("directory entries not sorted or duplicated"));
                    }
                    InodeKind::Dir(entries)
                }
                K_FILE if version >= 3 => {
                    let size = r.u64()?;
                    let root = r.hash()?;
                    if size == 0 {
                        if root != [0; 32] {
                            return Err(bad("empty file with a non-zero root"));
                        }
                        InodeKind::File(FileData { size, root, table: BlockTable::Inline(Vec::new()) })
                    } else {
                        let (blob, offset) = (r.u32()?, r.u64()?);
                        let nblocks = index::blocks_of(size);
                        if nblocks > u32::MAX as u64 {
                            return Err(bad("file too large"));
                        }
                        if dictionary == Some(blob) {
                            return Err(bad("file index inside the dictionary blob"));
                        }
                        let b = blobs.get(blob as usize).ok_or_else(|| bad("file index in unknown blob"))?;
                        let end = offset.checked_add(index::index_len(nblocks));
                        if end.is_none_or(|e| e > b.size) {
                            return Err(bad("file index outside its blob"));
                        }
                        InodeKind::File(FileData { size, root, table: BlockTable::Index { blob, offset } })
                    }
                }
                K_FILE => {
                    let size = r.u64()?;
                    let root = r.hash()?;
                    let nblocks = size.div_ceil(BLOCK_SIZE as u64);
                    if nblocks > u32::MAX as u64 || nblocks > (r.remaining() / 33) as u64 {
                        return Err(bad("file block table truncated"));
                    }
                    let mut blocks = Vec::with_capacity(nblocks as usize);
                    for _ in 0..nblocks {
                        let k = BlockKind::from_u8(r.u8()?).ok_or_else(|| bad("unknown block kind"))?;
                        let hash = r.hash()?;
                        let (blob, offset, len) =
                            if k == BlockKind::Zero { (0, 0, 0) } else { (r.u32()?, r.u64()?, r.u32()?) };
                        if k == BlockKind::ZstdDict && dictionary.is_none() {
                            return Err(bad("dictionary-compressed block in an image without a dictionary"));
                        }
                        if k != BlockKind::Zero {
                            if dictionary == Some(blob) {
                                return Err(bad("block inside the dictionary blob"));
                            }
                            let b = blobs.get(blob as usize).ok_or_else(|| bad("block in unknown blob"))?;
                            let end = offset.checked_add(len as u64);
                            if len == 0 || len as usize > 2 * BLOCK_SIZE || end.is_none_or(|e| e > b.size) {
                                return Err(bad("block location outside its blob"));
                            }
                        } else if hash != merkle::zero_leaf() {
                            return Err(bad("zero block with a non-zero hash"));
                        }
                        blocks.push(BlockRef { hash, kind: k, blob, len, offset });
                    }
                    InodeKind::File(FileData { size, root, table: BlockTable::Inline(blocks) })
                }
                K_SYMLINK => {
                    let n = r.u32()? as usize;
                    if n == 0 || n > PATH_MAX {
                        return Err(bad("symlink target length out of range"));
                    }
                    InodeKind::Symlink(r.take(n)?.to_vec())
                }
                K_SPECIAL => InodeKind::Special { rdev: r.u64()? },
                _ => return Err(bad("unknown inode kind")),
            };
            inodes.push(Inode { mode, uid, gid, mtime_sec, mtime_nsec, xattrs, kind });
        }
        if r.remaining() != 0 {
            return Err(bad("trailing bytes"));
        }
        let m = Manifest { blobs, inodes, dictionary };
        m.check_tree()?;
        Ok(m)
    }

    /// The directory graph must be a tree rooted at inode 0 (hard links are files only), and
    /// every file's root hash must match its leaves.
    fn check_tree(&self) -> Result<()> {
        if !matches!(self.inodes.first(), Some(Inode { kind: InodeKind::Dir(_), .. })) {
            return Err(bad("inode 0 is not a directory"));
        }
        let mut dir_refs = vec![0u32; self.inodes.len()];
        for ino in &self.inodes {
            if let InodeKind::Dir(entries) = &ino.kind {
                for e in entries {
                    let child = self.inodes.get(e.ino as usize).ok_or_else(|| bad("entry names unknown inode"))?;
                    if e.ino == 0 {
                        return Err(bad("entry names the root"));
                    }
                    if matches!(child.kind, InodeKind::Dir(_)) {
                        dir_refs[e.ino as usize] += 1;
                        if dir_refs[e.ino as usize] > 1 {
                            return Err(bad("directory linked twice"));
                        }
                    }
                }
            }
        }
        // Every directory but the root is referenced once; reachable from the root (no cycle).
        let mut seen = vec![false; self.inodes.len()];
        let mut stack = vec![0u32];
        seen[0] = true;
        while let Some(d) = stack.pop() {
            if let InodeKind::Dir(entries) = &self.inodes[d as usize].kind {
                for e in entries {
                    if matches!(self.inodes[e.ino as usize].kind, InodeKind::Dir(_)) {
                        if seen[e.ino as usize] {
                            return Err(bad("directory cycle"));
                        }
                        seen[e.ino as usize] = true;
                        stack.push(e.ino);
                    }
                }
            }
        }
        for (i, ino) in self.inodes.iter().enumerate() {
            match &ino.kind {
                InodeKind::Dir(_) if !seen[i] => return Err(bad("unreachable directory")),
                // An index is checked against the root when it is fetched.
                InodeKind::File(FileData { table: BlockTable::Inline(blocks), root, .. }) => {
                    let leaves: Vec<Hash> = blocks.iter().map(|b| b.hash).collect();
                    if merkle::root_hash(&leaves) != *root {
                        return Err(bad("file root hash does not match its blocks"));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

fn bad(what: &str) -> Error {
    Error::Manifest(what.to_string())
}

fn put16(w: &mut Vec<u8>, v: u16) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put32(w: &mut Vec<u8>, v: u32) {
    w.extend_from_slice(&v.to_le_bytes());
}
fn put64(w: &mut Vec<u8>, v: u64) {
    w.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(bad("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        self.arr().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32> {
        self.arr().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64> {
        self.arr().map(u64::from_le_bytes)
    }
    fn hash(&mut self) -> Result<Hash> {
        self.arr()
    }
    /// A count of items each at least `min_size` bytes long: bounded by what remains.
    fn count(&mut self, min_size: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.remaining() {
            return Err(bad("count exceeds the bytes that follow"));
        }
        Ok(n)
    }
}

/// A loaded, verified image with the lookups the filesystem and engine need.
#[derive(Debug)]
pub struct Image {
    pub id: ImageId,
    pub manifest: Manifest,
    /// Parent of each directory inode (root's parent is itself); other inodes: u32::MAX.
    pub parent: Vec<u32>,
    /// Link count per inode.
    pub nlink: Vec<u32>,
    /// For each file inode, the next file inode in inode order, which is the packer's blob
    /// order (u32::MAX for the last one and for non-files): readahead may continue there.
    pub next_file: Vec<u32>,
}

impl Image {
    /// Verifies `bytes` hash to `id`, then decodes them.
    pub fn from_manifest_bytes(id: ImageId, bytes: &[u8]) -> Result<Self> {
        let actual = ImageId::of_manifest(bytes);
        if actual != id {
            return Err(Error::ImageIdMismatch { expected: id.to_string(), actual: actual.to_string() });
        }
        let manifest = Manifest::decode(bytes)?;
        let n = manifest.inodes.len();
        let mut parent = vec![u32::MAX; n];
        let mut nlink = vec![0u32; n];
        parent[0] = 0;
        nlink[0] = 2;
        for (i, ino) in manifest.inodes.iter().enumerate() {
            if let InodeKind::Dir(entries) = &ino.kind {
                for e in entries {
                    let c = e.ino as usize;
                    if matches!(manifest.inodes[c].kind, InodeKind::Dir(_)) {
                        parent[c] = i as u32;
                        nlink[c] += 2; // its entry and its own "."
                        nlink[i] += 1; // the child's ".."
                    } else {
                        nlink[c] += 1;
                    }
                }
            }
        }
        let mut next_file = vec![u32::MAX; n];
        let mut prev: Option<usize> = None;
        for (i, ino) in manifest.inodes.iter().enumerate() {
            if matches!(ino.kind, InodeKind::File(_)) {
                if let Some(p) = prev {
                    next_file[p] = i as u32;
                }
                prev = Some(i);
            }
        }
        Ok(Image { id, manifest, parent, nlink, next_file })
    }

    /// The blob holding the image's zstd dictionary, if it has one.
    pub fn dictionary(&self) -> Option<&Blob> {
        self.manifest.blocks_dictionary()
    }

    pub fn inode(&self, ino: u32) -> Option<&Inode> {
        self.manifest.inodes.get(ino as usize)
    }

    pub fn file(&self, ino: u32) -> Option<&FileData> {
        match &self.inode(ino)?.kind {
            InodeKind::File(f) => Some(f),
            _ => None,
        }
    }

    pub fn lookup(&self, dir: u32, name: &[u8]) -> Option<u32> {
        match &self.inode(dir)?.kind {
            InodeKind::Dir(entries) => {
                entries.binary_search_by(|e| e.name.as_slice().cmp(name)).ok().map(|i| entries[i].ino)
            }
            _ => None,
        }
    }

    /// The incfs file id of inode `idx`: 16 bytes derived from the image and the inode,
    /// stable across mounts and hosts.
    pub fn file_id(&self, idx: u32) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(b"incfs file id");
        h.update(self.id.0);
        h.update(idx.to_le_bytes());
        let d = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        id
    }

    /// Resolves a '/'-separated path from the root (no symlinks followed). Paths come from
    /// hostile traces: `..` at the root stays there, and any component after a non-directory
    /// (even `.`, `..` or a trailing `/`) names nothing, as ENOTDIR would.
    pub fn resolve(&self, path: &[u8]) -> Option<u32> {
        let mut cur = 0u32;
        for part in path.split(|&c| c == b'/') {
            if !matches!(self.inode(cur)?.kind, InodeKind::Dir(_)) {
                return None;
            }
            cur = match part {
                b"" | b"." => cur,
                b".." => *self.parent.get(cur as usize).filter(|&&p| p != u32::MAX)?,
                name => self.lookup(cur, name)?,
            };
        }
        Some(cur)
    }

    /// Total bytes of file data (each hard-linked file once).
    pub fn data_size(&self) -> u64 {
        self.files().map(|(_, f)| f.size).sum()
    }

    pub fn files(&self) -> impl Iterator<Item = (u32, &FileData)> {
        self.manifest.inodes.iter().enumerate().filter_map(|(i, ino)| match &ino.kind {
            InodeKind::File(f) => Some((i as u32, f)),
            _ => None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn sample() -> Manifest {
        let data = b"hello";
        let h = merkle::leaf_hash(data);
        let file = FileData {
            size: 5,
            root: h,
            table: BlockTable::Inline(vec![BlockRef { hash: h, kind: BlockKind::Raw, blob: 0, len: 5, offset: 0 }]),
        };
        let meta = |mode| Inode {
            mode,
            uid: 1,
            gid: 2,
            mtime_sec: 3,
            mtime_nsec: 4,
            xattrs: vec![],
            kind: InodeKind::Symlink(vec![]),
        };
        Manifest {
            blobs: vec![Blob { id: [7; 32], size: 5 }],
            inodes: vec![
                Inode {
                    kind: InodeKind::Dir(vec![
                        DirEntry { name: b"a".to_vec(), ino: 1 },
                        DirEntry { name: b"l".to_vec(), ino: 2 },
                    ]),
                    ..meta(0o40755)
                },
                Inode {
                    kind: InodeKind::File(file),
                    xattrs: vec![(b"user.x".to_vec(), b"y".to_vec())],
                    ..meta(0o100644)
                },
                Inode { kind: InodeKind::Symlink(b"a".to_vec()), ..meta(0o120777) },
            ],
            dictionary: None,
        }
    }

    #[test]
    fn round_trip_and_id() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).expect("decode"), m);
        let id = ImageId::of_manifest(&bytes);
        let img = Image::from_manifest_bytes(id, &bytes).expect("image");
        assert_eq!(img.resolve(b"/a"), Some(1));
        assert_eq!(img.resolve(b"l"), Some(2));
        assert_eq!(img.nlink[0], 2);
        assert!(Image::from_manifest_bytes(ImageId([0; 32]), &bytes).is_err());
    }

    /// Root with a file `f` and a directory `d` holding a file `g`, one block each.
    pub(crate) fn tree() -> Image {
        let h = merkle::leaf_hash(b"x");
        let file = |_: ()| FileData {
            size: 1,
            root: h,
            table: BlockTable::Inline(vec![BlockRef { hash: h, kind: BlockKind::Raw, blob: 0, len: 1, offset: 0 }]),
        };
        let node = |mode, kind| Inode { mode, uid: 0, gid: 0, mtime_sec: 0, mtime_nsec: 0, xattrs: vec![], kind };
        let m = Manifest {
            blobs: vec![Blob { id: [7; 32], size: 1 }],
            inodes: vec![
                node(
                    0o40755,
                    InodeKind::Dir(vec![
                        DirEntry { name: b"d".to_vec(), ino: 2 },
                        DirEntry { name: b"f".to_vec(), ino: 1 },
                    ]),
                ),
                node(0o100644, InodeKind::File(file(()))),
                node(0o40755, InodeKind::Dir(vec![DirEntry { name: b"g".to_vec(), ino: 3 }])),
                node(0o100644, InodeKind::File(file(()))),
            ],
            dictionary: None,
        };
        let bytes = m.encode();
        Image::from_manifest_bytes(ImageId::of_manifest(&bytes), &bytes).expect("image")
    }

    #[test]
    fn resolve_handles_dot_dot_and_odd_paths_without_panicking() {
        let img = tree();
        // `..` under a non-directory used to index parent[u32::MAX].
        assert_eq!(img.resolve(b"f/../.."), None);
        assert_eq!(img.resolve(b"f/.."), None);
        assert_eq!(img.resolve(b"d/g/.."), None);
        // A path through a file names nothing, as ENOTDIR.
        assert_eq!(img.resolve(b"f/."), None);
        assert_eq!(img.resolve(b"f/"), None);
        assert_eq!(img.resolve(b"f/x"), None);
        // `..` at the root stays at the root, as in POSIX.
        assert_eq!(img.resolve(b".."), Some(0));
        assert_eq!(img.resolve(b"../../d/../f"), Some(1));
        assert_eq!(img.resolve(b"d/.."), Some(0));
        assert_eq!(img.resolve(b"//d//./g"), Some(3));
        assert_eq!(img.resolve(b"d/"), Some(2));
        assert_eq!(img.resolve(b""), Some(0));
        assert_eq!(img.resolve(b"d/\0g"), None);
        // Every short path over a small alphabet: no panic, and a hit is always a real inode.
        let alphabet: [&[u8]; 6] = [b"f", b"d", b"g", b"..", b".", b""];
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let p = [a, b, c].join(&b'/');
                    if let Some(ino) = img.resolve(&p) {
                        assert!(img.inode(ino).is_some(), "{}", String::from_utf8_lossy(&p));
                    }
                }
            }
        }
    }

    #[test]
    fn stored_manifests_are_verified_without_holding_them() {
        let bytes = sample().encode();
        let id = ImageId::of_manifest(&bytes);
        verify_stored_manifest(&store_manifest(&bytes), &id).expect("compressed");
        verify_stored_manifest(&bytes, &id).expect("raw");
        let other = ImageId([1; 32]);
        assert!(matches!(verify_stored_manifest(&bytes, &other), Err(Error::ImageIdMismatch { .. })));
        // A bomb: 64 MiB of zeros in a few KiB. Hashed, never held, and refused by its id.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).expect("compress");
        assert!(bomb.len() < 64 << 10);
        assert!(matches!(verify_stored_manifest(&bomb, &id), Err(Error::ImageIdMismatch { .. })));
    }

    #[test]
    fn dot_dot_of_a_non_directory_resolves_to_nothing() {
        let bytes = sample().encode();
        let img = Image::from_manifest_bytes(ImageId::of_manifest(&bytes), &bytes).expect("image");
        // A trace line's path is the store's to choose: this one used to index past the end.
        assert_eq!(img.resolve(b"a/../.."), None);
        assert_eq!(img.resolve(b"a/.."), None);
        assert_eq!(img.resolve(b"l/../a"), None);
        assert_eq!(img.resolve(b"../a"), Some(1));
    }

    #[test]
    fn stored_manifests_may_be_compressed() {
        let bytes = sample().encode();
        let stored = store_manifest(&bytes);
        assert_eq!(manifest_from_stored(stored).expect("decode"), bytes);
        assert_eq!(manifest_from_stored(bytes.clone()).expect("raw"), bytes);
        let mut bad = store_manifest(&[7u8; 10000]);
        let n = bad.len();
        bad.truncate(n - 3);
        assert!(manifest_from_stored(bad).is_err());
    }

    /// Every truncation of `bytes` is refused; no bit flip panics.
    fn truncations_fail_and_flips_do_not_panic(bytes: &[u8]) {
        for n in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..n]).is_err(), "truncated at {n}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0xff;
            let _ = Manifest::decode(&b); // must not panic
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error_not_a_panic() {
        truncations_fail_and_flips_do_not_panic(&sample().encode());
    }

    /// `sample()` with a dictionary (blob 1) and its file's block stored with it.
    fn sample_v2() -> Manifest {
        let mut m = sample();
        m.blobs.push(Blob { id: [9; 32], size: 1000 });
        m.dictionary = Some(1);
        if let InodeKind::File(FileData { table: BlockTable::Inline(b), .. }) = &mut m.inodes[1].kind {
            b[0].kind = BlockKind::ZstdDict;
        }
        m
    }

    #[test]
    fn version_2_names_a_dictionary_and_round_trips() {
        let m = sample_v2();
        let bytes = m.encode();
        assert_eq!(&bytes[8..12], &2u32.to_le_bytes());
        assert_eq!(&bytes[16..20], &1u32.to_le_bytes(), "dict_blob follows the flags");
        let back = Manifest::decode(&bytes).expect("decode");
        assert_eq!(back, m);
        let img = Image::from_manifest_bytes(ImageId::of_manifest(&bytes), &bytes).expect("image");
        assert_eq!(img.dictionary(), Some(&Blob { id: [9; 32], size: 1000 }));
        for n in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..n]).is_err(), "truncated at {n}");
        }
    }

    #[test]
    fn version_1_is_still_read_and_still_written_without_a_dictionary() {
        // A version-1 manifest as version-1 packers wrote it, byte for byte: a root directory
        // holding one empty file "e".
        let mut v1 = Vec::new();
        v1.extend_from_slice(b"INCFSIMG");
        v1.extend_from_slice(&1u32.to_le_bytes()); // version
        v1.extend_from_slice(&0u32.to_le_bytes()); // flags
        v1.extend_from_slice(&0u32.to_le_bytes()); // no blobs
        v1.extend_from_slice(&2u32.to_le_bytes()); // two inodes
        let head = |v: &mut Vec<u8>, kind: u8, mode: u32| {
            v.push(kind);
            v.extend_from_slice(&mode.to_le_bytes());
            v.extend_from_slice(&[0; 4 + 4 + 8 + 4]); // uid, gid, mtime
            v.extend_from_slice(&0u32.to_le_bytes()); // no xattrs
        };
        head(&mut v1, 1, 0o40755);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.push(b'e');
        v1.extend_from_slice(&1u32.to_le_bytes());
        head(&mut v1, 2, 0o100644);
        v1.extend_from_slice(&0u64.to_le_bytes()); // size
        v1.extend_from_slice(&[0; 32]); // root of an empty file
        let m = Manifest::decode(&v1).expect("a version-1 manifest decodes");
        assert_eq!(m.dictionary, None);
        // Without a dictionary the packer still writes exactly these bytes: same image id.
        assert_eq!(m.encode(), v1);
        let bytes = sample().encode();
        assert_eq!(&bytes[8..12], &1u32.to_le_bytes());
    }

    #[test]
    fn unknown_versions_and_misplaced_dictionaries_are_refused() {
        let mut v4 = sample_v2().encode();
        v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        let e = Manifest::decode(&v4).expect_err("version 4").to_string();
        assert!(e.contains("version 4") && e.contains("re-pack") && e.contains("newer incfsd"), "{e}");
        // A dictionary block in a version-1 image (which has no dictionary).
        let mut m = sample();
        if let InodeKind::File(FileData { table: BlockTable::Inline(b), .. }) = &mut m.inodes[1].kind {
            b[0].kind = BlockKind::ZstdDict;
        }
        let e = Manifest::decode(&m.encode()).expect_err("dict block without dict").to_string();
        assert!(e.contains("without a dictionary"), "{e}");
        // A dictionary over DICT_MAX, in an unknown blob, or holding a block.
        let mut m = sample_v2();
        m.blobs[1].size = DICT_MAX + 1;
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample_v2();
        m.dictionary = Some(2);
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample_v2();
        m.dictionary = Some(0);
        assert!(Manifest::decode(&m.encode()).expect_err("block in dict").to_string().contains("dictionary blob"));
        // Version 2 that names no dictionary: not canonical (that manifest is version 1).
        let mut b = sample().encode();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b.splice(16..16, u32::MAX.to_le_bytes());
        assert!(Manifest::decode(&b).is_err());
    }

    /// `sample()` in version 3: the file's 5 bytes in blob 0, its index (49 bytes) after them.
    fn sample_v3() -> Manifest {
        let mut m = sample();
        m.blobs[0].size = 5 + index::index_len(1);
        if let InodeKind::File(f) = &mut m.inodes[1].kind {
            f.table = BlockTable::Index { blob: 0, offset: 5 };
        }
        m
    }

    #[test]
    fn version_3_keeps_where_each_file_index_is_and_bounds_it() {
        let m = sample_v3();
        let bytes = m.encode();
        assert_eq!(&bytes[8..12], &3u32.to_le_bytes());
        assert_eq!(&bytes[16..20], &u32::MAX.to_le_bytes(), "no dictionary");
        assert_eq!(Manifest::decode(&bytes).expect("decode"), m);
        truncations_fail_and_flips_do_not_panic(&bytes);
        // The index must lie inside its blob, and not in the dictionary.
        let mut m = sample_v3();
        m.blobs[0].size -= 1;
        assert!(Manifest::decode(&m.encode()).expect_err("outside").to_string().contains("outside its blob"));
        let mut m = sample_v3();
        m.blobs.push(Blob { id: [9; 32], size: 100 });
        m.dictionary = Some(1);
        assert_eq!(Manifest::decode(&m.encode()).expect("with a dictionary"), m);
        if let InodeKind::File(f) = &mut m.inodes[1].kind {
            f.table = BlockTable::Index { blob: 1, offset: 0 };
        }
        assert!(Manifest::decode(&m.encode()).is_err());
        // A file with an inline table in a version-3 manifest is refused.
        let mut m = sample_v3();
        m.inodes.push(m.inodes[1].clone());
        if let InodeKind::File(f) = &mut m.inodes[3].kind {
            f.table = BlockTable::Inline(vec![]);
        }
        if let InodeKind::Dir(e) = &mut m.inodes[0].kind {
            e.push(DirEntry { name: b"z".to_vec(), ino: 3 });
        }
        assert!(Manifest::decode(&m.encode()).is_err());
    }

    #[test]
    fn rejects_cycles_and_bad_roots() {
        let mut m = sample();
        if let InodeKind::Dir(e) = &mut m.inodes[0].kind {
            e.push(DirEntry { name: b"z".to_vec(), ino: 0 });
        }
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = sample();
        if let InodeKind::File(f) = &mut m.inodes[1].kind {
            f.root = [1; 32];
        }
        assert!(Manifest::decode(&m.encode()).is_err());
    }
}
