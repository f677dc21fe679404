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
        let end = (first as u64 + count as u64).min(f.nblocks() as u64) as u32;
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

/// A trace's lines as (path, first block, count), without looking them up, and how many
/// were malformed. Comments and blank lines are not lines.
pub fn lines(text: &str) -> (Vec<(Vec<u8>, u32, u32)>, usize) {
    let mut out = Vec::new();
    let mut malformed = 0;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(l) => out.push(l),
            None => malformed += 1,
        }
    }
    (out, malformed)
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

/// Most blocks `merge` expands its traces into, all inputs together (a run names up to 2^32
/// blocks): 2^23 blocks, 32 GiB of traced data, about 100 MiB of memory.
pub const MAX_MERGE_BLOCKS: u64 = 1 << 23;

/// What `merge` made of its inputs.
#[derive(Debug)]
pub struct Merged {
    /// The merged trace, in the text format.
    pub text: String,
    pub runs: usize,
    pub blocks: u64,
    /// Malformed lines skipped, per input.
    pub malformed: Vec<usize>,
    /// The image id each input's header names (None without one).
    pub images: Vec<Option<String>>,
}

/// Merges traces of several runs into one; paths carry across image versions, so traces of
/// different images merge too. The rule, deterministic and independent of the inputs' order:
/// - a block's rank in a trace is how many distinct blocks that trace touched before it;
/// - the merge holds every block any trace names (the union), each once;
/// - blocks go by their median rank over the traces that name them (the lower median for an
///   even count), then those named by more traces first, then by earliest rank, then by path
///   and block number;
/// - consecutive blocks of one path are written as one run.
///
/// Inputs over `MAX_TRACE_BYTES`, or more than `MAX_MERGE_BLOCKS` blocks in all, are refused;
/// malformed lines are skipped and counted. The header names the first input's image.
pub fn merge(traces: &[&str]) -> Result<Merged> {
    let mut path_ids: std::collections::HashMap<Vec<u8>, u32> = std::collections::HashMap::new();
    let mut paths: Vec<Vec<u8>> = Vec::new();
    // (path, block, rank in its trace), every trace's blocks.
    let mut touches: Vec<(u32, u32, u32)> = Vec::new();
    let (mut malformed, mut images) = (Vec::new(), Vec::new());
    for (n, text) in traces.iter().enumerate() {
        if text.len() > MAX_TRACE_BYTES {
            return Err(Error::Invalid(format!(
                "trace {} is {} bytes, over the {MAX_TRACE_BYTES} bytes readers take",
                n + 1,
                text.len()
            )));
        }
        images.push(header_image(text));
        let (lines, bad) = lines(text);
        malformed.push(bad);
        let mut seen = std::collections::HashSet::new();
        let mut rank = 0u32;
        for (path, first, count) in lines {
            if touches.len() as u64 + count as u64 > MAX_MERGE_BLOCKS {
                return Err(Error::Invalid(format!(
                    "traces name more than {MAX_MERGE_BLOCKS} blocks in all (at trace {})",
                    n + 1
                )));
            }
            let id = match path_ids.get(&path) {
                Some(&id) => id,
                None => {
                    let id = paths.len() as u32;
                    path_ids.insert(path.clone(), id);
                    paths.push(path);
                    id
                }
            };
            for b in first..first.saturating_add(count) {
                if seen.insert((id, b)) {
                    touches.push((id, b, rank));
                    rank += 1;
                }
            }
        }
    }
    touches.sort_unstable();
    // (median rank, traces naming it, earliest rank, path, block) per distinct block.
    let mut blocks: Vec<(u32, std::cmp::Reverse<usize>, u32, u32, u32)> = Vec::new();
    for group in touches.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
        // Sorted by rank within the group: the tuples sort by (path, block, rank).
        let median = group[(group.len() - 1) / 2].2;
        blocks.push((median, std::cmp::Reverse(group.len()), group[0].2, group[0].0, group[0].1));
    }
    blocks.sort_unstable_by(|a, b| {
        (a.0, a.1, a.2)
            .cmp(&(b.0, b.1, b.2))
            .then_with(|| paths[a.3 as usize].cmp(&paths[b.3 as usize]))
            .then(a.4.cmp(&b.4))
    });
    let mut runs: Vec<(u32, u32, u32)> = Vec::new();
    for &(_, _, _, path, block) in &blocks {
        match runs.last_mut() {
            Some(r) if r.0 == path && r.1 as u64 + r.2 as u64 == block as u64 => r.2 += 1,
            _ => runs.push((path, block, 1)),
        }
    }
    let image = images.first().cloned().flatten().unwrap_or_else(|| "unknown".into());
    let mut text = format!("# incfs-trace v1 image {image}\n# merged from {} traces\n", traces.len());
    for &(path, first, count) in &runs {
        text.push_str(&format!("{}\t{first}\t{count}\n", escape(&paths[path as usize])));
    }
    Ok(Merged { text, runs: runs.len(), blocks: blocks.len() as u64, malformed, images })
}

