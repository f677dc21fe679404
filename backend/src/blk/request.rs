//! virtio-blk requests: the wire constants, descriptor-chain validation and interpretation.
//!
//! Everything here treats the guest as hostile. A chain is walked once (by `incfs_vhost`):
//! every descriptor must lie inside guest memory, device-readable descriptors come before
//! device-writable ones. Here: the readable part starts with the 16-byte header, the last
//! writable byte is the status byte, and the total size is bounded. Sector ranges are
//! checked against the capacity with checked arithmetic. A chain that fails is answered with VIRTIO_BLK_S_IOERR when it has a status
//! byte, and returned with nothing written when it has none.

use incfs_vhost::ChainError as WalkError;
use virtio_bindings::bindings::virtio_blk;
use vm_memory::{Address, GuestAddress};

pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

pub use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

// The status byte is a u8 on the wire; the bindings spell the values as u32.
pub const VIRTIO_BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

pub const VIRTIO_BLK_ID_BYTES: usize = virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

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

/// Most readable bytes a valid request has: the header, then the data or the segments.
pub fn max_readable(limits: &Limits) -> usize {
    HEADER_LEN + limits.max_data.max(SEGMENT_LEN * limits.max_discard_seg as usize)
}

/// Checks a chain the transport walked (descriptors inside guest memory, readable ones
/// first; at most [`max_readable`] bytes copied): sizes bounded, a header, and the status
/// byte split off the writable regions.
pub fn validate(walked: incfs_vhost::Chain, limits: &Limits) -> Result<Chain, (u16, Option<GuestAddress>, ChainError)> {
    let head = walked.head;
    let max_in = max_readable(limits);
    // Writable: the data (at most max_data) plus the status byte.
    let max_out = limits.max_data + 1;
    let mut writable = walked.writable;
    let mut writable_len = walked.writable_len;
    // The status byte: the last byte of the last writable descriptor.
    let Some(&(last_addr, last_len)) = writable.last() else {
        return Err((head, None, ChainError::NoStatus));
    };
    let Some(status) = last_addr.checked_add(last_len as u64 - 1) else {
        return Err((head, None, ChainError::NoStatus));
    };
    let fail = |e| Err((head, Some(status), ChainError::Malformed(e)));
    if let Some(e) = walked.error {
        return fail(WalkError::as_str(e));
    }
    if walked.readable_len < HEADER_LEN {
        return fail("no 16-byte request header");
    }
    if walked.readable_len > max_in {
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
    Ok(Chain { head, readable: walked.request, writable, writable_len, status })
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
