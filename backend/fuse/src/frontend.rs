//! A synchronous vhost-user-fs frontend that plays QEMU's (and the guest kernel's) part, for
//! tests and benchmarks. It works against any vhost-user-fs daemon.
//!
//! Guest memory is one memfd shared with the daemon. Each configured queue gets a split ring
//! laid out by hand at the start of that memory; the rest is cut into fixed-size buffer slots,
//! one per request in flight. Requests are submitted (descriptors + avail ring), the queue is
//! kicked, and completions are collected from the used ring after waiting on the call eventfd.
//! EVENT_IDX is negotiated only on request (`FrontendConfig::event_idx`); the frontend then
//! publishes `used_event` before it sleeps, and kicks only when the daemon's `avail_event`
//! asks for it, as a guest driver does.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::abi::{self, read_struct, InHeader, OutHeader};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Guest-physical base of the one memory region (any non-zero, page-aligned value).
const GPA_BASE: u64 = 0x10_0000;

/// Errors of the test frontend.
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

/// Frontend configuration.
#[derive(Debug, Clone, Copy)]
pub struct FrontendConfig {
    /// Request queues to set up (queue 0, hiprio, is always set up too).
    pub request_queues: usize,
    /// Size of every virtqueue (power of two, at most what the daemon allows).
    pub queue_size: u16,
    /// Size of one request buffer slot (input + output of one request in flight).
    pub slot_size: usize,
    /// Number of buffer slots (requests in flight at most, over all queues).
    pub slots: usize,
    /// How long to wait for a completion.
    pub timeout: Duration,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if the daemon offers it.
    pub event_idx: bool,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            request_queues: 1,
            queue_size: 256,
            slot_size: (1 << 20) + (64 << 10),
            slots: 64,
            timeout: Duration::from_secs(10),
            event_idx: false,
        }
    }
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
    /// The bytes of the writable buffers, `used_len` of them (clamped to their size).
    pub bytes: Vec<u8>,
}

/// A decoded FUSE reply.
#[derive(Debug, Clone)]
pub struct FuseReply {
    pub header: OutHeader,
    /// Body after the out_header (clamped to what was written).
    pub body: Vec<u8>,
    pub used_len: u32,
}

impl FuseReply {
    /// Decodes `bytes` written by the daemon.
    pub fn parse(bytes: &[u8], used_len: u32) -> Result<Self> {
        let (header, rest) = read_struct::<OutHeader>(bytes).ok_or_else(|| {
            FrontendError::Protocol(format!("reply of {} bytes has no out_header", bytes.len()))
        })?;
        let body_len = (header.len as usize)
            .saturating_sub(size_of::<OutHeader>())
            .min(rest.len());
        Ok(FuseReply {
            header,
            body: rest[..body_len].to_vec(),
            used_len,
        })
    }

    /// The body, or the FUSE error as `Err`.
    pub fn into_result(self) -> Result<Vec<u8>> {
        if self.header.error != 0 {
            return Err(FrontendError::Fuse(-self.header.error));
        }
        Ok(self.body)
    }
}

/// A directory entry from READDIR / READDIRPLUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntryOwned {
    pub ino: u64,
    pub off: u64,
    pub typ: u32,
    pub name: Vec<u8>,
    /// READDIRPLUS only.
    pub entry: Option<abi::EntryOut>,
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

/// The frontend. See the module documentation.
pub struct FuseFrontend {
    vu: Frontend,
    mem: GuestMemoryMmap,
    _memfd: File,
    cfg: FrontendConfig,
    queues: Vec<Option<VirtQueue>>,
    free_slots: Vec<usize>,
    slots_base: u64,
    next_unique: u64,
    request_queue: usize,
    init_out: Option<abi::InitOut>,
    event_idx: bool,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn mem_err(e: impl std::fmt::Display) -> FrontendError {
    FrontendError::Memory(e.to_string())
}

impl FuseFrontend {
    /// Connects with the default configuration (one request queue).
    pub fn connect(socket: &Path) -> Result<Self> {
        Self::connect_with(socket, FrontendConfig::default())
    }

