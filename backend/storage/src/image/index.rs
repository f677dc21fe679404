//! A file's block index (format version 3): the levels of its fs-verity tree above the leaves,
//! then per segment of 128 blocks the leaf hashes and where each block is stored. It lives in
//! a blob (the manifest says where) and is fetched on demand: the manifest keeps only the
//! file's root. Every offset follows from the file's size, so a reader fetches the part it
//! needs in one range.
//!
//! A segment's leaf hashes, zero-padded to 4096 bytes, are its level-0 tree block: verified
//! against the level above (the upper levels against the root), hashes are as trusted as the
//! root. Locations are not hashed and need not be: they are bounded here, and bytes fetched
//! through a wrong one fail verification against the leaf, as any bad bytes from a store do.

use sha2::{Digest, Sha256};

use super::{merkle, Blob, BlockKind, BlockRef, Hash, BLOCK_SIZE};
use crate::error::{Error, Result};

/// Blocks per segment: the leaves one level-0 tree block covers.
pub const SEGMENT_BLOCKS: usize = BLOCK_SIZE / 32;
/// Bytes of one block's location: kind u8, blob u32, offset u64, len u32.
pub const LOC_BYTES: usize = 17;
/// Bytes per block in a segment record: its leaf hash and its location.
pub const RECORD_BYTES: usize = 32 + LOC_BYTES;
/// Longest stored block.
pub const STORED_MAX: u32 = 2 * BLOCK_SIZE as u32;

/// Where one block's stored bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub offset: u64,
    pub blob: u32,
    pub len: u32,
    pub kind: BlockKind,
}

impl Loc {
    pub const ZERO: Loc = Loc { offset: 0, blob: 0, len: 0, kind: BlockKind::Zero };

    pub fn of(r: &BlockRef) -> Loc {
        Loc { offset: r.offset, blob: r.blob, len: r.len, kind: r.kind }
    }

    pub fn with_hash(&self, hash: Hash) -> BlockRef {
        BlockRef { hash, kind: self.kind, blob: self.blob, len: self.len, offset: self.offset }
    }
}

/// Blocks of a file of `size` bytes.
pub fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE as u64)
}

/// Segments of a file of `nblocks` blocks.
pub fn segments(nblocks: u64) -> u64 {
    nblocks.div_ceil(SEGMENT_BLOCKS as u64)
}

/// Blocks in segment `s`.
pub fn segment_len(nblocks: u64, s: u64) -> usize {
    nblocks.saturating_sub(s * SEGMENT_BLOCKS as u64).min(SEGMENT_BLOCKS as u64) as usize
}

/// Tree blocks per level above level 0, top level first (none for a one-segment file).
pub fn upper_levels(nblocks: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut n = segments(nblocks);
    while n > 1 {
        n = n.div_ceil(SEGMENT_BLOCKS as u64);
        out.push(n);
    }
    out.reverse();
    out
}

/// Bytes of the upper levels, at the start of the index.
pub fn upper_len(nblocks: u64) -> u64 {
    upper_levels(nblocks).iter().sum::<u64>() * BLOCK_SIZE as u64
}

/// Offset of segment `s`'s record from the start of the index.
pub fn segment_offset(nblocks: u64, s: u64) -> u64 {
    upper_len(nblocks) + s * (SEGMENT_BLOCKS * RECORD_BYTES) as u64
}

/// Bytes of the whole index of a file of `nblocks` blocks.
pub fn index_len(nblocks: u64) -> u64 {
    upper_len(nblocks) + nblocks * RECORD_BYTES as u64
}

/// The index of a file: its upper tree levels, then each segment's hashes and locations.
pub fn encode(blocks: &[BlockRef]) -> Vec<u8> {
    let leaves: Vec<Hash> = blocks.iter().map(|b| b.hash).collect();
    let n = blocks.len() as u64;
    let tree = merkle::tree_bytes(&leaves);
    let upper = upper_len(n) as usize;
    let mut out = Vec::with_capacity(index_len(n) as usize);
    out.extend_from_slice(&tree[..upper.min(tree.len())]);
    for seg in blocks.chunks(SEGMENT_BLOCKS) {
        for b in seg {
            out.extend_from_slice(&b.hash);
        }
        for b in seg {
            out.push(b.kind as u8);
            out.extend_from_slice(&b.blob.to_le_bytes());
            out.extend_from_slice(&b.offset.to_le_bytes());
            out.extend_from_slice(&b.len.to_le_bytes());
        }
    }
    out
}

