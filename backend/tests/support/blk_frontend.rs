//! A synchronous vhost-user-blk frontend that plays QEMU's (and the guest driver's) part, for
//! the device tests. Guest memory is one memfd shared with the daemon; each queue's split
//! ring is laid out by hand at the start, the rest is cut into buffer slots (one per request
//! in flight). Modelled on backend/fuse/src/frontend.rs.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const GPA_BASE: u64 = 0x10_0000;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const F_RO: u32 = 5;
pub const F_DISCARD: u32 = 13;
pub const F_WRITE_ZEROES: u32 = 14;
pub const F_FLUSH: u32 = 9;
pub const F_MQ: u32 = 12;

type R<T> = Result<T, String>;

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

#[derive(Debug, Clone)]
pub enum Desc {
    /// Device-readable bytes.
    In(Vec<u8>),
    /// Device-writable buffer of this many bytes.
    Out(u32),
    /// A raw descriptor anywhere (guest-physical), for hostile tests.
    Raw { addr: u64, len: u32, write: bool },
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub token: u16,
    pub used_len: u32,
    /// The writable buffers' bytes, in order (all of them, whatever used_len says).
    pub bytes: Vec<u8>,
}

impl Completion {
    /// The status byte (the last writable byte), if there was one.
    pub fn status(&self) -> Option<u8> {
        self.bytes.last().copied()
    }
}

struct InFlight {
    slot: usize,
    descs: Vec<u16>,
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
    last_used: u16,
    in_flight: HashMap<u16, InFlight>,
}

pub struct BlkFrontend {
    vu: Frontend,
    mem: GuestMemoryMmap,
    _memfd: File,
    queues: Vec<VirtQueue>,
    free_slots: Vec<usize>,
    slots_base: u64,
    slot_size: u64,
    pub features: u64,
    pub config: Vec<u8>,
    pub timeout: Duration,
    pub mem_size: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn memfd(name: &str) -> R<File> {
    let cname = CString::new(name).map_err(e)?;
    // SAFETY: a valid NUL-terminated name; the fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl BlkFrontend {
    /// Connects, negotiates (EVENT_IDX off), reads the config space and sets up `nq` queues.
    pub fn connect(socket: &Path, nq: usize) -> R<Self> {
        let qs: u16 = 128;
        let slots = 64usize;
        let slot_size = align_up((8 << 20) + 4096, 4096);
        let q = u64::from(qs);
        let desc_sz = 16 * q;
        let avail_sz = 6 + 2 * q;
        let used_off = align_up(desc_sz + avail_sz, 4096);
        let ring_sz = align_up(used_off + 6 + 8 * q, 4096);
        let slots_base = GPA_BASE + ring_sz * nq as u64;
        let mem_size = align_up(ring_sz * nq as u64 + slot_size * slots as u64, 1 << 21);
        let fd = memfd("blk-frontend")?;
        fd.set_len(mem_size).map_err(e)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(GuestAddress(GPA_BASE), mem_size as usize, Some(FileOffset::new(fd.try_clone().map_err(e)?, 0)))]).map_err(e)?;
        let hva = GuestMemoryBackend::get_host_address(&mem, GuestAddress(GPA_BASE)).map_err(e)? as u64;

