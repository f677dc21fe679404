//! virtio-blk requests: the wire constants, descriptor-chain parsing and validation.
//!
//! Everything here treats the guest as hostile. A chain is walked once: every descriptor must
//! lie inside guest memory, device-readable descriptors come before device-writable ones, the
//! readable part starts with the 16-byte header, the last writable byte is the status byte,
//! and the total size is bounded. Sector ranges are checked against the capacity with checked
//! arithmetic. A chain that fails is answered with VIRTIO_BLK_S_IOERR when it has a status
//! byte, and returned with nothing written when it has none.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Flag of a WRITE_ZEROES segment: the device may deallocate.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Header of every request: type, reserved (ioprio), sector.
pub const HEADER_LEN: usize = 16;
/// One DISCARD / WRITE_ZEROES segment: sector u64, num_sectors u32, flags u32.
pub const SEGMENT_LEN: usize = 16;

/// Device limits, also reported in the config space.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Disk size in bytes (a multiple of 512).
    pub capacity: u64,
    /// Largest data part of one request (bytes).
    pub max_data: usize,
    /// Largest DISCARD / WRITE_ZEROES segment (sectors) and segment count.
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
}

/// A request type the device knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl Kind {
    pub fn from_type(t: u32) -> Kind {
        match t {
            VIRTIO_BLK_T_IN => Kind::In,
            VIRTIO_BLK_T_OUT => Kind::Out,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            t => Kind::Other(t),
        }
    }
}

/// One DISCARD / WRITE_ZEROES range, validated against the capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// A chain, walked and bounded (not yet interpreted).
#[derive(Debug)]
pub struct Chain {
    pub head: u16,
    /// The readable bytes (header first), at most `16 + max_data`.
    pub readable: Vec<u8>,
    /// Writable regions without the status byte, in order.
    pub writable: Vec<(GuestAddress, usize)>,
    /// Total bytes of `writable`.
    pub writable_len: usize,
    /// The status byte: the last writable byte of the chain.
    pub status: GuestAddress,
}

/// Why a chain was refused before it could be interpreted.
#[derive(Debug, PartialEq, Eq)]
pub enum ChainError {
    /// Not even a status byte: the chain is returned with nothing written.
    NoStatus,
    /// A descriptor outside guest memory, readable after writable, too large, unreadable.
    Malformed(&'static str),
}

/// A request ready to execute.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at `offset` into the writable regions.
    Read {
        offset: u64,
        len: usize,
    },
    /// Write the readable data (after the header) at `offset`.
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Flush,
    GetId,
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
    /// Answer with this status and nothing else.
    Status(u8),
}

