//! The vhost-user-blk device: virtqueues in, [`Disk`] operations, status bytes out.
//!
//! Follows the virtio-fs device (backend/fuse/src/virtio_fs.rs): each queue belongs to one
//! epoll worker thread of vhost-user-backend. A request that can be answered without the
//! network (cached or overlaid data, a write whose partial blocks are cached, GET_ID, errors)
//! completes inline on the queue thread. Otherwise it is parked on the tokio runtime, which
//! fetches through the engine and then writes the data and status and puts the chain on the
//! used ring itself. FLUSH (fdatasync) also runs off the queue thread. Every completion
//! happens under the vring's lock and only if the queue is still the one the request came
//! from (same generation, still ready): after GET_VRING_BASE or a device reset, stale replies
//! are dropped instead of being written into buffers the guest may have reused.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::runtime::Handle;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

pub use incfs_fuse::server::ServerStopper;
use incfs_fuse::server::{exit_event, QueueState, Queues, DEFAULT_POLL_MAX};

use super::disk::Disk;
use super::request::{self as rq, Limits, Request, Support};
use crate::error::{Error, Result};

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
/// Data to copy into a chain's writable regions.
type Payload<'a> = (&'a [(GuestAddress, usize)], &'a [u8]);

const VIRTIO_F_VERSION_1: u32 = 32;
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Size of the virtio-blk config space we fill (up to write_zeroes_may_unmap and padding).
pub const CONFIG_LEN: usize = 60;

/// Device-level configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Request queues offered (the frontend's num-queues may be up to this).
    pub queues: usize,
    /// Largest virtqueue size the frontend may configure (power of two).
    pub queue_size: u16,
    /// Worker threads serving the queues (queue q goes to thread q % threads).
    pub threads: usize,
    /// Offer VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Logical block size reported to the guest: 512 (with 4 KiB physical blocks in the
    /// topology hints) or 4096.
    pub logical_block_size: u32,
    /// Largest segment (bytes) and segments per request (SIZE_MAX, SEG_MAX).
    pub size_max: u32,
    pub seg_max: u32,
    /// Preferred I/O size hint (bytes), e.g. the engine's readahead.
    pub opt_io: u32,
    /// Longest adaptive poll of a queue that ran dry (zero: never poll); see
    /// `incfs_fuse::server::QueuePoll`.
    pub poll_max: std::time::Duration,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            queues: 1,
            queue_size: 1024,
            threads: 1,
            event_idx: true,
            logical_block_size: 512,
            size_max: 64 << 10,
            seg_max: 126,
            opt_io: 128 << 10,
            poll_max: DEFAULT_POLL_MAX,
        }
    }
}

impl DeviceConfig {
    pub fn validate(&self) -> Result<()> {
        if self.queues == 0 || self.queues > 64 {
            return Err(Error::Invalid("queues must be 1..=64".into()));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(Error::Invalid("queue_size must be a power of two".into()));
        }
        if self.threads == 0 {
            return Err(Error::Invalid("threads must be at least 1".into()));
        }
        if self.logical_block_size != 512 && self.logical_block_size != 4096 {
            return Err(Error::Invalid("logical block size must be 512 or 4096".into()));
        }
        if self.size_max < 4096 || self.seg_max == 0 || u64::from(self.size_max) * u64::from(self.seg_max) > 64 << 20 {
            return Err(Error::Invalid("size_max * seg_max must be within 4 KiB..64 MiB".into()));
        }
        Ok(())
    }

    fn thread_masks(&self) -> Vec<u64> {
        let threads = self.threads.min(self.queues).max(1);
        let mut masks = vec![0u64; threads];
        for q in 0..self.queues {
            masks[q % threads] |= 1 << q;
        }
        masks
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

/// The virtio-blk config space for `disk` (struct virtio_blk_config, little endian).
pub fn config_space(cfg: &DeviceConfig, disk: &Disk) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let lbs = cfg.logical_block_size;
    c[0..8].copy_from_slice(&(disk.size() / rq::SECTOR_SIZE).to_le_bytes());
    c[8..12].copy_from_slice(&cfg.size_max.to_le_bytes());
    c[12..16].copy_from_slice(&cfg.seg_max.to_le_bytes());
    // geometry (16..20) left zero
    c[20..24].copy_from_slice(&lbs.to_le_bytes());
    // topology: physical block 4 KiB, no offset, min I/O one physical block, optimal opt_io.
    c[24] = (4096 / lbs).trailing_zeros() as u8;
    c[25] = 0;
    c[26..28].copy_from_slice(&((4096 / lbs) as u16).to_le_bytes());
    c[28..32].copy_from_slice(&(cfg.opt_io.max(lbs) / lbs).to_le_bytes());
    c[32] = u8::from(disk.writable()); // writeback: FLUSH is needed for durability
    c[34..36].copy_from_slice(&(cfg.queues as u16).to_le_bytes());
    if disk.writable() {
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&8u32.to_le_bytes()); // 4 KiB, in sectors
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
    }
    c
}

