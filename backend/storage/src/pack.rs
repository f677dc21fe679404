//! `incfsd pack`: turns a directory tree into an image in a store.
//!
//! The walk is sequential and sorted (so the same tree always gives the same image id); block
//! hashing and compression run in parallel on batches; blocks are appended to blobs in the
//! order `layout` plans (file order, or a trace's blocks first), so blocks read together sit
//! next to each other and one Range request fetches a run.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, Metadata};
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::dict::{BlockEncoder, Samples, Stored};
use crate::error::{Error, IoContext, Result};
use crate::image::{
    index, merkle, Blob, BlockKind, BlockRef, BlockTable, DirEntry, FileData, Hash, ImageId, Inode, InodeKind,
    Manifest, BLOCK_SIZE, NAME_MAX, XATTR_NAME_MAX, XATTR_VALUE_MAX,
};
use crate::store::Store;

#[derive(Clone, Debug)]
pub struct PackOptions {
    /// zstd level.
    pub level: i32,
    /// A blob is closed once it reaches this many bytes.
    pub blob_size: u64,
    pub progress: bool,
    /// A read trace (`trace` text format): its blocks are appended first, in its order.
    pub trace: Option<String>,
    /// Largest zstd dictionary to train for the image (0: none); kept only if it pays.
    pub dict_size: usize,
    /// Every block's hash and location in the manifest (format version 1 or 2, as older
    /// packers wrote) instead of in per-file indexes in the blobs (version 3).
    pub inline_hashes: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            level: 3,
            blob_size: 64 << 20,
            progress: false,
            trace: None,
            dict_size: crate::dict::DEFAULT_DICT_SIZE,
            inline_hashes: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct PackStats {
    pub inodes: u64,
    pub files: u64,
    pub bytes_in: u64,
    pub blocks: u64,
    pub zero_blocks: u64,
    pub dedup_blocks: u64,
    /// Blocks placed first because the trace names them.
    pub traced_blocks: u64,
    /// Trace lines not used (malformed, unknown path, past the file's end).
    pub trace_lines_skipped: usize,
    pub stored_bytes: u64,
    /// Blocks stored compressed with the image's dictionary, and its size (0: none).
    pub dict_blocks: u64,
    pub dict_bytes: u64,
    pub dict_seconds: f64,
    pub manifest_bytes: u64,
    /// Bytes of the per-file indexes in the blobs (version 3).
    pub index_bytes: u64,
    pub seconds: f64,
}

/// Packs `src` into `store`; returns the image id.
pub fn pack(src: &Path, store: &Store, opts: &PackOptions) -> Result<(ImageId, PackStats)> {
    let start = Instant::now();
    store.create_dirs()?;
    let meta = fs::symlink_metadata(src).ctx(|| format!("stat {}", src.display()))?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!("{} is not a directory", src.display())));
    }
    let mut walker = Walker::default();
    walker.dir(src, &meta)?;
    let Walker { mut inodes, files, .. } = walker;
    let file_blocks: Vec<(u32, u64)> = files.iter().map(|f| (f.ino, blocks_of(f.size) as u64)).collect();
    let layout = crate::layout::plan(&inodes, &file_blocks, opts.trace.as_deref())?;

    let total: u64 = files.iter().map(|f| f.size).sum();
    let bar = progress_bar(opts.progress, total);
    let mut stats = PackStats {
        inodes: inodes.len() as u64,
        files: files.len() as u64,
        bytes_in: total,
        traced_blocks: layout.traced_blocks,
        trace_lines_skipped: layout.skipped_lines,
        ..Default::default()
    };

    let mut blobs = BlobWriter::new(store, opts.blob_size);
    let dict_start = Instant::now();
    let dict = match opts.dict_size {
        0 => None,
        n => train_dictionary(&files, n, opts.level)?,
    };
    stats.dict_seconds = dict_start.elapsed().as_secs_f64();
    // The dictionary is a blob of its own (blob 0): its id, in the manifest, is its SHA-256.
    let dictionary = match &dict {
        Some(d) => {
            blobs.append(d)?;
            blobs.close()?;
            stats.dict_bytes = d.len() as u64;
            Some(0)
        }
        None => None,
    };
    // Pass 1 compresses the blocks in layout order into a staging file; pass 2 (`place`)
    // writes them into blobs with each file's index right before its first block, once
    // every block's place is known.
    let mut staging = Staging::new(store)?;
    let mut seen: HashMap<Hash, u32> = HashMap::new();
    // Blocks arrive in layout order: each lands at its index in its file.
    let mut per_file: Vec<Vec<Option<Pending>>> = files.iter().map(|f| vec![None; blocks_of(f.size)]).collect();

    // Reading overlaps hashing and compression: a thread reads batches ahead.
    let (tx, rx) = mpsc::sync_channel::<Result<Vec<Chunk>>>(2);
    let paths: Vec<(PathBuf, u64)> = files.iter().map(|f| (f.path.clone(), f.size)).collect();
    let segments = layout.segments;
    let reader = std::thread::spawn(move || read_batches(&paths, &segments, &tx));
    for batch in rx {
        let batch = batch?;
        let jobs: Vec<(usize, usize, &[u8])> = batch
            .iter()
            .flat_map(|c| c.data.chunks(BLOCK_SIZE).enumerate().map(move |(i, b)| (c.file, c.block + i, b)))
            .collect();
        let level = opts.level;
        let encoded: Vec<Encoded> = jobs
            .par_iter()
            .map_init(|| BlockEncoder::new(level, dict.as_deref()).ok(), |enc, (_, _, b)| encode_block(b, enc.as_mut()))
            .collect();
        for ((file, block, raw), enc) in jobs.iter().zip(encoded) {
            stats.blocks += 1;
            let r = match enc.stored {
                None => {
                    stats.zero_blocks += 1;
                    Pending { hash: enc.hash, staged: None }
                }
                Some(_) if seen.contains_key(&enc.hash) => {
                    stats.dedup_blocks += 1;
                    Pending { hash: enc.hash, staged: Some(seen[&enc.hash]) }
                }
                Some((kind, bytes)) => {
                    let i = staging.push(*file, kind, &bytes)?;
                    stats.stored_bytes += bytes.len() as u64;
                    stats.dict_blocks += u64::from(kind == BlockKind::ZstdDict);
                    seen.insert(enc.hash, i);
                    Pending { hash: enc.hash, staged: Some(i) }
                }
            };
            if let Some(slot) = per_file.get_mut(*file).and_then(|f| f.get_mut(*block)) {
                *slot = Some(r);
            }
            if let Some(b) = &bar {
                b.inc(raw.len() as u64);
            }
        }
    }
    reader.join().map_err(|_| Error::Invalid("reader thread panicked".into()))??;
    let mut pending = Vec::with_capacity(files.len());
    for (f, blocks) in files.iter().zip(per_file) {
        let Some(blocks) = blocks.into_iter().collect::<Option<Vec<Pending>>>() else {
            return Err(Error::Invalid(format!("{} changed size while packing", f.path.display())));
        };
        pending.push(blocks);
    }
    let placed = place(&mut blobs, staging, &pending, !opts.inline_hashes)?;
    stats.index_bytes = placed.index_bytes;
    let blob_list = blobs.finish()?;
    for ((f, blocks), index) in files.iter().zip(placed.blocks).zip(placed.indexes) {
        let leaves: Vec<Hash> = blocks.iter().map(|b| b.hash).collect();
        let table = match index {
            Some((blob, offset)) => BlockTable::Index { blob, offset },
            None => BlockTable::Inline(blocks),
        };
        inodes[f.ino as usize].kind =
            InodeKind::File(FileData { size: f.size, root: merkle::root_hash(&leaves), table });
    }
    let manifest = Manifest { blobs: blob_list, inodes, dictionary };
    let bytes = manifest.encode();
    stats.manifest_bytes = bytes.len() as u64;
    let id = ImageId::of_manifest(&bytes);
    store.write_manifest(&id, &bytes)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    stats.seconds = start.elapsed().as_secs_f64();
    Ok((id, stats))
}

