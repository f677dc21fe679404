//! Writes a few valid inputs per fuzz target into seeds/<target>/, so the fuzzers start from
//! real shapes: `cargo run --example make_seeds` (from backend/fuzz). The binary ones embed
//! the fixture image's ids and hashes, which is why a program writes them.

use std::fs;
use std::path::Path;

use incfs_fuzz::{SeedWriter, INO_A, INO_B};
use incfs_storage::cache::BlockCache;
use incfs_storage::image::{
    merkle, store_manifest, Blob, BlockKind, BlockTable, FileData, Inode, InodeKind, Manifest, BLOCK_SIZE,
};
use incfs_storage::trace;
use incfs_wire::{FileState, FillHeader, LastReadError, ReadRecord, COMPRESSION_NONE, COMPRESSION_ZSTD};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    fs::create_dir_all(&dir).expect("seed dir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    manifest();
    trace();
    blk_request();
    cache_open();
    control();
    wire();
}

fn manifest() {
    let bytes = incfs_fuzz::manifest().encode();
    write("manifest", "fixture", &[[0].as_slice(), &bytes].concat());
    write("manifest", "fixture_zstd", &[[0].as_slice(), &store_manifest(&bytes)].concat());
    write("manifest", "wrong_id", &[[1].as_slice(), &bytes].concat());
    let root = Inode {
        mode: 0o40755,
        uid: 0,
        gid: 0,
        mtime_sec: 0,
        mtime_nsec: 0,
        xattrs: vec![],
        kind: InodeKind::Dir(vec![]),
    };
    let empty = Manifest { blobs: vec![], inodes: vec![root], dictionary: None }.encode();
    write("manifest", "empty_root", &[[0].as_slice(), &empty].concat());
    // Version 2: the fixture with a dictionary (blob 1) and its zstd blocks marked as
    // compressed with it.
    let samples: Vec<Vec<u8>> =
        (0..64u32).map(|i| format!("sample {i} of a text, squared {} ", i * i).repeat(20).into_bytes()).collect();
    let dict = zstd::dict::from_samples(&samples, 4096).unwrap_or_default();
    let mut v2 = incfs_fuzz::manifest();
    v2.blobs.push(Blob { id: incfs_fuzz::sha256(&dict), size: dict.len().max(1) as u64 });
    v2.dictionary = Some(1);
    for ino in &mut v2.inodes {
        if let InodeKind::File(FileData { table: BlockTable::Inline(blocks), .. }) = &mut ino.kind {
            for b in blocks.iter_mut().filter(|b| b.kind == BlockKind::Zstd) {
                b.kind = BlockKind::ZstdDict;
            }
        }
    }
    write("manifest", "fixture_v2", &[[0].as_slice(), &v2.encode()].concat());
    // A dictionary on its own (flag bit 1), prepared as if a manifest named it.
    write("manifest", "dictionary", &[[2].as_slice(), &dict].concat());
}

fn trace() {
    let image = incfs_fuzz::image();
    let text = trace::format(&image, &[(INO_A, 0, 2), (INO_B, 0, 1), (INO_A, 2, 1), (5, 0, 2)]);
    write("trace", "fixture", text.as_bytes());
    // Indexed past the end of Image::parent before the fix of Image::resolve.
    write("trace", "dot_dot_of_a_file", b"a/../..\t0\t1\n");
    write("trace", "odd_paths", b"# comment\r\nd/h\t1\t9\nd/../a\t0\t1\nnope\t0\t1\nd/b%00\t0\t1\n\nl\t0\t1\n");
}

/// The blk_request input: geometry, support flags, descriptors, then the readable bytes.
fn blk_request() {
    let seed = |name: &str, kind: u32, sector: u64, body: &[u8], write_len: u32| {
        let mut w = SeedWriter::default();
        w.u64(1 << 20).u32(0).u32(1 << 12).u8(3).u8(7).u64(0x10000);
        let read_len = 16 + body.len() as u32;
        w.u8(2).u32(read_len).u8(0).u32(write_len + 1).u8(1);
        w.u32(kind).u32(0).u64(sector).bytes(body);
        write("blk_request", name, &w.0);
    };
    let seg = |sector: u64, n: u32, flags: u32| {
        [sector.to_le_bytes().as_slice(), &n.to_le_bytes(), &flags.to_le_bytes()].concat()
    };
    seed("read", 0, 8, &[], 4096);
    seed("write", 1, 8, &[7; 1024], 0);
    seed("flush", 4, 0, &[], 0);
    seed("get_id", 8, 0, &[], 20);
    seed("discard", 11, 0, &[seg(8, 8, 0), seg(64, 16, 0)].concat(), 0);
    seed("write_zeroes", 13, 0, &seg(8, 8, 1), 0);
}

