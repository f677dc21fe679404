//! The device-independent half of the test frontends: guest memory, split rings, feature
//! negotiation and request chains over vhost-user, as QEMU and a guest driver do them.
//! `FuseFrontend` (virtio-fs) and the vhost-user-blk test frontend put their requests on it.
//!
//! Guest memory is one memfd shared with the daemon. Each queue gets a split ring laid out by
//! hand at the start of that memory; the rest is cut into fixed-size buffer slots, one per
//! request in flight. Requests are submitted (descriptors + avail ring), the queue is kicked,
//! and completions are collected from the used ring after waiting on the call eventfd. With
//! EVENT_IDX the transport publishes `used_event` before it sleeps and kicks only when the
//! daemon's `avail_event` asks for it, as a guest driver does.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Guest-physical base of the one memory region (any non-zero, page-aligned value).
const GPA_BASE: u64 = 0x10_0000;

/// Errors of the test frontends.
#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("FUSE error {0} ({desc})", desc = std::io::Error::from_raw_os_error(*.0))]
    Fuse(i32),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no free descriptors or buffer slots")]
    Full,
    #[error("timed out waiting for the daemon")]
    Timeout,
}

impl FrontendError {
    /// The FUSE errno, if this is a FUSE error reply.
    pub fn errno(&self) -> Option<i32> {
        match self {
            FrontendError::Fuse(e) => Some(*e),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, FrontendError>;

/// How the transport sets a device up.
#[derive(Debug, Clone, Copy)]
pub struct TransportConfig {
    /// Virtqueues to set up, all of the same size (a power of two the daemon allows).
    pub queues: usize,
    pub queue_size: u16,
    /// Size of one request buffer slot (input + output of one request in flight).
    pub slot_size: usize,
    /// Number of buffer slots (requests in flight at most, over all queues).
    pub slots: usize,
    /// How long to wait for a completion.
    pub timeout: Duration,
    /// Virtio feature bits to accept when offered (EVENT_IDX among them turns it on).
    /// VERSION_1 and PROTOCOL_FEATURES are required whatever this says.
    pub features: u64,
    /// Bytes of device config space to read (GET_CONFIG); 0: none.
    pub config_len: u32,
    /// Fill writable buffers with 0xee before submitting and return them whole, whatever
    /// the used length says (to see exactly what a device wrote); otherwise return the
    /// first `used_len` bytes and skip the fill (cheaper, for benchmarks).
    pub whole_buffers: bool,
    /// Ask for an inflight area (GET_INFLIGHT_FD) and hand it over at every connection, as
    /// QEMU's vhost-user-blk does, so [`Transport::reconnect`] reaches a restarted daemon
    /// that resubmits what its predecessor left in flight.
    pub inflight: bool,
}

/// One descriptor of a hand-built chain.
#[derive(Debug, Clone)]
pub enum DescSpec {
    /// A device-readable buffer with these bytes (may be empty).
    In(Vec<u8>),
    /// A device-writable buffer of this many bytes.
    Out(u32),
    /// A raw descriptor pointing anywhere (guest-physical address), for hostile tests.
    Raw { addr: u64, len: u32, write: bool },
}

/// A completed request.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The token returned at submission.
    pub token: u16,
    /// The length the daemon put in the used ring.
    pub used_len: u32,
    /// The bytes of the writable buffers, in order: `used_len` of them (clamped to their
    /// size), or all of them with `TransportConfig::whole_buffers`.
    pub bytes: Vec<u8>,
}

struct InFlight {
    slot: usize,
    descs: Vec<u16>,
    /// (address, length) of the writable descriptors, in order.
    out: Vec<(u64, u32)>,
}

struct VirtQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    free_descs: Vec<u16>,
    avail_idx: u16,
    /// avail_idx at the last kick decision (EVENT_IDX suppression).
    kicked_idx: u16,
    /// Kicks actually sent.
    kicks: u64,
    last_used: u16,
    in_flight: HashMap<u16, InFlight>,
}

/// A connected device's memory and queues. See the module documentation.
pub struct Transport {
    vu: Frontend,
    mem: GuestMemoryMmap,
    _memfd: File,
    cfg: TransportConfig,
    queues: Vec<VirtQueue>,
    free_slots: Vec<usize>,
    slots_base: u64,
    slot_size: u64,
    mem_size: u64,
    features: u64,
    config: Vec<u8>,
    /// The dirty log given with SET_LOG_BASE, once started.
    dirty_log: Option<File>,
    protocol_features: VhostUserProtocolFeatures,
    /// Host address of guest-physical `GPA_BASE` in this process.
    hva: u64,
    /// The inflight area, kept across reconnections as QEMU keeps it.
    inflight: Option<(VhostUserInflight, File)>,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn mem_err(e: impl std::fmt::Display) -> FrontendError {
    FrontendError::Memory(e.to_string())
}

impl Transport {
    /// Connects to a vhost-user daemon, negotiates, and sets up memory and queues.
    pub fn connect(socket: &Path, cfg: TransportConfig) -> Result<Self> {
        if !cfg.queue_size.is_power_of_two() || cfg.slots == 0 || cfg.queues == 0 {
            return Err(FrontendError::Protocol("bad frontend configuration".into()));
        }
        let nq = cfg.queues;
        let qs = u64::from(cfg.queue_size);
        // Ring layout per queue: descriptors, avail ring, then the used ring on a new page.
        let desc_sz = 16 * qs;
        let avail_sz = 6 + 2 * qs;
        let used_off = align_up(desc_sz + avail_sz, 4096);
        let ring_sz = align_up(used_off + 6 + 8 * qs, 4096);
        let slots_base = GPA_BASE + ring_sz * nq as u64;
        let slot_size = align_up(cfg.slot_size as u64, 4096);
        let mem_size = align_up(ring_sz * nq as u64 + slot_size * cfg.slots as u64, 1 << 21);

        let memfd = memfd("incfs-frontend")?;
        memfd.set_len(mem_size)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(GPA_BASE),
            mem_size as usize,
            Some(FileOffset::new(memfd.try_clone()?, 0)),
        )])
        .map_err(mem_err)?;
        let hva = GuestMemoryBackend::get_host_address(&mem, GuestAddress(GPA_BASE)).map_err(mem_err)? as u64;

