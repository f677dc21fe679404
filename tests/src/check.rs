//! What the guest helper (`guest-check`) and the host tests must compute identically: the
//! random read plans, the digests and the line format. Pure std + sha2, so the same code
//! runs in the static guest binary and in the host test.

use sha2::{Digest, Sha256};

/// splitmix64: a tiny seeded generator, so guest and host derive the same plans.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` for test plans (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `count` (offset, len) reads inside a file of `size` bytes, len in 1..=max_len, clipped at
/// EOF. About one in eight reads starts in the last `max_len` bytes, to cover the file's tail.
pub fn pread_plan(size: u64, seed: u64, count: usize, max_len: u64) -> Vec<(u64, usize)> {
    assert!(size > 0 && max_len > 0, "pread plan needs a non-empty file");
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let off = if rng.below(8) == 0 { size.saturating_sub(1 + rng.below(max_len)) } else { rng.below(size) };
            let len = (1 + rng.below(max_len)).min(size - off);
            (off, len as usize)
        })
        .collect()
}

/// Pages `0..pages` in a seeded random order (Fisher-Yates).
pub fn page_order(pages: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<usize> = (0..pages).collect();
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// Digest of a sequence of (position, data) pieces: sha256 over `pos (u64 le), len (u64 le),
/// data` for each piece in order. Used for random preads (pos = offset) and mmap page walks
/// (pos = page index), so a piece read from the wrong place or in the wrong length shows.
#[derive(Default)]
pub struct PieceDigest(Sha256);

impl PieceDigest {
    pub fn add(&mut self, pos: u64, data: &[u8]) {
        self.0.update(pos.to_le_bytes());
        self.0.update((data.len() as u64).to_le_bytes());
        self.0.update(data);
    }

    pub fn hex(self) -> String {
        hex(&self.0.finalize())
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Digest of a directory listing: sha256 of the sorted names, each followed by '\n'.
pub fn names_digest(names: &mut [String]) -> String {
    names.sort();
    let mut h = Sha256::new();
    for n in names.iter() {
        h.update(n.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// A file or a byte range of one: `PATH` or `PATH@OFFSET+LEN`.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub path: String,
    pub range: Option<(u64, u64)>,
}

impl Spec {
    pub fn parse(s: &str) -> Spec {
        if let Some((path, r)) = s.rsplit_once('@') {
            if let Some((a, b)) = r.split_once('+') {
                if let (Ok(off), Ok(len)) = (a.parse(), b.parse()) {
                    return Spec { path: path.to_string(), range: Some((off, len)) };
                }
            }
        }
        Spec { path: s.to_string(), range: None }
    }
}

/// Every result line the guest helper prints starts with this, so the host can pick them out
/// of the console stream (kernel messages and shell output share it).
pub const PREFIX: &str = "GC ";

/// The result lines in a console transcript, split into fields (prefix removed).
pub fn result_lines(console: &str) -> Vec<Vec<String>> {
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter_map(|l| l.find(PREFIX).map(|i| &l[i + PREFIX.len()..]))
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect()
}
