//! The disk a vhost-user-blk device serves: one regular file of an image, read through the
//! block engine, with an optional copy-on-write overlay on top.
//!
//! The disk's size is the file's size rounded up to 4 KiB; bytes past the end of the file
//! read as zeros. Every operation has a synchronous form that never waits for the network
//! (`None` when base blocks are missing: the device then parks the request) and an async one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use incfs_buf::ScatterBuf;

use crate::engine::{Engine, ParkedBytes};
use crate::error::{Error, Result};
use crate::image::{ImageId, BLOCK_SIZE};

use super::overlay::{Overlay, BLOCK};

#[derive(Default, Debug)]
pub struct DiskCounters {
    pub reads: AtomicU64,
    pub reads_parked: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub writes_parked: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub errors: AtomicU64,
}

impl DiskCounters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let c = |a: &AtomicU64| a.load(Relaxed);
        vec![
            ("blk_reads", c(&self.reads)),
            ("blk_reads_parked", c(&self.reads_parked)),
            ("blk_read_bytes", c(&self.read_bytes)),
            ("blk_writes", c(&self.writes)),
            ("blk_writes_parked", c(&self.writes_parked)),
            ("blk_write_bytes", c(&self.write_bytes)),
            ("blk_flushes", c(&self.flushes)),
            ("blk_discards", c(&self.discards)),
            ("blk_write_zeroes", c(&self.write_zeroes)),
            ("blk_errors", c(&self.errors)),
        ]
    }
}

/// How long a device start waits for the overlay's lock, held by the daemon of a migration's
/// source until its frontend has stopped the device (which precedes the destination's start).
const OVERLAY_TAKE_WAIT: Duration = Duration::from_secs(10);

/// The overlay as a disk holds it: open (and locked) while the frontend runs the device;
/// flushed and closed when the frontend stops it, and opened again by the next request. So a
/// live migration's destination daemon, on the same host or a shared filesystem, takes the
/// overlay over at the switch-over, as QEMU hands over its own disk images.
struct OverlaySlot {
    path: PathBuf,
    size: u64,
    image: ImageId,
    image_path: String,
    open: RwLock<Option<Arc<Overlay>>>,
}

impl OverlaySlot {
    fn get(&self) -> Result<Arc<Overlay>> {
        if let Some(o) = self.open.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Ok(o.clone());
        }
        let mut open = self.open.write().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open.as_ref() {
            return Ok(o.clone());
        }
        let deadline = Instant::now() + OVERLAY_TAKE_WAIT;
        let o = loop {
            match Overlay::open(&self.path, self.size, &self.image, &self.image_path) {
                // EWOULDBLOCK: another daemon holds the overlay's lock.
                Err(e) if e.errno() == libc::EWOULDBLOCK && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                r => break Arc::new(r?),
            }
        };
        tracing::info!(overlay = %self.path.display(), blocks = o.overlaid_blocks(), "overlay taken");
        *open = Some(o.clone());
        Ok(o)
    }

    fn current(&self) -> Option<Arc<Overlay>> {
        self.open.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Flushes and closes the overlay (its lock goes with the last request holding it).
    fn release(&self) -> Result<()> {
        let Some(o) = self.open.write().unwrap_or_else(|e| e.into_inner()).take() else { return Ok(()) };
        o.flush()?;
        tracing::info!(overlay = %self.path.display(), "overlay flushed and released");
        Ok(())
    }
}

pub struct Disk {
    engine: Arc<Engine>,
    ino: u32,
    /// Size of the file in the image.
    file_size: u64,
    /// Size of the disk: the file's size rounded up to 4 KiB.
    size: u64,
    overlay: Option<OverlaySlot>,
    /// Serial number (GET_ID): the start of the image id.
    serial: [u8; 20],
    pub counters: DiskCounters,
}

