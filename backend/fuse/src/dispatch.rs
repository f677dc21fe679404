//! Decodes one FUSE request and produces its reply.
//!
//! The input is the readable part of a descriptor chain, copied into one byte slice; the
//! output is the bytes to put into the writable part, or a future of them. Everything in the
//! request is untrusted: every length is checked against the bytes actually present, and
//! every reply is checked against the room the guest gave for it.

use std::future::Future;
use std::mem::size_of;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use tracing::{debug, trace, warn};
use vm_memory::ByteValued;

use crate::abi::{self, read_struct, InHeader, OutHeader};
use crate::filesystem::{Context, DirEntry, DirSink, Entry, Errno, FileSystem, InitInfo, ReadReply, Reply};
use incfs_buf::ScatterBuf;

const PAGE_SIZE: u32 = 4096;
/// Pages per request the kernel assumes when MAX_PAGES is not negotiated.
const DEFAULT_MAX_PAGES: u16 = 32;
/// Hard ceiling for max_pages (FUSE_MAX_MAX_PAGES in the kernel).
pub const MAX_MAX_PAGES: u16 = 256;

/// FUSE-level limits and tunables, offered to the guest at INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuseConfig {
    /// Upper bound for the guest's readahead window, in bytes.
    pub max_readahead: u32,
    /// Largest WRITE payload accepted, in bytes.
    pub max_write: u32,
    /// Largest READ / READDIR in pages of 4 KiB (at most 256 = 1 MiB).
    pub max_pages: u16,
    /// Background request limit the guest should keep to.
    pub max_background: u16,
    /// Number of background requests at which the guest considers us congested.
    pub congestion_threshold: u16,
}

impl Default for FuseConfig {
    fn default() -> Self {
        FuseConfig {
            max_readahead: 1 << 20,
            max_write: 1 << 20,
            max_pages: MAX_MAX_PAGES,
            max_background: 64,
            congestion_threshold: 48,
        }
    }
}

impl FuseConfig {
    /// Largest READ / READDIR size accepted.
    pub fn max_read(&self) -> u32 {
        u32::from(self.max_pages.clamp(1, MAX_MAX_PAGES)) * PAGE_SIZE
    }

    /// Largest readable part of a request: header, the biggest fixed op struct, and a
    /// WRITE payload. Anything longer is refused before it is copied.
    pub fn max_request_len(&self) -> usize {
        size_of::<InHeader>() + size_of::<abi::WriteIn>() + self.max_write as usize + PAGE_SIZE as usize
    }
}

/// INIT flags we are willing to enable.
const SUPPORTED_FLAGS: u32 = abi::FUSE_ASYNC_READ
    | abi::FUSE_BIG_WRITES
    | abi::FUSE_PARALLEL_DIROPS
    | abi::FUSE_MAX_PAGES
    | abi::FUSE_DO_READDIRPLUS
    | abi::FUSE_READDIRPLUS_AUTO
    | abi::FUSE_CACHE_SYMLINKS;

/// Reply bytes: `head` (out_header and fixed reply structs) followed by `data` (file data,
/// kept apart so it is not copied once more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplyBuf {
    pub head: Vec<u8>,
    pub data: Vec<u8>,
}

impl ReplyBuf {
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The reply as one contiguous buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.data);
        v
    }
}

/// Writes a reply into the chain's writable part once it is at hand; returns the reply's
/// length (`None`: return the chain empty).
pub type ReplyWriter = Box<dyn FnOnce(&mut ScatterBuf<'_>) -> Option<u32> + Send + 'static>;

/// A future resolving to the writer of a parked request's reply.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Option<ReplyWriter>> + Send + 'static>>;

/// What became of a request.
pub enum Response {
    /// No reply: FORGET, BATCH_FORGET, INTERRUPT, or a request too broken to answer (not
    /// even a full header, or no room for an out_header). The chain is returned with length 0.
    None,
    /// The reply, this many bytes, is in the writable part.
    Done(u32),
    /// Parked: when the future resolves, its writer puts the reply into the writable part.
    Pending(ReplyFuture),
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Response::None => f.write_str("None"),
            Response::Done(n) => f.debug_tuple("Done").field(n).finish(),
            Response::Pending(_) => f.write_str("Pending(..)"),
        }
    }
}