/// The image id in a trace's first line, `# incfs-trace v1 image <id>`.
fn header_image(text: &str) -> Option<String> {
    let id = text.lines().next()?.strip_prefix("# incfs-trace v1 image ")?.trim();
    (!id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| id.to_string())
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

    fn merged(traces: &[&str]) -> Vec<String> {
        let m = merge(traces).expect("merge");
        m.text.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect()
    }

    #[test]
    fn merge_orders_by_median_rank_then_by_how_many_runs_saw_a_block() {
        let a = "# incfs-trace v1 image aa\nx\t0\t2\ny\t0\t1\n"; // x0 x1 y0
        let b = "# incfs-trace v1 image aa\ny\t0\t1\nx\t0\t1\nz\t5\t1\n"; // y0 x0 z5
        let c = "# incfs-trace v1 image bb\nx\t0\t1\nw\t0\t1\nx\t1\t1\ny\t0\t1\n"; // x0 w0 x1 y0
                                                                                   // Ranks: x0 {0,1,0} median 0; y0 {2,0,3} median 2; x1 {1,2} median 1; z5 {2} median 2;
                                                                                   // w0 {1} median 1. x1 and w0 tie on 1: x1 was seen by two runs. y0 and z5 tie on 2:
                                                                                   // y0 by three.
        assert_eq!(merged(&[a, b, c]), ["x\t0\t2", "w\t0\t1", "y\t0\t1", "z\t5\t1"]);
        // The inputs' order does not matter.
        assert_eq!(merge(&[c, a, b]).expect("merge").blocks, 5);
        assert_eq!(merged(&[c, a, b]), merged(&[a, b, c]));
        assert_eq!(merged(&[b, c, a]), merged(&[a, b, c]));
        // The header names the first input's image; each input's is reported.
        let m = merge(&[a, c]).expect("merge");
        assert!(m.text.starts_with("# incfs-trace v1 image aa\n"));
        assert_eq!(m.images, [Some("aa".to_string()), Some("bb".to_string())]);
    }

    #[test]
    fn merge_takes_each_block_once_and_rejoins_runs() {
        // One trace: its own order, repeats dropped, neighbours joined into runs.
        let t = "f\t0\t3\nf\t1\t1\nf\t3\t2\ng\t0\t1\nf\t5\t1\n";
        assert_eq!(merged(&[t]), ["f\t0\t5", "g\t0\t1", "f\t5\t1"]);
        assert_eq!(merged(&[t, t]), merged(&[t]));
        // Escaped paths survive.
        assert_eq!(merged(&["a%09b\t0\t1\n"]), ["a%09b\t0\t1"]);
    }

    #[test]
    fn merge_skips_malformed_lines_and_refuses_oversized_input() {
        let m = merge(&["f\t0\t1\nnot a line\nf\t-1\t1\n", "g\t0\t1\n"]).expect("merge");
        assert_eq!(m.malformed, [2, 0]);
        assert_eq!(m.blocks, 2);
        let big = "f\t0\t1\n".repeat(MAX_TRACE_BYTES / 6 + 1);
        assert!(matches!(merge(&[&big]), Err(Error::Invalid(_))));
        // A run may name 2^32 blocks: the expansion is bounded too.
        assert!(matches!(merge(&["f\t0\t4294967295\n"]), Err(Error::Invalid(_))));
        let half = format!("f\t0\t{}\n", MAX_MERGE_BLOCKS / 2 + 1);
        assert!(merge(&[&half]).is_ok());
        assert!(matches!(merge(&[&half, &half]), Err(Error::Invalid(_))));
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