/// Checks the upper levels of a file's tree (`bytes`, top level first) against its root;
/// returns the level-1 entries: the hash of each segment's level-0 block.
pub fn verify_upper(bytes: &[u8], root: &Hash, nblocks: u64) -> Result<Box<[Hash]>> {
    let levels = upper_levels(nblocks);
    if bytes.len() as u64 != upper_len(nblocks) || levels.is_empty() {
        return Err(bad("tree levels of the wrong length"));
    }
    // The hashes the next level down must match, top first: the root.
    let mut expected: Vec<Hash> = vec![*root];
    let mut at = 0usize;
    for &count in &levels {
        let mut next = Vec::with_capacity(count as usize * SEGMENT_BLOCKS);
        for want in expected.iter().take(count as usize) {
            let block = &bytes[at..at + BLOCK_SIZE];
            if <Hash>::from(Sha256::digest(block)) != *want {
                return Err(bad("tree block does not match the level above"));
            }
            next.extend(block.chunks_exact(32).map(|h| <Hash>::try_from(h).unwrap_or([0; 32])));
            at += BLOCK_SIZE;
        }
        expected = next;
    }
    expected.truncate(segments(nblocks) as usize);
    Ok(expected.into_boxed_slice())
}

/// A segment's level-0 tree block: its leaf hashes, zero-padded.
pub fn level0_block(hashes: &[Hash]) -> [u8; BLOCK_SIZE] {
    let mut block = [0u8; BLOCK_SIZE];
    for (i, h) in hashes.iter().take(SEGMENT_BLOCKS).enumerate() {
        block[i * 32..i * 32 + 32].copy_from_slice(h);
    }
    block
}

/// The leaf hashes in a segment's level-0 block.
pub fn hashes_of_level0(block: &[u8], count: usize) -> Box<[Hash]> {
    block.chunks_exact(32).take(count).map(|h| <Hash>::try_from(h).unwrap_or([0; 32])).collect()
}

/// Whether `hashes` are the leaves of a segment whose level-0 block should hash to `expected`
/// (`expected` is the root for a one-block file, whose root is its leaf).
pub fn hashes_match(hashes: &[Hash], expected: &Hash, nblocks: u64) -> bool {
    if nblocks == 1 {
        return hashes.len() == 1 && hashes[0] == *expected;
    }
    <Hash>::from(Sha256::digest(level0_block(hashes))) == *expected
}

/// A segment's leaf hashes (verified) and block locations (bounded).
pub type SegmentTable = (Box<[Hash]>, Box<[Loc]>);

/// What a reader needs of the image to bound a location.
pub struct Bounds<'a> {
    pub blobs: &'a [Blob],
    pub dictionary: Option<u32>,
}

/// Decodes segment record `bytes` of `count` blocks: checks the hashes against `expected`
/// (see `hashes_match`) and bounds every location. Zero blocks are the ones whose leaf is the
/// zero block's.
pub fn decode_segment(
    bytes: &[u8],
    count: usize,
    expected: &Hash,
    nblocks: u64,
    bounds: &Bounds<'_>,
) -> Result<SegmentTable> {
    if bytes.len() != count * RECORD_BYTES || count == 0 || count > SEGMENT_BLOCKS {
        return Err(bad("segment record of the wrong length"));
    }
    let (hash_bytes, loc_bytes) = bytes.split_at(count * 32);
    let hashes = hashes_of_level0(hash_bytes, count);
    if !hashes_match(&hashes, expected, nblocks) {
        return Err(bad("segment hashes do not match the file's tree"));
    }
    let zero = merkle::zero_leaf();
    let mut locs = Vec::with_capacity(count);
    for (h, l) in hashes.iter().zip(loc_bytes.chunks_exact(LOC_BYTES)) {
        let kind = BlockKind::from_u8(l[0]).ok_or_else(|| bad("unknown block kind"))?;
        let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let blob = le32(&l[1..5]);
        let offset = u64::from_le_bytes([l[5], l[6], l[7], l[8], l[9], l[10], l[11], l[12]]);
        let len = le32(&l[13..17]);
        if *h == zero {
            locs.push(Loc::ZERO);
            continue;
        }
        check_loc(kind, blob, offset, len, bounds)?;
        locs.push(Loc { offset, blob, len, kind });
    }
    Ok((hashes, locs.into_boxed_slice()))
}

/// A stored block's location must lie inside a blob that holds blocks, with a kind the image
/// can decode.
pub fn check_loc(kind: BlockKind, blob: u32, offset: u64, len: u32, bounds: &Bounds<'_>) -> Result<()> {
    match kind {
        BlockKind::Zero => return Err(bad("zero block with a non-zero hash")),
        BlockKind::ZstdDict if bounds.dictionary.is_none() => {
            return Err(bad("dictionary-compressed block in an image without a dictionary"))
        }
        _ => {}
    }
    if bounds.dictionary == Some(blob) {
        return Err(bad("block inside the dictionary blob"));
    }
    let b = bounds.blobs.get(blob as usize).ok_or_else(|| bad("block in unknown blob"))?;
    let end = offset.checked_add(len as u64);
    if len == 0 || len > STORED_MAX || end.is_none_or(|e| e > b.size) {
        return Err(bad("block location outside its blob"));
    }
    Ok(())
}