/// A handler's answer, before it is written.
enum Answer {
    None,
    Ready(ReplyBuf),
    Pending(Pin<Box<dyn Future<Output = Option<ReplyBuf>> + Send + 'static>>),
    /// READ wrote its reply in place.
    Written(Option<u32>),
    /// READ parked; its writer writes in place.
    PendingWrite(ReplyFuture),
}

/// Writes `reply` at the start of `out`; its length, or `None` if it does not fit (the
/// handlers sized it to fit, so only a bug gets there).
fn write_reply(reply: &ReplyBuf, out: &mut ScatterBuf<'_>) -> Option<u32> {
    let written = out.write(0, &reply.head).and_then(|()| out.write(reply.head.len(), &reply.data));
    if written.is_err() {
        warn!(len = reply.len(), room = out.len(), "reply did not fit the writable descriptors");
        return None;
    }
    u32::try_from(reply.len()).ok()
}

/// Turns an errno from the filesystem into one the guest can take: anything outside
/// 1..4096 becomes EIO.
fn sanitize_errno(e: Errno) -> i32 {
    if (1..4096).contains(&e) {
        e
    } else {
        libc::EIO
    }
}

fn error_reply(unique: u64, errno: Errno) -> ReplyBuf {
    let hdr = OutHeader { len: size_of::<OutHeader>() as u32, error: -sanitize_errno(errno), unique };
    ReplyBuf { head: hdr.as_slice().to_vec(), data: Vec::new() }
}

fn ok_reply(unique: u64, head_body: &[u8], data: Vec<u8>) -> ReplyBuf {
    let total = size_of::<OutHeader>() + head_body.len() + data.len();
    let hdr = OutHeader { len: total as u32, error: 0, unique };
    let mut head = Vec::with_capacity(size_of::<OutHeader>() + head_body.len());
    head.extend_from_slice(hdr.as_slice());
    head.extend_from_slice(head_body);
    ReplyBuf { head, data }
}

/// Makes sure a reply fits the guest's writable buffer: an oversize reply becomes
/// `overflow_errno`, and no room even for an out_header means no reply at all.
fn fit(reply: ReplyBuf, unique: u64, capacity: usize, overflow_errno: Errno) -> Option<ReplyBuf> {
    if reply.len() <= capacity {
        Some(reply)
    } else if capacity >= size_of::<OutHeader>() {
        debug!(unique, len = reply.len(), capacity, "reply larger than guest buffer");
        Some(error_reply(unique, overflow_errno))
    } else {
        None
    }
}

fn entry_out(e: &Entry) -> abi::EntryOut {
    abi::EntryOut {
        nodeid: e.ino,
        generation: e.generation,
        entry_valid: e.entry_timeout.as_secs(),
        attr_valid: e.attr_timeout.as_secs(),
        entry_valid_nsec: e.entry_timeout.subsec_nanos(),
        attr_valid_nsec: e.attr_timeout.subsec_nanos(),
        attr: e.attr.into(),
    }
}

/// Extracts a NUL-terminated name from the front of `body`: it must end inside the buffer,
/// be non-empty, at most `max` bytes, and contain no '/'.
fn parse_name(body: &[u8], max: usize) -> Result<&[u8], Errno> {
    let window = &body[..body.len().min(max + 1)];
    let Some(nul) = window.iter().position(|&b| b == 0) else {
        return Err(if body.len() > max { libc::ENAMETOOLONG } else { libc::EINVAL });
    };
    let name = &body[..nul];
    if name.is_empty() || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(name)
}

/// Like [`parse_name`] for xattr names, which may contain '/'.
fn parse_xattr_name(body: &[u8]) -> Result<&[u8], Errno> {
    let max = abi::XATTR_NAME_MAX;
    let window = &body[..body.len().min(max + 1)];
    let Some(nul) = window.iter().position(|&b| b == 0) else {
        return Err(if body.len() > max { libc::ERANGE } else { libc::EINVAL });
    };
    if nul == 0 {
        return Err(libc::EINVAL);
    }
    Ok(&body[..nul])
}

/// A decoded request header with its op body (the bytes between the header and `len`).
struct Request<'a> {
    hdr: InHeader,
    body: &'a [u8],
}

/// Told whenever the FUSE session starts (INIT) or ends (DESTROY, reset), so that another
/// process can take the session over without the guest noticing (`incfsd run`'s worker
/// keeps it in its state region; docs/restart.md).
pub trait SessionObserver: Send + Sync {
    fn session_changed(&self, session: Option<&InitInfo>);
}

/// Per-connection FUSE session: negotiated state plus the filesystem.
pub struct Dispatcher {
    fs: Arc<dyn FileSystem>,
    cfg: FuseConfig,
    initialized: AtomicBool,
    minor: AtomicU32,
    observer: Option<Arc<dyn SessionObserver>>,
    /// What INIT agreed (or a resumed session), for a migration's destination.
    session: std::sync::Mutex<Option<InitInfo>>,
}

impl Dispatcher {
    pub fn new(fs: Arc<dyn FileSystem>, cfg: FuseConfig) -> Self {
        let mut cfg = cfg;
        cfg.max_pages = cfg.max_pages.clamp(1, MAX_MAX_PAGES);
        Dispatcher {
            fs,
            cfg,
            initialized: AtomicBool::new(false),
            minor: AtomicU32::new(0),
            observer: None,
            session: std::sync::Mutex::new(None),
        }
    }

    /// Reports every start and end of the session to `observer`.
    pub fn with_observer(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Takes over a session negotiated by another process (same guest, same connection):
    /// requests are answered as if this dispatcher had answered the guest's INIT.
    pub fn resume(&self, session: &InitInfo) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(*session);
        self.minor.store(session.minor, Ordering::Release);
        self.fs.init(session);
        self.initialized.store(true, Ordering::Release);
        debug!(minor = session.minor, "FUSE session resumed");
    }

    pub fn config(&self) -> &FuseConfig {
        &self.cfg
    }

    pub fn filesystem(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }

    /// Whether FUSE INIT has been negotiated.
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }

    /// Ends the session as if the guest had sent DESTROY (device reset, frontend gone).
    /// The FUSE session, once INIT was answered (or a session resumed).
    pub fn session(&self) -> Option<InitInfo> {
        *self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn reset(&self) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if self.initialized.swap(false, Ordering::AcqRel) {
            self.fs.destroy();
            if let Some(o) = &self.observer {
                o.session_changed(None);
            }
        }
    }

    /// Handles one request. `req` is the readable part of the chain, `out` its writable part,
    /// where the reply goes (READ data straight from the filesystem, no copy in between).
    pub fn dispatch(&self, req: &[u8], out: &mut ScatterBuf<'_>) -> Response {
        match self.answer(req, out) {
            Answer::None | Answer::Written(None) => Response::None,
            Answer::Written(Some(n)) => Response::Done(n),
            Answer::Ready(reply) => write_reply(&reply, out).map_or(Response::None, Response::Done),
            Answer::Pending(fut) => Response::Pending(Box::pin(async move {
                let reply = fut.await?;
                Some(Box::new(move |out: &mut ScatterBuf<'_>| write_reply(&reply, out)) as ReplyWriter)
            })),
            Answer::PendingWrite(fut) => Response::Pending(fut),
        }
    }

    fn answer(&self, req: &[u8], out: &mut ScatterBuf<'_>) -> Answer {
        let out_capacity = out.len();
        let Some((hdr, _)) = read_struct::<InHeader>(req) else {
            debug!(len = req.len(), "request shorter than fuse_in_header");
            return Answer::None;
        };
        let unique = hdr.unique;
        let len = hdr.len as usize;
        if len < size_of::<InHeader>() || len > req.len() {
            debug!(unique, hdr_len = len, actual = req.len(), "in_header.len is wrong");
            return self.ready(error_reply(unique, libc::EINVAL), unique, out_capacity);
        }
        let request = Request { hdr, body: &req[size_of::<InHeader>()..len] };
        trace!(unique, opcode = hdr.opcode, nodeid = hdr.nodeid, "fuse request");

        match hdr.opcode {
            // No reply for these, whatever state we are in.
            abi::FUSE_FORGET => {
                self.do_forget(&request);
                return Answer::None;
            }
            abi::FUSE_BATCH_FORGET => {
                self.do_batch_forget(&request);
                return Answer::None;
            }
            // virtio-fs guests do not send INTERRUPT today; when they do, a parked request
            // simply completes later, which FUSE allows.
            abi::FUSE_INTERRUPT => return Answer::None,
            abi::FUSE_INIT => {
                let r = self.do_init(&request);
                return self.ready(r, unique, out_capacity);
            }
            _ => {}
        }

        if !self.is_initialized() {
            debug!(unique, opcode = hdr.opcode, "request before INIT");
            return self.ready(error_reply(unique, libc::EIO), unique, out_capacity);
        }

        let r = match hdr.opcode {
            abi::FUSE_LOOKUP => self.do_lookup(&request),
            abi::FUSE_GETATTR => self.do_getattr(&request),
            abi::FUSE_READLINK => self.do_readlink(&request),
            abi::FUSE_OPEN => self.do_open(&request, false),
            abi::FUSE_OPENDIR => self.do_open(&request, true),
            abi::FUSE_READ => return self.do_read(&request, out),
            abi::FUSE_WRITE => return self.do_write(&request, out_capacity),
            abi::FUSE_RELEASE => self.do_release(&request, false),
            abi::FUSE_RELEASEDIR => self.do_release(&request, true),
            abi::FUSE_FLUSH => self.do_flush(&request),
            abi::FUSE_READDIR => self.do_readdir(&request, out_capacity, false),
            abi::FUSE_READDIRPLUS => self.do_readdir(&request, out_capacity, true),
            abi::FUSE_STATFS => self.do_statfs(&request),
            abi::FUSE_GETXATTR => return self.do_getxattr(&request, out_capacity),
            abi::FUSE_LISTXATTR => return self.do_listxattr(&request, out_capacity),
            abi::FUSE_ACCESS => self.do_access(&request),
            abi::FUSE_LSEEK => self.do_lseek(&request),
            // Nothing to persist on a read-only filesystem.
            abi::FUSE_FSYNC | abi::FUSE_FSYNCDIR | abi::FUSE_SYNCFS => ok_reply(unique, &[], Vec::new()),
            abi::FUSE_DESTROY => {
                self.reset();
                ok_reply(unique, &[], Vec::new())
            }
            abi::FUSE_SETATTR
            | abi::FUSE_MKNOD
            | abi::FUSE_MKDIR
            | abi::FUSE_UNLINK
            | abi::FUSE_RMDIR
            | abi::FUSE_RENAME
            | abi::FUSE_RENAME2
            | abi::FUSE_LINK
            | abi::FUSE_SYMLINK
            | abi::FUSE_CREATE
            | abi::FUSE_SETXATTR
            | abi::FUSE_REMOVEXATTR
            | abi::FUSE_FALLOCATE
            | abi::FUSE_COPY_FILE_RANGE
            | abi::FUSE_TMPFILE => error_reply(unique, libc::EROFS),
            op => {
                debug!(unique, opcode = op, "unsupported opcode");
                error_reply(unique, libc::ENOSYS)
            }
        };
        self.ready(r, unique, out_capacity)
    }

    fn ready(&self, reply: ReplyBuf, unique: u64, capacity: usize) -> Answer {
        match fit(reply, unique, capacity, libc::EIO) {
            Some(r) => Answer::Ready(r),
            None => Answer::None,
        }
    }

    fn do_init(&self, req: &Request<'_>) -> ReplyBuf {
        let unique = req.hdr.unique;
        let Some((init, _)) = abi::read_struct_prefix::<abi::InitIn>(req.body, abi::INIT_IN_COMPAT_SIZE) else {
            return error_reply(unique, libc::EINVAL);
        };
        if init.major != abi::KERNEL_VERSION {
            // A newer major: answer with ours only, the guest then retries or gives up.
            // (An older one, 6 or below, is not something a virtio-fs guest can be.)
            warn!(major = init.major, minor = init.minor, "unsupported FUSE major version");
            if init.major > abi::KERNEL_VERSION {
                let out =
                    abi::InitOut { major: abi::KERNEL_VERSION, minor: abi::KERNEL_MINOR_VERSION, ..Default::default() };
                return ok_reply(unique, out.as_slice(), Vec::new());
            }
            return error_reply(unique, libc::EPROTO);
        }
        if init.minor < abi::MIN_KERNEL_MINOR_VERSION {
            warn!(minor = init.minor, "FUSE minor version too old");
            return error_reply(unique, libc::EPROTO);
        }
        // A second INIT without DESTROY (guest rebooted without resetting us): start over.
        self.reset();

        let minor = init.minor.min(abi::KERNEL_MINOR_VERSION);
        let flags = init.flags & SUPPORTED_FLAGS;
        let max_pages = if flags & abi::FUSE_MAX_PAGES != 0 {
            self.cfg.max_pages
        } else {
            DEFAULT_MAX_PAGES.min(self.cfg.max_pages)
        };
        let out = abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor,
            max_readahead: init.max_readahead.min(self.cfg.max_readahead),
            flags,
            max_background: self.cfg.max_background,
            congestion_threshold: self.cfg.congestion_threshold,
            max_write: self.cfg.max_write,
            time_gran: 1,
            max_pages,
            map_alignment: 0,
            flags2: 0,
            unused: [0; 7],
        };
        let info = InitInfo {
            major: abi::KERNEL_VERSION,
            minor,
            flags,
            max_readahead: out.max_readahead,
            max_write: out.max_write,
            max_pages,
        };
        self.minor.store(minor, Ordering::Release);
        self.fs.init(&info);
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
        self.initialized.store(true, Ordering::Release);
        if let Some(o) = &self.observer {
            o.session_changed(Some(&info));
        }
        debug!(minor, flags = format_args!("{flags:#x}"), max_pages, "FUSE session initialized");
        ok_reply(unique, out.as_slice(), Vec::new())
    }

    fn do_forget(&self, req: &Request<'_>) {
        if !self.is_initialized() {
            return;
        }
        if let Some((f, _)) = read_struct::<abi::ForgetIn>(req.body) {
            self.fs.forget(req.hdr.nodeid, f.nlookup);
        }
    }

    fn do_batch_forget(&self, req: &Request<'_>) {
        if !self.is_initialized() {
            return;
        }
        let Some((b, mut rest)) = read_struct::<abi::BatchForgetIn>(req.body) else {
            return;
        };
        // Trust the bytes, not the count: process min(count, entries present).
        for _ in 0..b.count {
            let Some((one, r)) = read_struct::<abi::ForgetOne>(rest) else {
                debug!(count = b.count, "BATCH_FORGET shorter than its count");
                break;
            };
            self.fs.forget(one.nodeid, one.nlookup);
            rest = r;
        }
    }

    fn do_lookup(&self, req: &Request<'_>) -> ReplyBuf {
        let unique = req.hdr.unique;
        let name = match parse_name(req.body, abi::NAME_MAX) {
            Ok(n) => n,
            Err(e) => return error_reply(unique, e),
        };
        match self.fs.lookup(req.hdr.nodeid, name) {
            Ok(e) => ok_reply(unique, entry_out(&e).as_slice(), Vec::new()),
            Err(e) => error_reply(unique, e),
        }
    }

    fn do_getattr(&self, req: &Request<'_>) -> ReplyBuf {
        // The getattr_in body (fh hint) is optional for us: attributes do not depend on it.
        match self.fs.getattr(req.hdr.nodeid) {
            Ok((attr, timeout)) => {
                let out = abi::AttrOut {
                    attr_valid: timeout.as_secs(),
                    attr_valid_nsec: timeout.subsec_nanos(),
                    dummy: 0,
                    attr: attr.into(),
                };
                ok_reply(req.hdr.unique, out.as_slice(), Vec::new())
            }
            Err(e) => error_reply(req.hdr.unique, e),
        }
    }

    fn do_readlink(&self, req: &Request<'_>) -> ReplyBuf {
        match self.fs.readlink(req.hdr.nodeid) {
            // PATH_MAX bounds what the guest accepts; longer is a filesystem bug.
            Ok(target) if target.len() >= libc::PATH_MAX as usize => error_reply(req.hdr.unique, libc::ENAMETOOLONG),
            Ok(target) => ok_reply(req.hdr.unique, &[], target),
            Err(e) => error_reply(req.hdr.unique, e),
        }
    }

    fn do_open(&self, req: &Request<'_>, dir: bool) -> ReplyBuf {
        let unique = req.hdr.unique;
        let Some((open, _)) = read_struct::<abi::OpenIn>(req.body) else {
            return error_reply(unique, libc::EINVAL);
        };
        let r =
            if dir { self.fs.opendir(req.hdr.nodeid, open.flags) } else { self.fs.open(req.hdr.nodeid, open.flags) };
        match r {
            Ok((fh, open_flags)) => {
                let out = abi::OpenOut { fh, open_flags, padding: 0 };
                ok_reply(unique, out.as_slice(), Vec::new())
            }
            Err(e) => error_reply(unique, e),
        }
    }

    fn do_release(&self, req: &Request<'_>, dir: bool) -> ReplyBuf {
        let unique = req.hdr.unique;
        let Some((rel, _)) = read_struct::<abi::ReleaseIn>(req.body) else {
            return error_reply(unique, libc::EINVAL);
        };
        if dir {
            self.fs.releasedir(req.hdr.nodeid, rel.fh);
        } else {
            self.fs.release(req.hdr.nodeid, rel.fh);
        }
        ok_reply(unique, &[], Vec::new())
    }

    fn do_flush(&self, req: &Request<'_>) -> ReplyBuf {
        let unique = req.hdr.unique;
        let Some((f, _)) = read_struct::<abi::FlushIn>(req.body) else {
            return error_reply(unique, libc::EINVAL);
        };
        match self.fs.flush(req.hdr.nodeid, f.fh) {
            Ok(()) => ok_reply(unique, &[], Vec::new()),
            Err(e) => error_reply(unique, e),
        }
    }

    fn do_read(&self, req: &Request<'_>, out: &mut ScatterBuf<'_>) -> Answer {
        let unique = req.hdr.unique;
        let capacity = out.len();
        let Some((read, _)) = read_struct::<abi::ReadIn>(req.body) else {
            return self.ready(error_reply(unique, libc::EINVAL), unique, capacity);
        };
        // The guest must have asked for no more than we allow, and given room for it.
        let head = size_of::<OutHeader>();
        if read.size > self.cfg.max_read() || (read.size as usize).saturating_add(head) > capacity {
            debug!(unique, size = read.size, capacity, "READ too large");
            return self.ready(error_reply(unique, libc::EINVAL), unique, capacity);
        }
        let size = read.size;
        // The data goes after the out_header; the header is written once the length is known.
        let finish = move |r: Result<u32, Errno>, out: &mut ScatterBuf<'_>| -> Option<u32> {
            let (len, error) = match r {
                Ok(n) if n <= size => (head as u32 + n, 0),
                Ok(n) => {
                    warn!(unique, got = n, size, "filesystem read returned too much");
                    (head as u32, -libc::EIO)
                }
                Err(e) => (head as u32, -sanitize_errno(e)),
            };
            out.write(0, OutHeader { len, error, unique }.as_slice()).ok()?;
            Some(len)
        };
        let ctx = caller(req);
        out.set_base(head);
        let reply = self.fs.read(req.hdr.nodeid, read.fh, read.offset, size, &ctx, out);
        out.set_base(0);
        match reply {
            ReadReply::Done(r) => Answer::Written(finish(r, out)),
            ReadReply::Pending(fut) => Answer::PendingWrite(Box::pin(async move {
                let fill = fut.await;
                Some(Box::new(move |out: &mut ScatterBuf<'_>| {
                    let r = fill.and_then(|fill| {
                        out.set_base(head);
                        let n = fill(out);
                        out.set_base(0);
                        n
                    });
                    finish(r, out)
                }) as ReplyWriter)
            })),
        }
    }

    fn do_write(&self, req: &Request<'_>, capacity: usize) -> Answer {
        let unique = req.hdr.unique;
        let Some((write, data)) = read_struct::<abi::WriteIn>(req.body) else {
            return self.ready(error_reply(unique, libc::EINVAL), unique, capacity);
        };
        if write.size > self.cfg.max_write || write.size as usize != data.len() {
            debug!(unique, size = write.size, present = data.len(), "WRITE size mismatch");
            return self.ready(error_reply(unique, libc::EINVAL), unique, capacity);
        }
        let finish = move |r: Result<u32, Errno>| -> Option<ReplyBuf> {
            let reply = match r {
                Ok(n) => {
                    let out = abi::WriteOut { size: n, padding: 0 };
                    ok_reply(unique, out.as_slice(), Vec::new())
                }
                Err(e) => error_reply(unique, e),
            };
            fit(reply, unique, capacity, libc::EIO)
        };
        let ctx = caller(req);
        match self.fs.write(req.hdr.nodeid, write.fh, write.offset, data, &ctx) {
            Reply::Ready(r) => match finish(r) {
                Some(r) => Answer::Ready(r),
                None => Answer::None,
            },
            Reply::Pending(fut) => Answer::Pending(Box::pin(async move { finish(fut.await) })),
        }
    }

    fn do_readdir(&self, req: &Request<'_>, capacity: usize, plus: bool) -> ReplyBuf {
        let unique = req.hdr.unique;
        let Some((read, _)) = read_struct::<abi::ReadIn>(req.body) else {
            return error_reply(unique, libc::EINVAL);
        };
        if read.size > self.cfg.max_read() {
            return error_reply(unique, libc::EINVAL);
        }
        // Never produce more than the guest asked for or has room for.
        let budget = (read.size as usize).min(capacity.saturating_sub(size_of::<OutHeader>()));
        let mut sink = CollectSink { budget, used: 0, plus, entries: Vec::new() };
        let dir = req.hdr.nodeid;
        if let Err(e) = self.fs.readdir(dir, read.fh, read.offset, &mut sink) {
            // An error after some entries: return what we have (the guest retries from
            // the last cookie and then sees the error).
            if sink.entries.is_empty() {
                return error_reply(unique, e);
            }
        }
        let mut data = Vec::with_capacity(sink.used);
        for ent in &sink.entries {
            let namelen = ent.name.len();
            let dirent = abi::Dirent { ino: ent.ino, off: ent.offset, namelen: namelen as u32, typ: ent.kind };
            if plus {
                // "." and ".." are never linked by the guest, so they carry no lookup;
                // a nodeid of 0 tells the guest "no attributes for this one".
                let dots = ent.name == b"." || ent.name == b"..";
                let entry_out = if dots {
                    abi::EntryOut::default()
                } else {
                    match self.fs.lookup(dir, &ent.name) {
                        Ok(e) => entry_out(&e),
                        Err(_) => abi::EntryOut::default(),
                    }
                };
                let d = abi::Direntplus { entry_out, dirent };
                data.extend_from_slice(d.as_slice());
            } else {
                data.extend_from_slice(dirent.as_slice());
            }
            data.extend_from_slice(&ent.name);
            let fixed = if plus { size_of::<abi::Direntplus>() } else { size_of::<abi::Dirent>() };
            let pad = abi::dirent_align(fixed + namelen) - (fixed + namelen);
            data.extend(std::iter::repeat_n(0u8, pad));
        }
        ok_reply(unique, &[], data)
    }

    fn do_statfs(&self, req: &Request<'_>) -> ReplyBuf {
        match self.fs.statfs(req.hdr.nodeid) {
            Ok(s) => {
                let out = abi::StatfsOut {
                    st: abi::Kstatfs {
                        blocks: s.blocks,
                        bfree: s.bfree,
                        bavail: s.bavail,
                        files: s.files,
                        ffree: s.ffree,
                        bsize: s.bsize,
                        namelen: s.namelen,
                        frsize: s.frsize,
                        padding: 0,
                        spare: [0; 6],
                    },
                };
                ok_reply(req.hdr.unique, out.as_slice(), Vec::new())
            }
            Err(e) => error_reply(req.hdr.unique, e),
        }
    }

    /// The xattr size-probe protocol shared by GETXATTR and LISTXATTR.
    fn xattr_reply(&self, unique: u64, size: u32, value: Vec<u8>, capacity: usize) -> Answer {
        if value.len() > abi::XATTR_SIZE_MAX {
            return self.ready(error_reply(unique, libc::E2BIG), unique, capacity);
        }
        let reply = if size == 0 {
            let out = abi::GetxattrOut { size: value.len() as u32, padding: 0 };
            ok_reply(unique, out.as_slice(), Vec::new())
        } else if value.len() > size as usize {
            error_reply(unique, libc::ERANGE)
        } else {
            ok_reply(unique, &[], value)
        };
        match fit(reply, unique, capacity, libc::ERANGE) {
            Some(r) => Answer::Ready(r),
            None => Answer::None,
        }
    }

    fn do_getxattr(&self, req: &Request<'_>, capacity: usize) -> Answer {
        let unique = req.hdr.unique;
        let Some((gx, rest)) = read_struct::<abi::GetxattrIn>(req.body) else {
            return self.ready(error_reply(unique, libc::EINVAL), unique, capacity);
        };
        let name = match parse_xattr_name(rest) {
            Ok(n) => n,
            Err(e) => return self.ready(error_reply(unique, e), unique, capacity),
        };
        match self.fs.getxattr(req.hdr.nodeid, name) {
            Ok(v) => self.xattr_reply(unique, gx.size, v, capacity),
            Err(e) => self.ready(error_reply(unique, e), unique, capacity),
        }
    }

    fn do_listxattr(&self, req: &Request<'_>, capacity: usize) -> Answer {
        let unique = req.hdr.unique;
        let Some((gx, _)) = read_struct::<abi::GetxattrIn>(req.body) else {
            return self.ready(error_reply(unique, libc::EINVAL), unique, capacity);
        };
        match self.fs.listxattr(req.hdr.nodeid) {
            Ok(names) => {
                let mut list = Vec::new();
                for n in names {
                    if list.len() > abi::XATTR_SIZE_MAX {
                        break; // already too long; xattr_reply turns it into E2BIG
                    }
                    list.extend_from_slice(&n);
                    list.push(0);
                }
                self.xattr_reply(unique, gx.size, list, capacity)
            }
            Err(e) => self.ready(error_reply(unique, e), unique, capacity),
        }
    }

    fn do_access(&self, req: &Request<'_>) -> ReplyBuf {
        let unique = req.hdr.unique;
        let Some((a, _)) = read_struct::<abi::AccessIn>(req.body) else {
            return error_reply(unique, libc::EINVAL);
        };
        let ctx = caller(req);
        match self.fs.access(req.hdr.nodeid, a.mask, &ctx) {
            Ok(()) => ok_reply(unique, &[], Vec::new()),
            Err(e) => error_reply(unique, e),
        }
    }

    fn do_lseek(&self, req: &Request<'_>) -> ReplyBuf {
        let unique = req.hdr.unique;
        let Some((l, _)) = read_struct::<abi::LseekIn>(req.body) else {
            return error_reply(unique, libc::EINVAL);
        };
        if l.whence != libc::SEEK_DATA as u32 && l.whence != libc::SEEK_HOLE as u32 {
            return error_reply(unique, libc::EINVAL);
        }
        match self.fs.lseek(req.hdr.nodeid, l.fh, l.offset, l.whence) {
            Ok(offset) => {
                let out = abi::LseekOut { offset };
                ok_reply(unique, out.as_slice(), Vec::new())
            }
            Err(e) => error_reply(unique, e),
        }
    }

    /// Negotiated protocol minor version (0 before INIT).
    pub fn minor(&self) -> u32 {
        self.minor.load(Ordering::Acquire)
    }
}

