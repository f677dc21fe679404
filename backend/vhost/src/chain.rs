//! Descriptor chains as every device here sees them, and the guest memory they point at.
//!
//! The guest is hostile: a chain is walked once, every descriptor must lie inside guest
//! memory and device-readable descriptors must come before device-writable ones. The walk
//! does not stop at the first problem, so a device whose protocol answers through the last
//! writable byte (virtio-blk's status) can still answer a malformed chain.

use std::fmt;

use incfs_buf::ScatterBuf;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMem;

/// A guest buffer: one descriptor's address and length.
pub type Region = (GuestAddress, usize);

/// Why a chain cannot be used as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor lies (partly) outside guest memory.
    OutsideMemory,
    /// A device-readable descriptor follows a device-writable one.
    ReadableAfterWritable,
    /// A readable descriptor inside guest memory could not be read.
    Read,
}

impl ChainError {
    pub fn as_str(self) -> &'static str {
        match self {
            ChainError::OutsideMemory => "descriptor outside guest memory",
            ChainError::ReadableAfterWritable => "readable descriptor after a writable one",
            ChainError::Read => "cannot read a readable descriptor",
        }
    }
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A popped chain, walked: the request bytes copied out, the writable regions checked.
/// Zero-length descriptors are skipped.
#[derive(Debug)]
pub struct Chain {
    /// The head descriptor's index, which the used ring entry names.
    pub head: u16,
    /// The start of the readable part, copied out (at most the device's
    /// [`Device::max_request_len`](crate::Device::max_request_len) bytes; empty when
    /// `error` is set).
    pub request: Vec<u8>,
    /// Length of the whole readable part; more than `request.len()` when it was too long.
    pub readable_len: usize,
    /// The writable descriptors in order, each inside guest memory unless `error` says
    /// otherwise.
    pub writable: Vec<Region>,
    /// Total bytes of `writable`.
    pub writable_len: usize,
    /// The first problem found, if any.
    pub error: Option<ChainError>,
}

impl Chain {
    /// Whether the readable part was longer than what `request` holds.
    pub fn oversize(&self) -> bool {
        self.readable_len > self.request.len()
    }
}

/// Walks `chain`, copying at most `max_request` readable bytes out of `mem`.
pub(crate) fn walk<M>(mem: &GuestMem, chain: virtio_queue::DescriptorChain<M>, max_request: usize) -> Chain
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    walk_descriptors(mem, head, chain, max_request)
}

/// Walks the chain that starts at descriptor `head` of the split ring whose descriptor table
/// is at `table` with `size` entries, as [`walk`] does a popped one. For chains that are not
/// popped from the avail ring: those a previous backend left in flight.
pub(crate) fn walk_head(mem: &GuestMem, table: GuestAddress, size: u16, head: u16, max_request: usize) -> Chain {
    let descriptors = HeadChain { mem, table, size, next: Some(head), ttl: size, indirect: false };
    walk_descriptors(mem, head, descriptors, max_request)
}

/// The descriptors of a chain read from a descriptor table, following an indirect table as
/// virtio-queue's `DescriptorChain` does: at most one level of indirection, at most as many
/// descriptors as the table has, a link out of the table or a descriptor that cannot be read
/// ends the chain.
struct HeadChain<'a> {
    mem: &'a GuestMem,
    table: GuestAddress,
    size: u16,
    next: Option<u16>,
    ttl: u16,
    indirect: bool,
}

impl Iterator for HeadChain<'_> {
    type Item = SplitDescriptor;

    fn next(&mut self) -> Option<SplitDescriptor> {
        loop {
            let index = self.next.take()?;
            if index >= self.size || self.ttl == 0 {
                return None;
            }
            self.ttl -= 1;
            let at = self.table.checked_add(u64::from(index) * 16)?;
            let desc: SplitDescriptor = self.mem.read_obj(at).ok()?;
            if desc.refers_to_indirect_table() {
                if self.indirect || desc.len() % 16 != 0 || desc.len() / 16 > u32::from(u16::MAX) {
                    return None;
                }
                self.table = desc.addr();
                self.size = (desc.len() / 16) as u16;
                self.ttl = self.size;
                self.indirect = true;
                self.next = Some(0);
                continue;
            }
            if desc.has_next() {
                self.next = Some(desc.next());
            }
            return Some(desc);
        }
    }
}

