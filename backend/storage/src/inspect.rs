//! Human-readable views of images and caches (`incfsd inspect`, `incfsd cache verify`).

use std::io::{self, Write};

use crate::cache::BlockCache;
use crate::engine::Engine;
use crate::error::Result;
use crate::image::InodeKind;

/// One line per inode: type, mode, size, filled/total blocks for files, path.
pub fn print_tree(engine: &Engine, out: &mut impl Write) -> io::Result<()> {
    let img = engine.image();
    let mut filled_total = (0u64, 0u64);
    writeln!(out, "image {}", img.id)?;
    let mut stack: Vec<(u32, Vec<u8>)> = vec![(0, b"/".to_vec())];
    while let Some((ino, path)) = stack.pop() {
        let Some(node) = img.inode(ino) else { continue };
        let p = String::from_utf8_lossy(&path);
        match &node.kind {
            InodeKind::Dir(entries) => {
                writeln!(out, "d {:o} {:>12} {:>17} {p}", node.mode & 0o7777, "-", "-")?;
                for e in entries.iter().rev() {
                    let mut child = path.clone();
                    if child.len() > 1 {
                        child.push(b'/');
                    }
                    child.extend_from_slice(&e.name);
                    stack.push((e.ino, child));
                }
            }
            InodeKind::File(f) => {
                let (filled, total) = engine.fill_state(ino).unwrap_or((0, 0));
                filled_total.0 += filled;
                filled_total.1 += total;
                writeln!(out, "f {:o} {:>12} {:>17} {p}", node.mode & 0o7777, f.size, format!("{filled}/{total}"))?;
            }
            InodeKind::Symlink(t) => writeln!(
                out,
                "l {:o} {:>12} {:>17} {p} -> {}",
                node.mode & 0o7777,
                t.len(),
                "-",
                String::from_utf8_lossy(t)
            )?,
            InodeKind::Special { rdev } => {
                writeln!(out, "s {:o} {:>12} {:>17} {p} (rdev {rdev:#x})", node.mode, 0, "-")?
            }
        }
    }
    writeln!(
        out,
        "total {} inodes, {} bytes of file data, {}/{} blocks present",
        img.manifest.inodes.len(),
        img.data_size(),
        filled_total.0,
        filled_total.1
    )?;
    let stored: u64 = img.manifest.blobs.iter().map(|b| b.size).sum();
    let dict = match img.dictionary() {
        Some(d) => format!("a {}-byte zstd dictionary", d.size),
        None => "no dictionary".to_string(),
    };
    writeln!(
        out,
        "stored {stored} bytes in {} blobs ({dict}): compression {:.3}:1",
        img.manifest.blobs.len(),
        img.data_size() as f64 / stored.max(1) as f64
    )
}

/// Re-hashes every valid block in a cache: (good, bad).
pub fn verify_cache(cache: &BlockCache) -> Result<(u64, u64)> {
    let rep = cache.verify_blocks(false)?;
    Ok((rep.good, rep.bad))
}

/// Re-hashes every valid block in a cache and drops the bad ones (`cache verify --repair`):
/// (good, bad, dropped).
pub fn repair_cache(cache: &BlockCache) -> Result<(u64, u64, u64)> {
    let rep = cache.verify_blocks(true)?;
    Ok((rep.good, rep.bad, rep.dropped))
}
