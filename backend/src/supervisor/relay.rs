//! vhost-user messages as the supervisor relays them: framing with bounds (header, payload,
//! SCM_RIGHTS fds), which requests expect a reply, and the recorded state that brings a
//! fresh worker to the device's current state. Nothing here looks inside guest memory or
//! the rings.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Requests (vhost-user specification, "Front-end message types").
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
    pub const CHECK_DEVICE_STATE: u32 = 43;
    /// Not vhost-user: on the supervisor's control channel to a worker, hands it the worker's
    /// end of a new frontend connection (one fd).
    pub const CONNECT: u32 = 0x494e_0001;
}

/// Header bytes: request u32, flags u32, size u32.
pub const HEADER_SIZE: usize = 12;
/// Largest payload (the `vhost` crate's MAX_MSG_SIZE; QEMU sends less).
pub const MAX_PAYLOAD: usize = 0x1000;
/// Most fds with one message (the `vhost` crate's MAX_ATTACHED_FD_ENTRIES).
pub const MAX_FDS: usize = 32;
const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;

/// The virtio feature bit that says protocol features were negotiated.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Protocol feature bits.
pub const PF_MQ: u64 = 1 << 0;
pub const PF_LOG_SHMFD: u64 = 1 << 1;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
pub const PF_DEVICE_STATE: u64 = 1 << 19;
/// What the supervisor lets QEMU negotiate: what the worker offers (`VirtioFs`
/// protocol_features) minus INFLIGHT_SHMFD, which is the supervisor's own business. Dirty
/// logging and the device state, for live migration (docs/migration.md), but nothing that
/// would open a second channel (BACKEND_REQ).
pub const PF_RELAYED: u64 = PF_MQ | PF_LOG_SHMFD | PF_REPLY_ACK | PF_CONFIGURE_MEM_SLOTS | PF_DEVICE_STATE;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("peer hung up in the middle of a message")]
    Truncated,
    #[error("bad message header (flags {flags:#x})")]
    BadHeader { flags: u32 },
    #[error("message payload of {0} bytes is over the limit")]
    TooLarge(u32),
    #[error("more than {MAX_FDS} file descriptors with one message")]
    TooManyFds,
    #[error("request {0} is not relayed (not offered, or not understood)")]
    Refused(u32),
    #[error("request {request}: {what}")]
    Invalid { request: u32, what: &'static str },
    #[error("the worker answered {got} to request {sent}")]
    WrongReply { sent: u32, got: u32 },
    #[error("recorded state is over its bound")]
    TooMuchState,
}

