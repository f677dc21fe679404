//! The order in which `pack` appends blocks to blobs. Without a trace, file order: a file's
//! blocks sit next to each other. With one (`incfsd pack --trace`), the traced blocks come
//! first, in the trace's (first-access) order, so what a workload reads first lies end to end
//! and one request fetches many traced runs; every other block follows in file order.
//! Readers never depend on the order: each block's place is in the manifest.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::image::{Inode, InodeKind};
use crate::trace;

/// Blocks of one file appended together: (file index in pack's list, first block, count).
pub type Segment = (usize, u64, u64);

/// Where every block of the packed files goes, in append order.
#[derive(Debug, Default, PartialEq)]
pub struct Layout {
    pub segments: Vec<Segment>,
    /// Blocks placed first because the trace names them.
    pub traced_blocks: u64,
    /// Trace lines not used: malformed, or naming a path that is not a file of the tree, or
    /// blocks past its end.
    pub skipped_lines: usize,
}

/// The append order of `files` ((inode, blocks) in pack's file order) given the walked
/// `inodes` and a trace's text. A trace over `trace::MAX_TRACE_BYTES` is refused: readers
/// would ignore its tail, so the layout could not match what they prefetch.
pub fn plan(inodes: &[Inode], files: &[(u32, u64)], trace_text: Option<&str>) -> Result<Layout> {
    let mut layout = Layout::default();
    // Blocks already placed, for the files the trace names.
    let mut placed: HashMap<usize, Vec<bool>> = HashMap::new();
    if let Some(text) = trace_text {
        if text.len() > trace::MAX_TRACE_BYTES {
            return Err(Error::Invalid(format!(
                "trace of {} bytes is over the {} bytes readers take",
                text.len(),
                trace::MAX_TRACE_BYTES
            )));
        }
        let file_of: HashMap<u32, usize> = files.iter().enumerate().map(|(i, &(ino, _))| (ino, i)).collect();
        let (lines, malformed) = trace::lines(text);
        layout.skipped_lines = malformed;
        for (path, first, count) in lines {
            let Some(&file) = resolve(inodes, &path).and_then(|ino| file_of.get(&ino)) else {
                layout.skipped_lines += 1;
                continue;
            };
            let blocks = files[file].1;
            let end = (first as u64 + count as u64).min(blocks);
            if first as u64 >= end {
                layout.skipped_lines += 1;
                continue;
            }
            let done = placed.entry(file).or_insert_with(|| vec![false; blocks as usize]);
            for b in first as u64..end {
                if !std::mem::replace(&mut done[b as usize], true) {
                    push(&mut layout.segments, file, b);
                    layout.traced_blocks += 1;
                }
            }
        }
    }
    for (file, &(_, blocks)) in files.iter().enumerate() {
        match placed.get(&file) {
            None if blocks > 0 => layout.segments.push((file, 0, blocks)),
            None => {}
            Some(done) => {
                for (b, _) in done.iter().enumerate().filter(|(_, &d)| !d) {
                    push(&mut layout.segments, file, b as u64);
                }
            }
        }
    }
    Ok(layout)
}

/// Appends block `b` of `file`, extending the last segment when it is the next block.
fn push(segments: &mut Vec<Segment>, file: usize, b: u64) {
    match segments.last_mut() {
        Some(s) if s.0 == file && s.1 + s.2 == b => s.2 += 1,
        _ => segments.push((file, b, 1)),
    }
}

/// The inode at `path` (relative to the root, as traces write it), as `Image::resolve` finds
/// it: `.` and empty parts stay, `..` goes up (not above the root).
fn resolve(inodes: &[Inode], path: &[u8]) -> Option<u32> {
    let mut stack = vec![0u32];
    for part in path.split(|&c| c == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                stack.pop();
                if stack.is_empty() {
                    return None;
                }
            }
            name => {
                let InodeKind::Dir(entries) = &inodes.get(*stack.last()? as usize)?.kind else { return None };
                let i = entries.binary_search_by(|e| e.name.as_slice().cmp(name)).ok()?;
                stack.push(entries[i].ino);
            }
        }
    }
    stack.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::DirEntry;

    fn inode(kind: InodeKind) -> Inode {
        Inode { mode: 0, uid: 0, gid: 0, mtime_sec: 0, mtime_nsec: 0, xattrs: vec![], kind }
    }

    fn file() -> Inode {
        inode(InodeKind::File(crate::image::FileData {
            size: 0,
            root: [0; 32],
            table: crate::image::BlockTable::Inline(vec![]),
        }))
    }

    /// / { a (3 blocks), d/ { b (4 blocks) }, e (0 blocks) }
    fn tree() -> (Vec<Inode>, Vec<(u32, u64)>) {
        let e = |name: &str, ino| DirEntry { name: name.as_bytes().to_vec(), ino };
        let inodes = vec![
            inode(InodeKind::Dir(vec![e("a", 1), e("d", 2), e("e", 4)])),
            file(),
            inode(InodeKind::Dir(vec![e("b", 3)])),
            file(),
            file(),
        ];
        (inodes, vec![(1, 3), (3, 4), (4, 0)])
    }

    #[test]
    fn without_a_trace_blocks_go_in_file_order() {
        let (inodes, files) = tree();
        let l = plan(&inodes, &files, None).expect("plan");
        assert_eq!(l.segments, vec![(0, 0, 3), (1, 0, 4)]);
        assert_eq!(l.traced_blocks, 0);
    }

    #[test]
    fn traced_blocks_go_first_in_trace_order_then_the_rest_in_file_order() {
        let (inodes, files) = tree();
        let text = "# incfs-trace v1 image 00\n\
                    d/b\t2\t2\n\
                    a\t1\t1\n\
                    d/b\t3\t1\n\
                    nope\t0\t1\n\
                    a\t9\t1\n\
                    e\t0\t1\n\
                    bad line\n\
                    ./d/../a\t0\t1\n\
                    d/b\t0\t4294967295\n";
        let l = plan(&inodes, &files, Some(text)).expect("plan");
        assert_eq!(
            l.segments,
            vec![(1, 2, 2), (0, 1, 1), (0, 0, 1), (1, 0, 2), (0, 2, 1)],
            "b2-3, a1, a0, b0-1 (b3 again and b2-3 skipped), then the untraced a2"
        );
        assert_eq!(l.traced_blocks, 6);
        assert_eq!(l.skipped_lines, 4, "nope, a past its end, the empty e, the malformed line");
        let all: u64 = l.segments.iter().map(|s| s.2).sum();
        assert_eq!(all, 7, "every block once");
    }

    #[test]
    fn a_trace_over_the_readers_limit_is_refused() {
        let (inodes, files) = tree();
        let text = "a\t0\t1\n".repeat(trace::MAX_TRACE_BYTES / 6 + 1);
        assert!(plan(&inodes, &files, Some(&text)).is_err());
    }
}