/// A block of a file after pass 1: its leaf, and the staged block holding it (None: zero).
#[derive(Clone, Copy)]
struct Pending {
    hash: Hash,
    staged: Option<u32>,
}

/// Stored blocks in layout order, in a temporary file of the store, until their places in
/// the blobs are planned.
struct Staging {
    file: std::io::BufWriter<File>,
    path: PathBuf,
    size: u64,
    /// Per staged block: the file that stored it first, its kind, its stored length.
    blocks: Vec<(usize, BlockKind, u32)>,
}

impl Staging {
    fn new(store: &Store) -> Result<Staging> {
        let (file, path) = store.temp_file("staging")?;
        Ok(Staging { file: std::io::BufWriter::with_capacity(1 << 20, file), path, size: 0, blocks: Vec::new() })
    }

    fn push(&mut self, file: usize, kind: BlockKind, bytes: &[u8]) -> Result<u32> {
        let i = u32::try_from(self.blocks.len()).map_err(|_| Error::Invalid("too many blocks".into()))?;
        self.file.write_all(bytes).ctx(|| format!("write {}", self.path.display()))?;
        self.size += bytes.len() as u64;
        self.blocks.push((file, kind, bytes.len() as u32));
        Ok(i)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Where `BlobWriter::append` will put each piece: the same rule, without the bytes.
struct Planner {
    target: u64,
    next: u32,
    open: Option<u64>,
}

impl Planner {
    fn place(&mut self, len: u64) -> (u32, u64) {
        if self.open.is_some_and(|size| size + len > self.target) {
            self.next += 1;
            self.open = None;
        }
        let at = self.open.unwrap_or(0);
        self.open = Some(at + len);
        (self.next, at)
    }
}

/// What `place` wrote: every file's blocks with their places, and where its index is (None
/// for an inline table).
struct Placed {
    blocks: Vec<Vec<BlockRef>>,
    indexes: Vec<Option<(u32, u64)>>,
    index_bytes: u64,
}

/// Pass 2: plans where every staged block and (with `indexed`) every file's index goes, each
/// index right before the first block its file stored (so one range fetches both, and the
/// next files' after them), the indexes of files that stored no block at the end; then
/// writes them in that order.
fn place(blobs: &mut BlobWriter<'_>, mut staging: Staging, pending: &[Vec<Pending>], indexed: bool) -> Result<Placed> {
    staging.file.flush().ctx(|| format!("write {}", staging.path.display()))?;
    // Staged block -> the file whose index goes right before it.
    let mut index_before: HashMap<u32, usize> = HashMap::new();
    let mut trailing = Vec::new();
    let mut first_of: HashMap<usize, u32> = HashMap::new();
    for (i, &(f, _, _)) in staging.blocks.iter().enumerate() {
        first_of.entry(f).or_insert(i as u32);
    }
    for (file, blocks) in pending.iter().enumerate() {
        if !indexed || blocks.is_empty() {
            continue;
        }
        match first_of.get(&file) {
            Some(&i) => {
                index_before.insert(i, file);
            }
            None => trailing.push(file),
        }
    }
    let index_len = |file: usize| index::index_len(pending[file].len() as u64);
    let mut plan = Planner { target: blobs.target, next: blobs.done.len() as u32, open: None };
    let mut locs: Vec<(u32, u64)> = Vec::with_capacity(staging.blocks.len());
    let mut indexes: Vec<Option<(u32, u64)>> = vec![None; pending.len()];
    for (i, &(_, _, len)) in staging.blocks.iter().enumerate() {
        if let Some(&file) = index_before.get(&(i as u32)) {
            indexes[file] = Some(plan.place(index_len(file)));
        }
        locs.push(plan.place(len as u64));
    }
    for &file in &trailing {
        indexes[file] = Some(plan.place(index_len(file)));
    }
    let blocks: Vec<Vec<BlockRef>> = pending
        .iter()
        .map(|file| {
            file.iter()
                .map(|p| match p.staged {
                    None => BlockRef { hash: p.hash, kind: BlockKind::Zero, blob: 0, len: 0, offset: 0 },
                    Some(i) => {
                        let (_, kind, len) = staging.blocks[i as usize];
                        let (blob, offset) = locs[i as usize];
                        BlockRef { hash: p.hash, kind, blob, len, offset }
                    }
                })
                .collect()
        })
        .collect();
    // Write in the planned order; every piece must land where it was planned.
    let (path, staged) = (&staging.path, &staging.blocks);
    let mut index_bytes = 0;
    let put = |blobs: &mut BlobWriter<'_>, bytes: &[u8], want: (u32, u64)| -> Result<()> {
        let got = blobs.append(bytes)?;
        if got != want {
            return Err(Error::Invalid(format!("pack: planned {want:?}, written at {got:?}")));
        }
        Ok(())
    };
    let mut reader =
        std::io::BufReader::with_capacity(1 << 20, File::open(path).ctx(|| format!("open {}", path.display()))?);
    let mut buf = vec![0u8; 2 * BLOCK_SIZE];
    for (i, &(_, _, len)) in staged.iter().enumerate() {
        if let Some(&f) = index_before.get(&(i as u32)) {
            let bytes = index::encode(&blocks[f]);
            index_bytes += bytes.len() as u64;
            put(blobs, &bytes, indexes[f].unwrap_or_default())?;
        }
        let data = &mut buf[..len as usize];
        std::io::Read::read_exact(&mut reader, data).ctx(|| format!("read {}", path.display()))?;
        put(blobs, data, locs[i])?;
    }
    for &f in &trailing {
        let bytes = index::encode(&blocks[f]);
        index_bytes += bytes.len() as u64;
        put(blobs, &bytes, indexes[f].unwrap_or_default())?;
    }
    drop(staging);
    Ok(Placed { blocks, indexes, index_bytes })
}

fn blocks_of(size: u64) -> usize {
    size.div_ceil(BLOCK_SIZE as u64) as usize
}

pub(crate) fn progress_bar(want: bool, total: u64) -> Option<indicatif::ProgressBar> {
    if !want || !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {bytes_per_sec} [{bar:40}] {eta}")
    {
        b.set_style(style);
    }
    Some(b)
}

struct Encoded {
    hash: Hash,
    /// None for an all-zero block.
    stored: Option<(BlockKind, Vec<u8>)>,
}

/// Hashes a block and stores it the smallest way `enc` knows (raw if it has no encoder).
/// One encoder per rayon job: setting one up costs more than compressing a block.
fn encode_block(data: &[u8], enc: Option<&mut BlockEncoder<'_>>) -> Encoded {
    if data.iter().all(|&b| b == 0) {
        // Sparse regions of large images: skip hashing a known block.
        return Encoded { hash: merkle::zero_leaf(), stored: None };
    }
    let hash = merkle::leaf_hash(data);
    let stored = match enc.map(|e| e.encode(data)) {
        Some(Stored::Zstd(c)) => (BlockKind::Zstd, c),
        Some(Stored::ZstdDict(c)) => (BlockKind::ZstdDict, c),
        Some(Stored::Raw) | None => (BlockKind::Raw, data.to_vec()),
    };
    Encoded { hash, stored: Some(stored) }
}

/// Trains the image's dictionary on blocks spread evenly over its files (every `stride`th
/// block in pack order), judged on the blocks halfway between; None if it does not pay.
fn train_dictionary(files: &[PendingFile], dict_size: usize, level: i32) -> Result<Option<Vec<u8>>> {
    let total: u64 = files.iter().map(|f| f.size.div_ceil(BLOCK_SIZE as u64)).sum();
    let want = (crate::dict::sample_bytes(dict_size) / BLOCK_SIZE).max(1) as u64;
    let stride = (total / want).max(2);
    let (mut train, mut judge) = (Samples::default(), Samples::default());
    let mut global = 0u64;
    let mut block = vec![0u8; BLOCK_SIZE];
    for f in files {
        let n = f.size.div_ceil(BLOCK_SIZE as u64);
        // Indexes in this file of the blocks whose global index is 0 or stride/2 mod stride.
        let picks: Vec<(u64, bool)> = (0..n)
            .filter_map(|i| match (global + i) % stride {
                0 => Some((i, true)),
                r if r == stride / 2 => Some((i, false)),
                _ => None,
            })
            .collect();
        global += n;
        if picks.is_empty() {
            continue;
        }
        let file = File::open(&f.path).ctx(|| format!("open {}", f.path.display()))?;
        for (i, is_train) in picks {
            let off = i * BLOCK_SIZE as u64;
            let len = (f.size - off).min(BLOCK_SIZE as u64) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut block[..len], off)
                .ctx(|| format!("read {} (did it shrink while packing?)", f.path.display()))?;
            if block[..len].iter().all(|&b| b == 0) {
                continue;
            }
            match is_train {
                true => train.push(&block[..len]),
                false => judge.push(&block[..len]),
            }
        }
    }
    let scale = total as f64 / judge.sizes.len().max(1) as f64;
    Ok(crate::dict::train(&train, &judge, scale, dict_size, level))
}

