//! The vhost-user-blk device: virtio-blk requests to [`Disk`] operations, status bytes back.
//!
//! The transport (queues, worker threads, completion under the vring lock, stop) is
//! `incfs_vhost`. A request that can be answered without the network (cached or overlaid
//! data, a write whose partial blocks are cached, GET_ID, errors) completes inline on the
//! queue thread. Otherwise it is parked on the tokio runtime, which fetches through the
//! engine and then completes the chain. FLUSH (fdatasync) also runs off the queue thread.

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use incfs_vhost::{Completer, Device, DeviceServer, ServerConfig, VhostUserProtocolFeatures};
use tokio::runtime::Handle;
use tracing::{debug, warn};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vm_memory::ByteValued;

pub use incfs_vhost::ServerStopper;

use super::disk::Disk;
use super::request::{self as rq, Limits, Request, Support};
use crate::error::{Error, Result};

/// Size of the virtio-blk config space we fill (up to write_zeroes_may_unmap and padding).
pub const CONFIG_LEN: usize = std::mem::size_of::<VirtioBlkConfig>();

/// Device-level configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkDeviceConfig {
    /// Request queues offered (the frontend's num-queues may be up to this).
    pub queues: usize,
    /// Queue size, worker threads (queue q goes to thread q % threads), EVENT_IDX, polling.
    pub server: ServerConfig,
    /// Logical block size reported to the guest: 512 (with 4 KiB physical blocks in the
    /// topology hints) or 4096.
    pub logical_block_size: u32,
    /// Largest segment (bytes) and segments per request (SIZE_MAX, SEG_MAX).
    pub size_max: u32,
    pub seg_max: u32,
    /// Preferred I/O size hint (bytes), e.g. the engine's readahead.
    pub opt_io: u32,
}

impl Default for BlkDeviceConfig {
    fn default() -> Self {
        BlkDeviceConfig {
            queues: 1,
            server: ServerConfig::default(),
            logical_block_size: 512,
            size_max: 64 << 10,
            seg_max: 126,
            opt_io: 128 << 10,
        }
    }
}

impl BlkDeviceConfig {
    pub fn validate(&self) -> Result<()> {
        if self.queues == 0 || self.queues > 64 {
            return Err(Error::Invalid("queues must be 1..=64".into()));
        }
        self.server.validate().map_err(vhost_error)?;
        if self.logical_block_size != 512 && self.logical_block_size != 4096 {
            return Err(Error::Invalid("logical block size must be 512 or 4096".into()));
        }
        if self.size_max < 4096 || self.seg_max == 0 || u64::from(self.size_max) * u64::from(self.seg_max) > 64 << 20 {
            return Err(Error::Invalid("size_max * seg_max must be within 4 KiB..64 MiB".into()));
        }
        Ok(())
    }

    fn limits(&self, capacity: u64) -> Limits {
        Limits {
            capacity,
            max_data: self.size_max as usize * self.seg_max as usize,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEG,
        }
    }
}

const MAX_DISCARD_SECTORS: u32 = 1 << 22; // 2 GiB
const MAX_DISCARD_SEG: u32 = 32;

/// `struct virtio_blk_geometry`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioBlkGeometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (little endian, as the guest
/// reads it with GET_CONFIG).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioBlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub geometry: VirtioBlkGeometry,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

// SAFETY: plain integers, packed (no padding), and every bit pattern is a valid value.
unsafe impl ByteValued for VirtioBlkGeometry {}
// SAFETY: as above.
unsafe impl ByteValued for VirtioBlkConfig {}

impl VirtioBlkConfig {
    /// The config space for `disk` served with `cfg`.
    pub fn new(cfg: &BlkDeviceConfig, disk: &Disk) -> Self {
        let lbs = cfg.logical_block_size;
        let mut c = VirtioBlkConfig {
            capacity: (disk.size() / rq::SECTOR_SIZE).to_le(),
            size_max: cfg.size_max.to_le(),
            seg_max: cfg.seg_max.to_le(),
            blk_size: lbs.to_le(),
            // Topology: physical block 4 KiB, no offset, min I/O one physical block, optimal
            // opt_io.
            physical_block_exp: (4096 / lbs).trailing_zeros() as u8,
            alignment_offset: 0,
            min_io_size: ((4096 / lbs) as u16).to_le(),
            opt_io_size: (cfg.opt_io.max(lbs) / lbs).to_le(),
            // Writeback: FLUSH is needed for durability.
            writeback: u8::from(disk.writable()),
            num_queues: (cfg.queues as u16).to_le(),
            ..VirtioBlkConfig::default()
        };
        if disk.writable() {
            c.max_discard_sectors = MAX_DISCARD_SECTORS.to_le();
            c.max_discard_seg = MAX_DISCARD_SEG.to_le();
            c.discard_sector_alignment = 8u32.to_le(); // 4 KiB, in sectors
            c.max_write_zeroes_sectors = MAX_DISCARD_SECTORS.to_le();
            c.max_write_zeroes_seg = MAX_DISCARD_SEG.to_le();
            c.write_zeroes_may_unmap = 1;
        }
        c
    }
}

