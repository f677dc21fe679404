//! Inflight I/O tracking for split rings (vhost-user `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! The frontend (QEMU) keeps a shared memory area for the backend across backend restarts:
//! `GET_INFLIGHT_FD` makes it (a zeroed memfd), `SET_INFLIGHT_FD` hands it over at every
//! start. Per queue, in the layout of the vhost-user specification ("Inflight I/O tracking",
//! split virtqueues), aligned to 64 bytes as libvhost-user lays it out:
//!
//! ```text
//! header (16 bytes)   features u64, version u16, desc_num u16, last_batch_head u16, used_idx u16
//! desc[desc_num]      inflight u8, padding [u8; 5], next u16, counter u64   (16 bytes each)
//! ```
//!
//! A chain is marked in flight (with a counter giving the order it was popped in) under the
//! vring lock right after it is popped; completing it sets `last_batch_head`, adds the used
//! entry, then clears the mark and copies the used index. So after a crash, at most the one
//! completion that was under way is ambiguous, and `used_idx` tells whether its used entry
//! was published. A new backend then resubmits exactly the marked chains, in counter order,
//! and pops the avail ring from `used idx + chains in flight`: every chain popped was either
//! used or is still marked.
//!
//! The area is memory the frontend can write too: every index read from it is checked.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;

/// Bytes of one queue's part of the area.
fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// `GET_INFLIGHT_FD`: a zeroed memfd for `req.num_queues` queues of `req.queue_size`
/// descriptors (at most `max_queues`), and its description for the frontend.
pub(crate) fn create(req: &VhostUserInflight, max_queues: usize) -> io::Result<(VhostUserInflight, File)> {
    if req.num_queues == 0 || usize::from(req.num_queues) > max_queues || req.queue_size == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "inflight area: bad queue count or size"));
    }
    let size = usize::from(req.num_queues) * queue_bytes(req.queue_size);
    // SAFETY: a NUL-terminated name and plain flags; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"incfs-inflight".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    let reply = VhostUserInflight {
        mmap_size: size as u64,
        mmap_offset: 0,
        num_queues: req.num_queues,
        queue_size: req.queue_size,
    };
    Ok((reply, file))
}

/// The shared area, mapped.
struct Area {
    map: memmap2::MmapRaw,
}

/// `SET_INFLIGHT_FD`: maps `file` as described by `msg` and returns one tracker per queue
/// (at most `max_queues`).
pub(crate) fn map(msg: &VhostUserInflight, file: &File, max_queues: usize) -> io::Result<Vec<QueueInflight>> {
    let queues = usize::from(msg.num_queues).min(max_queues);
    let per_queue = queue_bytes(msg.queue_size);
    let need = queues * per_queue;
    if msg.queue_size == 0 || queues == 0 || (msg.mmap_size as usize) < need || msg.mmap_size > (1 << 30) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "inflight area: bad size"));
    }
    let map = memmap2::MmapOptions::new().offset(msg.mmap_offset).len(need).map_raw(file)?;
    if map.as_ptr() as usize % ALIGN != 0 {
        // Only with an offset that is not a multiple of 64: the fields must be aligned.
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "inflight area: misaligned offset"));
    }
    let area = Arc::new(Area { map });
    Ok((0..queues)
        .map(|q| QueueInflight { area: area.clone(), base: q * per_queue, desc_num: msg.queue_size })
        .collect())
}

/// What a queue's tracker says when the queue starts.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// A fresh area (first start): nothing was in flight.
    Fresh,
    /// A started area: `heads` were in flight (resubmit them in this order), the avail ring
    /// goes on at `next_avail`, and new chains are counted from `counter`.
    Resume { heads: Vec<u16>, next_avail: u16, counter: u64 },
}

/// One queue's part of the area.
#[derive(Clone)]
pub(crate) struct QueueInflight {
    area: Arc<Area>,
    /// Byte offset of the queue's header in the area.
    base: usize,
    desc_num: u16,
}