impl Disk {
    /// The disk backed by file `path` of the engine's image. The overlay is opened (and
    /// checked) now, unless `incoming`: then by the first request, once the daemon of a
    /// migration's source has released it.
    pub fn new(engine: Arc<Engine>, path: &str, overlay: Option<&Path>, incoming: bool) -> Result<Disk> {
        let img = engine.image().clone();
        let ino = img.resolve(path.as_bytes()).ok_or_else(|| Error::NotFound(format!("{path} in image {}", img.id)))?;
        let f = img.file(ino).ok_or_else(|| Error::Invalid(format!("{path} is not a regular file")))?;
        let file_size = f.size;
        let size = file_size.div_ceil(BLOCK) * BLOCK;
        if size == 0 {
            return Err(Error::Invalid(format!("{path} is empty")));
        }
        let overlay = overlay.map(|p| OverlaySlot {
            path: p.to_path_buf(),
            size,
            image: img.id,
            image_path: path.to_string(),
            open: RwLock::new(None),
        });
        if let Some(slot) = overlay.as_ref().filter(|_| !incoming) {
            slot.get()?;
        }
        let mut serial = [0u8; 20];
        let id = img.id.to_string();
        let n = id.len().min(20);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Disk { engine, ino, file_size, size, overlay, serial, counters: DiskCounters::default() })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    /// The overlay, if open now.
    pub fn overlay(&self) -> Option<Arc<Overlay>> {
        self.overlay.as_ref().and_then(OverlaySlot::current)
    }

    /// The frontend stopped the device: flush and close the overlay, so another daemon (a
    /// migration's destination) may take it. The next request opens it again.
    pub fn release_overlay(&self) -> Result<()> {
        self.overlay.as_ref().map_or(Ok(()), OverlaySlot::release)
    }

    /// The overlay, opened if it is not (None: a read-only disk).
    fn overlay_now(&self) -> Result<Option<Arc<Overlay>>> {
        self.overlay.as_ref().map(OverlaySlot::get).transpose()
    }

    pub fn serial(&self) -> &[u8; 20] {
        &self.serial
    }