/// Writes as much of `data` as fits into the chain's data regions, then the status byte,
/// and completes the chain (with nothing written if its buffers are no longer guest memory).
fn answer(c: &Completer<'_>, chain: &rq::Chain, status: u8, data: &[u8]) {
    let mut regions = Vec::with_capacity(chain.writable.len() + 1);
    regions.extend_from_slice(&chain.writable);
    regions.push((chain.status, 1));
    let filled = c.fill(&regions, |buf| {
        let room = buf.len().checked_sub(1)?;
        let n = data.len().min(room);
        buf.write(0, &data[..n]).ok()?;
        buf.write(room, &[status]).ok()?;
        u32::try_from(n + 1).ok()
    });
    if !filled {
        c.complete_empty();
    }
}

fn status_of(r: &Result<()>) -> u8 {
    match r {
        Ok(()) => rq::VIRTIO_BLK_S_OK,
        Err(e) => {
            debug!(error = %e, "request failed");
            rq::VIRTIO_BLK_S_IOERR
        }
    }
}

/// The vhost-user-blk device of one frontend connection.
pub struct Blk {
    disk: Arc<Disk>,
    cfg: BlkDeviceConfig,
    config: VirtioBlkConfig,
    limits: Limits,
    support: Support,
    rt: Handle,
}

impl Blk {
    pub fn new(disk: Arc<Disk>, cfg: BlkDeviceConfig, rt: Handle) -> Self {
        let w = disk.writable();
        Blk {
            config: VirtioBlkConfig::new(&cfg, &disk),
            limits: cfg.limits(disk.size()),
            support: Support { writable: w, discard: w, write_zeroes: w },
            disk,
            cfg,
            rt,
        }
    }