/// An owned directory entry collected during READDIR.
struct OwnedDirEntry {
    ino: u64,
    offset: u64,
    kind: u32,
    name: Vec<u8>,
}

/// Collects entries while they fit the budget. Lookups for READDIRPLUS are done only after
/// the filesystem's readdir has returned, so the filesystem can hold its own locks while
/// listing, and no lookup count is taken for an entry that does not fit.
struct CollectSink {
    budget: usize,
    used: usize,
    plus: bool,
    entries: Vec<OwnedDirEntry>,
}

impl DirSink for CollectSink {
    fn add(&mut self, e: DirEntry<'_>) -> bool {
        // A name the guest would choke on is skipped, not fatal.
        if e.name.is_empty() || e.name.len() > abi::NAME_MAX || e.name.contains(&0) || e.name.contains(&b'/') {
            warn!("filesystem produced an invalid directory entry name; skipped");
            return true;
        }
        let fixed = if self.plus { size_of::<abi::Direntplus>() } else { size_of::<abi::Dirent>() };
        let rec = abi::dirent_align(fixed + e.name.len());
        if self.used + rec > self.budget {
            return false;
        }
        self.used += rec;
        self.entries.push(OwnedDirEntry { ino: e.ino, offset: e.offset, kind: e.kind, name: e.name.to_vec() });
        true
    }
}