/// A run of whole blocks of one file from block `block` on (the last block of a file may be
/// short).
struct Chunk {
    file: usize,
    block: usize,
    data: Vec<u8>,
}

const BATCH_BYTES: usize = 16 << 20;
const CHUNK_BYTES: usize = 1 << 20;

/// Reads the blocks of `segments` (in `layout`'s order) and sends them in batches.
fn read_batches(
    files: &[(PathBuf, u64)],
    segments: &[crate::layout::Segment],
    tx: &mpsc::SyncSender<Result<Vec<Chunk>>>,
) -> Result<()> {
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let send = |batch: Vec<Chunk>| tx.send(Ok(batch)).map_err(|_| Error::Invalid("packer stopped".into()));
    let fail = |err: Error| {
        let _ = tx.send(Err(Error::Invalid(err.to_string())));
        Err(err)
    };
    // The file of the previous segment, kept open: without a trace each file is one segment.
    let mut open: Option<(usize, File)> = None;
    for &(i, first, count) in segments {
        let Some((path, size)) = files.get(i) else { return fail(Error::Invalid("segment of no file".into())) };
        if open.as_ref().is_none_or(|(j, _)| *j != i) {
            match File::open(path) {
                Ok(f) => open = Some((i, f)),
                Err(e) => return fail(Error::io(format!("open {}", path.display()), e)),
            }
        }
        let Some((_, f)) = open.as_ref() else { continue };
        let mut at = first * BLOCK_SIZE as u64;
        let end = ((first + count) * BLOCK_SIZE as u64).min(*size);
        while at < end {
            let n = (end - at).min(CHUNK_BYTES as u64) as usize;
            let mut data = vec![0u8; n];
            if let Err(e) = f.read_exact_at(&mut data, at) {
                return fail(Error::io(format!("read {} (did it shrink while packing?)", path.display()), e));
            }
            batch.push(Chunk { file: i, block: (at / BLOCK_SIZE as u64) as usize, data });
            at += n as u64;
            batch_bytes += n;
            if batch_bytes >= BATCH_BYTES {
                send(std::mem::take(&mut batch))?;
                batch_bytes = 0;
            }
        }
    }
    if !batch.is_empty() {
        send(batch)?;
    }
    Ok(())
}

