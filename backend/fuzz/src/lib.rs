//! What the fuzz targets share: one small image built from fixed bytes (so its id, its file
//! ids and therefore the seeds never change), the store and cache it lives in, and the
//! helpers that split a fuzz input into fields.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use incfs::control::Control;
use incfs_storage::cache::BlockCache;
use incfs_storage::engine::{Engine, EngineConfig, FillSource};
use incfs_storage::image::{
    merkle, Blob, BlockKind, BlockRef, BlockTable, DirEntry, FileData, Hash, Image, ImageId, Inode, InodeKind,
    Manifest, BLOCK_SIZE,
};
use incfs_storage::store::{Remote, Store};

/// Inode indexes of the fixture image.
pub const INO_A: u32 = 1;
pub const INO_B: u32 = 3;
pub const INO_Z: u32 = 5;

/// SHA-256 (the image id of bytes is their SHA-256).
pub fn sha256(bytes: &[u8]) -> Hash {
    ImageId::of_manifest(bytes).0
}

/// Plaintext of `/a`: two full blocks and a short one, stored raw.
pub fn file_a() -> Vec<u8> {
    (0..2 * BLOCK_SIZE + 100).map(|i| (i * 7 % 251) as u8).collect()
}

/// Plaintext of `/d/b`: one short block, stored as zstd.
pub fn file_b() -> Vec<u8> {
    b"hello incfs ".repeat(50)
}

/// Stored bytes of every non-zero block, in blob order: (inode, block index, kind, bytes).
pub fn stored_blocks() -> Vec<(u32, u32, BlockKind, Vec<u8>)> {
    let a = file_a();
    let mut out: Vec<_> =
        a.chunks(BLOCK_SIZE).enumerate().map(|(i, c)| (INO_A, i as u32, BlockKind::Raw, c.to_vec())).collect();
    let b = zstd::bulk::compress(&file_b(), 3).expect("zstd compresses");
    out.push((INO_B, 0, BlockKind::Zstd, b));
    out
}

/// The one blob: every stored block back to back.
pub fn blob() -> Vec<u8> {
    stored_blocks().into_iter().flat_map(|(_, _, _, b)| b).collect()
}

/// `/a` (3 blocks), `/d/` with `b` (1 zstd block, an xattr) and `h` (a hard link to `/a`),
/// `/l` (a symlink to `a`), `/z` (two all-zero blocks).
pub fn manifest() -> Manifest {
    let blob_bytes = blob();
    let mut offset = 0u64;
    let mut blocks: Vec<Vec<BlockRef>> = vec![Vec::new(); 6];
    for (ino, _, kind, stored) in stored_blocks() {
        let plain = match ino {
            INO_A => file_a(),
            _ => file_b(),
        };
        let index = blocks[ino as usize].len();
        let chunk = plain.chunks(BLOCK_SIZE).nth(index).expect("block of the file");
        blocks[ino as usize].push(BlockRef {
            hash: merkle::leaf_hash(chunk),
            kind,
            blob: 0,
            len: stored.len() as u32,
            offset,
        });
        offset += stored.len() as u64;
    }
    let zero = BlockRef { hash: merkle::zero_leaf(), kind: BlockKind::Zero, blob: 0, len: 0, offset: 0 };
    blocks[INO_Z as usize] = vec![zero; 2];
    let file = |ino: u32, size: u64| {
        let blocks = blocks[ino as usize].clone();
        let leaves: Vec<Hash> = blocks.iter().map(|b| b.hash).collect();
        InodeKind::File(FileData { size, root: merkle::root_hash(&leaves), table: BlockTable::Inline(blocks) })
    };
    let inode = |mode: u32, kind: InodeKind| Inode {
        mode,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: vec![],
        kind,
    };
    let entry = |name: &[u8], ino: u32| DirEntry { name: name.to_vec(), ino };
    Manifest {
        blobs: vec![Blob { id: sha256(&blob_bytes), size: blob_bytes.len() as u64 }],
        inodes: vec![
            inode(0o40755, InodeKind::Dir(vec![entry(b"a", 1), entry(b"d", 2), entry(b"l", 4), entry(b"z", 5)])),
            inode(0o100644, file(INO_A, file_a().len() as u64)),
            inode(0o40755, InodeKind::Dir(vec![entry(b"b", 3), entry(b"h", 1)])),
            Inode {
                xattrs: vec![(b"user.x".to_vec(), b"y".to_vec())],
                ..inode(0o100644, file(INO_B, file_b().len() as u64))
            },
            inode(0o120777, InodeKind::Symlink(b"a".to_vec())),
            inode(0o100644, file(INO_Z, 2 * BLOCK_SIZE as u64)),
        ],
        dictionary: None,
    }
}

/// The fixture image, loaded and verified as the engine loads one.
pub fn image() -> Image {
    let bytes = manifest().encode();
    Image::from_manifest_bytes(ImageId::of_manifest(&bytes), &bytes).expect("the fixture image is valid")
}

/// Writes the fixture image (manifest and blob) into a store directory; returns its id.
pub fn write_store(root: &Path) -> ImageId {
    let bytes = manifest().encode();
    let id = ImageId::of_manifest(&bytes);
    let store = Store::new(root);
    store.create_dirs().expect("store directories");
    store.write_manifest(&id, &bytes).expect("store manifest");
    let blob = blob();
    std::fs::write(root.join("blobs").join(ImageId(sha256(&blob)).to_string()), blob).expect("store blob");
    id
}

/// An engine on the fixture image whose blocks come only from `supply_block` (no remote
/// fetch), with a cache in `cache_dir`.
pub fn supplied_engine(rt: &tokio::runtime::Runtime, store: &Path, id: ImageId, cache_dir: &Path) -> Arc<Engine> {
    let remote = Remote::open(store.to_str().expect("utf-8 temp path"), Duration::from_secs(5)).expect("store");
    let cache = Arc::new(BlockCache::open(cache_dir).expect("cache"));
    let cfg = EngineConfig { read_timeout: Duration::ZERO, fill: FillSource::Supplied, ..EngineConfig::default() };
    rt.block_on(Engine::open(remote, id, cache, cfg)).expect("engine")
}

/// The file id the control channel gives image inode `idx` of the fixture image.
pub fn file_id(idx: u32) -> [u8; 16] {
    let bytes = manifest().encode();
    let image = incfs::image::Image::from_manifest_bytes(ImageId::of_manifest(&bytes), &bytes).expect("fixture image");
    image.file_id(idx)
}

/// A control channel on a fresh engine (for callers that only need one).
pub fn control(rt: &tokio::runtime::Runtime, store: &Path, id: ImageId, cache_dir: &Path) -> Arc<Control> {
    Control::new(supplied_engine(rt, store, id, cache_dir))
}

/// Splits a fuzz input into fields; reads past the end give zeroes / empty slices, so every
/// input means something.
pub struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Input { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.bytes.split_at(n.min(self.bytes.len()));
        self.bytes = rest;
        head
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.bytes.len())
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let h = self.take(N);
        a[..h.len()].copy_from_slice(h);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.le::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }
}

/// Appends the field encodings [`Input`] reads, for writing seeds.
#[derive(Default)]
pub struct SeedWriter(pub Vec<u8>);

impl SeedWriter {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}