    /// Base content of [offset, offset+buf.len()) from the cache only; false if a block is
    /// missing.
    fn base_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let n = self.in_file(offset, buf.len());
        buf[n..].fill(0);
        if n == 0 {
            return Ok(true);
        }
        let len = n as u32;
        match self.engine.read_cached_into(self.ino, offset, len, &mut ScatterBuf::from_slice(&mut buf[..n]))? {
            Some(got) if got == len => Ok(true),
            Some(_) => Err(Error::Invalid("short read from the engine".into())),
            None => Ok(false),
        }
    }

    /// Base content, waiting for missing blocks, within room the caller reserved.
    async fn base(&self, room: &ParkedBytes, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = self.in_file(offset, buf.len());
        buf[n..].fill(0);
        if n == 0 {
            return Ok(());
        }
        if self.engine.read_within(room, self.ino, offset, &mut buf[..n]).await? != n {
            return Err(Error::Invalid("short read from the engine".into()));
        }
        Ok(())
    }

    /// How many of `len` bytes at `offset` lie inside the file.
    fn in_file(&self, offset: u64, len: usize) -> usize {
        self.file_size.saturating_sub(offset).min(len as u64) as usize
    }

    /// Pieces of a read: (offset, len, overlaid).
    fn pieces(overlay: Option<&Overlay>, offset: u64, len: usize) -> Vec<(u64, usize, bool)> {
        let end = offset + len as u64;
        match overlay {
            None => vec![(offset, len, false)],
            Some(o) => o
                .runs(offset, len as u64)
                .into_iter()
                .map(|(a, z, ov)| {
                    let (s, e) = ((a * BLOCK).max(offset), (z * BLOCK).min(end));
                    (s, (e - s) as usize, ov)
                })
                .collect(),
        }
    }

    /// Reads without waiting: None if base blocks are missing from the cache.
    pub fn read_now(&self, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
        let overlay = self.overlay_now()?;
        let mut buf = vec![0u8; len];
        for (s, n, ov) in Self::pieces(overlay.as_deref(), offset, len) {
            let at = (s - offset) as usize;
            let part = &mut buf[at..at + n];
            if ov {
                overlay.as_ref().map(|o| o.read(s, part)).transpose()?;
            } else if !self.base_cached(s, part)? {
                return Ok(None);
            }
        }
        Ok(Some(buf))
    }

    /// Reads, fetching missing base blocks (until the engine's read timeout). Waits for room
    /// in the daemon's parked-bytes budget before allocating anything.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let room = self.engine.reserve_parked(Engine::room_for(len)).await;
        let overlay = self.overlay_now()?;
        let mut buf = vec![0u8; len];
        for (s, n, ov) in Self::pieces(overlay.as_deref(), offset, len) {
            let at = (s - offset) as usize;
            let part = &mut buf[at..at + n];
            if ov {
                overlay.as_ref().map(|o| o.read(s, part)).transpose()?;
            } else {
                self.base(&room, s, part).await?;
            }
        }
        Ok(buf)
    }

    fn overlay_or_ro(&self) -> Result<Arc<Overlay>> {
        self.overlay_now()?.ok_or_else(|| Error::Invalid("the disk is read-only (no overlay)".into()))
    }

    /// Base content of the partly written blocks a write needs; None if not cached.
    fn bases_now(&self, need: &[u64]) -> Result<Option<HashMap<u64, Vec<u8>>>> {
        let mut m = HashMap::new();
        for &b in need {
            let mut v = vec![0u8; BLOCK_SIZE];
            if !self.base_cached(b * BLOCK, &mut v)? {
                return Ok(None);
            }
            m.insert(b, v);
        }
        Ok(Some(m))
    }

    /// The bases of the partly written blocks `need` of a parked write that holds `held`
    /// bytes of data: waits for room for both in the parked-bytes budget first.
    async fn bases(&self, need: &[u64], held: usize) -> Result<HashMap<u64, Vec<u8>>> {
        let room = self.engine.reserve_parked(Engine::room_for(need.len() * BLOCK_SIZE) + held).await;
        let mut m = HashMap::new();
        for &b in need {
            let mut v = vec![0u8; BLOCK_SIZE];
            self.base(&room, b * BLOCK, &mut v).await?;
            m.insert(b, v);
        }
        Ok(m)
    }

    /// Writes without waiting; Ok(false) if a partial block's base must be fetched first.
    pub fn write_now(&self, offset: u64, data: &[u8]) -> Result<bool> {
        let o = self.overlay_or_ro()?;
        match self.bases_now(&o.needs_base(offset, data.len() as u64))? {
            Some(bases) => o.write(offset, data, &bases).map(|_| true),
            None => Ok(false),
        }
    }

    /// Writes, fetching the bases of partly written blocks first. Once they are there, writes
    /// only if `still_wanted()` (else Ok(false)): a request whose queue was stopped meanwhile
    /// is redone by the device that restarts the queue, and this late copy must not land
    /// after writes the guest made since.
    pub async fn write(&self, offset: u64, data: &[u8], still_wanted: impl FnOnce() -> bool) -> Result<bool> {
        let o = self.overlay_or_ro()?;
        let bases = self.bases(&o.needs_base(offset, data.len() as u64), data.len()).await?;
        if !still_wanted() {
            return Ok(false);
        }
        o.write(offset, data, &bases).map(|_| true)
    }

    /// WRITE_ZEROES without waiting; Ok(false) if a base must be fetched first.
    pub fn write_zeroes_now(&self, offset: u64, len: u64) -> Result<bool> {
        let o = self.overlay_or_ro()?;
        match self.bases_now(&o.needs_base(offset, len))? {
            Some(bases) => o.write_zeroes(offset, len, &bases).map(|_| true),
            None => Ok(false),
        }
    }

    /// WRITE_ZEROES, fetching bases first; `still_wanted` as for [`write`](Disk::write).
    pub async fn write_zeroes(&self, offset: u64, len: u64, still_wanted: impl FnOnce() -> bool) -> Result<bool> {
        let o = self.overlay_or_ro()?;
        let bases = self.bases(&o.needs_base(offset, len), 0).await?;
        if !still_wanted() {
            return Ok(false);
        }
        o.write_zeroes(offset, len, &bases).map(|_| true)
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay_or_ro()?.discard(offset, len)
    }

    /// Makes completed writes durable (blocking: call off the queue thread).
    pub fn flush(&self) -> Result<()> {
        match self.overlay_now()? {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}