    /// Runs one request, completing it now or from a task.
    fn execute(&self, req: Request, chain: rq::Chain, c: Completer<'_>) {
        let counters = &self.disk.counters;
        match req {
            Request::Status(s) => {
                if s != rq::VIRTIO_BLK_S_OK {
                    counters.errors.fetch_add(1, Relaxed);
                }
                answer(&c, &chain, s, &[]);
            }
            Request::GetId => answer(&c, &chain, rq::VIRTIO_BLK_S_OK, &self.disk.serial()[..]),
            Request::Read { offset, len } => {
                counters.reads.fetch_add(1, Relaxed);
                counters.read_bytes.fetch_add(len as u64, Relaxed);
                match self.disk.read_now(offset, len) {
                    Ok(Some(data)) => {
                        answer(&c, &chain, rq::VIRTIO_BLK_S_OK, &data);
                        self.disk.engine().startup.read_answered();
                    }
                    Ok(None) => {
                        counters.reads_parked.fetch_add(1, Relaxed);
                        let disk = self.disk.clone();
                        let c = c.detach();
                        self.rt.spawn(async move {
                            match disk.read(offset, len).await {
                                Ok(data) => {
                                    answer(&c, &chain, rq::VIRTIO_BLK_S_OK, &data);
                                    disk.engine().startup.read_answered();
                                }
                                Err(e) => {
                                    debug!(offset, len, error = %e, "read failed");
                                    disk.counters.errors.fetch_add(1, Relaxed);
                                    answer(&c, &chain, rq::VIRTIO_BLK_S_IOERR, &[]);
                                }
                            }
                        });
                    }
                    Err(e) => {
                        debug!(offset, len, error = %e, "read failed");
                        counters.errors.fetch_add(1, Relaxed);
                        answer(&c, &chain, rq::VIRTIO_BLK_S_IOERR, &[]);
                    }
                }
            }
            Request::Write { offset, data } => {
                counters.writes.fetch_add(1, Relaxed);
                counters.write_bytes.fetch_add(data.len() as u64, Relaxed);
                match self.disk.write_now(offset, &data) {
                    Ok(true) => answer(&c, &chain, rq::VIRTIO_BLK_S_OK, &[]),
                    Ok(false) => {
                        counters.writes_parked.fetch_add(1, Relaxed);
                        let disk = self.disk.clone();
                        let c = c.detach();
                        self.rt.spawn(async move {
                            let r = match disk.write(offset, &data, || c.is_current()).await {
                                Ok(true) => Ok(()),
                                Ok(false) => {
                                    debug!(offset, "write dropped: its queue was stopped");
                                    return;
                                }
                                Err(e) => Err(e),
                            };
                            if r.is_err() {
                                disk.counters.errors.fetch_add(1, Relaxed);
                            }
                            answer(&c, &chain, status_of(&r), &[]);
                        });
                    }
                    Err(e) => {
                        let r = Err(e);
                        counters.errors.fetch_add(1, Relaxed);
                        answer(&c, &chain, status_of(&r), &[]);
                    }
                }
            }
            Request::Flush => {
                counters.flushes.fetch_add(1, Relaxed);
                if !self.disk.writable() {
                    return answer(&c, &chain, rq::VIRTIO_BLK_S_OK, &[]);
                }
                let disk = self.disk.clone();
                let c = c.detach();
                self.rt.spawn(async move {
                    let d = disk.clone();
                    let r = match tokio::task::spawn_blocking(move || d.flush()).await {
                        Ok(r) => r,
                        Err(e) => Err(Error::Invalid(format!("flush task: {e}"))),
                    };
                    if r.is_err() {
                        disk.counters.errors.fetch_add(1, Relaxed);
                    }
                    answer(&c, &chain, status_of(&r), &[]);
                });
            }
            Request::Discard(segs) => {
                counters.discards.fetch_add(1, Relaxed);
                let r = segs.iter().try_for_each(|s| self.disk.discard(s.offset, s.len));
                answer(&c, &chain, status_of(&r), &[]);
            }
            Request::WriteZeroes(segs) => {
                counters.write_zeroes.fetch_add(1, Relaxed);
                let mut all = true;
                for s in &segs {
                    match self.disk.write_zeroes_now(s.offset, s.len) {
                        Ok(true) => {}
                        Ok(false) => {
                            all = false;
                            break;
                        }
                        Err(e) => return answer(&c, &chain, status_of(&Err(e)), &[]),
                    }
                }
                if all {
                    return answer(&c, &chain, rq::VIRTIO_BLK_S_OK, &[]);
                }
                // Some partial block needs its base: redo all segments (idempotent) off the
                // queue thread.
                let disk = self.disk.clone();
                let c = c.detach();
                self.rt.spawn(async move {
                    let mut r = Ok(());
                    for s in &segs {
                        r = match disk.write_zeroes(s.offset, s.len, || c.is_current()).await {
                            Ok(true) => Ok(()),
                            Ok(false) => {
                                debug!("write zeroes dropped: its queue was stopped");
                                return;
                            }
                            Err(e) => Err(e),
                        };
                        if r.is_err() {
                            break;
                        }
                    }
                    answer(&c, &chain, status_of(&r), &[]);
                });
            }
        }
    }
}

impl Device for Blk {
    const NAME: &'static str = "incfs-vhost-user-blk";