/// The cache_open input: u16 lengths of header, slots and free, those bytes, then the log.
fn cache_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = BlockCache::open(dir.path()).expect("cache");
    let a = incfs_fuzz::file_a();
    let blocks: Vec<_> = a.chunks(BLOCK_SIZE).take(2).map(|c| (merkle::leaf_hash(c), c)).collect();
    cache.insert_verified(&blocks).expect("insert");
    drop(cache);
    let read = |name: &str| fs::read(dir.path().join(name)).expect("cache file");
    let (header, slots, free, log) = (read("header"), read("slots"), read("free"), read("log"));
    let mut w = SeedWriter::default();
    w.u16(header.len() as u16).u16(slots.len() as u16).u16(free.len() as u16);
    w.bytes(&header).bytes(&slots).bytes(&free).bytes(&log);
    write("cache_open", "two_blocks", &w.0);
    write("cache_open", "fresh", &[]);
}

fn fill_block(ino: u32, block: u32, kind: BlockKind, data: &[u8], flags: u8) -> Vec<u8> {
    let compression = if kind == BlockKind::Zstd { COMPRESSION_ZSTD } else { COMPRESSION_NONE };
    let h = FillHeader { file_id: incfs_fuzz::file_id(ino), block, data_len: data.len() as u32, compression, flags };
    [h.encode().as_slice(), data].concat()
}

/// The control input: opcodes and their fields, as the target's match reads them.
fn control() {
    let stored = incfs_fuzz::stored_blocks();
    let fill = |w: &mut SeedWriter, bytes: &[u8]| {
        w.u8(0).u16(bytes.len() as u16).bytes(bytes);
    };
    // Every stored block, one write each, then the whole file in one write.
    let mut w = SeedWriter::default();
    for (ino, block, kind, data) in &stored {
        fill(&mut w, &fill_block(*ino, *block, *kind, data, 0));
    }
    w.u8(2).u8(3 + 4 * INO_A as u8).u32(0).u16(4096);
    write("control", "fill_each", &w.0);
    let mut w = SeedWriter::default();
    let all: Vec<u8> = stored.iter().flat_map(|(i, b, k, d)| fill_block(*i, *b, *k, d, 0)).collect();
    fill(&mut w, &all);
    write("control", "fill_all", &w.0);
    let mut w = SeedWriter::default();
    fill(&mut w, &fill_block(INO_A, 0, BlockKind::Raw, &[1; 100], 0));
    fill(&mut w, &fill_block(INO_A, 7, BlockKind::Raw, &[1; 100], 0));
    fill(&mut w, &fill_block(INO_A, 0, BlockKind::Raw, &[1; 32], 1));
    write("control", "fill_refused", &w.0);
    // Timeouts, pending reads, polls.
    let mut w = SeedWriter::default();
    w.u8(4).u8(INO_A as u8).u8(0).u8(3).u8(1);
    w.u8(1).u8(0).u8(4).u32(1500).u16(400);
    w.u8(1).u8(1).u8(4).u32(100_000).u16(80);
    w.u8(1).u8(0).u8(4).u32(250).u16(40);
    w.u8(2).u8(2).u32(0).u16(40);
    w.u8(2).u8(1).u32(10).u16(100);
    write("control", "polls", &w.0);
    let mut w = SeedWriter::default();
    let hex = incfs_wire::file_id_to_hex(&incfs_fuzz::file_id(INO_B));
    for parent in 0..3 {
        w.u8(3).u8(parent).u8(32).bytes(hex.as_bytes());
    }
    w.u8(2).u8(0).u32(0).u16(64).u8(5);
    write("control", "lookups", &w.0);
}

fn wire() {
    let r = ReadRecord { file_id: [3; 16], timestamp_us: 1 << 40, block: 9, serial: 2, uid: 1000 };
    write("wire", "records", &[r.encode(), r.encode()].concat());
    write("wire", "fill", &fill_block(INO_A, 2, BlockKind::Raw, b"tail", 0));
    let s =
        FileState { size: 20580, total_blocks: 6, filled_blocks: 3, fully_loaded: false, ranges: vec![(0, 2), (5, 6)] };
    write("wire", "filled", &s.encode());
    write("wire", "last_error", &LastReadError { errno: 62, ..Default::default() }.encode());
    write("wire", "stats", b"reads_failed_timed_out 4\nengine_reads 9\n");
    write("wire", "file_id", incfs_wire::file_id_to_hex(&[0xab; 16]).as_bytes());
}