struct PendingFile {
    ino: u32,
    path: PathBuf,
    size: u64,
}

#[derive(Default)]
struct Walker {
    inodes: Vec<Inode>,
    files: Vec<PendingFile>,
    /// (dev, ino) of multiply-linked files already seen: hard links share one inode.
    links: HashMap<(u64, u64), u32>,
}

impl Walker {
    fn push(&mut self, path: &Path, meta: &Metadata, kind: InodeKind) -> Result<u32> {
        let idx = u32::try_from(self.inodes.len()).map_err(|_| Error::Invalid("too many inodes".into()))?;
        self.inodes.push(Inode {
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec() as u32,
            xattrs: read_xattrs(path)?,
            kind,
        });
        Ok(idx)
    }

    fn dir(&mut self, path: &Path, meta: &Metadata) -> Result<u32> {
        let idx = self.push(path, meta, InodeKind::Dir(Vec::new()))?;
        let mut names: Vec<Vec<u8>> = fs::read_dir(path)
            .ctx(|| format!("read directory {}", path.display()))?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<std::io::Result<_>>()
            .ctx(|| format!("read directory {}", path.display()))?;
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            if name.len() > NAME_MAX {
                return Err(Error::Invalid(format!("name too long in {}", path.display())));
            }
            let child = path.join(std::ffi::OsStr::from_bytes(&name));
            let m = fs::symlink_metadata(&child).ctx(|| format!("stat {}", child.display()))?;
            let ft = m.file_type();
            let ino = if ft.is_dir() {
                self.dir(&child, &m)?
            } else if ft.is_file() {
                let key = (m.dev(), m.ino());
                match self.links.get(&key) {
                    Some(&i) if m.nlink() > 1 => i,
                    _ => {
                        let i = self.push(
                            &child,
                            &m,
                            InodeKind::File(FileData { size: 0, root: [0; 32], table: BlockTable::Inline(vec![]) }),
                        )?;
                        if m.nlink() > 1 {
                            self.links.insert(key, i);
                        }
                        self.files.push(PendingFile { ino: i, path: child, size: m.len() });
                        i
                    }
                }
            } else if ft.is_symlink() {
                let target = fs::read_link(&child).ctx(|| format!("readlink {}", child.display()))?;
                self.push(&child, &m, InodeKind::Symlink(target.as_os_str().as_bytes().to_vec()))?
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() || ft.is_socket() {
                self.push(&child, &m, InodeKind::Special { rdev: m.rdev() })?
            } else {
                return Err(Error::Invalid(format!("unsupported file type at {}", child.display())));
            };
            entries.push(DirEntry { name, ino });
        }
        self.inodes[idx as usize].kind = InodeKind::Dir(entries);
        Ok(idx)
    }
}