        let queues = (0..nq)
            .map(|q| {
                let base = GPA_BASE + ring_sz * q as u64;
                Ok(VirtQueue {
                    size: cfg.queue_size,
                    desc: base,
                    avail: base + desc_sz,
                    used: base + used_off,
                    kick: EventFd::new(EFD_NONBLOCK)?,
                    call: EventFd::new(EFD_NONBLOCK)?,
                    free_descs: (0..cfg.queue_size).rev().collect(),
                    avail_idx: 0,
                    kicked_idx: 0,
                    kicks: 0,
                    last_used: 0,
                    in_flight: HashMap::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut t = Transport {
            vu: Frontend::connect(socket, nq as u64)?,
            mem,
            _memfd: memfd,
            cfg,
            queues,
            free_slots: (0..cfg.slots).rev().collect(),
            slots_base,
            slot_size,
            mem_size,
            features: 0,
            config: Vec::new(),
            dirty_log: None,
            protocol_features: VhostUserProtocolFeatures::empty(),
            hva,
            inflight: None,
        };
        t.handshake()?;
        Ok(t)
    }

    /// Connects again to a daemon restarted on `socket` with the same memory, rings and
    /// eventfds, as QEMU does after a backend crash (`reconnect=`): the rings start again
    /// at the used index, and with an inflight area the daemon takes it from there.
    pub fn reconnect(&mut self, socket: &Path) -> Result<()> {
        self.vu = Frontend::connect(socket, self.queues.len() as u64)?;
        self.handshake()
    }

    /// Negotiates, reads the config space, hands over memory (and the inflight area) and
    /// starts every queue.
    fn handshake(&mut self) -> Result<()> {
        let cfg = self.cfg;
        let nq = self.queues.len();
        let vu = &mut self.vu;
        vu.set_owner()?;
        let offered = vu.get_features()?;
        let need = (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if offered & need != need {
            return Err(FrontendError::Protocol(format!("daemon features {offered:#x} lack {need:#x}")));
        }
        let features = offered & (cfg.features | need);
        vu.set_features(features)?;
        let proto = vu.get_protocol_features()?;
        // LOG_SHMFD as QEMU takes it: a migration may start logging at any time.
        let mut proto_want =
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::LOG_SHMFD;
        if cfg.config_len > 0 {
            proto_want |= VhostUserProtocolFeatures::CONFIG;
        }
        if cfg.inflight {
            if !proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
                return Err(FrontendError::Protocol("the daemon does not offer INFLIGHT_SHMFD".into()));
            }
            proto_want |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        let protocol_features = proto & proto_want;
        vu.set_protocol_features(protocol_features)?;
        let config = if cfg.config_len > 0 && proto.contains(VhostUserProtocolFeatures::CONFIG) {
            let empty = vec![0u8; cfg.config_len as usize];
            vu.get_config(0, cfg.config_len, VhostUserConfigFlags::WRITABLE, &empty)?.1
        } else {
            Vec::new()
        };
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let n = vu.get_queue_num()?;
            if (n as usize) < nq {
                return Err(FrontendError::Protocol(format!("daemon has {n} queues, need {nq}")));
            }
        }
        let guest_region = GuestMemoryBackend::find_region(&self.mem, GuestAddress(GPA_BASE))
            .ok_or_else(|| FrontendError::Memory("no region".into()))?;
        vu.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(guest_region)?])?;
        if cfg.inflight {
            if self.inflight.is_none() {
                let want = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: nq as u16,
                    queue_size: cfg.queue_size,
                };
                self.inflight = Some(vu.get_inflight_fd(&want)?);
            }
            if let Some((info, file)) = &self.inflight {
                vu.set_inflight_fd(info, file.as_raw_fd())?;
            }
        }

        let hva = self.hva;
        for (q, vq) in self.queues.iter().enumerate() {
            let to_hva = |gpa: u64| gpa - GPA_BASE + hva;
            // A restarted queue goes on from the used index (QEMU's
            // virtio_queue_restore_last_avail_idx); 0 on the first start.
            let used = published_used(&self.mem, vq.used)?;
            vu.set_vring_num(q, cfg.queue_size)?;
            vu.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: cfg.queue_size,
                    queue_size: cfg.queue_size,
                    flags: 0,
                    desc_table_addr: to_hva(vq.desc),
                    used_ring_addr: to_hva(vq.used),
                    avail_ring_addr: to_hva(vq.avail),
                    log_addr: None,
                },
            )?;
            vu.set_vring_base(q, used)?;
            vu.set_vring_call(q, &vq.call)?;
            vu.set_vring_kick(q, &vq.kick)?;
            vu.set_vring_enable(q, true)?;
        }
        self.features = features;
        self.config = config;
        self.protocol_features = protocol_features;
        Ok(())
    }

    /// Starts dirty-page logging as QEMU does when a migration starts: a log of one bit
    /// per 4 KiB page of guest-physical memory, in a memfd given with SET_LOG_BASE, then
    /// SET_FEATURES with VHOST_F_LOG_ALL.
    pub fn start_dirty_log(&mut self) -> Result<()> {
        if !self.protocol_features.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(FrontendError::Protocol("the daemon does not offer LOG_SHMFD".into()));
        }
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.vu.get_features()? & log_all == 0 {
            return Err(FrontendError::Protocol("the daemon does not offer VHOST_F_LOG_ALL".into()));
        }
        let pages = (GPA_BASE + self.mem_size).div_ceil(4096);
        let log = memfd("incfs-dirty-log")?;
        log.set_len(align_up(pages.div_ceil(8), 4096))?;
        let region = VhostUserDirtyLogRegion {
            mmap_size: align_up(pages.div_ceil(8), 4096),
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        };
        self.vu.set_log_base(0, Some(region))?;
        self.vu.set_features(self.features | log_all)?;
        // SET_FEATURES has no reply: as QEMU does when it turns logging on, wait for one to
        // a later message, so no request is served before the backend logs.
        self.vu.get_features()?;
        self.dirty_log = Some(log);
        Ok(())
    }

    /// Ends logging as QEMU does when a migration ends or fails: SET_FEATURES without
    /// VHOST_F_LOG_ALL. The log stays readable here.
    pub fn stop_dirty_log(&mut self) -> Result<()> {
        self.vu.set_features(self.features)?;
        // As in `start_dirty_log`: the backend has stopped logging once a later reply comes.
        self.vu.get_features()?;
        Ok(())
    }

    /// Guest-physical addresses of the pages marked in the dirty log since the last call,
    /// which clears them, as QEMU's log sync does.
    pub fn take_dirty_pages(&mut self) -> Result<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        let log = self.dirty_log.as_ref().ok_or_else(|| FrontendError::Protocol("no dirty log".into()))?;
        let mut bytes = vec![0u8; log.metadata()?.len() as usize];
        log.read_exact_at(&mut bytes, 0)?;
        log.write_all_at(&vec![0u8; bytes.len()], 0)?;
        let mut pages = Vec::new();
        for (i, b) in bytes.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.push((i as u64 * 8 + bit) * 4096);
                }
            }
        }
        Ok(pages)
    }

    /// Guest-physical range of the request buffer slots (after the rings).
    pub fn slots_range(&self) -> std::ops::Range<u64> {
        self.slots_base..self.slots_base + self.slot_size * self.cfg.slots as u64
    }

    /// The virtio features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device config space read at connection (empty if none was asked for).
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// One past the guest memory: an address no descriptor may point at.
    pub fn beyond_memory(&self) -> u64 {
        GPA_BASE + self.mem_size
    }

    /// The vhost-user connection, for tests of the control plane.
    pub fn vhost_user(&mut self) -> &mut Frontend {
        &mut self.vu
    }

    /// Stops queue `q` as QEMU does (GET_VRING_BASE) and returns the next avail index.
    pub fn stop_queue(&mut self, q: usize) -> Result<u32> {
        Ok(self.vu.get_vring_base(q)?)
    }

    fn event_idx(&self) -> bool {
        self.features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn queue(&mut self, q: usize) -> Result<&mut VirtQueue> {
        self.queues.get_mut(q).ok_or_else(|| FrontendError::Protocol(format!("no queue {q}")))
    }

    /// Puts a hand-built chain on queue `q` (without kicking). Returns its token.
    pub fn submit_descs(&mut self, q: usize, descs: &[DescSpec]) -> Result<u16> {
        if descs.is_empty() {
            return Err(FrontendError::Protocol("empty chain".into()));
        }
        let need: u64 = descs
            .iter()
            .map(|d| match d {
                DescSpec::In(b) => align_up(b.len() as u64, 64),
                DescSpec::Out(n) => align_up(u64::from(*n), 64),
                DescSpec::Raw { .. } => 0,
            })
            .sum();
        if need > self.slot_size {
            return Err(FrontendError::Protocol(format!("chain needs {need} bytes, slot has {}", self.slot_size)));
        }
        if self.queue(q)?.free_descs.len() < descs.len() {
            return Err(FrontendError::Full);
        }
        let slot = self.free_slots.pop().ok_or(FrontendError::Full)?;
        let mut cursor = self.slots_base + slot as u64 * self.slot_size;
        let poison = self.cfg.whole_buffers;
        let mem = &self.mem;
        let vq = &mut self.queues[q];
        let ids: Vec<u16> = (0..descs.len()).filter_map(|_| vq.free_descs.pop()).collect();
        let mut out = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let (addr, len, mut flags) = match d {
                DescSpec::In(bytes) => {
                    mem.write_slice(bytes, GuestAddress(cursor)).map_err(mem_err)?;
                    let a = cursor;
                    cursor += align_up(bytes.len() as u64, 64);
                    (a, bytes.len() as u32, 0)
                }
                DescSpec::Out(n) => {
                    let a = cursor;
                    if poison {
                        mem.write_slice(&vec![0xeeu8; *n as usize], GuestAddress(a)).map_err(mem_err)?;
                    }
                    cursor += align_up(u64::from(*n), 64);
                    out.push((a, *n));
                    (a, *n, VIRTQ_DESC_F_WRITE)
                }
                DescSpec::Raw { addr, len, write } => (*addr, *len, if *write { VIRTQ_DESC_F_WRITE } else { 0 }),
            };
            let next = if i + 1 < ids.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(vq.desc + 16 * u64::from(ids[i]))).map_err(mem_err)?;
        }
        let head = ids[0];
        // avail->ring[idx % size] = head; then publish idx.
        let ring_entry = vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size);
        mem.write_obj(head.to_le(), GuestAddress(ring_entry)).map_err(mem_err)?;
        fence(Ordering::SeqCst);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        mem.store(vq.avail_idx.to_le(), GuestAddress(vq.avail + 2), Ordering::Release).map_err(mem_err)?;
        fence(Ordering::SeqCst);
        vq.in_flight.insert(head, InFlight { slot, descs: ids, out });
        Ok(head)
    }

    /// Notifies the daemon that queue `q` has new buffers. With EVENT_IDX, only when the
    /// daemon asked for it (its avail_event lies among the buffers added since the last
    /// kick), as a guest driver does.
    pub fn kick(&mut self, q: usize) -> Result<()> {
        let event_idx = self.event_idx();
        self.queue(q)?;
        let mem = &self.mem;
        let vq = &mut self.queues[q];
        let (new, old) = (vq.avail_idx, vq.kicked_idx);
        vq.kicked_idx = new;
        if event_idx {
            fence(Ordering::SeqCst);
            let avail_event: u16 =
                mem.load(GuestAddress(vq.used + 4 + 8 * u64::from(vq.size)), Ordering::Acquire).map_err(mem_err)?;
            let event = u16::from_le(avail_event);
            if new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old) {
                return Ok(());
            }
        }
        vq.kick.write(1)?;
        vq.kicks += 1;
        Ok(())
    }

    /// Kicks sent on queue `q` so far (fewer than submissions when the daemon polls).
    pub fn kicks(&self, q: usize) -> u64 {
        self.queues.get(q).map_or(0, |v| v.kicks)
    }

    /// Number of requests in flight on queue `q`.
    pub fn in_flight(&self, q: usize) -> usize {
        self.queues.get(q).map_or(0, |v| v.in_flight.len())
    }

    /// Collects whatever completed on queue `q`, without waiting.
    pub fn poll(&mut self, q: usize) -> Result<Vec<Completion>> {
        self.queue(q)?;
        let whole = self.cfg.whole_buffers;
        let mem = &self.mem;
        let vq = &mut self.queues[q];
        let used_idx = published_used(mem, vq.used)?;
        fence(Ordering::SeqCst);
        let mut done = Vec::new();
        while vq.last_used != used_idx {
            let e = vq.used + 4 + 8 * u64::from(vq.last_used % vq.size);
            let id: u32 = u32::from_le(mem.read_obj(GuestAddress(e)).map_err(mem_err)?);
            let len: u32 = u32::from_le(mem.read_obj(GuestAddress(e + 4)).map_err(mem_err)?);
            vq.last_used = vq.last_used.wrapping_add(1);
            let head = u16::try_from(id).map_err(|_| FrontendError::Protocol(format!("used id {id}")))?;
            let Some(f) = vq.in_flight.remove(&head) else {
                return Err(FrontendError::Protocol(format!("used id {head} not in flight")));
            };
            let mut bytes = Vec::new();
            let mut left = if whole { usize::MAX } else { len as usize };
            for &(addr, n) in &f.out {
                let take = left.min(n as usize);
                let start = bytes.len();
                bytes.resize(start + take, 0);
                mem.read_slice(&mut bytes[start..], GuestAddress(addr)).map_err(mem_err)?;
                left -= take;
            }
            vq.free_descs.extend(f.descs);
            self.free_slots.push(f.slot);
            done.push(Completion { token: head, used_len: len, bytes });
        }
        Ok(done)
    }

    /// The used ring's index of queue `q` as the daemon published it, whether or not the
    /// completions were collected.
    pub fn used_index(&mut self, q: usize) -> Result<u16> {
        let used = self.queue(q)?.used;
        published_used(&self.mem, used)
    }

    /// With EVENT_IDX, asks as a sleeping guest driver does for a signal once anything
    /// past what was collected on queue `q` is used.
    fn ask_for_signal(&mut self, q: usize) -> Result<()> {
        if !self.event_idx() {
            return Ok(());
        }
        let vq = self.queue(q)?;
        let (used_event, last_used) = (vq.avail + 4 + 2 * u64::from(vq.size), vq.last_used);
        self.mem.store(last_used.to_le(), GuestAddress(used_event), Ordering::Release).map_err(mem_err)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Waits up to `timeout` for queue `q`'s call eventfd, then clears it; whether it was
    /// signalled (false if interrupted).
    fn wait_call(&mut self, q: usize, timeout: Duration) -> Result<bool> {
        let mut pfd = libc::pollfd { fd: self.queue(q)?.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        // Clear the eventfd; EAGAIN just means it was not signalled.
        let _ = self.queue(q)?.call.read();
        Ok(r > 0)
    }

    /// Waits up to `timeout` for the daemon to signal queue `q`, without collecting
    /// anything (asking for the signal first, with EVENT_IDX); whether it came.
    pub fn wait_signal(&mut self, q: usize, timeout: Duration) -> Result<bool> {
        self.ask_for_signal(q)?;
        self.wait_call(q, timeout)
    }

    /// Waits until at least one request completes on queue `q` (or the timeout).
    pub fn wait_some(&mut self, q: usize) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            self.ask_for_signal(q)?;
            let done = self.poll(q)?;
            if !done.is_empty() {
                return Ok(done);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout);
            }
            self.wait_call(q, left.min(Duration::from_secs(1)))?;
        }
    }

    /// Waits until every token in `tokens` has completed on queue `q`; completions in the
    /// order of `tokens`. Any other completion is an error.
    pub fn wait_all(&mut self, q: usize, tokens: &[u16]) -> Result<Vec<Completion>> {
        let mut got: Vec<Completion> = Vec::with_capacity(tokens.len());
        let mut extra = 0;
        while tokens.iter().any(|t| !got.iter().any(|c| c.token == *t)) {
            for c in self.wait_some(q)? {
                if tokens.contains(&c.token) {
                    got.push(c);
                } else {
                    extra += 1;
                }
            }
        }
        if extra > 0 {
            return Err(FrontendError::Protocol(format!("{extra} unexpected completions")));
        }
        got.sort_by_key(|c| tokens.iter().position(|t| *t == c.token));
        Ok(got)
    }

    /// Submits a chain, kicks, and waits for its completion.
    pub fn roundtrip_descs(&mut self, q: usize, descs: &[DescSpec]) -> Result<Completion> {
        let t = self.submit_descs(q, descs)?;
        self.kick(q)?;
        let mut v = self.wait_all(q, &[t])?;
        v.pop().ok_or(FrontendError::Timeout)
    }
}

/// The index of the used ring at guest-physical `used`, as the daemon published it.
fn published_used(mem: &GuestMemoryMmap, used: u64) -> Result<u16> {
    let idx: u16 = mem.load(GuestAddress(used + 2), Ordering::Acquire).map_err(mem_err)?;
    Ok(u16::from_le(idx))
}

fn memfd(name: &str) -> Result<File> {
    let cname = CString::new(name).map_err(|e| FrontendError::Protocol(e.to_string()))?;
    // SAFETY: a valid NUL-terminated name; the returned fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}