/// One vhost-user message with the fds that came with it.
#[derive(Debug)]
pub struct Message {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Message {
    pub fn new(request: u32, payload: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        Message { request, flags: VERSION, payload, fds }
    }

    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// The payload's first u64 (features, vring state as a whole).
    pub fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.payload.get(off..off + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        let b = self.payload.get(off..off + 4)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    /// The queue a vring message is about (vring state/address: u32 index; kick, call, err:
    /// the low 8 bits of a u64).
    pub fn queue(&self) -> Option<u32> {
        match self.request {
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => self.u64_at(0).map(|v| (v & 0xff) as u32),
            _ => self.u32_at(0),
        }
    }

    /// A copy for sending again, without the flag asking for an ack.
    pub fn replayed(&self) -> io::Result<Message> {
        let fds = self.fds.iter().map(|f| f.try_clone()).collect::<io::Result<_>>()?;
        Ok(Message { request: self.request, flags: self.flags & !FLAG_NEED_REPLY, payload: self.payload.clone(), fds })
    }
}

/// Whether the backend answers `msg`: GET requests always; others when they ask for an ack
/// and REPLY_ACK was negotiated (`reply_ack`).
pub fn expects_reply(msg: &Message, reply_ack: bool) -> bool {
    matches!(
        msg.request,
        req::GET_FEATURES
            | req::GET_PROTOCOL_FEATURES
            | req::GET_VRING_BASE
            | req::GET_QUEUE_NUM
            | req::GET_INFLIGHT_FD
            | req::GET_MAX_MEM_SLOTS
            | req::SET_LOG_BASE
            | req::SET_DEVICE_STATE_FD
            | req::CHECK_DEVICE_STATE
    ) || (reply_ack && msg.need_reply())
}

/// Reads one message, or None if the peer hung up between messages.
pub fn recv(sock: &UnixStream) -> Result<Option<Message>, RelayError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_SIZE];
    if !recv_exact(sock, &mut header, &mut fds, true)? {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if flags & VERSION_MASK != VERSION || flags & !(VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY) != 0 {
        return Err(RelayError::BadHeader { flags });
    }
    if size as usize > MAX_PAYLOAD {
        return Err(RelayError::TooLarge(size));
    }
    let mut payload = vec![0u8; size as usize];
    if !payload.is_empty() && !recv_exact(sock, &mut payload, &mut fds, false)? {
        return Err(RelayError::Truncated);
    }
    Ok(Some(Message { request, flags, payload, fds }))
}

/// Fills `buf`, collecting fds that come along (at most [`MAX_FDS`] in all). False if the
/// peer hung up before the first byte and `eof_ok`.
fn recv_exact(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>, eof_ok: bool) -> Result<bool, RelayError> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_some(sock, &mut buf[got..], fds)?;
        if n == 0 {
            return if got == 0 && eof_ok { Ok(false) } else { Err(RelayError::Truncated) };
        }
        got += n;
    }
    Ok(true)
}

const CMSG_SPACE: usize = 512;

