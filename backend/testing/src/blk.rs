//! A synchronous vhost-user-blk frontend that plays QEMU's (and the guest driver's) part, for
//! the device tests: virtio-blk requests on [`Transport`] (the guest memory, rings and
//! negotiation the virtio-fs test frontend uses too).

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

pub use crate::{Completion, DescSpec, FrontendError, Result, Transport, TransportConfig};

pub const T_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;
// The status byte is a u8 on the wire; the bindings spell the values as u32.
pub const S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
pub const F_RO: u32 = virtio_blk::VIRTIO_BLK_F_RO;
pub const F_DISCARD: u32 = virtio_blk::VIRTIO_BLK_F_DISCARD;
pub const F_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;
pub const F_FLUSH: u32 = virtio_blk::VIRTIO_BLK_F_FLUSH;
pub const F_MQ: u32 = virtio_blk::VIRTIO_BLK_F_MQ;

/// The status byte of a virtio-blk completion.
pub trait Status {
    /// The last writable byte, if there was one (the transport returns buffers whole).
    fn status(&self) -> Option<u8>;
}

impl Status for Completion {
    fn status(&self) -> Option<u8> {
        self.bytes.last().copied()
    }
}

/// The virtio-blk frontend: a [`Transport`] (which it derefs to) plus the device's config
/// space and requests.
pub struct BlkFrontend {
    t: Transport,
    pub config: Vec<u8>,
}

impl Deref for BlkFrontend {
    type Target = Transport;
    fn deref(&self) -> &Transport {
        &self.t
    }
}

impl DerefMut for BlkFrontend {
    fn deref_mut(&mut self) -> &mut Transport {
        &mut self.t
    }
}

impl BlkFrontend {
    /// Connects, negotiates everything offered but EVENT_IDX, reads the config space and
    /// sets up `nq` queues.
    pub fn connect(socket: &Path, nq: usize) -> Result<Self> {
        let t = Transport::connect(
            socket,
            TransportConfig {
                queues: nq,
                queue_size: 128,
                slot_size: (8 << 20) + 4096,
                slots: 64,
                timeout: Duration::from_secs(20),
                // Not EVENT_IDX: the device tests count on a kick per submit.
                features: !(1u64 << VIRTIO_RING_F_EVENT_IDX),
                config_len: 60,
                whole_buffers: true,
                inflight: false,
            },
        )?;
        let config = t.config().to_vec();
        Ok(BlkFrontend { t, config })
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.features() & (1u64 << bit) != 0
    }

    pub fn capacity_sectors(&self) -> u64 {
        u64::from_le_bytes(self.config[0..8].try_into().expect("config"))
    }

    pub fn config_u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.config[at..at + 4].try_into().expect("config"))
    }

    pub fn submit(&mut self, q: usize, descs: &[DescSpec]) -> Result<u16> {
        self.submit_descs(q, descs)
    }

    pub fn roundtrip(&mut self, q: usize, descs: &[DescSpec]) -> Result<Completion> {
        self.roundtrip_descs(q, descs)
    }

    pub fn header(t: u32, sector: u64) -> Vec<u8> {
        let mut h = t.to_le_bytes().to_vec();
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    }

    /// Chain of a read as Linux builds it: header, data, status.
    pub fn read_chain(sector: u64, len: u32) -> Vec<DescSpec> {
        vec![DescSpec::In(Self::header(T_IN, sector)), DescSpec::Out(len), DescSpec::Out(1)]
    }

    /// IN: (status, data).
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        let c = self.roundtrip(q, &Self::read_chain(sector, len))?;
        let s = c.status().ok_or_else(no_status)?;
        if s == S_OK && c.used_len != len + 1 {
            return Err(FrontendError::Protocol(format!("used len {} for a read of {len}", c.used_len)));
        }
        Ok((s, c.bytes[..len as usize].to_vec()))
    }

    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Result<u8> {
        let c = self.roundtrip(
            q,
            &[DescSpec::In(Self::header(T_OUT, sector)), DescSpec::In(data.to_vec()), DescSpec::Out(1)],
        )?;
        c.status().ok_or_else(no_status)
    }

    pub fn flush(&mut self, q: usize) -> Result<u8> {
        let c = self.roundtrip(q, &[DescSpec::In(Self::header(T_FLUSH, 0)), DescSpec::Out(1)])?;
        c.status().ok_or_else(no_status)
    }

    pub fn get_id(&mut self, q: usize) -> Result<(u8, Vec<u8>)> {
        let c = self.roundtrip(q, &[DescSpec::In(Self::header(T_GET_ID, 0)), DescSpec::Out(20), DescSpec::Out(1)])?;
        Ok((c.status().ok_or_else(no_status)?, c.bytes[..20].to_vec()))
    }

    /// DISCARD or WRITE_ZEROES with segments (sector, num_sectors, flags).
    pub fn segments(&mut self, q: usize, t: u32, segs: &[(u64, u32, u32)]) -> Result<u8> {
        let mut body = Self::header(t, 0);
        for &(s, n, f) in segs {
            body.extend_from_slice(&s.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
            body.extend_from_slice(&f.to_le_bytes());
        }
        let c = self.roundtrip(q, &[DescSpec::In(body), DescSpec::Out(1)])?;
        c.status().ok_or_else(no_status)
    }
}

fn no_status() -> FrontendError {
    FrontendError::Protocol("no status byte".into())
}
