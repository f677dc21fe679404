//! The per-VM copy-on-write overlay of a disk: one sparse file holding a header, a bitmap of
//! the 4 KiB blocks the guest has written, and those blocks at their disk offsets.
//!
//! ```text
//! [0, 4096)                 header: magic, version, disk size, image id, path in the image
//! [4096, data_off)          bitmap, one bit per 4 KiB block of the disk (bit set: overlaid)
//! [data_off, +disk size)    data; only overlaid blocks are ever written (the rest are holes)
//!
//! [data_off + disk size, +4096)  unflushed record header: magic, the boot id it was made in
//! [.. + 4096, + bitmap size)     bits set since (never synced: see below)
//! ```
//!
//! Crash safety: a write goes to the data area with `pwrite` and sets its bit in memory. FLUSH
//! (serialized) snapshots the dirty part of the bitmap, `fdatasync`s (the data of every write
//! completed before the flush is then durable), writes the snapshot, and `fdatasync`s again.
//! Bits only ever go from 0 to 1 and a bit reaches the disk only after its data did, so after
//! a host crash every block whose bit is set holds data the guest wrote, and every write
//! acknowledged before a completed FLUSH is there. Blocks written after the last FLUSH may
//! read as their previous content (like a disk's volatile write cache).
//!
//! A crash of the daemon alone must lose nothing acknowledged: the guest goes on running and
//! would read the old content of a block it wrote. The data is in the page cache, which
//! outlives the process; so, before a write is acknowledged, its new bits are also written
//! (not synced) to the unflushed record. A daemon that opens the overlay in the same boot (the
//! page cache is the same) merges the record into the bitmap it read; after a reboot the
//! record is ignored and started afresh, so a bit whose data may not have reached the disk
//! is never trusted. A write replayed after a crash writes the same bytes again, read-modify-
//! write included (the partial block's base is the same, or the block is already overlaid
//! with the write's own bytes), so replaying is safe.
//!
//! An fdatasync error poisons the overlay: the kernel may have dropped the pages that failed
//! to reach the disk and marked them clean, so a later fdatasync can succeed without them and
//! a bitmap flushed then would vouch for lost data. Every later write and flush fails with
//! EIO (as PostgreSQL does); the overlay on disk stays as of the last good flush.
//!
//! One daemon at a time: `open` takes an exclusive flock on the file, so a second daemon cannot
//! flush its own bitmap over the first's bits.
//!
//! The overlay never touches the shared block cache; the base content comes from the engine.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::image::ImageId;

pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"INCFSOVL";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const MAX_PATH: usize = 3072;
const UNFLUSHED_MAGIC: &[u8; 8] = b"INCFSUNF";
const BOOT_ID_LEN: usize = 36;

/// This boot's id (`/proc/sys/kernel/random/boot_id`), read once: call it before the sandbox
/// hides /proc. None if it cannot be read (then no unflushed record is kept).
pub fn boot_id() -> Option<[u8; BOOT_ID_LEN]> {
    static ID: std::sync::OnceLock<Option<[u8; BOOT_ID_LEN]>> = std::sync::OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        text.trim().as_bytes().try_into().ok()
    })
}

struct State {
    bitmap: Vec<u64>,
    /// Range of bitmap words changed since the last flush snapshot.
    dirty: Option<(usize, usize)>,
    /// Data written since the last flush snapshot.
    data_dirty: bool,
    overlaid: u64,
    /// Range of bitmap words changed since they were last written to the unflushed record.
    unrecorded: Option<(usize, usize)>,
}

pub struct Overlay {
    /// Holds the exclusive flock for as long as the overlay is open.
    file: File,
    path: PathBuf,
    size: u64,
    blocks: u64,
    data_off: u64,
    /// Where the unflushed record's bitmap starts; None without a boot id.
    record_off: Option<u64>,
    state: Mutex<State>,
    /// Held for a whole flush: snapshots reach the disk in order.
    flushing: Mutex<()>,
    /// Set by a failed fdatasync; never cleared (see the module comment).
    poisoned: AtomicBool,
    /// Test hook: this many coming `fdatasync`s fail with EIO, as a dying disk's would.
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicU32,
}

