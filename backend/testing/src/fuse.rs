//! A synchronous vhost-user-fs frontend that plays QEMU's (and the guest kernel's) part, for
//! tests and benchmarks. It works against any vhost-user-fs daemon: FUSE requests on the
//! device-independent [`Transport`] (guest memory, rings, EVENT_IDX), which the
//! vhost-user-blk tests use too.

use std::mem::size_of;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::Duration;

use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::ByteValued;

use incfs_fuse::abi::{self, read_struct, InHeader, OutHeader};

use crate::{DescSpec, FrontendError, Result, Transport, TransportConfig};

/// Configuration of a virtio-fs frontend.
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
        let (header, rest) = read_struct::<OutHeader>(bytes)
            .ok_or_else(|| FrontendError::Protocol(format!("reply of {} bytes has no out_header", bytes.len())))?;
        let body_len = (header.len as usize).saturating_sub(size_of::<OutHeader>()).min(rest.len());
        Ok(FuseReply { header, body: rest[..body_len].to_vec(), used_len })
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

/// The virtio-fs frontend: a [`Transport`] (which it derefs to, for raw chains, kicks and
/// waits) plus FUSE requests.
pub struct FuseFrontend {
    t: Transport,
    next_unique: u64,
    request_queue: usize,
    init_out: Option<abi::InitOut>,
}

impl Deref for FuseFrontend {
    type Target = Transport;
    fn deref(&self) -> &Transport {
        &self.t
    }
}

impl DerefMut for FuseFrontend {
    fn deref_mut(&mut self) -> &mut Transport {
        &mut self.t
    }
}

impl FuseFrontend {
    /// Connects with the default configuration (one request queue).
    pub fn connect(socket: &Path) -> Result<Self> {
        Self::connect_with(socket, FrontendConfig::default())
    }

    /// Connects to a vhost-user-fs daemon and sets up memory and queues (hiprio and
    /// `cfg.request_queues` request queues).
    pub fn connect_with(socket: &Path, cfg: FrontendConfig) -> Result<Self> {
        if cfg.request_queues == 0 {
            return Err(FrontendError::Protocol("no request queue".into()));
        }
        let t = Transport::connect(
            socket,
            TransportConfig {
                queues: cfg.request_queues + 1,
                queue_size: cfg.queue_size,
                slot_size: cfg.slot_size,
                slots: cfg.slots,
                timeout: cfg.timeout,
                features: if cfg.event_idx { 1 << VIRTIO_RING_F_EVENT_IDX } else { 0 },
                config_len: 0,
                whole_buffers: false,
                inflight: false,
            },
        )?;
        Ok(FuseFrontend { t, next_unique: 1, request_queue: 1, init_out: None })
    }

    /// The queue typed requests go to (1 by default; FORGET always goes to hiprio, 0).
    pub fn set_request_queue(&mut self, q: usize) {
        self.request_queue = q;
    }

    /// What the daemon answered to INIT.
    pub fn init_out(&self) -> Option<&abi::InitOut> {
        self.init_out.as_ref()
    }