fn walk_descriptors(
    mem: &GuestMem,
    head: u16,
    descriptors: impl Iterator<Item = SplitDescriptor>,
    max_request: usize,
) -> Chain {
    let mut readable: Vec<Region> = Vec::new();
    let mut readable_len = 0usize;
    let mut writable: Vec<Region> = Vec::new();
    let mut writable_len = 0usize;
    let mut error = None;
    for desc in descriptors {
        let addr = desc.addr();
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, addr, len) {
            error.get_or_insert(ChainError::OutsideMemory);
            continue;
        }
        if desc.is_write_only() {
            writable_len = writable_len.saturating_add(len);
            writable.push((addr, len));
        } else {
            if !writable.is_empty() {
                error.get_or_insert(ChainError::ReadableAfterWritable);
            }
            readable_len = readable_len.saturating_add(len);
            readable.push((addr, len));
        }
    }
    let mut request = Vec::new();
    if error.is_none() {
        request.resize(readable_len.min(max_request), 0);
        let mut at = 0;
        for (addr, len) in readable {
            let take = len.min(request.len() - at);
            if take == 0 {
                break;
            }
            if mem.read_slice(&mut request[at..at + take], addr).is_err() {
                error = Some(ChainError::Read);
                request.clear();
                break;
            }
            at += take;
        }
    }
    Chain { head, request, readable_len, writable, writable_len, error }
}

