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

use crate::error::Result;
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
            // Two hex digits exactly: from_str_radix alone would take "+1".
            let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
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

/// Most trace text `parse` reads; the rest is ignored. A trace is a hint from the store (it is
/// not covered by the image id), so it may cost at most this much memory and time. 8 MiB is
/// about a million runs, far more than any workload's first touches merge into.
pub const MAX_TRACE_BYTES: usize = 8 << 20;

/// Longest line: a path of PATH_MAX bytes, each escaped (`%XX`), and two numbers.
const MAX_LINE: usize = 3 * crate::image::PATH_MAX + 32;

/// Parses a trace against an image. A trace is only a hint: lines for paths the image lacks,
/// past a file's end, or malformed, are skipped and counted in the second value (malformed
/// ones are warned about once, with their count), and text past MAX_TRACE_BYTES is ignored.
/// Never fails; the Result stays for the callers.
pub fn parse(image: &Image, text: &str) -> Result<(Vec<Range>, usize)> {
    let mut body = text;
    if body.len() > MAX_TRACE_BYTES {
        // Cut at the last line end before the limit: a line split in two is not a line.
        let cut = body.as_bytes()[..MAX_TRACE_BYTES].iter().rposition(|&b| b == b'\n').map_or(0, |n| n + 1);
        tracing::warn!(
            bytes = text.len(),
            used = cut,
            "trace longer than {MAX_TRACE_BYTES} bytes: the rest is ignored"
        );
        body = &body[..cut];
    }
    let mut out = Vec::new();
    let (mut skipped, mut malformed) = (0usize, 0usize);
    let mut first_bad = None;
    for (n, line) in body.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((path, first, count)) = parse_line(line) else {
            malformed += 1;
            first_bad.get_or_insert(n + 1);
            continue;
        };
        let Some(f) = image.resolve(&path).and_then(|ino| Some((ino, image.file(ino)?))) else {
            skipped += 1;
            continue;
        };
        let (ino, f) = f;
        let end = (first as u64 + count as u64).min(f.blocks.len() as u64) as u32;
        if first >= end {
            skipped += 1;
            continue;
        }
        out.push((ino, first, end - first));
    }
    if let Some(line) = first_bad {
        tracing::warn!(malformed, first = line, "trace: skipped malformed lines (expected PATH<TAB>FIRST<TAB>COUNT)");
    }
    Ok((out, skipped + malformed))
}

/// PATH<TAB>FIRST<TAB>COUNT, or None.
fn parse_line(line: &str) -> Option<(Vec<u8>, u32, u32)> {
    if line.len() > MAX_LINE {
        return None;
    }
    let mut it = line.split('\t');
    let (Some(p), Some(first), Some(count), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return None;
    };
    Some((unescape(p)?, number(first)?, number(count)?))
}

/// Decimal digits only: `str::parse` alone would take "+1".
fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::tests::tree;

    #[test]
    fn malformed_lines_are_skipped_and_counted_not_fatal() {
        let img = tree();
        let text = "# incfs-trace v1 image 00\n\
                    f\t0\t1\n\
                    no tabs here\n\
                    f\t0\n\
                    f\t0\t1\textra\n\
                    f\tx\t1\n\
                    f\t0\t-1\n\
                    f\t99999999999\t1\n\
                    %zz\t0\t1\n\
                    f/../..\t0\t1\n\
                    \t\t\n\
                    d/g\t0\t4294967295\r\n";
        let (ranges, skipped) = parse(&img, text).expect("a bad line is skipped, not an error");
        assert_eq!(ranges, vec![(1, 0, 1), (3, 0, 1)]);
        assert_eq!(skipped, 9);
    }

    #[test]
    fn any_bytes_parse_without_panic() {
        let img = tree();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for len in 0..2000usize {
            let bytes: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let alphabet = b"f/d.g%0A\t\n\r19-+ \xff";
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse(&img, &text);
        }
    }

    #[test]
    fn text_past_the_size_limit_is_ignored() {
        let img = tree();
        let mut text = "f\t0\t1\n".repeat((8 << 20) / 6);
        text.push_str("d/g\t0\t1\n");
        let (ranges, _) = parse(&img, &text).expect("parse");
        assert!(!ranges.iter().any(|r| r.0 == 3), "a line past the limit was used");
        // A line longer than any escaped path is malformed, whatever it holds.
        let long = format!("{}\t0\t1\n", "%2F".repeat(5000));
        assert_eq!(parse(&img, &long).expect("parse"), (vec![], 1));
    }

    #[test]
    fn escaping_round_trips_any_bytes() {
        let p: Vec<u8> = (0u8..=255).collect();
        assert_eq!(unescape(&escape(&p)), Some(p));
        assert!(!escape(b"a\tb\nc%").contains(['\t', '\n']));
        assert_eq!(unescape("%4"), None);
        assert_eq!(unescape("%zz"), None);
    }
}
