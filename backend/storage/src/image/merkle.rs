//! Per-file SHA-256 Merkle tree in the fs-verity layout (as Android's Incremental FS uses).
//!
//! Leaves are SHA-256 over each 4096-byte data block (the last one zero-padded). Each tree
//! level packs 128 hashes into 4096-byte blocks (the last one zero-padded) and hashes those
//! blocks to form the level above, until one block remains; the root hash is the hash of that
//! block. A one-block file has no tree: its root is its leaf hash. An empty file's root is zero.

use sha2::{Digest, Sha256};

use super::{Hash, BLOCK_SIZE};

const HASHES_PER_BLOCK: usize = BLOCK_SIZE / 32;

/// SHA-256 of one data block, zero-padded to 4096 bytes.
pub fn leaf_hash(data: &[u8]) -> Hash {
    debug_assert!(data.len() <= BLOCK_SIZE);
    let mut h = Sha256::new();
    h.update(data);
    if data.len() < BLOCK_SIZE {
        h.update(&ZERO_BLOCK[..BLOCK_SIZE - data.len()]);
    }
    h.finalize().into()
}

pub static ZERO_BLOCK: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];

/// The hash of an all-zero block, the leaf of every sparse block.
pub fn zero_leaf() -> Hash {
    use std::sync::OnceLock;
    static Z: OnceLock<Hash> = OnceLock::new();
    *Z.get_or_init(|| leaf_hash(&ZERO_BLOCK))
}

/// Whether `h` is the leaf of an all-zero block: such a block is never stored or fetched.
pub fn is_zero_leaf(h: &Hash) -> bool {
    *h == zero_leaf()
}

/// Builds the tree levels above the leaves, bottom-up; each level is a byte vector of whole
/// 4096-byte blocks.
fn levels(leaves: &[Hash]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if leaves.len() <= 1 {
        return out;
    }
    let mut cur: Vec<Hash> = leaves.to_vec();
    loop {
        let nblocks = cur.len().div_ceil(HASHES_PER_BLOCK);
        let mut level = vec![0u8; nblocks * BLOCK_SIZE];
        for (i, h) in cur.iter().enumerate() {
            level[i * 32..i * 32 + 32].copy_from_slice(h);
        }
        let next: Vec<Hash> = level.chunks(BLOCK_SIZE).map(|b| Sha256::digest(b).into()).collect();
        out.push(level);
        if next.len() == 1 {
            return out;
        }
        cur = next;
    }
}

/// The root hash (the file's digest) of a file with these leaf hashes.
pub fn root_hash(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => [0; 32],
        1 => leaves[0],
        _ => {
            let lv = levels(leaves);
            // The top level is one block; the root is its hash.
            lv.last().map(|top| Sha256::digest(top).into()).unwrap_or([0; 32])
        }
    }
}

/// The whole tree as fs-verity stores it: levels top-down, each a run of 4096-byte blocks.
pub fn tree_bytes(leaves: &[Hash]) -> Vec<u8> {
    let mut lv = levels(leaves);
    lv.reverse();
    lv.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_trees() {
        assert_eq!(root_hash(&[]), [0; 32]);
        let a = leaf_hash(b"hello");
        assert_eq!(root_hash(&[a]), a);
        // Two leaves: one tree block holding both hashes, zero padded.
        let b = leaf_hash(b"world");
        let mut blk = vec![0u8; 4096];
        blk[..32].copy_from_slice(&a);
        blk[32..64].copy_from_slice(&b);
        let want: Hash = Sha256::digest(&blk).into();
        assert_eq!(root_hash(&[a, b]), want);
        assert_eq!(tree_bytes(&[a, b]), blk);
    }

    #[test]
    fn two_level_tree_is_top_down() {
        // 129 leaves need two level-0 blocks and one level-1 block.
        let leaves: Vec<Hash> = (0..129u32).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let t = tree_bytes(&leaves);
        assert_eq!(t.len(), 3 * 4096);
        let top = &t[..4096];
        assert_eq!(root_hash(&leaves), <Hash>::from(Sha256::digest(top)));
        let l0b0: Hash = Sha256::digest(&t[4096..8192]).into();
        assert_eq!(&top[..32], &l0b0);
    }

    #[test]
    fn padding_matches_explicit_zeroes() {
        let mut padded = [0u8; 4096];
        padded[..3].copy_from_slice(b"abc");
        assert_eq!(leaf_hash(b"abc"), leaf_hash(&padded));
    }
}