    fn num_queues(&self) -> usize {
        self.cfg.queues
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_MQ);
        if self.disk.writable() {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        } else {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: vhost-user-blk frontends (QEMU) read capacity and limits with GET_CONFIG.
        // INFLIGHT_SHMFD: the requests in flight when the daemon dies are resubmitted by the
        // next one (QEMU with reconnect; see docs/restart.md).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(config.len());
        let end = (offset as usize).saturating_add(size as usize).min(config.len());
        out[..end - start].copy_from_slice(&config[start..end]);
        out
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> std::io::Result<()> {
        // Only `writeback` is writable (CONFIG_WCE), which we do not offer: ignore.
        debug!(offset, len = data.len(), "SET_CONFIG ignored");
        Ok(())
    }

    fn max_request_len(&self) -> usize {
        rq::max_readable(&self.limits)
    }

    fn queue_stopped(&self, queue: usize, migrating: bool) {
        // At a migration's switch-over the destination's daemon takes the overlay over: hand
        // it on flushed, with its lock released. If the migration fails, the next request
        // here takes it back.
        if migrating {
            if let Err(e) = self.disk.release_overlay() {
                warn!(queue, "cannot release the overlay at the migration's switch-over: {e}");
            }
        }
    }

    fn process(&self, queue: usize, chain: incfs_vhost::Chain, c: Completer<'_>) {
        let mut chain = match rq::validate(chain, &self.limits) {
            Ok(chain) => chain,
            Err((head, status, e)) => {
                debug!(queue, head, error = ?e, "bad descriptor chain");
                self.disk.counters.errors.fetch_add(1, Relaxed);
                match status {
                    Some(addr) => c.write(&[(addr, 1)], &[&[rq::VIRTIO_BLK_S_IOERR]]),
                    None => c.complete_empty(),
                };
                return;
            }
        };
        let req = rq::interpret(&mut chain, &self.limits, self.support);
        self.execute(req, chain, c);
    }
}

/// A server error as this crate's error: configuration problems stay messages, the rest
/// keeps the typed error as the payload of an I/O error.
fn vhost_error(e: incfs_vhost::Error) -> Error {
    match e {
        incfs_vhost::Error::Config(msg) => Error::Invalid(msg.into()),
        incfs_vhost::Error::Io { context, source } => Error::io(context, source),
        e => Error::io("vhost-user-blk", std::io::Error::other(e)),
    }
}

/// A vhost-user-blk server on a socket, serving one frontend at a time.
pub struct BlkServer {
    server: DeviceServer<Blk>,
}

impl BlkServer {
    /// Binds `socket` (replacing a stale socket file there).
    pub fn bind(socket: &Path, disk: Arc<Disk>, cfg: BlkDeviceConfig, rt: Handle) -> Result<Self> {
        cfg.validate()?;
        let server = DeviceServer::bind(socket, cfg.server, move || Blk::new(disk.clone(), cfg, rt.clone()))
            .map_err(vhost_error)?;
        Ok(BlkServer { server })
    }

    /// Serves on an already bound listener (socket activation, tests).
    pub fn from_listener(listener: UnixListener, disk: Arc<Disk>, cfg: BlkDeviceConfig, rt: Handle) -> Result<Self> {
        cfg.validate()?;
        let server = DeviceServer::from_listener(listener, cfg.server, move || Blk::new(disk.clone(), cfg, rt.clone()))
            .map_err(vhost_error)?;
        Ok(BlkServer { server })
    }

    pub fn stopper(&self) -> ServerStopper {
        self.server.stopper()
    }

    /// Waits for one frontend, serves it until it disconnects, returns Ok(true); Ok(false)
    /// once stopped.
    pub fn serve_one(&mut self) -> Result<bool> {
        self.server.serve_one().map_err(vhost_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        let cfg = BlkDeviceConfig {
            queues: 3,
            server: ServerConfig { threads: 2, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(incfs_vhost::round_robin(0, cfg.queues, cfg.server.threads), vec![0b101, 0b010]);
        let cfg = BlkDeviceConfig {
            queues: 1,
            server: ServerConfig { threads: 4, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(incfs_vhost::round_robin(0, cfg.queues, cfg.server.threads), vec![0b1]);
    }

    #[test]
    fn config_space_is_laid_out_as_virtio_blk_config() {
        use std::mem::offset_of;
        assert_eq!(CONFIG_LEN, 60);
        let at = [
            (offset_of!(VirtioBlkConfig, size_max), 8),
            (offset_of!(VirtioBlkConfig, blk_size), 20),
            (offset_of!(VirtioBlkConfig, physical_block_exp), 24),
            (offset_of!(VirtioBlkConfig, min_io_size), 26),
            (offset_of!(VirtioBlkConfig, opt_io_size), 28),
            (offset_of!(VirtioBlkConfig, writeback), 32),
            (offset_of!(VirtioBlkConfig, num_queues), 34),
            (offset_of!(VirtioBlkConfig, max_discard_sectors), 36),
            (offset_of!(VirtioBlkConfig, discard_sector_alignment), 44),
            (offset_of!(VirtioBlkConfig, max_write_zeroes_seg), 52),
            (offset_of!(VirtioBlkConfig, write_zeroes_may_unmap), 56),
        ];
        for (got, want) in at {
            assert_eq!(got, want);
        }
    }
}