    /// Puts a request (readable bytes `req`, one writable buffer of `out_len`) on queue `q`.
    pub fn submit(&mut self, q: usize, req: &[u8], out_len: u32) -> Result<u16> {
        let mut descs = vec![DescSpec::In(req.to_vec())];
        if out_len > 0 {
            descs.push(DescSpec::Out(out_len));
        }
        self.submit_descs(q, &descs)
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
    pub fn raw(&mut self, opcode: u32, nodeid: u64, body: &[u8], out_len: u32) -> Result<FuseReply> {
        let q = self.request_queue;
        self.raw_on(q, opcode, nodeid, body, out_len)
    }

    /// Like [`Self::raw`], on queue `q`.
    pub fn raw_on(&mut self, q: usize, opcode: u32, nodeid: u64, body: &[u8], out_len: u32) -> Result<FuseReply> {
        let (req, unique) = self.build_request(opcode, nodeid, body);
        let c = self.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(out_len)])?;
        let r = FuseReply::parse(&c.bytes, c.used_len)?;
        if r.header.unique != unique {
            return Err(FrontendError::Protocol(format!("unique {} != {unique}", r.header.unique)));
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
                    return Err(FrontendError::Protocol(format!("unique {} != {unique}", r.header.unique)));
                }
                Ok(r)
            })
            .collect()
    }

    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8], out_len: u32) -> Result<Vec<u8>> {
        self.raw(opcode, nodeid, body, out_len)?.into_result()
    }

    fn call_struct<T: ByteValued + Default>(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<T> {
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
    pub fn init_with(&mut self, major: u32, minor: u32, flags: u32, max_readahead: u32) -> Result<abi::InitOut> {
        let body = abi::InitIn { major, minor, max_readahead, flags, flags2: 0, unused: [0; 11] };
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
        let (req, _) = self.build_request(abi::FUSE_FORGET, ino, abi::ForgetIn { nlookup }.as_slice());
        self.roundtrip_descs(0, &[DescSpec::In(req)])?;
        Ok(())
    }

    /// BATCH_FORGET, on the hiprio queue.
    pub fn batch_forget(&mut self, items: &[(u64, u64)]) -> Result<()> {
        let mut body = abi::BatchForgetIn { count: items.len() as u32, dummy: 0 }.as_slice().to_vec();
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
        let o: abi::OpenOut = self.call_struct(abi::FUSE_OPEN, ino, abi::OpenIn { flags, open_flags: 0 }.as_slice())?;
        Ok((o.fh, o.open_flags))
    }

    /// OPENDIR; returns (fh, open_flags).
    pub fn opendir(&mut self, ino: u64) -> Result<(u64, u32)> {
        let o: abi::OpenOut = self.call_struct(
            abi::FUSE_OPENDIR,
            ino,
            abi::OpenIn { flags: libc::O_RDONLY as u32, open_flags: 0 }.as_slice(),
        )?;
        Ok((o.fh, o.open_flags))
    }

    fn read_body(fh: u64, offset: u64, size: u32) -> abi::ReadIn {
        abi::ReadIn { fh, offset, size, read_flags: 0, lock_owner: 0, flags: libc::O_RDONLY as u32, padding: 0 }
    }

    /// READ into a buffer laid out as the kernel does: out_header, then the data.
    pub fn read(&mut self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (req, unique) = self.build_request(abi::FUSE_READ, ino, Self::read_body(fh, offset, size).as_slice());
        let q = self.request_queue;
        let c = self.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(16), DescSpec::Out(size)])?;
        let r = FuseReply::parse(&c.bytes, c.used_len)?;
        if r.header.unique != unique {
            return Err(FrontendError::Protocol("unique mismatch".into()));
        }
        r.into_result()
    }

    /// Submits a READ without waiting (for queue depth > 1); complete with `wait_all`.
    pub fn submit_read(&mut self, q: usize, ino: u64, fh: u64, offset: u64, size: u32) -> Result<u16> {
        let (req, _) = self.build_request(abi::FUSE_READ, ino, Self::read_body(fh, offset, size).as_slice());
        self.submit_descs(q, &[DescSpec::In(req), DescSpec::Out(16), DescSpec::Out(size)])
    }

    /// WRITE.
    pub fn write(&mut self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let w = abi::WriteIn { fh, offset, size: data.len() as u32, ..Default::default() };
        let mut body = w.as_slice().to_vec();
        body.extend_from_slice(data);
        let o: abi::WriteOut = self.call_struct(abi::FUSE_WRITE, ino, &body)?;
        Ok(o.size)
    }

    pub fn release(&mut self, ino: u64, fh: u64) -> Result<()> {
        self.release_op(abi::FUSE_RELEASE, ino, fh)
    }

    pub fn releasedir(&mut self, ino: u64, fh: u64) -> Result<()> {
        self.release_op(abi::FUSE_RELEASEDIR, ino, fh)
    }

    /// RELEASE or RELEASEDIR (the same release_in).
    fn release_op(&mut self, opcode: u32, ino: u64, fh: u64) -> Result<()> {
        let body = abi::ReleaseIn { fh, ..Default::default() };
        self.call(opcode, ino, body.as_slice(), 16).map(|_| ())
    }

    pub fn flush(&mut self, ino: u64, fh: u64) -> Result<()> {
        let body = abi::FlushIn { fh, ..Default::default() };
        self.call(abi::FUSE_FLUSH, ino, body.as_slice(), 16).map(|_| ())
    }

    fn readdir_any(&mut self, ino: u64, fh: u64, offset: u64, size: u32, plus: bool) -> Result<Vec<DirEntryOwned>> {
        let op = if plus { abi::FUSE_READDIRPLUS } else { abi::FUSE_READDIR };
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
            out.push(DirEntryOwned { ino: dirent.ino, off: dirent.off, typ: dirent.typ, name: name.to_vec(), entry });
            let rec = abi::dirent_align(fixed + nl);
            rest = rest.get(rec..).unwrap_or(&[]);
        }
        Ok(out)
    }

    pub fn readdir(&mut self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<DirEntryOwned>> {
        self.readdir_any(ino, fh, offset, size, false)
    }

    pub fn readdirplus(&mut self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<DirEntryOwned>> {
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
        self.call(abi::FUSE_ACCESS, ino, body.as_slice(), 16).map(|_| ())
    }

    pub fn lseek(&mut self, ino: u64, fh: u64, offset: u64, whence: u32) -> Result<u64> {
        let body = abi::LseekIn { fh, offset, whence, padding: 0 };
        let o: abi::LseekOut = self.call_struct(abi::FUSE_LSEEK, ino, body.as_slice())?;
        Ok(o.offset)
    }

    pub fn destroy(&mut self) -> Result<()> {
        self.call(abi::FUSE_DESTROY, 0, &[], 16).map(|_| ())
    }
}