/// Host memory of `regions` in `mem` as one [`ScatterBuf`]; a region across two memory
/// regions becomes two segments. None if some region is not (or no longer) guest memory.
///
/// # Safety
/// The device must own `regions` (popped, not yet on the used ring) for `'a`, and `mem`
/// must keep them mapped for `'a`; nothing of the host may be referenced inside them.
pub(crate) unsafe fn guest_buf<'a>(mem: &'a GuestMem, regions: &[Region]) -> Option<ScatterBuf<'a>> {
    let mut segs = Vec::with_capacity(regions.len());
    for &(addr, len) in regions {
        // Nearly every descriptor lies in one region: one lookup. The iterator, which walks
        // region boundaries, is several times costlier per descriptor.
        if let Ok(slice) = GuestMemoryBackend::get_slice(mem, addr, len) {
            segs.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.ok()?;
            segs.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    // SAFETY: get_slice/get_slices mapped every region to host memory of `mem`, which stays mapped for
    // 'a; the caller owns the descriptors until add_used. Guest descriptors could overlap
    // each other, which only garbles what this guest reads, never host memory.
    Some(unsafe { ScatterBuf::new(segs) })
}

/// Marks `regions` of `mem` in the frontend's dirty log: every page of them, whether or not
/// all was written, since a page marked too often is only sent again while one written and
/// not marked would be stale at the destination. Called after the writes (QEMU clears what
/// it has read of the log while it runs), and only while the frontend asked for logging.
pub(crate) fn mark_dirty(mem: &GuestMem, regions: &[Region]) {
    use vm_memory::bitmap::Bitmap;
    for &(addr, len) in regions {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len).flatten() {
            slice.bitmap().mark_dirty(0, slice.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    /// Two adjacent memory regions of 64 KiB, as a guest's RAM split by a hole would be
    /// mapped when the hole is elsewhere.
    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)]).expect("memory")
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn walked(mem: &GuestMem, descs: &[RawDescriptor], max_request: usize) -> Chain {
        let queue = MockSplitQueue::new(mem, 16);
        let chain = queue.build_desc_chain(descs).expect("chain");
        walk(mem, chain, max_request)
    }

    #[test]
    fn walk_copies_the_request_and_lists_the_writable_regions() {
        let mem = memory();
        mem.write_slice(b"hello, ", GuestAddress(0x8000)).expect("write");
        mem.write_slice(b"world", GuestAddress(0x9000)).expect("write");
        let descs = [
            desc(0x8000, 7, false),
            desc(0xa000, 0, false),
            desc(0x9000, 5, false),
            desc(0xb000, 100, true),
            desc(0xf800, 0x1000, true),
        ];
        let c = walked(&mem, &descs, 64);
        assert_eq!(c.error, None);
        assert_eq!(c.request, b"hello, world");
        assert!(!c.oversize());
        assert_eq!(c.writable, [(GuestAddress(0xb000), 100), (GuestAddress(0xf800), 0x1000)]);
        assert_eq!(c.writable_len, 0x1000 + 100);
        // Longer than allowed: the start only.
        let c = walked(&mem, &descs, 9);
        assert_eq!((c.request.as_slice(), c.readable_len, c.oversize()), (&b"hello, wo"[..], 12, true));
    }

    #[test]
    fn walk_finds_misplaced_descriptors_and_keeps_going() {
        let mem = memory();
        let c = walked(&mem, &[desc(0x8000, 16, true), desc(0x9000, 16, false), desc(0xa000, 1, true)], 64);
        assert_eq!(c.error, Some(ChainError::ReadableAfterWritable));
        assert!(c.request.is_empty());
        let c = walked(&mem, &[desc(0x8000, 16, false), desc(0x1f800, 0x1000, true), desc(0xa000, 1, true)], 64);
        assert_eq!(c.error, Some(ChainError::OutsideMemory));
        assert_eq!(c.writable, [(GuestAddress(0xa000), 1)], "the walk went on to the last descriptor");
    }

    #[test]
    fn walk_head_reads_the_chain_a_pop_would_give() {
        let mem = memory();
        mem.write_slice(b"abcdefgh", GuestAddress(0x8000)).expect("write");
        let descs = [desc(0x8000, 8, false), desc(0xb000, 100, true), desc(0xc000, 1, true)];
        let queue = MockSplitQueue::new(&mem, 16);
        let chain = queue.build_desc_chain(&descs).expect("chain");
        let head = chain.head_index();
        let popped = walk(&mem, chain, 64);
        let again = walk_head(&mem, queue.desc_table_addr(), 16, head, 64);
        assert_eq!((again.head, &again.request, &again.writable), (popped.head, &popped.request, &popped.writable));
        assert_eq!(again.error, None);
        // Through an indirect table.
        let queue = MockSplitQueue::new(&mem, 16);
        queue.build_desc_chain(&descs).expect("chain");
        let table = queue.desc_table_addr();
        let indirect = SplitDescriptor::new(table.0, 3 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        mem.write_obj(indirect, table.unchecked_add(15 * 16)).expect("indirect");
        let via = walk_head(&mem, table, 16, 15, 64);
        assert_eq!((&via.request, &via.writable), (&popped.request, &popped.writable));
        // A link out of the table, or a loop, ends the chain; nothing outside is read.
        let looped = SplitDescriptor::new(0x8000, 8, VRING_DESC_F_NEXT as u16, 14);
        mem.write_obj(looped, table.unchecked_add(14 * 16)).expect("loop");
        let c = walk_head(&mem, table, 16, 14, 1 << 20);
        assert_eq!(c.readable_len, 16 * 8, "stops after as many descriptors as the table has");
        assert_eq!(walk_head(&mem, table, 16, 16, 64).readable_len, 0, "head outside the table");
    }

    #[test]
    fn guest_buf_spans_two_memory_regions() {
        let mem = memory();
        let regions = [(GuestAddress(0x100), 16), (GuestAddress(0xfff8), 16)];
        // SAFETY: no chain owns these test regions, and `mem` outlives the buffer.
        let mut buf = unsafe { guest_buf(&mem, &regions) }.expect("mapped");
        assert_eq!(buf.len(), 32);
        let data: Vec<u8> = (0..32).collect();
        buf.write(0, &data).expect("write");
        drop(buf);
        let mut back = [0u8; 16];
        mem.read_slice(&mut back, GuestAddress(0xfff8)).expect("read");
        assert_eq!(&back, &data[16..]);
        // SAFETY: as above.
        assert!(unsafe { guest_buf(&mem, &[(GuestAddress(0x1fff8), 16)]) }.is_none(), "past the end of memory");
    }
}