fn header(size: u64, image: &ImageId, path: &str) -> Vec<u8> {
    let mut h = vec![0u8; HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..56].copy_from_slice(&image.0);
    let p = path.as_bytes();
    let n = p.len().min(MAX_PATH);
    h[56..60].copy_from_slice(&(n as u32).to_le_bytes());
    h[64..64 + n].copy_from_slice(&p[..n]);
    h
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn widen(range: Option<(usize, usize)>, i: usize) -> (usize, usize) {
    match range {
        Some((lo, hi)) => (lo.min(i), hi.max(i + 1)),
        None => (i, i + 1),
    }
}

/// Opens the unflushed record at `at`: if it was made in this boot, ORs its bits into
/// `bitmap` and returns the range of words that gained bits; else makes it afresh for
/// `boot` (bits cleared before the header names this boot).
fn open_record(
    file: &File,
    at: u64,
    boot: &[u8; BOOT_ID_LEN],
    bitmap: &mut [u64],
) -> std::io::Result<Option<(usize, usize)>> {
    let bits_len = bitmap.len() as u64 * 8;
    let mut header = [0u8; 8 + BOOT_ID_LEN];
    let ours = file.metadata()?.len() >= at + HEADER + bits_len
        && file.read_exact_at(&mut header, at).is_ok()
        && &header[..8] == UNFLUSHED_MAGIC
        && header[8..] == boot[..];
    if !ours {
        file.set_len(file.metadata()?.len().max(at + HEADER + bits_len))?;
        file.write_all_at(&[0u8; 8], at)?;
        punch_hole(file, at + HEADER, bits_len.div_ceil(BLOCK) * BLOCK)?;
        header[..8].copy_from_slice(UNFLUSHED_MAGIC);
        header[8..].copy_from_slice(boot);
        file.write_all_at(&header, at)?;
        return Ok(None);
    }
    let mut raw = vec![0u8; bits_len as usize];
    file.read_exact_at(&mut raw, at + HEADER)?;
    let mut gained = None;
    for (i, (w, c)) in bitmap.iter_mut().zip(raw.chunks_exact(8)).enumerate() {
        let extra = u64::from_le_bytes(c.try_into().unwrap_or_default()) & !*w;
        if extra != 0 {
            *w |= extra;
            gained = Some(widen(gained, i));
        }
    }
    Ok(gained)
}

impl Overlay {
    /// Opens the overlay at `path`, creating it (atomically) if it does not exist. An existing
    /// overlay must belong to the same image, path and disk size.
    pub fn open(path: &Path, size: u64, image: &ImageId, image_path: &str) -> Result<Overlay> {
        Self::open_in_boot(path, size, image, image_path, boot_id())
    }

    /// `open` as if this boot's id were `boot`.
    fn open_in_boot(
        path: &Path,
        size: u64,
        image: &ImageId,
        image_path: &str,
        boot: Option<[u8; BOOT_ID_LEN]>,
    ) -> Result<Overlay> {
        let blocks = size.div_ceil(BLOCK);
        let words = blocks.div_ceil(64) as usize;
        let data_off = HEADER + (words as u64 * 8).div_ceil(BLOCK) * BLOCK;
        let want = header(size, image, image_path);
        if !path.exists() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            // Linked into place, never renamed: a racing creator must not replace an overlay
            // another daemon already opened (and may have written).
            // A fresh file, never one found there (a stale one, or a link another local user
            // planted), and for the VM's owner only: it holds what the guest wrote.
            let create = || {
                use std::os::unix::fs::OpenOptionsExt;
                OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp)
            };
            let f = match create() {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::remove_file(&tmp).ctx(|| format!("remove stale {}", tmp.display()))?;
                    create()
                }
                r => r,
            }
            .ctx(|| format!("create {}", tmp.display()))?;
            f.write_all_at(&want, 0).ctx(|| format!("write {}", tmp.display()))?;
            f.set_len(data_off + blocks * BLOCK).ctx(|| format!("size {}", tmp.display()))?;
            f.sync_all().ctx(|| format!("sync {}", tmp.display()))?;
            let linked = std::fs::hard_link(&tmp, path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::io(format!("link {} to {}", tmp.display(), path.display()), e))
                }
                _ => {}
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        let file =
            OpenOptions::new().read(true).write(true).open(path).ctx(|| format!("open overlay {}", path.display()))?;
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            let what = if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                format!("overlay {} is in use by another daemon (it holds the file's lock)", path.display())
            } else {
                format!("lock overlay {}", path.display())
            };
            return Err(Error::io(what, e));
        }
        let mut h = vec![0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0).ctx(|| format!("read overlay header of {}", path.display()))?;
        if &h[..8] != MAGIC {
            return Err(Error::Invalid(format!("{} is not an overlay file", path.display())));
        }
        if h[..64] != want[..64] || h[64..] != want[64..] {
            let their_size = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
            let mut their_id = [0u8; 32];
            their_id.copy_from_slice(&h[24..56]);
            return Err(Error::Invalid(format!(
                "overlay {} belongs to another disk (image {}, {} bytes), not image {} path {} ({} bytes)",
                path.display(),
                ImageId(their_id),
                their_size,
                image,
                image_path,
                size
            )));
        }
        let mut raw = vec![0u8; words * 8];
        file.read_exact_at(&mut raw, HEADER).ctx(|| format!("read overlay bitmap of {}", path.display()))?;
        let mut bitmap: Vec<u64> =
            raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        let trailer = data_off + blocks * BLOCK;
        let record_off = match boot {
            Some(boot) => {
                let dirty = open_record(&file, trailer, &boot, &mut bitmap)
                    .ctx(|| format!("unflushed record of overlay {}", path.display()))?;
                if dirty.is_some() {
                    tracing::info!(overlay = %path.display(), "kept the writes a previous daemon had not flushed");
                }
                Some((trailer + HEADER, dirty))
            }
            None => {
                tracing::warn!("no boot id: a daemon crash may lose writes acknowledged since the last flush");
                None
            }
        };
        // Bits past the last block mean nothing: clear them.
        if blocks % 64 != 0 {
            if let Some(w) = bitmap.last_mut() {
                *w &= (1u64 << (blocks % 64)) - 1;
            }
        }
        let overlaid = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(Overlay {
            file,
            path: path.to_path_buf(),
            size,
            blocks,
            data_off,
            record_off: record_off.map(|r| r.0),
            state: Mutex::new(State {
                bitmap,
                dirty: record_off.and_then(|r| r.1),
                // The writes of a daemon that died may not be synced yet: the first FLUSH syncs.
                data_dirty: true,
                overlaid,
                unrecorded: None,
            }),
            flushing: Mutex::new(()),
            poisoned: AtomicBool::new(false),
            #[cfg(test)]
            fail_syncs: Default::default(),
        })
    }

    /// EIO once an fdatasync has failed: nothing written since can be vouched for.
    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(SeqCst) {
            return Err(Error::io(
                format!("overlay {}: an earlier fdatasync failed, writes may have been lost", self.path.display()),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Blocks the guest has written.
    pub fn overlaid_blocks(&self) -> u64 {
        self.lock().overlaid
    }

    fn bit(st: &State, b: u64) -> bool {
        st.bitmap.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
    }

    fn set(st: &mut State, b: u64) {
        let i = (b / 64) as usize;
        if let Some(w) = st.bitmap.get_mut(i) {
            if *w & (1 << (b % 64)) == 0 {
                *w |= 1 << (b % 64);
                st.overlaid += 1;
                st.dirty = Some(widen(st.dirty, i));
                st.unrecorded = Some(widen(st.unrecorded, i));
            }
        }
    }

    /// Writes the bits set since the last call to the unflushed record (before a write that
    /// set them is acknowledged).
    fn record(&self, st: &mut State) -> Result<()> {
        let (Some(base), Some((lo, hi))) = (self.record_off, st.unrecorded) else {
            return Ok(());
        };
        let bytes: Vec<u8> = st.bitmap[lo..hi].iter().flat_map(|w| w.to_le_bytes()).collect();
        self.file.write_all_at(&bytes, base + lo as u64 * 8).ctx(|| "write the overlay's unflushed record".into())?;
        st.unrecorded = None;
        Ok(())
    }

    /// Where overlaid data starts in the file (block `b` is at `data_offset() + b * 4096`).
    pub fn data_offset(&self) -> u64 {
        self.data_off
    }

    pub fn is_overlaid(&self, block: u64) -> bool {
        Self::bit(&self.lock(), block)
    }

    /// The blocks [first, last) of a byte range, and runs of them: (first block, end block,
    /// overlaid).
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        if len == 0 {
            return Vec::new();
        }
        let first = offset / BLOCK;
        let last = (offset + len).div_ceil(BLOCK).min(self.blocks);
        let st = self.lock();
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for b in first..last {
            let o = Self::bit(&st, b);
            match out.last_mut() {
                Some(r) if r.2 == o => r.1 = b + 1,
                _ => out.push((b, b + 1, o)),
            }
        }
        out
    }

    /// Reads overlaid data at disk `offset` (the caller knows the blocks are overlaid).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, self.data_off + offset).ctx(|| format!("read overlay at {offset}"))
    }

    /// Blocks touched by a write of `len` bytes at `offset` that are partly covered and not
    /// overlaid: their base content is needed to write them.
    pub fn needs_base(&self, offset: u64, len: u64) -> Vec<u64> {
        if len == 0 {
            return Vec::new();
        }
        let end = offset + len;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let st = self.lock();
        let mut v = Vec::new();
        for b in [first, last] {
            let full = offset <= b * BLOCK && end >= (b + 1) * BLOCK;
            if !full && !Self::bit(&st, b) && !v.contains(&b) {
                v.push(b);
            }
        }
        v
    }

    /// Writes `data` at disk `offset`. Partly covered blocks that are not overlaid yet are
    /// completed from `bases` (block index -> its 4096 bytes of base content).
    pub fn write(&self, offset: u64, data: &[u8], bases: &HashMap<u64, Vec<u8>>) -> Result<()> {
        self.write_inner(offset, data.len() as u64, Some(data), bases)
    }

    /// Writes zeros over [offset, offset+len): whole blocks become holes, partial ones are
    /// completed from `bases` as for `write`.
    pub fn write_zeroes(&self, offset: u64, len: u64, bases: &HashMap<u64, Vec<u8>>) -> Result<()> {
        self.write_inner(offset, len, None, bases)
    }

    /// Discards [offset, offset+len): whole blocks become overlaid holes (they read as
    /// zeros); partly covered blocks are left alone (DISCARD is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let first = offset.div_ceil(BLOCK);
        let end = ((offset + len) / BLOCK).min(self.blocks);
        self.check_poisoned()?;
        if first >= end {
            return Ok(());
        }
        let mut st = self.lock();
        punch_hole(&self.file, self.data_off + first * BLOCK, (end - first) * BLOCK)
            .ctx(|| format!("punch overlay at {offset}"))?;
        for b in first..end {
            Self::set(&mut st, b);
        }
        st.data_dirty = true;
        self.record(&mut st)
    }

    fn write_inner(&self, offset: u64, len: u64, data: Option<&[u8]>, bases: &HashMap<u64, Vec<u8>>) -> Result<()> {
        self.check_poisoned()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.blocks * BLOCK)
            .ok_or_else(|| Error::Invalid("write past the end of the disk".into()))?;
        let mut st = self.lock();
        let mut b = offset / BLOCK;
        while b * BLOCK < end {
            let (bs, be) = (b * BLOCK, (b + 1) * BLOCK);
            let (from, to) = (offset.max(bs), end.min(be));
            let src = |a: u64, z: u64| data.map(|d| &d[(a - offset) as usize..(z - offset) as usize]);
            if from == bs && to == be {
                // Whole blocks: as many as follow.
                let run_end = (end / BLOCK).max(b + 1);
                let (a, z) = (bs, run_end * BLOCK);
                match src(a, z) {
                    Some(d) => self.file.write_all_at(d, self.data_off + a).ctx(|| format!("write overlay at {a}"))?,
                    None => punch_hole(&self.file, self.data_off + a, z - a).ctx(|| format!("punch overlay at {a}"))?,
                }
                for k in b..run_end {
                    Self::set(&mut st, k);
                }
                b = run_end;
                continue;
            }
            let mut block = vec![0u8; BLOCK as usize];
            if Self::bit(&st, b) {
                self.file.read_exact_at(&mut block, self.data_off + bs).ctx(|| format!("read overlay at {bs}"))?;
            } else {
                let base = bases
                    .get(&b)
                    .ok_or_else(|| Error::Invalid(format!("base content of block {b} missing for a partial write")))?;
                let n = base.len().min(block.len());
                block[..n].copy_from_slice(&base[..n]);
            }
            let part = &mut block[(from - bs) as usize..(to - bs) as usize];
            match src(from, to) {
                Some(d) => part.copy_from_slice(d),
                None => part.fill(0),
            }
            self.file.write_all_at(&block, self.data_off + bs).ctx(|| format!("write overlay at {bs}"))?;
            Self::set(&mut st, b);
            b += 1;
        }
        st.data_dirty = true;
        self.record(&mut st)
    }

    /// `fdatasync` of the overlay file (failing on demand in tests). A failure poisons the
    /// overlay for good.
    fn sync_data(&self) -> std::io::Result<()> {
        let res = self.sync_data_once();
        if let Err(e) = &res {
            tracing::error!(overlay = %self.path.display(), "fdatasync failed, the overlay fails every write from now: {e}");
            self.poisoned.store(true, SeqCst);
            // Data may be gone from the page cache too: no later open may trust the record.
            if let Some(at) = self.record_off {
                if let Err(e) = self.file.write_all_at(&[0u8; 8], at - HEADER) {
                    tracing::error!(overlay = %self.path.display(), "cannot void the unflushed record: {e}");
                }
            }
        }
        res
    }

    fn sync_data_once(&self) -> std::io::Result<()> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::SeqCst;
            if self.fail_syncs.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
        }
        self.file.sync_data()
    }

    /// Makes every write completed before this call durable (see the module comment).
    pub fn flush(&self) -> Result<()> {
        let _serial = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        self.check_poisoned()?;
        let (data_dirty, snapshot) = {
            let mut st = self.lock();
            let snap = st.dirty.take().map(|(lo, hi)| (lo, st.bitmap[lo..hi].to_vec()));
            (std::mem::take(&mut st.data_dirty), snap)
        };
        let res = (|| {
            if data_dirty || snapshot.is_some() {
                self.sync_data().ctx(|| "fdatasync overlay".into())?;
            }
            if let Some((lo, words)) = &snapshot {
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                self.file.write_all_at(&bytes, HEADER + *lo as u64 * 8).ctx(|| "write overlay bitmap".into())?;
                self.sync_data().ctx(|| "fdatasync overlay bitmap".into())?;
            }
            Ok(())
        })();
        if res.is_err() && !self.poisoned.load(SeqCst) {
            // Not an fdatasync error (the bitmap write): try again at the next flush.
            let mut st = self.lock();
            st.data_dirty |= data_dirty;
            if let Some((lo, words)) = snapshot {
                let hi = lo + words.len();
                st.dirty = Some(match st.dirty {
                    Some((a, z)) => (a.min(lo), z.max(hi)),
                    None => (lo, hi),
                });
            }
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ImageId {
        ImageId([7u8; 32])
    }

    #[test]
    fn write_flush_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ov");
        let size = 40 * BLOCK + 1024;
        let o = Overlay::open(&p, size, &id(), "disk.img").expect("open");
        assert_eq!(o.runs(0, size), vec![(0, 41, false)]);
        // Whole blocks.
        o.write(BLOCK, &vec![1u8; 2 * BLOCK as usize], &HashMap::new()).expect("write");
        // A partial block needs its base.
        assert_eq!(o.needs_base(5 * BLOCK + 512, 512), vec![5]);
        assert!(o.write(5 * BLOCK + 512, &[2u8; 512], &HashMap::new()).is_err());
        let bases = HashMap::from([(5u64, vec![9u8; BLOCK as usize])]);
        o.write(5 * BLOCK + 512, &[2u8; 512], &bases).expect("rmw");
        assert!(o.needs_base(5 * BLOCK, 512).is_empty());
        o.write(5 * BLOCK, &[3u8; 512], &HashMap::new()).expect("rmw on overlaid");
        let mut b = vec![0u8; BLOCK as usize];
        o.read(5 * BLOCK, &mut b).expect("read");
        assert!(
            b[..512].iter().all(|&x| x == 3)
                && b[512..1024].iter().all(|&x| x == 2)
                && b[1024..].iter().all(|&x| x == 9)
        );
        o.write_zeroes(BLOCK, BLOCK + 512, &HashMap::new()).expect("zeroes");
        o.discard(10 * BLOCK + 100, 3 * BLOCK).expect("discard");
        assert_eq!(
            o.runs(0, 14 * BLOCK),
            vec![
                (0, 1, false),
                (1, 3, true),
                (3, 5, false),
                (5, 6, true),
                (6, 11, false),
                (11, 13, true),
                (13, 14, false)
            ]
        );
        o.flush().expect("flush");
        drop(o);
        let o = Overlay::open(&p, size, &id(), "disk.img").expect("reopen");
        assert_eq!(o.overlaid_blocks(), 5);
        let mut two = vec![0u8; 2 * BLOCK as usize];
        o.read(BLOCK, &mut two).expect("read");
        assert!(
            two[..BLOCK as usize + 512].iter().all(|&x| x == 0) && two[BLOCK as usize + 512..].iter().all(|&x| x == 1)
        );
        drop(o); // else the lock, not the header, would refuse the opens below
        assert!(Overlay::open(&p, size, &ImageId([8u8; 32]), "disk.img").is_err());
        assert!(Overlay::open(&p, size, &id(), "other.img").is_err());
        assert!(Overlay::open(&p, size + BLOCK, &id(), "disk.img").is_err());
    }

    #[test]
    fn a_second_open_of_the_same_overlay_fails_clearly() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ov");
        let o = Overlay::open(&p, 8 * BLOCK, &id(), "d").expect("open");
        let err = Overlay::open(&p, 8 * BLOCK, &id(), "d").err().expect("a second opener must be refused");
        let msg = err.to_string();
        assert!(msg.contains(&p.display().to_string()) && msg.contains("in use"), "{msg}");
        drop(o);
        Overlay::open(&p, 8 * BLOCK, &id(), "d").expect("free again once the first is closed");
    }

    #[test]
    fn an_fsync_error_poisons_the_overlay() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ov");
        let o = Overlay::open(&p, 8 * BLOCK, &id(), "d").expect("open");
        o.write(0, &vec![1u8; BLOCK as usize], &HashMap::new()).expect("write");
        o.fail_syncs.store(1, SeqCst);
        let err = o.flush().expect_err("the fsync error reaches the guest");
        assert_eq!(err.errno(), libc::EIO);
        // The kernel may have dropped the pages: no later flush may report success, nor
        // persist the bit of a block whose data may be gone.
        let again = o.flush().expect_err("a flush after an fsync error must fail too");
        assert_eq!(again.errno(), libc::EIO);
        let w = o.write(BLOCK, &vec![1u8; BLOCK as usize], &HashMap::new()).expect_err("writes fail");
        assert_eq!(w.errno(), libc::EIO);
        assert_eq!(o.discard(0, 8 * BLOCK).err().map(|e| e.errno()), Some(libc::EIO));
        assert_eq!(o.write_zeroes(0, BLOCK, &HashMap::new()).err().map(|e| e.errno()), Some(libc::EIO));
        drop(o);
        let o = Overlay::open(&p, 8 * BLOCK, &id(), "d").expect("reopen");
        assert_eq!(o.overlaid_blocks(), 0, "no bit reached the disk after the fsync error, nor is the record trusted");
    }

    #[test]
    fn a_new_overlay_is_private_and_never_made_through_a_planted_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ov");
        // Another local user plants a symlink where the temporary file will be made.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        let o = Overlay::open(&p, 8 * BLOCK, &id(), "d").expect("open");
        let victim_now = std::fs::read(&victim).expect("read");
        assert!(victim_now == b"precious", "wrote {} bytes through the planted link", victim_now.len());
        // The guest's writes are for the VM's owner only.
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "overlay mode {mode:o}");
        drop(o);
    }

    #[test]
    fn unflushed_bits_survive_a_daemon_crash_not_a_reboot() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ov");
        let (boot, reboot) = (Some([b'a'; BOOT_ID_LEN]), Some([b'b'; BOOT_ID_LEN]));
        let open = |boot| Overlay::open_in_boot(&p, 8 * BLOCK, &id(), "d", boot).expect("open");
        let o = open(boot);
        o.write(0, &vec![1u8; BLOCK as usize], &HashMap::new()).expect("write");
        o.flush().expect("flush");
        o.write(BLOCK, &vec![2u8; BLOCK as usize], &HashMap::new()).expect("write");
        o.discard(4 * BLOCK, BLOCK).expect("discard");
        drop(o); // as if killed: no flush
                 // The daemon restarted in the same boot: every acknowledged write is there.
        let o = open(boot);
        assert_eq!(o.runs(0, 8 * BLOCK), vec![(0, 2, true), (2, 4, false), (4, 5, true), (5, 8, false)]);
        let mut b = vec![0u8; BLOCK as usize];
        o.read(BLOCK, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 2));
        // A write replayed after the crash gives the same bytes.
        o.write(BLOCK, &vec![2u8; BLOCK as usize], &HashMap::new()).expect("replay");
        drop(o);
        // After a reboot only what was flushed counts (a bit never outruns its data).
        let o = open(reboot);
        assert_eq!(o.runs(0, 8 * BLOCK), vec![(0, 1, true), (1, 8, false)]);
        drop(o);
        // The record was made afresh for the new boot: the old one's bits are gone for good.
        let o = open(boot);
        assert_eq!(o.runs(0, 8 * BLOCK), vec![(0, 1, true), (1, 8, false)]);
        // A flush after a restart persists the record's bits.
        o.write(2 * BLOCK, &vec![3u8; BLOCK as usize], &HashMap::new()).expect("write");
        drop(o);
        let o = open(boot);
        o.flush().expect("flush");
        drop(o);
        let o = open(reboot);
        assert_eq!(o.runs(0, 8 * BLOCK), vec![(0, 1, true), (1, 2, false), (2, 3, true), (3, 8, false)]);
    }
}