fn bad(what: &str) -> Error {
    Error::Manifest(format!("file index: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(n: usize) -> Vec<BlockRef> {
        (0..n)
            .map(|i| BlockRef {
                hash: merkle::leaf_hash(&(i as u32 + 1).to_le_bytes()),
                kind: BlockKind::Zstd,
                blob: 0,
                len: 10,
                offset: i as u64 * 10,
            })
            .collect()
    }

    fn bounds() -> Vec<Blob> {
        vec![Blob { id: [1; 32], size: 1 << 30 }]
    }

    #[test]
    fn shapes() {
        assert_eq!(upper_levels(1), Vec::<u64>::new());
        assert_eq!(upper_levels(128), Vec::<u64>::new());
        assert_eq!(upper_levels(129), vec![1]);
        assert_eq!(upper_levels(128 * 128), vec![1]);
        assert_eq!(upper_levels(128 * 128 + 1), vec![1, 2]);
        // 4 GiB: 2^20 blocks, 8192 segments, level 1 of 64 blocks, level 2 of one.
        assert_eq!(upper_levels(1 << 20), vec![1, 64]);
        assert_eq!(index_len(3), 3 * 49);
        assert_eq!(segment_offset(300, 2), 4096 + 2 * 128 * 49);
    }

    #[test]
    fn every_segment_verifies_against_the_root_through_the_upper_levels() {
        for n in [1usize, 2, 127, 128, 129, 300, 128 * 128 + 5] {
            let b = blocks(n);
            let leaves: Vec<Hash> = b.iter().map(|r| r.hash).collect();
            let root = merkle::root_hash(&leaves);
            let idx = encode(&b);
            assert_eq!(idx.len() as u64, index_len(n as u64), "{n}");
            let blobs = bounds();
            let bounds = Bounds { blobs: &blobs, dictionary: None };
            let upper = upper_len(n as u64) as usize;
            let l0: Vec<Hash> = if n > SEGMENT_BLOCKS {
                verify_upper(&idx[..upper], &root, n as u64).expect("upper").to_vec()
            } else {
                vec![root]
            };
            assert_eq!(l0.len() as u64, segments(n as u64));
            for s in 0..segments(n as u64) {
                let at = segment_offset(n as u64, s) as usize;
                let count = segment_len(n as u64, s);
                let rec = &idx[at..at + count * RECORD_BYTES];
                let (h, l) = decode_segment(rec, count, &l0[s as usize], n as u64, &bounds).expect("segment");
                let first = s as usize * SEGMENT_BLOCKS;
                assert_eq!(&h[..], &leaves[first..first + count]);
                assert_eq!(l[0], Loc::of(&b[first]));
                // One flipped hash bit and the segment is refused.
                let mut bad = rec.to_vec();
                bad[5] ^= 1;
                assert!(decode_segment(&bad, count, &l0[s as usize], n as u64, &bounds).is_err());
            }
            if n > SEGMENT_BLOCKS {
                let mut bad = idx[..upper].to_vec();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert!(verify_upper(&bad, &root, n as u64).is_err());
                assert!(verify_upper(&idx[..upper - 1], &root, n as u64).is_err());
            }
        }
    }

    #[test]
    fn locations_are_bounded() {
        let b = blocks(2);
        let root = merkle::root_hash(&[b[0].hash, b[1].hash]);
        let blobs = vec![Blob { id: [1; 32], size: 15 }];
        let bounds = Bounds { blobs: &blobs, dictionary: None };
        // Block 1 ends at 20, past the 15-byte blob.
        let e = decode_segment(&encode(&b), 2, &root, 2, &bounds).expect_err("outside");
        assert!(e.to_string().contains("outside its blob"), "{e}");
        let mut idx = encode(&b);
        idx[64] = 9; // kind of block 0
        assert!(decode_segment(&idx, 2, &root, 2, &Bounds { blobs: &bounds_big(), dictionary: None }).is_err());
        let mut idx = encode(&b);
        idx[64] = BlockKind::ZstdDict as u8;
        assert!(decode_segment(&idx, 2, &root, 2, &Bounds { blobs: &bounds_big(), dictionary: None }).is_err());
        // Truncated or too long: refused, never a panic.
        let idx = encode(&b);
        for n in 0..idx.len() + 3 {
            let mut v = idx.clone();
            v.resize(n, 0);
            let r = decode_segment(&v, 2, &root, 2, &Bounds { blobs: &bounds_big(), dictionary: None });
            assert_eq!(r.is_ok(), n == idx.len(), "{n}");
        }
    }

    fn bounds_big() -> Vec<Blob> {
        bounds()
    }
}