    /// Connects to a vhost-user-fs daemon and sets up memory and queues.
    pub fn connect_with(socket: &Path, cfg: FrontendConfig) -> Result<Self> {
        if !cfg.queue_size.is_power_of_two() || cfg.slots == 0 || cfg.request_queues == 0 {
            return Err(FrontendError::Protocol("bad frontend configuration".into()));
        }
        let nq = cfg.request_queues + 1;
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
        let hva = GuestMemoryBackend::get_host_address(&mem, GuestAddress(GPA_BASE))
            .map_err(mem_err)? as u64;

        let mut vu = Frontend::connect(socket, nq as u64)?;
        vu.set_owner()?;
        let features = vu.get_features()?;
        let need = (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & need != need {
            return Err(FrontendError::Protocol(format!(
                "daemon features {features:#x} lack {need:#x}"
            )));
        }
        let event_idx = cfg.event_idx && features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let want = if event_idx {
            need | (1u64 << VIRTIO_RING_F_EVENT_IDX)
        } else {
            need
        };
        vu.set_features(want)?;
        let proto = vu.get_protocol_features()?;
        let proto_want =
            proto & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
        vu.set_protocol_features(proto_want)?;
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let n = vu.get_queue_num()?;
            if (n as usize) < nq {
                return Err(FrontendError::Protocol(format!(
                    "daemon has {n} queues, need {nq}"
                )));
            }
        }
        let guest_region = GuestMemoryBackend::find_region(&mem, GuestAddress(GPA_BASE))
            .ok_or_else(|| FrontendError::Memory("no region".into()))?;
        let region = VhostUserMemoryRegionInfo::from_guest_region(guest_region)?;
        vu.set_mem_table(&[region])?;

        let mut queues = Vec::with_capacity(nq);
        for q in 0..nq {
            let base = GPA_BASE + ring_sz * q as u64;
            let vq = VirtQueue {
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
            };
            let to_hva = |gpa: u64| gpa - GPA_BASE + hva;
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
            vu.set_vring_base(q, 0)?;
            vu.set_vring_call(q, &vq.call)?;
            vu.set_vring_kick(q, &vq.kick)?;
            vu.set_vring_enable(q, true)?;
            queues.push(Some(vq));
        }

        Ok(FuseFrontend {
            vu,
            mem,
            _memfd: memfd,
            cfg,
            queues,
            free_slots: (0..cfg.slots).rev().collect(),
            slots_base,
            next_unique: 1,
            request_queue: 1,
            init_out: None,
            event_idx,
        })
    }

    /// The queue typed requests go to (1 by default; FORGET always goes to hiprio, 0).
    pub fn set_request_queue(&mut self, q: usize) {
        self.request_queue = q;
    }

    /// What the daemon answered to INIT.
    pub fn init_out(&self) -> Option<&abi::InitOut> {
        self.init_out.as_ref()
    }

    /// The vhost-user connection, for tests of the control plane.
    pub fn vhost_user(&mut self) -> &mut Frontend {
        &mut self.vu
    }

    /// Stops queue `q` as QEMU does (GET_VRING_BASE) and returns the next avail index.
    pub fn stop_queue(&mut self, q: usize) -> Result<u32> {
        Ok(self.vu.get_vring_base(q)?)
    }

    fn queue(&mut self, q: usize) -> Result<&mut VirtQueue> {
        self.queues
            .get_mut(q)
            .and_then(|v| v.as_mut())
            .ok_or_else(|| FrontendError::Protocol(format!("no queue {q}")))
    }

    fn slot_addr(&self, slot: usize) -> u64 {
        self.slots_base + slot as u64 * align_up(self.cfg.slot_size as u64, 4096)
    }