/// The extended attributes of a path (not following symlinks), sorted by name.
fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Invalid("NUL in path".into()))?;
    let names =
        xattr_call(|| rustix::fs::llistxattr_query(c.as_c_str()), |buf| rustix::fs::llistxattr(c.as_c_str(), buf))
            .ctx(|| format!("list xattrs of {}", path.display()))?;
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.len() > XATTR_NAME_MAX {
            continue;
        }
        let cn = CString::new(name).map_err(|_| Error::Invalid("NUL in xattr name".into()))?;
        let value = match xattr_call(
            || rustix::fs::lgetxattr_query(c.as_c_str(), cn.as_c_str()),
            |buf| rustix::fs::lgetxattr(c.as_c_str(), cn.as_c_str(), buf),
        ) {
            Ok(v) => v,
            // Removed between list and get.
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(Error::io(format!("read xattr of {}", path.display()), e)),
        };
        if value.len() > XATTR_VALUE_MAX {
            return Err(Error::Invalid(format!("xattr value too large on {}", path.display())));
        }
        out.push((name.to_vec(), value));
    }
    out.sort();
    Ok(out)
}

/// Runs an xattr call that fills a buffer: asks for the size first, then again if the value
/// grew in between. A filesystem without xattrs has none.
fn xattr_call(
    size: impl Fn() -> rustix::io::Result<usize>,
    f: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> std::io::Result<Vec<u8>> {
    loop {
        let n = match size() {
            Ok(n) => n,
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; n];
        match f(&mut buf) {
            Ok(m) => {
                buf.truncate(m);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Appends stored blocks to blobs, closing each one at the size target; a blob is named by the
/// SHA-256 of its bytes once it is complete.
struct BlobWriter<'a> {
    store: &'a Store,
    target: u64,
    cur: Option<OpenBlob>,
    done: Vec<Blob>,
    /// Closed blobs whose writeback was started; made durable together in `finish`.
    unsynced: Vec<File>,
}

struct OpenBlob {
    file: std::io::BufWriter<File>,
    tmp: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl<'a> BlobWriter<'a> {
    fn new(store: &'a Store, target: u64) -> Self {
        BlobWriter { store, target: target.max(BLOCK_SIZE as u64), cur: None, done: Vec::new(), unsynced: Vec::new() }
    }

    fn append(&mut self, data: &[u8]) -> Result<(u32, u64)> {
        if self.cur.as_ref().is_some_and(|b| b.size + data.len() as u64 > self.target) {
            self.close()?;
        }
        if self.cur.is_none() {
            let (file, tmp) = self.store.temp_file("blobs")?;
            self.cur = Some(OpenBlob {
                file: std::io::BufWriter::with_capacity(1 << 20, file),
                tmp,
                hasher: Sha256::new(),
                size: 0,
            });
        }
        let idx = self.done.len() as u32;
        let b = self.cur.as_mut().ok_or_else(|| Error::Invalid("no open blob".into()))?;
        b.file.write_all(data).ctx(|| format!("write {}", b.tmp.display()))?;
        b.hasher.update(data);
        let off = b.size;
        b.size += data.len() as u64;
        Ok((idx, off))
    }

    fn close(&mut self) -> Result<()> {
        if let Some(b) = self.cur.take() {
            let file =
                b.file.into_inner().map_err(|e| Error::io(format!("write {}", b.tmp.display()), e.into_error()))?;
            // Start writing it back now, while packing goes on; wait for it in `finish`.
            // SAFETY: a valid fd and plain integer arguments.
            unsafe { libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
            let id: Hash = b.hasher.finalize().into();
            self.store.commit_blob(&b.tmp, &id)?;
            self.done.push(Blob { id, size: b.size });
            self.unsynced.push(file);
        }
        Ok(())
    }

    /// Closes the last blob and makes every blob durable: the manifest that names them is
    /// written only after this.
    fn finish(mut self) -> Result<Vec<Blob>> {
        self.close()?;
        for f in &self.unsynced {
            f.sync_data().ctx(|| "sync blobs".into())?;
        }
        let blobs = self.store.root.join("blobs");
        File::open(&blobs).and_then(|d| d.sync_all()).ctx(|| format!("sync {}", blobs.display()))?;
        Ok(self.done)
    }
}