/// The guest caller of a request, from its header.
fn caller(req: &Request<'_>) -> Context {
    Context { uid: req.hdr.uid, gid: req.hdr.gid, pid: req.hdr.pid }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filesystem::{Attr, Entry};
    use std::time::Duration;

    /// One directory (1) holding "f" (2, 10 bytes).
    struct Tiny;

    /// What a read of "f" returns.
    fn tiny_data(offset: u64, size: u32) -> &'static [u8] {
        let data = b"0123456789";
        let start = (offset as usize).min(data.len());
        let end = (start + size as usize).min(data.len());
        &data[start..end]
    }

    impl FileSystem for Tiny {
        fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno> {
            if parent == 1 && name == b"f" {
                Ok(Entry { ino: 2, attr: self.getattr(2)?.0, ..Default::default() })
            } else {
                Err(libc::ENOENT)
            }
        }
        fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno> {
            match ino {
                1 => Ok((Attr { ino, mode: libc::S_IFDIR | 0o555, nlink: 2, ..Default::default() }, Duration::ZERO)),
                2 => Ok((
                    Attr { ino, mode: libc::S_IFREG | 0o444, nlink: 1, size: 10, ..Default::default() },
                    Duration::ZERO,
                )),
                _ => Err(libc::ENOENT),
            }
        }
        /// Odd offsets are parked, to show both ways a READ ends.
        fn read(
            &self,
            _ino: u64,
            _fh: u64,
            offset: u64,
            size: u32,
            _ctx: &Context,
            out: &mut ScatterBuf<'_>,
        ) -> ReadReply {
            let data = tiny_data(offset, size);
            if offset % 2 == 1 {
                return ReadReply::bytes(Reply::pending(async move { Ok(data.to_vec()) }), size, out);
            }
            ReadReply::bytes(Reply::ok(data.to_vec()), size, out)
        }
        fn readdir(&self, ino: u64, _fh: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno> {
            if ino != 1 {
                return Err(libc::ENOTDIR);
            }
            let ents: [(u64, &[u8], u32); 3] =
                [(1, b".", libc::DT_DIR.into()), (1, b"..", libc::DT_DIR.into()), (2, b"f", libc::DT_REG.into())];
            for (i, (ino, name, kind)) in ents.iter().enumerate().skip(offset as usize) {
                if !sink.add(DirEntry { ino: *ino, offset: i as u64 + 1, kind: *kind, name }) {
                    break;
                }
            }
            Ok(())
        }
    }

    fn req(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let hdr =
            InHeader { len: (size_of::<InHeader>() + body.len()) as u32, opcode, unique, nodeid, ..Default::default() };
        let mut v = hdr.as_slice().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn init_body(flags: u32) -> Vec<u8> {
        abi::InitIn { major: 7, minor: 38, max_readahead: 1 << 22, flags, flags2: 0, unused: [0; 11] }
            .as_slice()
            .to_vec()
    }

    /// What the dispatcher made of a request: the response and the writable part after it.
    struct Answered {
        response: Response,
        out: Vec<u8>,
    }

    fn call(d: &Dispatcher, req: &[u8], capacity: usize) -> Answered {
        let mut out = vec![0xeeu8; capacity];
        let response = d.dispatch(req, &mut ScatterBuf::from_slice(&mut out));
        Answered { response, out }
    }

    /// The reply bytes of a request answered at once.
    fn ready(a: Answered) -> Vec<u8> {
        match a.response {
            Response::Done(n) => a.out[..n as usize].to_vec(),
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn out_hdr(b: &[u8]) -> OutHeader {
        read_struct::<OutHeader>(b).expect("out header").0
    }

    fn session() -> Dispatcher {
        let d = Dispatcher::new(Arc::new(Tiny), FuseConfig::default());
        let r = ready(call(&d, &req(abi::FUSE_INIT, 1, 0, &init_body(u32::MAX)), 4096));
        assert_eq!(out_hdr(&r).error, 0);
        d
    }

    #[test]
    fn init_negotiates() {
        let d = Dispatcher::new(Arc::new(Tiny), FuseConfig::default());
        let flags = abi::FUSE_ASYNC_READ | abi::FUSE_MAX_PAGES | abi::FUSE_POSIX_LOCKS | abi::FUSE_EXPORT_SUPPORT;
        let r = ready(call(&d, &req(abi::FUSE_INIT, 9, 0, &init_body(flags)), 4096));
        let h = out_hdr(&r);
        assert_eq!((h.error, h.unique, h.len as usize), (0, 9, r.len()));
        let (out, _) = read_struct::<abi::InitOut>(&r[16..]).expect("init_out");
        assert_eq!(out.major, 7);
        assert_eq!(out.minor, abi::KERNEL_MINOR_VERSION);
        assert_eq!(out.flags, abi::FUSE_ASYNC_READ | abi::FUSE_MAX_PAGES);
        assert_eq!(out.max_readahead, 1 << 20);
        assert_eq!(out.max_pages, 256);
    }

    #[test]
    fn init_old_compat_size() {
        let d = Dispatcher::new(Arc::new(Tiny), FuseConfig::default());
        let body = &init_body(abi::FUSE_ASYNC_READ)[..16];
        let r = ready(call(&d, &req(abi::FUSE_INIT, 2, 0, body), 4096));
        assert_eq!(out_hdr(&r).error, 0);
        let (out, _) = read_struct::<abi::InitOut>(&r[16..]).expect("init_out");
        assert_eq!(out.max_pages, DEFAULT_MAX_PAGES);
        // Too short.
        let r = ready(call(&d, &req(abi::FUSE_INIT, 3, 0, &body[..15]), 4096));
        assert_eq!(out_hdr(&r).error, -libc::EINVAL);
    }

    #[test]
    fn before_init_is_eio() {
        let d = Dispatcher::new(Arc::new(Tiny), FuseConfig::default());
        let r = ready(call(&d, &req(abi::FUSE_LOOKUP, 5, 1, b"f\0"), 4096));
        assert_eq!(out_hdr(&r), OutHeader { len: 16, error: -libc::EIO, unique: 5 });
    }

    #[test]
    fn header_checks() {
        let d = session();
        assert!(matches!(call(&d, &[0u8; 39], 4096).response, Response::None));
        let mut r = req(abi::FUSE_GETATTR, 7, 1, &[0u8; 16]);
        r[0..4].copy_from_slice(&1000u32.to_ne_bytes()); // len lies
        assert_eq!(out_hdr(&ready(call(&d, &r, 4096))).error, -libc::EINVAL);
        r[0..4].copy_from_slice(&10u32.to_ne_bytes()); // shorter than a header
        assert_eq!(out_hdr(&ready(call(&d, &r, 4096))).error, -libc::EINVAL);
        // No room for even an out_header: nothing to write.
        let r = req(abi::FUSE_GETATTR, 7, 1, &[0u8; 16]);
        assert!(matches!(call(&d, &r, 15).response, Response::None));
        // Room for the header only: EIO instead of overflow.
        assert_eq!(out_hdr(&ready(call(&d, &r, 16))).error, -libc::EIO);
    }

    #[test]
    fn lookup_names() {
        let d = session();
        let r = ready(call(&d, &req(abi::FUSE_LOOKUP, 2, 1, b"f\0"), 4096));
        assert_eq!(out_hdr(&r).error, 0);
        let (e, _) = read_struct::<abi::EntryOut>(&r[16..]).expect("entry");
        assert_eq!((e.nodeid, e.attr.size), (2, 10));
        let cases: [(&[u8], i32); 5] = [
            (b"f", -libc::EINVAL),  // no NUL
            (b"\0", -libc::EINVAL), // empty
            (b"a/b\0", -libc::EINVAL),
            (b"g\0", -libc::ENOENT),
            (&[b'a'; 300], -libc::ENAMETOOLONG),
        ];
        for (body, err) in cases {
            let r = ready(call(&d, &req(abi::FUSE_LOOKUP, 3, 1, body), 4096));
            assert_eq!(out_hdr(&r).error, err, "body {body:?}");
        }
        let mut long = vec![b'a'; 255];
        long.push(0);
        let r = ready(call(&d, &req(abi::FUSE_LOOKUP, 3, 1, &long), 4096));
        assert_eq!(out_hdr(&r).error, -libc::ENOENT);
    }

    #[test]
    fn read_bounds() {
        let d = session();
        let read = |size: u32, cap: usize| {
            let body = abi::ReadIn { size, ..Default::default() };
            call(&d, &req(abi::FUSE_READ, 4, 2, body.as_slice()), cap)
        };
        let r = ready(read(4096, 1 << 21));
        assert_eq!(&r[16..], b"0123456789");
        assert_eq!(out_hdr(&r).len, 26);
        assert_eq!(out_hdr(&ready(read((1 << 20) + 1, 1 << 21))).error, -libc::EINVAL);
        assert_eq!(out_hdr(&ready(read(4096, 100))).error, -libc::EINVAL);
        // Truncated read_in.
        let r = ready(call(&d, &req(abi::FUSE_READ, 4, 2, &[0u8; 20]), 4096));
        assert_eq!(out_hdr(&r).error, -libc::EINVAL);
    }

    #[test]
    fn read_writes_header_and_data_in_place_now_or_when_parked() {
        let d = session();
        let read = |off: u64, size: u32| {
            let body = abi::ReadIn { offset: off, size, ..Default::default() };
            req(abi::FUSE_READ, 4, 2, body.as_slice())
        };
        let a = call(&d, &read(2, 4096), 8192);
        assert!(matches!(a.response, Response::Done(24)));
        assert_eq!(out_hdr(&a.out[..24]).len, 24);
        assert_eq!(out_hdr(&a.out[..24]).unique, 4);
        assert_eq!(&a.out[16..24], b"23456789");
        assert_eq!(a.out[24], 0xee, "nothing written past the reply");
        // Parked: the writer puts header and data into the same buffer later.
        let a = call(&d, &read(3, 4096), 8192);
        let Response::Pending(fut) = a.response else { panic!("odd offsets park") };
        let write = block_on(fut).expect("a reply");
        let mut out = vec![0xeeu8; 8192];
        assert_eq!(write(&mut ScatterBuf::from_slice(&mut out)), Some(23));
        assert_eq!((out_hdr(&out).len, out_hdr(&out).error), (23, 0));
        assert_eq!(&out[16..23], b"3456789");
        assert_eq!(out[23], 0xee);
        // Refused: no room for the data, too large a read, a truncated read_in, no session.
        assert_eq!(out_hdr(&ready(call(&d, &read(0, 4096), 4096))).error, -libc::EINVAL);
        assert_eq!(out_hdr(&ready(call(&d, &read(0, (1 << 20) + 4096), 2 << 20))).error, -libc::EINVAL);
        assert_eq!(out_hdr(&ready(call(&d, &req(abi::FUSE_READ, 4, 2, &[0; 20]), 8192))).error, -libc::EINVAL);
        let fresh = Dispatcher::new(Arc::new(Tiny), FuseConfig::default());
        assert_eq!(out_hdr(&ready(call(&fresh, &read(0, 4096), 8192))).error, -libc::EIO);
    }

    /// Runs a future that never waits on anything external to completion.
    fn block_on<F: Future>(fut: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(fut)
    }

    #[test]
    fn mutations_and_unknown() {
        let d = session();
        for op in [abi::FUSE_MKDIR, abi::FUSE_SETATTR, abi::FUSE_CREATE, abi::FUSE_UNLINK, abi::FUSE_TMPFILE] {
            assert_eq!(out_hdr(&ready(call(&d, &req(op, 1, 1, &[]), 4096))).error, -libc::EROFS);
        }
        let w = abi::WriteIn { size: 3, ..Default::default() };
        let mut body = w.as_slice().to_vec();
        body.extend_from_slice(b"abc");
        assert_eq!(out_hdr(&ready(call(&d, &req(abi::FUSE_WRITE, 1, 2, &body), 4096))).error, -libc::EROFS);
        body.pop(); // size lies
        assert_eq!(out_hdr(&ready(call(&d, &req(abi::FUSE_WRITE, 1, 2, &body), 4096))).error, -libc::EINVAL);
        for op in [0, 7, 19, abi::FUSE_IOCTL, abi::FUSE_POLL, 9999, u32::MAX] {
            assert_eq!(out_hdr(&ready(call(&d, &req(op, 1, 1, &[]), 4096))).error, -libc::ENOSYS);
        }
        assert!(matches!(
            call(&d, &req(abi::FUSE_FORGET, 1, 2, &[1, 0, 0, 0, 0, 0, 0, 0]), 4096).response,
            Response::None
        ));
        assert!(matches!(call(&d, &req(abi::FUSE_INTERRUPT, 1, 0, &[0; 8]), 0).response, Response::None));
        let bf = abi::BatchForgetIn { count: u32::MAX, dummy: 0 };
        assert!(matches!(call(&d, &req(abi::FUSE_BATCH_FORGET, 1, 0, bf.as_slice()), 0).response, Response::None));
    }

    #[test]
    fn readdir_fills_and_resumes() {
        let d = session();
        let rd = |plus: bool, offset: u64, size: u32| {
            let body = abi::ReadIn { offset, size, ..Default::default() };
            let op = if plus { abi::FUSE_READDIRPLUS } else { abi::FUSE_READDIR };
            ready(call(&d, &req(op, 6, 1, body.as_slice()), 4096))
        };
        let r = rd(false, 0, 4096);
        assert_eq!(r.len(), 16 + 3 * 32);
        // Room for exactly one entry.
        let r = rd(false, 1, 32);
        let (de, _) = read_struct::<abi::Dirent>(&r[16..]).expect("dirent");
        assert_eq!((de.off, de.namelen, &r[40..42]), (2, 2, &b".."[..]));
        assert_eq!(r.len(), 16 + 32);
        let r = rd(true, 2, 4096);
        let (dp, _) = read_struct::<abi::Direntplus>(&r[16..]).expect("direntplus");
        assert_eq!((dp.entry_out.nodeid, dp.dirent.ino, dp.dirent.off), (2, 2, 3));
        let r = rd(true, 0, 160);
        let (dp, _) = read_struct::<abi::Direntplus>(&r[16..]).expect("direntplus");
        assert_eq!(dp.entry_out.nodeid, 0, "dot entries carry no lookup");
        assert_eq!(r.len(), 16 + 160);
        assert_eq!(rd(false, 3, 4096).len(), 16);
    }
}