fn recv_some(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, RelayError> {
    let mut cmsg = [0u64; CMSG_SPACE / 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `cmsg`, both live for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    };
    // Take ownership of every fd received before judging, so none leaks.
    let mut too_many = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: the CMSG_* walk stays within msg_control/msg_controllen as the kernel set them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    too_many |= fds.len() > MAX_FDS;
    if too_many {
        return Err(RelayError::TooManyFds);
    }
    Ok(n)
}

/// Sends `msg` with its fds.
pub fn send(sock: &UnixStream, msg: &Message) -> Result<(), RelayError> {
    if msg.payload.len() > MAX_PAYLOAD {
        return Err(RelayError::TooLarge(msg.payload.len() as u32));
    }
    if msg.fds.len() > MAX_FDS {
        return Err(RelayError::TooManyFds);
    }
    let mut header = [0u8; HEADER_SIZE];
    header[..4].copy_from_slice(&msg.request.to_le_bytes());
    header[4..8].copy_from_slice(&msg.flags.to_le_bytes());
    header[8..].copy_from_slice(&(msg.payload.len() as u32).to_le_bytes());
    let mut bytes = Vec::with_capacity(HEADER_SIZE + msg.payload.len());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(&msg.payload);
    let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(|f| f.as_fd()).collect();
    let mut sent = send_some(sock, &bytes, &fds)?;
    while sent < bytes.len() {
        // The fds went with the first bytes.
        sent += send_some(sock, &bytes[sent..], &[])?;
    }
    Ok(())
}

fn send_some(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<usize, RelayError> {
    let iov = [IoSlice::new(bytes)];
    let mut cmsg = [0u64; CMSG_SPACE / 8];
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = (fds.len() * size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE of at most MAX_FDS fds fits `cmsg` (512 bytes); the header and
        // data are written inside it.
        unsafe {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(data_len) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as _;
            let data = libc::CMSG_DATA(c) as *mut RawFd;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` and `cmsg`, both live for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

/// What a recorded message stands for: a later message with the same key replaces it in
/// place (keeping the order QEMU first set things in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Owner,
    Features,
    ProtocolFeatures,
    MemTable,
    /// ADD_MEM_REG: guest physical address and size.
    MemRegion(u64, u64),
    Inflight,
    Vring(u32, u32),
    /// SET_LOG_BASE: a migration's dirty log, which a worker started meanwhile must keep.
    LogBase,
}

/// Most messages kept: owner, features, a memory table or its regions, and 7 per queue.
const MAX_RECORDED: usize = 1024;

/// The messages that bring a fresh worker to the device's current state, in order.
#[derive(Debug, Default)]
pub struct Recorded {
    msgs: Vec<(Key, Message)>,
    features: u64,
    protocol_features: u64,
}

impl Recorded {
    /// REPLY_ACK is in force (the backend acks messages that ask for it).
    pub fn reply_ack(&self) -> bool {
        self.features & F_PROTOCOL_FEATURES != 0 && self.protocol_features & PF_REPLY_ACK != 0
    }

    pub fn has_inflight(&self) -> bool {
        self.msgs.iter().any(|(k, _)| *k == Key::Inflight)
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// The messages to replay, in order.
    pub fn messages(&self) -> impl Iterator<Item = &Message> {
        self.msgs.iter().map(|(_, m)| m)
    }

    fn put(&mut self, key: Key, msg: Message) -> Result<(), RelayError> {
        if let Some(slot) = self.msgs.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = msg;
            return Ok(());
        }
        if self.msgs.len() >= MAX_RECORDED {
            return Err(RelayError::TooMuchState);
        }
        self.msgs.push((key, msg));
        Ok(())
    }

    /// Records `msg`, which the worker has taken (and acked, if it was asked to).
    pub fn apply(&mut self, msg: Message) -> Result<(), RelayError> {
        let invalid = |what| RelayError::Invalid { request: msg.request, what };
        match msg.request {
            req::SET_OWNER => self.put(Key::Owner, msg),
            req::SET_FEATURES => {
                self.features = msg.u64_at(0).ok_or_else(|| invalid("short payload"))?;
                self.put(Key::Features, msg)
            }
            req::SET_PROTOCOL_FEATURES => {
                self.protocol_features = msg.u64_at(0).ok_or_else(|| invalid("short payload"))?;
                self.put(Key::ProtocolFeatures, msg)
            }
            req::SET_MEM_TABLE => {
                self.msgs.retain(|(k, _)| !matches!(k, Key::MemTable | Key::MemRegion(..)));
                self.put(Key::MemTable, msg)
            }
            req::ADD_MEM_REG | req::REM_MEM_REG => {
                // u64 padding, then guest_phys_addr, memory_size, userspace_addr, mmap_offset.
                let gpa = msg.u64_at(8).ok_or_else(|| invalid("short payload"))?;
                let size = msg.u64_at(16).ok_or_else(|| invalid("short payload"))?;
                self.msgs.retain(|(k, _)| *k != Key::MemRegion(gpa, size));
                if msg.request == req::ADD_MEM_REG {
                    self.put(Key::MemRegion(gpa, size), msg)
                } else {
                    Ok(())
                }
            }
            req::SET_INFLIGHT_FD => self.put(Key::Inflight, msg),
            req::SET_LOG_BASE => self.put(Key::LogBase, msg),
            req::SET_VRING_NUM
            | req::SET_VRING_ADDR
            | req::SET_VRING_BASE
            | req::SET_VRING_KICK
            | req::SET_VRING_CALL
            | req::SET_VRING_ERR
            | req::SET_VRING_ENABLE => {
                let q = msg.queue().ok_or_else(|| invalid("short payload"))?;
                self.put(Key::Vring(msg.request, q), msg)
            }
            req::GET_VRING_BASE => {
                // The ring stopped: a fresh worker must not start it. The inflight area goes
                // too: the ring starts afresh (a new area is made at the next start), and
                // marks of the stopped ring must never be resubmitted into a new one.
                let q = msg.queue().ok_or_else(|| invalid("short payload"))?;
                self.msgs.retain(|(k, _)| !matches!(k, Key::Vring(_, vq) if *vq == q) && *k != Key::Inflight);
                Ok(())
            }
            req::RESET_OWNER | req::RESET_DEVICE => {
                *self = Recorded::default();
                Ok(())
            }
            // GET_* and the rest change nothing a fresh worker needs.
            _ => Ok(()),
        }
    }
}

impl Recorded {
    /// Appends the record to `out` for a successor supervisor (an upgrade re-executes it);
    /// the fds stay open across execve and are written as their numbers, kept in `fds`.
    pub fn encode(&self, out: &mut Vec<u8>, fds: &mut Vec<RawFd>) {
        out.extend_from_slice(&self.features.to_le_bytes());
        out.extend_from_slice(&self.protocol_features.to_le_bytes());
        out.extend_from_slice(&(self.msgs.len() as u32).to_le_bytes());
        for (key, m) in &self.msgs {
            let (tag, a, b) = match *key {
                Key::Owner => (0u8, 0, 0),
                Key::Features => (1, 0, 0),
                Key::ProtocolFeatures => (2, 0, 0),
                Key::MemTable => (3, 0, 0),
                Key::MemRegion(gpa, size) => (4, gpa, size),
                Key::Inflight => (5, 0, 0),
                Key::Vring(request, q) => (6, u64::from(request), u64::from(q)),
                Key::LogBase => (7, 0, 0),
            };
            out.push(tag);
            for v in [a, b] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for v in [m.request, m.flags, m.payload.len() as u32, m.fds.len() as u32] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&m.payload);
            for f in &m.fds {
                out.extend_from_slice(&f.as_raw_fd().to_le_bytes());
                fds.push(f.as_raw_fd());
            }
        }
    }

    /// The record `encode` wrote, taking its fds with `take_fd`. None if the bytes are not
    /// one (every length bounded as a message's).
    pub fn decode(b: &mut &[u8], take_fd: &mut dyn FnMut(RawFd) -> Option<OwnedFd>) -> Option<Recorded> {
        fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
            let (head, rest) = b.split_first_chunk::<N>()?;
            *b = rest;
            Some(*head)
        }
        let u32_ = |b: &mut &[u8]| take::<4>(b).map(u32::from_le_bytes);
        let u64_ = |b: &mut &[u8]| take::<8>(b).map(u64::from_le_bytes);
        let mut r = Recorded { features: u64_(b)?, protocol_features: u64_(b)?, msgs: Vec::new() };
        let count = u32_(b)? as usize;
        if count > MAX_RECORDED {
            return None;
        }
        for _ in 0..count {
            let tag = take::<1>(b)?[0];
            let (a, c) = (u64_(b)?, u64_(b)?);
            let key = match tag {
                0 => Key::Owner,
                1 => Key::Features,
                2 => Key::ProtocolFeatures,
                3 => Key::MemTable,
                4 => Key::MemRegion(a, c),
                5 => Key::Inflight,
                6 => Key::Vring(u32::try_from(a).ok()?, u32::try_from(c).ok()?),
                7 => Key::LogBase,
                _ => return None,
            };
            let (request, flags, len, nfds) = (u32_(b)?, u32_(b)?, u32_(b)? as usize, u32_(b)? as usize);
            if len > MAX_PAYLOAD || nfds > MAX_FDS || b.len() < len {
                return None;
            }
            let (payload, rest) = b.split_at(len);
            let payload = payload.to_vec();
            *b = rest;
            let mut fds = Vec::with_capacity(nfds);
            for _ in 0..nfds {
                fds.push(take_fd(u32_(b)? as RawFd)?);
            }
            r.msgs.push((key, Message { request, flags, payload, fds }));
        }
        Some(r)
    }
}

/// Checks a request from QEMU before it is relayed: only what the relay understands.
pub fn check_request(msg: &Message) -> Result<(), RelayError> {
    if msg.is_reply() {
        return Err(RelayError::BadHeader { flags: msg.flags });
    }
    let fds_allowed = match msg.request {
        req::GET_FEATURES
        | req::SET_FEATURES
        | req::SET_OWNER
        | req::RESET_OWNER
        | req::RESET_DEVICE
        | req::GET_PROTOCOL_FEATURES
        | req::SET_PROTOCOL_FEATURES
        | req::GET_QUEUE_NUM
        | req::GET_MAX_MEM_SLOTS
        | req::SET_VRING_NUM
        | req::SET_VRING_ADDR
        | req::SET_VRING_BASE
        | req::GET_VRING_BASE
        | req::SET_VRING_ENABLE
        | req::CHECK_DEVICE_STATE => 0,
        req::SET_VRING_KICK
        | req::SET_VRING_CALL
        | req::SET_VRING_ERR
        | req::ADD_MEM_REG
        | req::REM_MEM_REG
        | req::SET_LOG_BASE
        | req::SET_DEVICE_STATE_FD => 1,
        req::SET_MEM_TABLE => 8,
        other => return Err(RelayError::Refused(other)),
    };
    if msg.fds.len() > fds_allowed {
        return Err(RelayError::TooManyFds);
    }
    if msg.request == req::SET_PROTOCOL_FEATURES {
        let f = msg.u64_at(0).ok_or(RelayError::Invalid { request: msg.request, what: "short payload" })?;
        if f & !PF_RELAYED != 0 {
            return Err(RelayError::Invalid { request: msg.request, what: "protocol features not offered" });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().expect("socketpair")
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: plain flags; the returned fd is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn raw(sock: &mut UnixStream, request: u32, flags: u32, size: u32, payload: &[u8]) {
        let mut b = Vec::new();
        for w in [request, flags, size] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(payload);
        sock.write_all(&b).expect("write");
    }

    #[test]
    fn round_trip_with_fds() {
        let (a, b) = pair();
        let msg = Message::new(req::SET_VRING_KICK, 1u64.to_le_bytes().to_vec(), vec![eventfd()]);
        send(&a, &msg).expect("send");
        let got = recv(&b).expect("recv").expect("a message");
        assert_eq!(
            (got.request, got.flags, got.payload.clone(), got.fds.len()),
            (req::SET_VRING_KICK, 1, msg.payload, 1)
        );
        assert_eq!(got.queue(), Some(1));
        drop(a);
        assert!(recv(&b).expect("eof").is_none(), "hang-up between messages");
    }

    #[test]
    fn hostile_messages_are_errors() {
        let (mut a, b) = pair();
        raw(&mut a, req::GET_FEATURES, 1, MAX_PAYLOAD as u32 + 1, &[]);
        assert!(matches!(recv(&b), Err(RelayError::TooLarge(_))));
        let (mut a, b) = pair();
        raw(&mut a, req::GET_FEATURES, 2, 0, &[]);
        assert!(matches!(recv(&b), Err(RelayError::BadHeader { .. })));
        let (mut a, b) = pair();
        raw(&mut a, req::GET_FEATURES, 1 | 0x100, 0, &[]);
        assert!(matches!(recv(&b), Err(RelayError::BadHeader { .. })));
        let (mut a, b) = pair();
        raw(&mut a, req::SET_FEATURES, 1, 8, &[1, 2, 3]);
        drop(a);
        assert!(matches!(recv(&b), Err(RelayError::Truncated)));
        let (mut a, b) = pair();
        a.write_all(&[1, 0, 0]).expect("write");
        drop(a);
        assert!(matches!(recv(&b), Err(RelayError::Truncated)));
        // Too many fds: refused, and every one received is closed.
        let (a, b) = pair();
        let fds: Vec<OwnedFd> = (0..MAX_FDS + 1).map(|_| eventfd()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let mut b12 = vec![0u8; 12];
        b12[..4].copy_from_slice(&req::SET_MEM_TABLE.to_le_bytes());
        b12[4..8].copy_from_slice(&1u32.to_le_bytes());
        send_some(&a, &b12, &borrowed).expect("send");
        assert!(matches!(recv(&b), Err(RelayError::TooManyFds)));
    }

    #[test]
    fn requests_the_relay_does_not_understand_are_refused() {
        // SET_LOG_FD, SET_BACKEND_REQ_FD, the IOTLB and inflight requests (QEMU's inflight
        // area is the supervisor's own), postcopy, and nonsense.
        for request in [7, 21, 24, 25, 31, 32, 39, 40, 1000] {
            assert!(matches!(check_request(&Message::new(request, vec![], vec![])), Err(RelayError::Refused(_))));
        }
        let backend_req = Message::new(req::SET_PROTOCOL_FEATURES, (PF_MQ | (1 << 5)).to_le_bytes().to_vec(), vec![]);
        assert!(check_request(&backend_req).is_err(), "BACKEND_REQ is not relayed");
        // Migration: the dirty log and the device state pass, each with its one fd.
        let log = Message::new(req::SET_LOG_BASE, vec![0; 16], vec![eventfd()]);
        assert!(check_request(&log).is_ok() && expects_reply(&log, false), "SET_LOG_BASE is always answered");
        let two = Message::new(req::SET_DEVICE_STATE_FD, vec![0; 8], vec![eventfd(), eventfd()]);
        assert!(matches!(check_request(&two), Err(RelayError::TooManyFds)));
        let ok = Message::new(req::SET_PROTOCOL_FEATURES, PF_RELAYED.to_le_bytes().to_vec(), vec![]);
        assert!(check_request(&ok).is_ok());
        let fd_on_num = Message::new(req::SET_VRING_NUM, vec![0; 8], vec![eventfd()]);
        assert!(matches!(check_request(&fd_on_num), Err(RelayError::TooManyFds)));
        let mut reply = Message::new(req::GET_FEATURES, vec![], vec![]);
        reply.flags |= FLAG_REPLY;
        assert!(check_request(&reply).is_err());
    }

    fn vring(request: u32, q: u32, value: u32) -> Message {
        let mut p = q.to_le_bytes().to_vec();
        p.extend_from_slice(&value.to_le_bytes());
        Message::new(request, p, vec![])
    }

    /// The recorded requests, with the queue of vring messages.
    fn requests(r: &Recorded) -> Vec<(u32, Option<u32>)> {
        let vring = |m: &Message| matches!(m.request, req::SET_VRING_NUM..=req::SET_VRING_ERR | req::SET_VRING_ENABLE);
        r.messages().map(|m| (m.request, m.queue().filter(|_| vring(m)))).collect()
    }

    #[test]
    fn recorded_state_replaces_in_place_and_forgets_stopped_rings() {
        let mut r = Recorded::default();
        r.apply(Message::new(req::SET_OWNER, vec![], vec![])).expect("owner");
        r.apply(Message::new(req::SET_FEATURES, (F_PROTOCOL_FEATURES).to_le_bytes().to_vec(), vec![])).expect("f");
        assert!(!r.reply_ack());
        r.apply(Message::new(req::SET_PROTOCOL_FEATURES, PF_REPLY_ACK.to_le_bytes().to_vec(), vec![])).expect("pf");
        assert!(r.reply_ack());
        for q in 0..2 {
            r.apply(vring(req::SET_VRING_NUM, q, 256)).expect("num");
            r.apply(vring(req::SET_VRING_BASE, q, 0)).expect("base");
        }
        r.apply(Message::new(req::SET_INFLIGHT_FD, vec![0; 24], vec![eventfd()])).expect("inflight");
        r.apply(Message::new(req::SET_VRING_KICK, 1u64.to_le_bytes().to_vec(), vec![eventfd()])).expect("kick");
        r.apply(vring(req::SET_VRING_NUM, 0, 128)).expect("num again");
        assert_eq!(r.messages().filter(|m| m.request == req::SET_VRING_NUM).count(), 2, "replaced, not added");
        assert_eq!(r.messages().nth(3).and_then(|m| m.u32_at(4)), Some(128), "in place");
        assert!(r.has_inflight());
        r.apply(vring(req::GET_VRING_BASE, 1, 0)).expect("stop");
        assert_eq!(
            requests(&r),
            vec![
                (req::SET_OWNER, None),
                (req::SET_FEATURES, None),
                (req::SET_PROTOCOL_FEATURES, None),
                (req::SET_VRING_NUM, Some(0)),
                (req::SET_VRING_BASE, Some(0)),
            ]
        );
        assert!(!r.has_inflight(), "a stopped ring drops the area: the next start makes a new one");
        r.apply(Message::new(req::RESET_OWNER, vec![], vec![])).expect("reset");
        assert!(r.is_empty() && !r.reply_ack());
    }

    #[test]
    fn memory_regions_come_and_go() {
        let region = |request, gpa: u64| {
            let mut p = vec![0u8; 8];
            for v in [gpa, 4096u64, 0x7000_0000, 0] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            Message::new(request, p, vec![eventfd()])
        };
        let mut r = Recorded::default();
        r.apply(region(req::ADD_MEM_REG, 0)).expect("add");
        r.apply(region(req::ADD_MEM_REG, 1 << 30)).expect("add");
        r.apply(region(req::REM_MEM_REG, 0)).expect("rem");
        assert_eq!(r.messages().count(), 1);
        r.apply(Message::new(req::SET_MEM_TABLE, vec![0; 8], vec![eventfd()])).expect("table");
        assert_eq!(requests(&r), vec![(req::SET_MEM_TABLE, None)]);
        assert!(r.apply(Message::new(req::ADD_MEM_REG, vec![0; 3], vec![])).is_err(), "short payload");
    }

    #[test]
    fn recorded_state_is_bounded() {
        let mut r = Recorded::default();
        let mut err = None;
        for q in 0..=(MAX_RECORDED as u32) {
            if let Err(e) = r.apply(vring(req::SET_VRING_NUM, q, 8)) {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(RelayError::TooMuchState)));
    }

    #[test]
    fn the_record_round_trips_for_a_successor() {
        let mut r = Recorded::default();
        r.apply(Message::new(req::SET_OWNER, vec![], vec![])).expect("owner");
        r.apply(Message::new(req::SET_FEATURES, (F_PROTOCOL_FEATURES).to_le_bytes().to_vec(), vec![])).expect("f");
        r.apply(Message::new(req::SET_PROTOCOL_FEATURES, PF_REPLY_ACK.to_le_bytes().to_vec(), vec![])).expect("pf");
        r.apply(vring(req::SET_VRING_NUM, 1, 256)).expect("num");
        r.apply(Message::new(req::SET_VRING_KICK, 1u64.to_le_bytes().to_vec(), vec![eventfd()])).expect("kick");
        let mut out = Vec::new();
        let mut fds = Vec::new();
        r.encode(&mut out, &mut fds);
        assert_eq!(fds.len(), 1);
        // The successor takes the same fd numbers (here: duplicates standing in for them).
        let mut take = |fd: RawFd| {
            // SAFETY: `fd` is open (owned by `r`), borrowed only to duplicate it.
            unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok()
        };
        let back = Recorded::decode(&mut &out[..], &mut take).expect("decode");
        assert!(back.reply_ack());
        assert_eq!(requests(&back), requests(&r));
        assert_eq!(
            back.messages().map(|m| m.payload.clone()).collect::<Vec<_>>(),
            r.messages().map(|m| m.payload.clone()).collect::<Vec<_>>()
        );
        assert_eq!(back.messages().map(|m| m.fds.len()).sum::<usize>(), 1);
        // Truncated or out-of-bounds records are refused, not trusted.
        for cut in [1, 10, out.len() / 2, out.len() - 1] {
            assert!(Recorded::decode(&mut &out[..cut], &mut take).is_none(), "cut at {cut}");
        }
        let mut huge = out.clone();
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Recorded::decode(&mut &huge[..], &mut take).is_none());
    }

    #[test]
    fn replies() {
        let mut m = Message::new(req::SET_MEM_TABLE, vec![], vec![]);
        assert!(!expects_reply(&m, true));
        m.flags |= FLAG_NEED_REPLY;
        assert!(expects_reply(&m, true) && !expects_reply(&m, false));
        assert!(!expects_reply(&m.replayed().expect("dup"), true), "replayed without asking for acks");
        assert!(expects_reply(&Message::new(req::GET_VRING_BASE, vec![0; 8], vec![]), false));
    }
}