impl QueueInflight {
    /// Byte `off` of this queue's part. Callers check heads against `desc_num`; the assert
    /// only guards against a bug here, so no access can leave the mapping.
    fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off < queue_bytes(self.desc_num), "inflight area offset {off} out of bounds");
        // In bounds: `off` is inside this queue's part, which `map` checked lies in the map.
        self.area.map.as_mut_ptr().wrapping_add(self.base + off)
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        // SAFETY: `ptr` is inside the live mapping (kept by `self.area` for the borrow);
        // atomics because the frontend shares the memory.
        unsafe { AtomicU8::from_ptr(self.ptr(off)) }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: as in `u8_at`; `off` is even and the queue's part is 64-byte aligned.
        unsafe { AtomicU16::from_ptr(self.ptr(off).cast()) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as in `u8_at`; `off` is a multiple of 8 and the queue's part is 64-byte aligned.
        unsafe { AtomicU64::from_ptr(self.ptr(off).cast()) }
    }

    fn version(&self) -> &AtomicU16 {
        self.u16_at(8)
    }
    fn header_desc_num(&self) -> &AtomicU16 {
        self.u16_at(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.u16_at(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.u16_at(14)
    }
    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.u8_at(HEADER + DESC * usize::from(head))
    }
    fn next(&self, head: u16) -> &AtomicU16 {
        self.u16_at(HEADER + DESC * usize::from(head) + 6)
    }
    fn counter(&self, head: u16) -> &AtomicU64 {
        self.u64_at(HEADER + DESC * usize::from(head) + 8)
    }

    /// The chain at `head` was popped: marks it in flight, `counter`-th of the queue.
    pub(crate) fn popped(&self, head: u16, counter: u64) {
        if head >= self.desc_num {
            return;
        }
        self.counter(head).store(counter, Ordering::Relaxed);
        self.inflight(head).store(1, Ordering::Release);
    }

    /// Before the used entry of `head` is added.
    pub(crate) fn using(&self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.next(head).store(self.last_batch_head().load(Ordering::Relaxed), Ordering::Relaxed);
        self.last_batch_head().store(head, Ordering::Release);
    }

    /// After the used entry of `head` was added and the used index is `used_idx`.
    pub(crate) fn used(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.inflight(head).store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.used_idx().store(used_idx, Ordering::Release);
    }

    /// When the queue starts with `ring_used` as the used ring's index and `ring_size`
    /// descriptors: settles the completion a crash may have cut short and lists the chains
    /// still in flight.
    pub(crate) fn recover(&self, ring_used: u16, ring_size: u16) -> Recovery {
        if self.version().load(Ordering::Acquire) == 0 {
            self.header_desc_num().store(self.desc_num, Ordering::Relaxed);
            self.used_idx().store(ring_used, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            return Recovery::Fresh;
        }
        let last_used = self.used_idx().load(Ordering::Acquire);
        if last_used != ring_used {
            // The last batch reached the used ring but not its marks: clear them.
            let mut head = self.last_batch_head().load(Ordering::Acquire);
            for _ in 0..ring_used.wrapping_sub(last_used).min(self.desc_num) {
                if head >= self.desc_num {
                    break;
                }
                self.inflight(head).store(0, Ordering::Release);
                head = self.next(head).load(Ordering::Acquire);
            }
            fence(Ordering::SeqCst);
            self.used_idx().store(ring_used, Ordering::Release);
        }
        let limit = self.desc_num.min(ring_size);
        let mut inflight: Vec<(u64, u16)> = (0..limit)
            .filter(|&h| self.inflight(h).load(Ordering::Acquire) != 0)
            .map(|h| (self.counter(h).load(Ordering::Relaxed), h))
            .collect();
        inflight.sort_unstable();
        let counter = inflight.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        let next_avail = ring_used.wrapping_add(inflight.len() as u16);
        Recovery::Resume { heads: inflight.into_iter().map(|(_, h)| h).collect(), next_avail, counter }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(queues: u16, size: u16) -> (Vec<QueueInflight>, File) {
        let req = VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: queues, queue_size: size };
        let (reply, file) = create(&req, 4).expect("create");
        assert_eq!(reply.mmap_size as usize, usize::from(queues) * queue_bytes(size));
        (map(&reply, &file, 4).expect("map"), file)
    }

    #[test]
    fn layout_is_the_specifications() {
        assert_eq!(queue_bytes(128), (16 + 16 * 128usize).next_multiple_of(64));
        assert_eq!(queue_bytes(3), 64);
        let (qs, file) = area(2, 4);
        let q = &qs[1];
        q.recover(0, 4);
        q.popped(2, 0x0102_0304_0506_0708);
        q.using(2);
        let mut raw = vec![0u8; 2 * 128];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut raw, 0).expect("read");
        let h = &raw[128..];
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 1, "version");
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 4, "desc_num");
        assert_eq!(u16::from_le_bytes([h[12], h[13]]), 2, "last_batch_head");
        let d = &h[16 + 2 * 16..16 + 3 * 16];
        assert_eq!(d[0], 1, "inflight");
        assert_eq!(u64::from_le_bytes(d[8..16].try_into().expect("8")), 0x0102_0304_0506_0708, "counter");
        assert!(raw[..128].iter().all(|&b| b == 0), "queue 0 untouched");
    }

    #[test]
    fn a_restart_resubmits_what_was_in_flight_in_pop_order() {
        let (qs, _file) = area(1, 8);
        let q = &qs[0];
        assert_eq!(q.recover(10, 8), Recovery::Fresh);
        // Popped 5, 3, 7, 1 (counters 0..4); 3 completes, then 1 (out of order).
        for (c, h) in [5u16, 3, 7, 1].iter().enumerate() {
            q.popped(*h, c as u64);
        }
        q.using(3);
        q.used(3, 11);
        q.using(1);
        q.used(1, 12);
        assert_eq!(q.recover(12, 8), Recovery::Resume { heads: vec![5, 7], next_avail: 14, counter: 3 });
        // Twice in a row (a crash during the resubmission): the same answer.
        assert_eq!(q.recover(12, 8), Recovery::Resume { heads: vec![5, 7], next_avail: 14, counter: 3 });
    }

    #[test]
    fn a_completion_cut_short_after_the_used_index_counts_as_done() {
        let (qs, _file) = area(1, 8);
        let q = &qs[0];
        q.recover(0, 8);
        q.popped(4, 0);
        q.popped(6, 1);
        // Crash between publishing the used entry of 6 and clearing its mark.
        q.using(6);
        let r = q.recover(1, 8);
        assert_eq!(r, Recovery::Resume { heads: vec![4], next_avail: 2, counter: 1 });
        // Crash before the used entry was published: 6 is still in flight.
        let (qs, _file) = area(1, 8);
        let q = &qs[0];
        q.recover(0, 8);
        q.popped(4, 0);
        q.popped(6, 1);
        q.using(6);
        assert_eq!(q.recover(0, 8), Recovery::Resume { heads: vec![4, 6], next_avail: 2, counter: 2 });
    }

    #[test]
    fn hostile_contents_stay_in_bounds() {
        let (qs, file) = area(1, 4);
        let q = &qs[0];
        q.recover(0, 4);
        // The frontend scribbles over the area: huge heads, links and counts.
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xff; 128], 0).expect("write");
        let Recovery::Resume { heads, .. } = q.recover(0, 2) else { panic!("not fresh") };
        assert_eq!(heads, vec![0, 1], "only heads inside the ring");
        q.popped(60_000, 1);
        q.using(60_000);
        q.used(60_000, 1);
        let req = VhostUserInflight { mmap_size: 1, mmap_offset: 0, num_queues: 1, queue_size: 4 };
        assert!(map(&req, &file, 1).is_err(), "area smaller than the queues");
        let req = VhostUserInflight { mmap_size: 64, mmap_offset: 0, num_queues: 9, queue_size: 4 };
        assert!(create(&req, 8).is_err(), "more queues than the device has");
    }
}