/// Walks `chain`: every descriptor inside `mem`, readable ones first, sizes bounded.
pub fn walk<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    limits: &Limits,
) -> Result<Chain, (u16, Option<GuestAddress>, ChainError)>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let max_in = HEADER_LEN + limits.max_data.max(SEGMENT_LEN * limits.max_discard_seg as usize);
    // Writable: the data (at most max_data) plus the status byte.
    let max_out = limits.max_data + 1;
    let mut readable: Vec<(GuestAddress, usize)> = Vec::new();
    let mut readable_len = 0usize;
    let mut writable: Vec<(GuestAddress, usize)> = Vec::new();
    let mut writable_len = 0usize;
    let mut error: Option<&'static str> = None;
    for desc in chain {
        let addr = desc.addr();
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, addr, len) {
            error.get_or_insert("descriptor outside guest memory");
            continue;
        }
        if desc.is_write_only() {
            writable_len = writable_len.saturating_add(len);
            writable.push((addr, len));
        } else {
            if !writable.is_empty() {
                error.get_or_insert("readable descriptor after a writable one");
            }
            readable_len = readable_len.saturating_add(len);
            readable.push((addr, len));
        }
    }
    // The status byte: the last byte of the last writable descriptor.
    let Some(&(last_addr, last_len)) = writable.last() else {
        return Err((head, None, ChainError::NoStatus));
    };
    let Some(status) = last_addr.checked_add(last_len as u64 - 1) else {
        return Err((head, None, ChainError::NoStatus));
    };
    let fail = |e| Err((head, Some(status), ChainError::Malformed(e)));
    if let Some(e) = error {
        return fail(e);
    }
    if readable_len < HEADER_LEN {
        return fail("no 16-byte request header");
    }
    if readable_len > max_in {
        return fail("readable part too large");
    }
    if writable_len > max_out {
        return fail("writable part too large");
    }
    // Drop the status byte from the writable regions.
    writable_len -= 1;
    if last_len == 1 {
        writable.pop();
    } else if let Some(l) = writable.last_mut() {
        l.1 -= 1;
    }
    let mut bytes = vec![0u8; readable_len];
    let mut at = 0;
    for (addr, len) in readable {
        if mem.read_slice(&mut bytes[at..at + len], addr).is_err() {
            return fail("cannot read a readable descriptor");
        }
        at += len;
    }
    Ok(Chain { head, readable: bytes, writable, writable_len, status })
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// What the device supports, for interpreting a chain.
#[derive(Clone, Copy, Debug)]
pub struct Support {
    pub writable: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// Byte range of `sectors` starting at `sector`, if it lies within the capacity.
fn range(sector: u64, bytes: u64, capacity: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(bytes)?;
    (end <= capacity).then_some(offset)
}

/// Interprets a walked chain. `readable` is consumed (it becomes the write data).
pub fn interpret(chain: &mut Chain, limits: &Limits, support: Support) -> Request {
    let h = &chain.readable;
    let kind = Kind::from_type(le_u32(h, 0));
    let sector = le_u64(h, 8);
    match kind {
        Kind::In => {
            let len = chain.writable_len;
            if len % SECTOR_SIZE as usize != 0 || len > limits.max_data {
                return Request::Status(VIRTIO_BLK_S_IOERR);
            }
            match range(sector, len as u64, limits.capacity) {
                Some(offset) => Request::Read { offset, len },
                None => Request::Status(VIRTIO_BLK_S_IOERR),
            }
        }
        Kind::Out => {
            if !support.writable {
                return Request::Status(VIRTIO_BLK_S_IOERR);
            }
            let len = h.len() - HEADER_LEN;
            if len % SECTOR_SIZE as usize != 0 || len > limits.max_data {
                return Request::Status(VIRTIO_BLK_S_IOERR);
            }
            match range(sector, len as u64, limits.capacity) {
                Some(offset) => {
                    let mut data = std::mem::take(&mut chain.readable);
                    data.drain(..HEADER_LEN);
                    Request::Write { offset, data }
                }
                None => Request::Status(VIRTIO_BLK_S_IOERR),
            }
        }
        Kind::Flush => Request::Flush,
        Kind::GetId => Request::GetId,
        Kind::Discard | Kind::WriteZeroes => {
            let zeroes = kind == Kind::WriteZeroes;
            if !(if zeroes { support.write_zeroes } else { support.discard }) {
                return Request::Status(VIRTIO_BLK_S_UNSUPP);
            }
            let body = &h[HEADER_LEN..];
            if body.is_empty()
                || body.len() % SEGMENT_LEN != 0
                || body.len() / SEGMENT_LEN > limits.max_discard_seg as usize
            {
                return Request::Status(VIRTIO_BLK_S_IOERR);
            }
            let mut segs = Vec::with_capacity(body.len() / SEGMENT_LEN);
            for s in body.chunks_exact(SEGMENT_LEN) {
                let (sector, n, flags) = (le_u64(s, 0), le_u32(s, 8), le_u32(s, 12));
                // DISCARD has no flags; WRITE_ZEROES knows only UNMAP.
                let allowed = if zeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
                if flags & !allowed != 0 {
                    return Request::Status(VIRTIO_BLK_S_UNSUPP);
                }
                if n > limits.max_discard_sectors {
                    return Request::Status(VIRTIO_BLK_S_IOERR);
                }
                let len = u64::from(n) << SECTOR_SHIFT;
                let Some(offset) = range(sector, len, limits.capacity) else {
                    return Request::Status(VIRTIO_BLK_S_IOERR);
                };
                segs.push(Segment { offset, len, unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 });
            }
            if zeroes {
                Request::WriteZeroes(segs)
            } else {
                Request::Discard(segs)
            }
        }
        Kind::Other(_) => Request::Status(VIRTIO_BLK_S_UNSUPP),
    }
}

/// Copies `data` into the writable regions (as much as fits); returns the bytes written.
pub fn scatter(mem: &GuestMemoryMmap, regions: &[(GuestAddress, usize)], data: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    for &(addr, len) in regions {
        if at >= data.len() {
            break;
        }
        let n = len.min(data.len() - at);
        mem.write_slice(&data[at..at + n], addr).ok()?;
        at += n;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(hdr_type: u32, sector: u64, extra: &[u8], writable_len: usize) -> Chain {
        let mut r = Vec::new();
        r.extend_from_slice(&hdr_type.to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        r.extend_from_slice(&sector.to_le_bytes());
        r.extend_from_slice(extra);
        Chain {
            head: 0,
            readable: r,
            writable: vec![(GuestAddress(0x1000), writable_len)],
            writable_len,
            status: GuestAddress(0),
        }
    }

    const L: Limits = Limits { capacity: 1 << 20, max_data: 1 << 16, max_discard_sectors: 1 << 12, max_discard_seg: 4 };
    const RW: Support = Support { writable: true, discard: true, write_zeroes: true };
    const RO: Support = Support { writable: false, discard: false, write_zeroes: false };

    #[test]
    fn reads() {
        assert_eq!(interpret(&mut chain(0, 2, &[], 4096), &L, RO), Request::Read { offset: 1024, len: 4096 });
        // Not a multiple of 512, past the end, overflowing, too large.
        assert_eq!(interpret(&mut chain(0, 0, &[], 100), &L, RO), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(0, 2047, &[], 1024), &L, RO), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(0, u64::MAX / 256, &[], 512), &L, RO), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(0, 0, &[], 1 << 17), &L, RO), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(0, 2048, &[], 0), &L, RO), Request::Read { offset: 1 << 20, len: 0 });
    }

    #[test]
    fn writes() {
        let d = vec![7u8; 1024];
        assert_eq!(interpret(&mut chain(1, 1, &d, 0), &L, RW), Request::Write { offset: 512, data: d.clone() });
        assert_eq!(interpret(&mut chain(1, 1, &d, 0), &L, RO), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(1, 1, &d[..100], 0), &L, RW), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(1, 2047, &d, 0), &L, RW), Request::Status(VIRTIO_BLK_S_IOERR));
    }

    #[test]
    fn segments() {
        let seg = |sector: u64, n: u32, flags: u32| {
            let mut v = sector.to_le_bytes().to_vec();
            v.extend_from_slice(&n.to_le_bytes());
            v.extend_from_slice(&flags.to_le_bytes());
            v
        };
        assert_eq!(interpret(&mut chain(11, 0, &seg(8, 8, 0), 0), &L, RO), Request::Status(VIRTIO_BLK_S_UNSUPP));
        assert_eq!(
            interpret(&mut chain(11, 0, &seg(8, 8, 0), 0), &L, RW),
            Request::Discard(vec![Segment { offset: 4096, len: 4096, unmap: false }])
        );
        assert_eq!(interpret(&mut chain(11, 0, &seg(8, 8, 1), 0), &L, RW), Request::Status(VIRTIO_BLK_S_UNSUPP));
        assert_eq!(
            interpret(&mut chain(13, 0, &seg(8, 8, 1), 0), &L, RW),
            Request::WriteZeroes(vec![Segment { offset: 4096, len: 4096, unmap: true }])
        );
        assert_eq!(interpret(&mut chain(13, 0, &seg(2040, 16, 0), 0), &L, RW), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(13, 0, &seg(0, 1 << 13, 0), 0), &L, RW), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(13, 0, &[0u8; 5], 0), &L, RW), Request::Status(VIRTIO_BLK_S_IOERR));
        let many: Vec<u8> = (0..5).flat_map(|i| seg(i * 8, 8, 0)).collect();
        assert_eq!(interpret(&mut chain(13, 0, &many, 0), &L, RW), Request::Status(VIRTIO_BLK_S_IOERR));
        assert_eq!(interpret(&mut chain(99, 0, &[], 0), &L, RW), Request::Status(VIRTIO_BLK_S_UNSUPP));
        assert_eq!(interpret(&mut chain(8, 0, &[], 20), &L, RW), Request::GetId);
        assert_eq!(interpret(&mut chain(4, 0, &[], 0), &L, RW), Request::Flush);
    }
}