/// What a completion needs, cloneable into a tokio task.
#[derive(Clone)]
struct Completer {
    vring: VringRwLock,
    mem: Mem,
    queue: Arc<QueueState>,
    generation: u64,
    event_idx: bool,
}

impl Completer {
    /// Writes `data` (if any) and the status byte, adds the chain to the used ring, and
    /// optionally signals. `status` None: return the chain with nothing written.
    fn complete(&self, head: u16, status: Option<(GuestAddress, u8)>, data: Option<Payload<'_>>, signal: bool) -> bool {
        let mut state = self.vring.get_mut();
        if self.queue.generation.load(Ordering::Acquire) != self.generation || !state.get_queue().ready() {
            debug!(head, "dropping completion for a stopped queue");
            return false;
        }
        let mem = self.mem.memory();
        let mut len = 0u32;
        if let Some((addr, mut s)) = status {
            if let Some((regions, bytes)) = data {
                match rq::scatter(&mem, regions, bytes) {
                    Some(n) => len = n as u32,
                    None => s = rq::VIRTIO_BLK_S_IOERR,
                }
            }
            if mem.write_obj(s, addr).is_ok() {
                len += 1;
            } else {
                len = 0;
            }
        }
        if let Err(e) = state.add_used(head, len) {
            warn!(head, error = %e, "add_used failed");
            return false;
        }
        if signal {
            let needed = !self.event_idx || state.needs_notification().unwrap_or(true);
            if needed {
                if let Err(e) = state.signal_used_queue() {
                    warn!(error = %e, "cannot signal used queue");
                }
            }
        }
        true
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

/// The vhost-user backend for one frontend connection.
struct BlkBackend {
    disk: Arc<Disk>,
    cfg: DeviceConfig,
    config: [u8; CONFIG_LEN],
    limits: Limits,
    support: Support,
    rt: Handle,
    mem: Mem,
    queues: Queues,
}

impl BlkBackend {
    fn new(disk: Arc<Disk>, cfg: DeviceConfig, rt: Handle, mem: Mem) -> Self {
        let w = disk.writable();
        BlkBackend {
            config: config_space(&cfg, &disk),
            limits: cfg.limits(disk.size()),
            support: Support { writable: w, discard: w, write_zeroes: w },
            queues: Queues::new(cfg.queues, cfg.thread_masks(), cfg.poll_max),
            disk,
            cfg,
            rt,
            mem,
        }
    }

    fn process_queue(&self, vring: &VringRwLock, qidx: usize) -> std::io::Result<()> {
        let Some(queue) = self.queues.get(qidx) else {
            return Ok(());
        };
        let event_idx = self.queues.event_idx();
        let mut used_any = false;
        loop {
            let mem = self.mem.memory();
            let (chain, generation) = {
                let mut state = vring.get_mut();
                let generation = queue.generation.load(Ordering::Acquire);
                (state.get_queue_mut().pop_descriptor_chain(&*mem), generation)
            };
            let Some(chain) = chain else { break };
            let completer =
                Completer { vring: vring.clone(), mem: self.mem.clone(), queue: queue.clone(), generation, event_idx };
            let mut chain = match rq::walk(&mem, chain, &self.limits) {
                Ok(c) => c,
                Err((head, status, e)) => {
                    debug!(queue = qidx, head, error = ?e, "bad descriptor chain");
                    self.disk.counters.errors.fetch_add(1, Ordering::Relaxed);
                    used_any |= completer.complete(head, status.map(|a| (a, rq::VIRTIO_BLK_S_IOERR)), None, false);
                    continue;
                }
            };
            drop(mem);
            let req = rq::interpret(&mut chain, &self.limits, self.support);
            used_any |= self.execute(req, chain, completer);
        }
        if used_any {
            let needed = !event_idx || vring.needs_notification().unwrap_or(true);
            if needed {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }

    /// Runs one request; true if it completed inline.
    fn execute(&self, req: Request, chain: rq::Chain, c: Completer) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let head = chain.head;
        let status_addr = chain.status;
        let counters = &self.disk.counters;
        let done = |s: u8| c.complete(head, Some((status_addr, s)), None, false);
        match req {
            Request::Status(s) => {
                if s != rq::VIRTIO_BLK_S_OK {
                    counters.errors.fetch_add(1, Relaxed);
                }
                done(s)
            }
            Request::GetId => {
                let id = *self.disk.serial();
                c.complete(head, Some((status_addr, rq::VIRTIO_BLK_S_OK)), Some((&chain.writable, &id[..])), false)
            }
            Request::Read { offset, len } => {
                counters.reads.fetch_add(1, Relaxed);
                counters.read_bytes.fetch_add(len as u64, Relaxed);
                match self.disk.read_now(offset, len) {
                    Ok(Some(data)) => c.complete(
                        head,
                        Some((status_addr, rq::VIRTIO_BLK_S_OK)),
                        Some((&chain.writable, &data)),
                        false,
                    ),
                    Ok(None) => {
                        counters.reads_parked.fetch_add(1, Relaxed);
                        let disk = self.disk.clone();
                        self.rt.spawn(async move {
                            match disk.read(offset, len).await {
                                Ok(data) => c.complete(
                                    head,
                                    Some((status_addr, rq::VIRTIO_BLK_S_OK)),
                                    Some((&chain.writable, &data)),
                                    true,
                                ),
                                Err(e) => {
                                    debug!(offset, len, error = %e, "read failed");
                                    disk.counters.errors.fetch_add(1, Relaxed);
                                    c.complete(head, Some((status_addr, rq::VIRTIO_BLK_S_IOERR)), None, true)
                                }
                            };
                        });
                        false
                    }
                    Err(e) => {
                        debug!(offset, len, error = %e, "read failed");
                        counters.errors.fetch_add(1, Relaxed);
                        done(rq::VIRTIO_BLK_S_IOERR)
                    }
                }
            }
            Request::Write { offset, data } => {
                counters.writes.fetch_add(1, Relaxed);
                counters.write_bytes.fetch_add(data.len() as u64, Relaxed);
                match self.disk.write_now(offset, &data) {
                    Ok(true) => done(rq::VIRTIO_BLK_S_OK),
                    Ok(false) => {
                        counters.writes_parked.fetch_add(1, Relaxed);
                        let disk = self.disk.clone();
                        self.rt.spawn(async move {
                            let r = disk.write(offset, &data).await;
                            if r.is_err() {
                                disk.counters.errors.fetch_add(1, Relaxed);
                            }
                            c.complete(head, Some((status_addr, status_of(&r))), None, true);
                        });
                        false
                    }
                    Err(e) => {
                        let r = Err(e);
                        counters.errors.fetch_add(1, Relaxed);
                        done(status_of(&r))
                    }
                }
            }
            Request::Flush => {
                counters.flushes.fetch_add(1, Relaxed);
                if !self.disk.writable() {
                    return done(rq::VIRTIO_BLK_S_OK);
                }
                let disk = self.disk.clone();
                self.rt.spawn(async move {
                    let d = disk.clone();
                    let r = match tokio::task::spawn_blocking(move || d.flush()).await {
                        Ok(r) => r,
                        Err(e) => Err(Error::Invalid(format!("flush task: {e}"))),
                    };
                    if r.is_err() {
                        disk.counters.errors.fetch_add(1, Relaxed);
                    }
                    c.complete(head, Some((status_addr, status_of(&r))), None, true);
                });
                false
            }
            Request::Discard(segs) => {
                counters.discards.fetch_add(1, Relaxed);
                let r = segs.iter().try_for_each(|s| self.disk.discard(s.offset, s.len));
                done(status_of(&r))
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
                        Err(e) => return done(status_of(&Err(e))),
                    }
                }
                if all {
                    return done(rq::VIRTIO_BLK_S_OK);
                }
                // Some partial block needs its base: redo all segments (idempotent) off the
                // queue thread.
                let disk = self.disk.clone();
                self.rt.spawn(async move {
                    let mut r = Ok(());
                    for s in &segs {
                        r = disk.write_zeroes(s.offset, s.len).await;
                        if r.is_err() {
                            break;
                        }
                    }
                    c.complete(head, Some((status_addr, status_of(&r))), None, true);
                });
                false
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.cfg.queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | bit(rq::VIRTIO_BLK_F_SIZE_MAX)
            | bit(rq::VIRTIO_BLK_F_SEG_MAX)
            | bit(rq::VIRTIO_BLK_F_BLK_SIZE)
            | bit(rq::VIRTIO_BLK_F_FLUSH)
            | bit(rq::VIRTIO_BLK_F_TOPOLOGY)
            | bit(rq::VIRTIO_BLK_F_MQ);
        if self.cfg.event_idx {
            f |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        if self.disk.writable() {
            f |= bit(rq::VIRTIO_BLK_F_DISCARD) | bit(rq::VIRTIO_BLK_F_WRITE_ZEROES);
        } else {
            f |= bit(rq::VIRTIO_BLK_F_RO);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: vhost-user-blk frontends (QEMU) read capacity and limits with GET_CONFIG.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize).saturating_add(size as usize).min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&self.config[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        // Only `writeback` is writable (CONFIG_WCE), which we do not offer: ignore.
        debug!(offset, len = buf.len(), "SET_CONFIG ignored");
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.queues.set_event_idx(enabled);
    }

    fn update_memory(&self, _mem: Mem) -> std::io::Result<()> {
        Ok(())
    }

    fn reset_device(&self) {
        self.queues.stop_all();
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.queues.masks()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_event()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.queues.stop(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        self.queues.handle_event(device_event, evset, vrings, thread_id, &self.mem, |vring, qidx| {
            self.process_queue(vring, qidx)
        });
        Ok(())
    }
}

/// A vhost-user-blk server on a socket, serving one frontend at a time.
pub struct BlkServer {
    listener: Listener,
    disk: Arc<Disk>,
    cfg: DeviceConfig,
    rt: Handle,
    stopper: ServerStopper,
}

impl BlkServer {
    /// Binds `socket` (replacing a stale socket file there).
    pub fn bind(socket: &Path, disk: Arc<Disk>, cfg: DeviceConfig, rt: Handle) -> Result<Self> {
        let listener =
            Listener::new(socket, true).map_err(|e| Error::Invalid(format!("listen on {}: {e}", socket.display())))?;
        Self::with_listener(listener, disk, cfg, rt)
    }

    /// Serves on an already bound listener (socket activation, tests).
    pub fn from_listener(listener: UnixListener, disk: Arc<Disk>, cfg: DeviceConfig, rt: Handle) -> Result<Self> {
        Self::with_listener(Listener::from(listener), disk, cfg, rt)
    }

    fn with_listener(listener: Listener, disk: Arc<Disk>, cfg: DeviceConfig, rt: Handle) -> Result<Self> {
        cfg.validate()?;
        let stopper = ServerStopper::new().map_err(|e| Error::io("eventfd", e))?;
        Ok(BlkServer { listener, disk, cfg, rt, stopper })
    }

    pub fn stopper(&self) -> ServerStopper {
        self.stopper.clone()
    }

    fn wait_for_frontend(&self) -> Result<bool> {
        self.stopper.wait_for_frontend(self.listener.as_raw_fd()).map_err(|e| Error::io("wait for a frontend", e))
    }

    /// Waits for one frontend, serves it until it disconnects, returns Ok(true); Ok(false)
    /// once stopped.
    pub fn serve_one(&mut self) -> Result<bool> {
        if !self.wait_for_frontend()? {
            return Ok(false);
        }
        let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(self.disk.clone(), self.cfg, self.rt.clone(), mem.clone()));
        let mut daemon = VhostUserDaemon::new("incfs-vhost-user-blk".to_string(), backend.clone(), mem)
            .map_err(|e| Error::Invalid(format!("vhost-user daemon: {e}")))?;
        daemon.start(&mut self.listener).map_err(|e| Error::Invalid(format!("vhost-user daemon: {e}")))?;
        info!("vhost-user-blk frontend connected");
        self.stopper.set_connection(daemon.shutdown_handle());
        if self.stopper.is_stopped() {
            daemon.request_shutdown();
        }
        let result = daemon.wait();
        self.stopper.set_connection(None);
        backend.queues.stop_all();
        drop(daemon);
        info!("vhost-user-blk frontend disconnected");
        match result {
            Ok(()) => Ok(true),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(true),
            Err(e) => Err(Error::Invalid(format!("vhost-user daemon: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        let cfg = DeviceConfig { queues: 3, threads: 2, ..Default::default() };
        assert_eq!(cfg.thread_masks(), vec![0b101, 0b010]);
        let cfg = DeviceConfig { queues: 1, threads: 4, ..Default::default() };
        assert_eq!(cfg.thread_masks(), vec![0b1]);
    }
}