        let mut vu = Frontend::connect(socket, nq as u64).map_err(e)?;
        vu.set_owner().map_err(e)?;
        let offered = vu.get_features().map_err(e)?;
        // Everything but EVENT_IDX (29).
        let features = offered & !(1u64 << 29);
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err("no PROTOCOL_FEATURES".into());
        }
        vu.set_features(features).map_err(e)?;
        let proto = vu.get_protocol_features().map_err(e)?;
        let want = proto & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG);
        vu.set_protocol_features(want).map_err(e)?;
        let config = if want.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, payload) = vu.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60]).map_err(e)?;
            payload
        } else {
            Vec::new()
        };
        if want.contains(VhostUserProtocolFeatures::MQ) {
            let n = vu.get_queue_num().map_err(e)?;
            if (n as usize) < nq {
                return Err(format!("daemon has {n} queues, need {nq}"));
            }
        }
        let region = VhostUserMemoryRegionInfo::from_guest_region(GuestMemoryBackend::find_region(&mem, GuestAddress(GPA_BASE)).ok_or("no region")?).map_err(e)?;
        vu.set_mem_table(&[region]).map_err(e)?;
        let mut queues = Vec::new();
        for i in 0..nq {
            let base = GPA_BASE + ring_sz * i as u64;
            let vq = VirtQueue {
                size: qs,
                desc: base,
                avail: base + desc_sz,
                used: base + used_off,
                kick: EventFd::new(EFD_NONBLOCK).map_err(e)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(e)?,
                free_descs: (0..qs).rev().collect(),
                avail_idx: 0,
                last_used: 0,
                in_flight: HashMap::new(),
            };
            let h = |gpa: u64| gpa - GPA_BASE + hva;
            vu.set_vring_num(i, qs).map_err(e)?;
            vu.set_vring_addr(
                i,
                &VringConfigData { queue_max_size: qs, queue_size: qs, flags: 0, desc_table_addr: h(vq.desc), used_ring_addr: h(vq.used), avail_ring_addr: h(vq.avail), log_addr: None },
            )
            .map_err(e)?;
            vu.set_vring_base(i, 0).map_err(e)?;
            vu.set_vring_call(i, &vq.call).map_err(e)?;
            vu.set_vring_kick(i, &vq.kick).map_err(e)?;
            vu.set_vring_enable(i, true).map_err(e)?;
            queues.push(vq);
        }
        Ok(BlkFrontend {
            vu,
            mem,
            _memfd: fd,
            queues,
            free_slots: (0..slots).rev().collect(),
            slots_base,
            slot_size,
            features,
            config,
            timeout: Duration::from_secs(20),
            mem_size,
        })
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    pub fn capacity_sectors(&self) -> u64 {
        u64::from_le_bytes(self.config[0..8].try_into().expect("config"))
    }

    pub fn config_u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.config[at..at + 4].try_into().expect("config"))
    }

    pub fn vhost_user(&mut self) -> &mut Frontend {
        &mut self.vu
    }

    /// One past the guest memory: an address no descriptor may point at.
    pub fn beyond_memory(&self) -> u64 {
        GPA_BASE + self.mem_size
    }

    pub fn submit(&mut self, q: usize, descs: &[Desc]) -> R<u16> {
        let need: u64 = descs
            .iter()
            .map(|d| match d {
                Desc::In(b) => align_up(b.len() as u64, 64),
                Desc::Out(n) => align_up(u64::from(*n), 64),
                Desc::Raw { .. } => 0,
            })
            .sum();
        if need > self.slot_size {
            return Err(format!("chain needs {need} bytes"));
        }
        let slot = self.free_slots.pop().ok_or("no free slot")?;
        let mut cursor = self.slots_base + slot as u64 * self.slot_size;
        let mem = &self.mem;
        let vq = self.queues.get_mut(q).ok_or("no such queue")?;
        if vq.free_descs.len() < descs.len() {
            return Err("no free descriptors".into());
        }
        let ids: Vec<u16> = (0..descs.len()).filter_map(|_| vq.free_descs.pop()).collect();
        let mut out = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let (addr, len, mut flags) = match d {
                Desc::In(bytes) => {
                    mem.write_slice(bytes, GuestAddress(cursor)).map_err(e)?;
                    let a = cursor;
                    cursor += align_up(bytes.len() as u64, 64);
                    (a, bytes.len() as u32, 0)
                }
                Desc::Out(n) => {
                    let a = cursor;
                    // Poison, so tests see what the device wrote.
                    mem.write_slice(&vec![0xeeu8; *n as usize], GuestAddress(a)).map_err(e)?;
                    cursor += align_up(u64::from(*n), 64);
                    out.push((a, *n));
                    (a, *n, VIRTQ_DESC_F_WRITE)
                }
                Desc::Raw { addr, len, write } => (*addr, *len, if *write { VIRTQ_DESC_F_WRITE } else { 0 }),
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
            mem.write_slice(&raw, GuestAddress(vq.desc + 16 * u64::from(ids[i]))).map_err(e)?;
        }
        let head = ids[0];
        mem.write_obj(head.to_le(), GuestAddress(vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size))).map_err(e)?;
        fence(Ordering::SeqCst);
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        mem.store(vq.avail_idx.to_le(), GuestAddress(vq.avail + 2), Ordering::Release).map_err(e)?;
        fence(Ordering::SeqCst);
        vq.in_flight.insert(head, InFlight { slot, descs: ids, out });
        Ok(head)
    }

    pub fn kick(&mut self, q: usize) -> R<()> {
        self.queues[q].kick.write(1).map_err(e)
    }

    pub fn poll(&mut self, q: usize) -> R<Vec<Completion>> {
        let mem = &self.mem;
        let vq = &mut self.queues[q];
        let used_idx = u16::from_le(mem.load::<u16>(GuestAddress(vq.used + 2), Ordering::Acquire).map_err(e)?);
        fence(Ordering::SeqCst);
        let mut done = Vec::new();
        while vq.last_used != used_idx {
            let at = vq.used + 4 + 8 * u64::from(vq.last_used % vq.size);
            let id: u32 = u32::from_le(mem.read_obj(GuestAddress(at)).map_err(e)?);
            let len: u32 = u32::from_le(mem.read_obj(GuestAddress(at + 4)).map_err(e)?);
            vq.last_used = vq.last_used.wrapping_add(1);
            let head = u16::try_from(id).map_err(e)?;
            let f = vq.in_flight.remove(&head).ok_or_else(|| format!("used id {head} not in flight"))?;
            let mut bytes = Vec::new();
            for &(addr, n) in &f.out {
                let s = bytes.len();
                bytes.resize(s + n as usize, 0);
                mem.read_slice(&mut bytes[s..], GuestAddress(addr)).map_err(e)?;
            }
            vq.free_descs.extend(f.descs);
            self.free_slots.push(f.slot);
            done.push(Completion { token: head, used_len: len, bytes });
        }
        Ok(done)
    }

    pub fn wait_all(&mut self, q: usize, tokens: &[u16]) -> R<Vec<Completion>> {
        let deadline = Instant::now() + self.timeout;
        let mut got: Vec<Completion> = Vec::new();
        while tokens.iter().any(|t| !got.iter().any(|c| c.token == *t)) {
            got.extend(self.poll(q)?);
            if tokens.iter().all(|t| got.iter().any(|c| c.token == *t)) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out waiting for completions".into());
            }
            let mut pfd = libc::pollfd { fd: self.queues[q].call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(200) as libc::c_int) };
            let _ = self.queues[q].call.read();
        }
        got.sort_by_key(|c| tokens.iter().position(|t| *t == c.token));
        Ok(got)
    }

    pub fn roundtrip(&mut self, q: usize, descs: &[Desc]) -> R<Completion> {
        let t = self.submit(q, descs)?;
        self.kick(q)?;
        self.wait_all(q, &[t])?.pop().ok_or_else(|| "no completion".into())
    }

    pub fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    /// Chain of a read as Linux builds it: header, data, status.
    pub fn read_chain(sector: u64, len: u32) -> Vec<Desc> {
        vec![Desc::In(Self::header(T_IN, sector)), Desc::Out(len), Desc::Out(1)]
    }

    /// IN: (status, data).
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> R<(u8, Vec<u8>)> {
        let c = self.roundtrip(q, &Self::read_chain(sector, len))?;
        let s = c.status().ok_or("no status")?;
        if s == S_OK && c.used_len != len + 1 {
            return Err(format!("used len {} for a read of {len}", c.used_len));
        }
        Ok((s, c.bytes[..len as usize].to_vec()))
    }

    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> R<u8> {
        let c = self.roundtrip(q, &[Desc::In(Self::header(T_OUT, sector)), Desc::In(data.to_vec()), Desc::Out(1)])?;
        c.status().ok_or_else(|| "no status".into())
    }

    pub fn flush(&mut self, q: usize) -> R<u8> {
        let c = self.roundtrip(q, &[Desc::In(Self::header(T_FLUSH, 0)), Desc::Out(1)])?;
        c.status().ok_or_else(|| "no status".into())
    }

    pub fn get_id(&mut self, q: usize) -> R<(u8, Vec<u8>)> {
        let c = self.roundtrip(q, &[Desc::In(Self::header(T_GET_ID, 0)), Desc::Out(20), Desc::Out(1)])?;
        Ok((c.status().ok_or("no status")?, c.bytes[..20].to_vec()))
    }

    /// DISCARD or WRITE_ZEROES with segments (sector, num_sectors, flags).
    pub fn segments(&mut self, q: usize, t: u32, segs: &[(u64, u32, u32)]) -> R<u8> {
        let mut body = Self::header(t, 0);
        for &(s, n, f) in segs {
            body.extend_from_slice(&s.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&f.to_le_bytes());
        }
        let c = self.roundtrip(q, &[Desc::In(body), Desc::Out(1)])?;
        c.status().ok_or_else(|| "no status".into())
    }
}
