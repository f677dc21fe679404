//! Read traces: the order in which a workload first touched each block, recorded by one run
//! (`incfsd run --record-trace`) and replayed as a prefetch list by later ones.
//!
//! Text, one run of blocks per line, so traces can be read, edited and reused across image
//! versions (lines name paths, not inode numbers; unknown paths are skipped):
//!
//! ```text
//! # incfs-trace v1 image <image id>
//! <path>\t<first block>\t<block count>
//! ```
//!
//! Paths are relative to the image root, with `%`, tab, newline, carriage return, control
//! bytes and bytes >= 0x7f written as `%XX`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::image::{Image, InodeKind};

/// A run of blocks of one file: (image inode, first block, count).
pub type Range = (u32, u32, u32);

/// Records first touches of blocks, in order. Cheap when a block was seen before: one
/// atomic load.
pub struct Recorder {
    /// Global index of each inode's block 0 (files only).
    base: Vec<u64>,
    seen: Vec<AtomicU64>,
    order: Mutex<Vec<(u32, u32)>>,
}

impl Recorder {
    /// `base`: each inode's first global block index (u64::MAX for non-files), as the engine
    /// numbers them; `total`: blocks of the image.
    pub fn new(base: Vec<u64>, total: u64) -> Self {
        Recorder {
            base,
            seen: (0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            order: Mutex::new(Vec::new()),
        }
    }

    /// Notes a read of blocks [first, last) of inode `ino`.
    pub fn note(&self, ino: u32, first: usize, last: usize) {
        let Some(&base) = self.base.get(ino as usize) else { return };
        if base == u64::MAX {
            return;
        }
        for b in first..last {
            let g = base + b as u64;
            let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            let Some(word) = self.seen.get(w) else { return };
            if word.load(Relaxed) & bit == 0 && word.fetch_or(bit, Relaxed) & bit == 0 {
                self.order.lock().unwrap_or_else(|e| e.into_inner()).push((ino, b as u32));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.order.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// First touches so far, consecutive blocks of one file merged.
    pub fn ranges(&self) -> Vec<Range> {
        let order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Range> = Vec::new();
        for &(ino, b) in order.iter() {
            match out.last_mut() {
                Some(r) if r.0 == ino && r.1 + r.2 == b => r.2 += 1,
                _ => out.push((ino, b, 1)),
            }
        }
        out
    }
}

/// One path per inode (the first found for hard links), relative to the root.
fn paths(image: &Image) -> Vec<Option<Vec<u8>>> {
    let mut out = vec![None; image.manifest.inodes.len()];
    let mut stack: Vec<(u32, Vec<u8>)> = vec![(0, Vec::new())];
    while let Some((d, prefix)) = stack.pop() {
        if let Some(InodeKind::Dir(entries)) = image.inode(d).map(|n| &n.kind) {
            for e in entries {
                let mut p = prefix.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                if out[e.ino as usize].is_none() {
                    out[e.ino as usize] = Some(p.clone());
                }
                stack.push((e.ino, p));
            }
        }
    }
    out
}

fn escape(path: &[u8]) -> String {
    let mut s = String::with_capacity(path.len());
    for &b in path {
        if b == b'%' || !(0x20..0x7f).contains(&b) {
            s.push_str(&format!("%{b:02X}"));
        } else {
            s.push(b as char);
        }
    }
    s
}

fn unescape(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

pub fn format(image: &Image, ranges: &[Range]) -> String {
    let names = paths(image);
    let mut s = format!("# incfs-trace v1 image {}\n", image.id);
    for &(ino, first, count) in ranges {
        if let Some(Some(p)) = names.get(ino as usize) {
            s.push_str(&format!("{}\t{first}\t{count}\n", escape(p)));
        }
    }
    s
}

/// Parses a trace against an image: lines for paths the image lacks, or past a file's end,
/// are skipped (counted in the second value); malformed lines are an error.
pub fn parse(image: &Image, text: &str) -> Result<(Vec<Range>, usize)> {
    let mut out = Vec::new();
    let mut skipped = 0;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || Error::Invalid(format!("trace line {}: expected PATH<TAB>FIRST<TAB>COUNT", n + 1));
        let mut it = line.split('\t');
        let (Some(p), Some(first), Some(count), None) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        let path = unescape(p).ok_or_else(bad)?;
        let first: u32 = first.parse().map_err(|_| bad())?;
        let count: u32 = count.parse().map_err(|_| bad())?;
        let Some(ino) = image.resolve(&path) else {
            skipped += 1;
            continue;
        };
        let Some(f) = image.file(ino) else {
            skipped += 1;
            continue;
        };
        let end = (first as u64 + count as u64).min(f.blocks.len() as u64) as u32;
        if first >= end {
            skipped += 1;
            continue;
        }
        out.push((ino, first, end - first));
    }
    Ok((out, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_any_bytes() {
        let p: Vec<u8> = (0u8..=255).collect();
        assert_eq!(unescape(&escape(&p)), Some(p));
        assert!(!escape(b"a\tb\nc%").contains(['\t', '\n']));
        assert_eq!(unescape("%4"), None);
        assert_eq!(unescape("%zz"), None);
    }
}
