//! A file's block index as a hostile store serves it (format version 3), decoded against the
//! file's size and root: refused or verified, never a panic, and what verifies holds the
//! leaf hashes the packer wrote (locations are bounded, not trusted).
#![no_main]

use incfs_storage::image::index::{self, Bounds};
use incfs_storage::image::{merkle, Blob, BlockKind, BlockRef, Hash};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, shift, body @ ..] = data else { return };
    // A file of 1 to 3,000 blocks (an upper level from 129 on), and its real index.
    let nblocks = u64::from(u16::from_le_bytes([*a, *b])) % 3_000 + 1;
    let blocks: Vec<BlockRef> = (0..nblocks)
        .map(|i| BlockRef {
            hash: merkle::leaf_hash(&(i as u32 + 1).to_le_bytes()),
            kind: BlockKind::Zstd,
            blob: 0,
            len: 1 + (i % 100) as u32,
            offset: i * 100,
        })
        .collect();
    let leaves: Vec<Hash> = blocks.iter().map(|b| b.hash).collect();
    let root = merkle::root_hash(&leaves);
    let blobs = [Blob { id: [1; 32], size: nblocks * 100 }];
    let bounds = Bounds { blobs: &blobs, dictionary: None };
    let good = index::encode(&blocks);
    assert_eq!(good.len() as u64, index::index_len(nblocks));
    // The hostile bytes xored over the real index from `shift` on.
    let mut bad = good.clone();
    for (i, x) in body.iter().enumerate() {
        let at = (i + *shift as usize * 97) % bad.len();
        bad[at] ^= x;
    }
    // The hostile bytes themselves as upper levels and as a segment.
    let _ = index::verify_upper(body, &root, nblocks);
    let _ = index::decode_segment(body, body.len() / index::RECORD_BYTES, &root, nblocks, &bounds);
    let upper = index::upper_len(nblocks) as usize;
    let level1: Vec<Hash> = match nblocks > index::SEGMENT_BLOCKS as u64 {
        true => match index::verify_upper(&bad[..upper], &root, nblocks) {
            Ok(l) => {
                assert_eq!(bad[..upper], good[..upper], "changed upper levels verified");
                l.to_vec()
            }
            Err(_) => return,
        },
        false => vec![root],
    };
    for s in 0..index::segments(nblocks) {
        let count = index::segment_len(nblocks, s);
        let at = index::segment_offset(nblocks, s) as usize;
        let rec = &bad[at..at + count * index::RECORD_BYTES];
        if let Ok((hashes, locs)) = index::decode_segment(rec, count, &level1[s as usize], nblocks, &bounds) {
            let first = s as usize * index::SEGMENT_BLOCKS;
            assert_eq!(&hashes[..], &leaves[first..first + count], "changed hashes verified");
            for l in locs.iter() {
                assert!(l.len > 0 && l.offset + u64::from(l.len) <= blobs[0].size, "location out of bounds");
            }
        }
    }
});