    /// Puts a hand-built chain on queue `q` (without kicking). Returns its token.
    pub fn submit_descs(&mut self, q: usize, descs: &[DescSpec]) -> Result<u16> {
        if descs.is_empty() {
            return Err(FrontendError::Protocol("empty chain".into()));
        }
        let slot_size = align_up(self.cfg.slot_size as u64, 4096);
        let need: u64 = descs
            .iter()
            .map(|d| match d {
                DescSpec::In(b) => align_up(b.len() as u64, 64),
                DescSpec::Out(n) => align_up(u64::from(*n), 64),
                DescSpec::Raw { .. } => 0,
            })
            .sum();
        if need > slot_size {
            return Err(FrontendError::Protocol(format!(
                "chain needs {need} bytes, slot has {slot_size}"
            )));
        }
        if self.queue(q)?.free_descs.len() < descs.len() {
            return Err(FrontendError::Full);
        }
        let slot = self.free_slots.pop().ok_or(FrontendError::Full)?;
        let mut cursor = self.slot_addr(slot);
        let mem = &self.mem;
        let vq = self
            .queues
            .get_mut(q)
            .and_then(|v| v.as_mut())
            .ok_or(FrontendError::Full)?;
        let ids: Vec<u16> = (0..descs.len())
            .filter_map(|_| vq.free_descs.pop())
            .collect();
        let mut out = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let (addr, len, mut flags) = match d {
                DescSpec::In(bytes) => {
                    mem.write_slice(bytes, GuestAddress(cursor))
                        .map_err(mem_err)?;
                    let a = cursor;
                    cursor += align_up(bytes.len() as u64, 64);
                    (a, bytes.len() as u32, 0)
                }
                DescSpec::Out(n) => {
                    let a = cursor;
                    cursor += align_up(u64::from(*n), 64);
                    out.push((a, *n));
                    (a, *n, VIRTQ_DESC_F_WRITE)
                }
                DescSpec::Raw { addr, len, write } => {
                    (*addr, *len, if *write { VIRTQ_DESC_F_WRITE } else { 0 })
                }
            };
            let next = if i + 1 < ids.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let daddr = GuestAddress(vq.desc + 16 * u64::from(ids[i]));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, daddr).map_err(mem_err)?;
        }
        let head = ids[0];
        // avail->ring[idx % size] = head; then publish idx.
        let ring_entry = vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size);
        mem.write_obj(head.to_le(), GuestAddress(ring_entry))
            .map_err(mem_err)?;
        fence(Ordering::SeqCst);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        mem.store(
            vq.avail_idx.to_le(),
            GuestAddress(vq.avail + 2),
            Ordering::Release,
        )
        .map_err(mem_err)?;
        fence(Ordering::SeqCst);
        vq.in_flight.insert(
            head,
            InFlight {
                slot,
                descs: ids,
                out,
            },
        );
        Ok(head)
    }

    /// Puts a request (readable bytes `req`, one writable buffer of `out_len`) on queue `q`.
    pub fn submit(&mut self, q: usize, req: &[u8], out_len: u32) -> Result<u16> {
        let mut descs = vec![DescSpec::In(req.to_vec())];
        if out_len > 0 {
            descs.push(DescSpec::Out(out_len));
        }
        self.submit_descs(q, &descs)
    }

    /// Notifies the daemon that queue `q` has new buffers. With EVENT_IDX, only when the
    /// daemon asked for it (its avail_event lies among the buffers added since the last
    /// kick), as a guest driver does.
    pub fn kick(&mut self, q: usize) -> Result<()> {
        let event_idx = self.event_idx;
        let mem = &self.mem;
        let vq = self.queues.get_mut(q).and_then(|v| v.as_mut()).ok_or(FrontendError::Full)?;
        let (new, old) = (vq.avail_idx, vq.kicked_idx);
        vq.kicked_idx = new;
        if event_idx {
            fence(Ordering::SeqCst);
            let avail_event: u16 = mem
                .load(GuestAddress(vq.used + 4 + 8 * u64::from(vq.size)), Ordering::Acquire)
                .map_err(mem_err)?;
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
        self.queues.get(q).and_then(|v| v.as_ref()).map_or(0, |v| v.kicks)
    }

    /// Number of requests in flight on queue `q`.
    pub fn in_flight(&self, q: usize) -> usize {
        self.queues
            .get(q)
            .and_then(|v| v.as_ref())
            .map_or(0, |v| v.in_flight.len())
    }

    /// Collects whatever completed on queue `q`, without waiting.
    pub fn poll(&mut self, q: usize) -> Result<Vec<Completion>> {
        let mem = &self.mem;
        let vq = self
            .queues
            .get_mut(q)
            .and_then(|v| v.as_mut())
            .ok_or(FrontendError::Full)?;
        let used_idx = u16::from_le(
            mem.load::<u16>(GuestAddress(vq.used + 2), Ordering::Acquire)
                .map_err(mem_err)?,
        );
        fence(Ordering::SeqCst);
        let mut done = Vec::new();
        while vq.last_used != used_idx {
            let e = vq.used + 4 + 8 * u64::from(vq.last_used % vq.size);
            let id: u32 = u32::from_le(mem.read_obj(GuestAddress(e)).map_err(mem_err)?);
            let len: u32 = u32::from_le(mem.read_obj(GuestAddress(e + 4)).map_err(mem_err)?);
            vq.last_used = vq.last_used.wrapping_add(1);
            let head =
                u16::try_from(id).map_err(|_| FrontendError::Protocol(format!("used id {id}")))?;
            let Some(f) = vq.in_flight.remove(&head) else {
                return Err(FrontendError::Protocol(format!(
                    "used id {head} not in flight"
                )));
            };
            let mut bytes = Vec::new();
            let mut left = len as usize;
            for &(addr, n) in &f.out {
                let take = left.min(n as usize);
                let start = bytes.len();
                bytes.resize(start + take, 0);
                mem.read_slice(&mut bytes[start..], GuestAddress(addr))
                    .map_err(mem_err)?;
                left -= take;
            }
            vq.free_descs.extend(f.descs);
            self.free_slots.push(f.slot);
            done.push(Completion {
                token: head,
                used_len: len,
                bytes,
            });
        }
        Ok(done)
    }

    /// Waits until at least one request completes on queue `q` (or the timeout).
    pub fn wait_some(&mut self, q: usize) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            if self.event_idx {
                // Ask for a notification as soon as anything past what we consumed is used.
                let mem = &self.mem;
                let vq = self
                    .queues
                    .get_mut(q)
                    .and_then(|v| v.as_mut())
                    .ok_or(FrontendError::Full)?;
                let used_event = vq.avail + 4 + 2 * u64::from(vq.size);
                mem.store(
                    vq.last_used.to_le(),
                    GuestAddress(used_event),
                    Ordering::Release,
                )
                .map_err(mem_err)?;
                fence(Ordering::SeqCst);
            }
            let done = self.poll(q)?;
            if !done.is_empty() {
                return Ok(done);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout);
            }
            let fd = self.queue(q)?.call.as_raw_fd();
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(1000) as libc::c_int;
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
        }
    }

    /// Waits until every token in `tokens` has completed on queue `q`.
    pub fn wait_all(&mut self, q: usize, tokens: &[u16]) -> Result<Vec<Completion>> {
        let mut got: Vec<Completion> = Vec::with_capacity(tokens.len());
        let mut extra = Vec::new();
        while tokens.iter().any(|t| !got.iter().any(|c| c.token == *t)) {
            for c in self.wait_some(q)? {
                if tokens.contains(&c.token) {
                    got.push(c);
                } else {
                    extra.push(c);
                }
            }
        }
        if !extra.is_empty() {
            return Err(FrontendError::Protocol(format!(
                "{} unexpected completions",
                extra.len()
            )));
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

    /// Builds a FUSE request with a fresh unique id; returns (bytes, unique).
    pub fn build_request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (Vec<u8>, u64) {
        let unique = self.next_unique;
        self.next_unique += 1;
        let hdr = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            total_extlen: 0,
            padding: 0,
        };
        let mut v = hdr.as_slice().to_vec();
        v.extend_from_slice(body);
        (v, unique)
    }

    /// Sends `opcode` with `body` to the request queue and returns the decoded reply.
    pub fn raw(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        out_len: u32,
    ) -> Result<FuseReply> {
        let q = self.request_queue;
        self.raw_on(q, opcode, nodeid, body, out_len)
    }

    /// Like [`Self::raw`], on queue `q`.
    pub fn raw_on(
        &mut self,
        q: usize,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        out_len: u32,
    ) -> Result<FuseReply> {
        let (req, unique) = self.build_request(opcode, nodeid, body);
        let c = self.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(out_len)])?;
        let r = FuseReply::parse(&c.bytes, c.used_len)?;
        if r.header.unique != unique {
            return Err(FrontendError::Protocol(format!(
                "unique {} != {unique}",
                r.header.unique
            )));
        }
        Ok(r)
    }

    /// Submits several requests on one queue at once and waits for all; replies in order.
    pub fn batch(&mut self, q: usize, reqs: &[(u32, u64, Vec<u8>, u32)]) -> Result<Vec<FuseReply>> {
        let mut tokens = Vec::with_capacity(reqs.len());
        let mut uniques = Vec::with_capacity(reqs.len());
        for (op, nodeid, body, out_len) in reqs {
            let (req, unique) = self.build_request(*op, *nodeid, body);
            tokens.push(self.submit(q, &req, *out_len)?);
            uniques.push(unique);
        }
        self.kick(q)?;
        let done = self.wait_all(q, &tokens)?;
        done.iter()
            .zip(uniques)
            .map(|(c, unique)| {
                let r = FuseReply::parse(&c.bytes, c.used_len)?;
                if r.header.unique != unique {
                    return Err(FrontendError::Protocol(format!(
                        "unique {} != {unique}",
                        r.header.unique
                    )));
                }
                Ok(r)
            })
            .collect()
    }

    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8], out_len: u32) -> Result<Vec<u8>> {
        self.raw(opcode, nodeid, body, out_len)?.into_result()
    }

    fn call_struct<T: ByteValued + Default>(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
    ) -> Result<T> {
        let out_len = (size_of::<OutHeader>() + size_of::<T>()) as u32;
        let b = self.call(opcode, nodeid, body, out_len)?;
        read_struct::<T>(&b)
            .map(|(v, _)| v)
            .ok_or_else(|| FrontendError::Protocol(format!("short reply to opcode {opcode}")))
    }

    /// FUSE INIT as a Linux guest sends it (7.38, with MAX_PAGES and READDIRPLUS).
    pub fn init(&mut self) -> Result<abi::InitOut> {
        let flags = abi::FUSE_ASYNC_READ
            | abi::FUSE_BIG_WRITES
            | abi::FUSE_PARALLEL_DIROPS
            | abi::FUSE_MAX_PAGES
            | abi::FUSE_DO_READDIRPLUS
            | abi::FUSE_READDIRPLUS_AUTO
            | abi::FUSE_CACHE_SYMLINKS
            | abi::FUSE_EXPORT_SUPPORT
            | abi::FUSE_POSIX_LOCKS;
        self.init_with(7, 38, flags, 1 << 20)
    }

    /// FUSE INIT with explicit values.
    pub fn init_with(
        &mut self,
        major: u32,
        minor: u32,
        flags: u32,
        max_readahead: u32,
    ) -> Result<abi::InitOut> {
        let body = abi::InitIn {
            major,
            minor,
            max_readahead,
            flags,
            flags2: 0,
            unused: [0; 11],
        };
        let out: abi::InitOut = self.call_struct(abi::FUSE_INIT, 0, body.as_slice())?;
        self.init_out = Some(out);
        Ok(out)
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<abi::EntryOut> {
        let mut body = name.to_vec();
        body.push(0);
        self.call_struct(abi::FUSE_LOOKUP, parent, &body)
    }

    /// FORGET, on the hiprio queue (no reply; waits for the chain to be returned).
    pub fn forget(&mut self, ino: u64, nlookup: u64) -> Result<()> {
        let (req, _) =
            self.build_request(abi::FUSE_FORGET, ino, abi::ForgetIn { nlookup }.as_slice());
        self.roundtrip_descs(0, &[DescSpec::In(req)])?;
        Ok(())
    }

    /// BATCH_FORGET, on the hiprio queue.
    pub fn batch_forget(&mut self, items: &[(u64, u64)]) -> Result<()> {
        let mut body = abi::BatchForgetIn {
            count: items.len() as u32,
            dummy: 0,
        }
        .as_slice()
        .to_vec();
        for &(nodeid, nlookup) in items {
            body.extend_from_slice(abi::ForgetOne { nodeid, nlookup }.as_slice());
        }
        let (req, _) = self.build_request(abi::FUSE_BATCH_FORGET, 0, &body);
        self.roundtrip_descs(0, &[DescSpec::In(req)])?;
        Ok(())
    }

    pub fn getattr(&mut self, ino: u64) -> Result<abi::AttrOut> {
        self.call_struct(abi::FUSE_GETATTR, ino, abi::GetattrIn::default().as_slice())
    }

    pub fn readlink(&mut self, ino: u64) -> Result<Vec<u8>> {
        self.call(abi::FUSE_READLINK, ino, &[], 4096 + 16)
    }

    /// OPEN; returns (fh, open_flags).
    pub fn open(&mut self, ino: u64, flags: u32) -> Result<(u64, u32)> {
        let o: abi::OpenOut = self.call_struct(
            abi::FUSE_OPEN,
            ino,
            abi::OpenIn {
                flags,
                open_flags: 0,
            }
            .as_slice(),
        )?;
        Ok((o.fh, o.open_flags))
    }

    /// OPENDIR; returns (fh, open_flags).
    pub fn opendir(&mut self, ino: u64) -> Result<(u64, u32)> {
        let o: abi::OpenOut = self.call_struct(
            abi::FUSE_OPENDIR,
            ino,
            abi::OpenIn {
                flags: libc::O_RDONLY as u32,
                open_flags: 0,
            }
            .as_slice(),
        )?;
        Ok((o.fh, o.open_flags))
    }

    fn read_body(fh: u64, offset: u64, size: u32) -> abi::ReadIn {
        abi::ReadIn {
            fh,
            offset,
            size,
            read_flags: 0,
            lock_owner: 0,
            flags: libc::O_RDONLY as u32,
            padding: 0,
        }
    }

    /// READ into a buffer laid out as the kernel does: out_header, then the data.
    pub fn read(&mut self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (req, unique) = self.build_request(
            abi::FUSE_READ,
            ino,
            Self::read_body(fh, offset, size).as_slice(),
        );
        let q = self.request_queue;
        let c = self.roundtrip_descs(
            q,
            &[DescSpec::In(req), DescSpec::Out(16), DescSpec::Out(size)],
        )?;
        let r = FuseReply::parse(&c.bytes, c.used_len)?;
        if r.header.unique != unique {
            return Err(FrontendError::Protocol("unique mismatch".into()));
        }
        r.into_result()
    }

    /// Submits a READ without waiting (for queue depth > 1); complete with `wait_all`.
    pub fn submit_read(
        &mut self,
        q: usize,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<u16> {
        let (req, _) = self.build_request(
            abi::FUSE_READ,
            ino,
            Self::read_body(fh, offset, size).as_slice(),
        );
        self.submit_descs(
            q,
            &[DescSpec::In(req), DescSpec::Out(16), DescSpec::Out(size)],
        )
    }

    /// WRITE.
    pub fn write(&mut self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let w = abi::WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        let mut body = w.as_slice().to_vec();
        body.extend_from_slice(data);
        let o: abi::WriteOut = self.call_struct(abi::FUSE_WRITE, ino, &body)?;
        Ok(o.size)
    }

    pub fn release(&mut self, ino: u64, fh: u64) -> Result<()> {
        let body = abi::ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(abi::FUSE_RELEASE, ino, body.as_slice(), 16)
            .map(|_| ())
    }

    pub fn releasedir(&mut self, ino: u64, fh: u64) -> Result<()> {
        let body = abi::ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(abi::FUSE_RELEASEDIR, ino, body.as_slice(), 16)
            .map(|_| ())
    }

    pub fn flush(&mut self, ino: u64, fh: u64) -> Result<()> {
        let body = abi::FlushIn {
            fh,
            ..Default::default()
        };
        self.call(abi::FUSE_FLUSH, ino, body.as_slice(), 16)
            .map(|_| ())
    }

    fn readdir_any(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> Result<Vec<DirEntryOwned>> {
        let op = if plus {
            abi::FUSE_READDIRPLUS
        } else {
            abi::FUSE_READDIR
        };
        let body = Self::read_body(fh, offset, size);
        let b = self.call(op, ino, body.as_slice(), size + 16)?;
        let mut out = Vec::new();
        let mut rest = &b[..];
        loop {
            let (entry, dirent, fixed) = if plus {
                let Some((d, _)) = read_struct::<abi::Direntplus>(rest) else {
                    break;
                };
                (Some(d.entry_out), d.dirent, size_of::<abi::Direntplus>())
            } else {
                let Some((d, _)) = read_struct::<abi::Dirent>(rest) else {
                    break;
                };
                (None, d, size_of::<abi::Dirent>())
            };
            let nl = dirent.namelen as usize;
            let name = rest
                .get(fixed..fixed + nl)
                .ok_or_else(|| FrontendError::Protocol("dirent name past the end".into()))?;
            out.push(DirEntryOwned {
                ino: dirent.ino,
                off: dirent.off,
                typ: dirent.typ,
                name: name.to_vec(),
                entry,
            });
            let rec = abi::dirent_align(fixed + nl);
            rest = rest.get(rec..).unwrap_or(&[]);
        }
        Ok(out)
    }

    pub fn readdir(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<DirEntryOwned>> {
        self.readdir_any(ino, fh, offset, size, false)
    }

    pub fn readdirplus(
        &mut self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<DirEntryOwned>> {
        self.readdir_any(ino, fh, offset, size, true)
    }

    pub fn statfs(&mut self, ino: u64) -> Result<abi::Kstatfs> {
        let o: abi::StatfsOut = self.call_struct(abi::FUSE_STATFS, ino, &[])?;
        Ok(o.st)
    }

    /// GETXATTR with the given `size` (0 = probe). Returns the raw reply body: a
    /// getxattr_out when probing, the value otherwise.
    pub fn getxattr(&mut self, ino: u64, name: &[u8], size: u32) -> Result<Vec<u8>> {
        let mut body = abi::GetxattrIn { size, padding: 0 }.as_slice().to_vec();
        body.extend_from_slice(name);
        body.push(0);
        let out = if size == 0 { 16 + 8 } else { size + 16 };
        self.call(abi::FUSE_GETXATTR, ino, &body, out)
    }

    /// LISTXATTR with the given `size` (0 = probe).
    pub fn listxattr(&mut self, ino: u64, size: u32) -> Result<Vec<u8>> {
        let body = abi::GetxattrIn { size, padding: 0 };
        let out = if size == 0 { 16 + 8 } else { size + 16 };
        self.call(abi::FUSE_LISTXATTR, ino, body.as_slice(), out)
    }

    pub fn access(&mut self, ino: u64, mask: u32) -> Result<()> {
        let body = abi::AccessIn { mask, padding: 0 };
        self.call(abi::FUSE_ACCESS, ino, body.as_slice(), 16)
            .map(|_| ())
    }

    pub fn lseek(&mut self, ino: u64, fh: u64, offset: u64, whence: u32) -> Result<u64> {
        let body = abi::LseekIn {
            fh,
            offset,
            whence,
            padding: 0,
        };
        let o: abi::LseekOut = self.call_struct(abi::FUSE_LSEEK, ino, body.as_slice())?;
        Ok(o.offset)
    }

    pub fn destroy(&mut self) -> Result<()> {
        self.call(abi::FUSE_DESTROY, 0, &[], 16).map(|_| ())
    }
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
