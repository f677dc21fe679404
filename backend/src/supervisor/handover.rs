//! An upgrade re-executes the supervisor from the binary on disk without letting go of
//! QEMU's connection: its fds stay open across execve (close-on-exec cleared on exactly
//! those), and what it knows goes in a memfd named by `--supervisor-state FD`:
//!
//! ```text
//! magic "incfsSUP", version u32 (1)
//! fds (i32, -1 for none): listener, control socket, metrics, state region, QEMU connection,
//!     worker pidfd, worker control channel, worker connection; worker pid u32 (0: none)
//! the record (relay::Recorded::encode)
//! ```
//!
//! A successor that finds another version refuses to start; the old binary is gone by
//! then, so the format only ever grows with a new version that its successor also reads.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::relay::Recorded;

const MAGIC: &[u8; 8] = b"incfsSUP";
pub const VERSION: u32 = 1;
/// Most bytes of a handover (the record is bounded; this is far above it).
const MAX_BYTES: u64 = 64 << 20;
/// The argument that names the handover's fd.
pub const ARG: &str = "--supervisor-state";

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a supervisor handover, or a malformed one")]
    Malformed,
    #[error("supervisor handover version {0} is not known to this incfsd (it knows {VERSION})")]
    UnknownVersion(u32),
    #[error("fd {0} of the handover is not open or named twice")]
    BadFd(RawFd),
}

/// The worker as handed over.
pub struct BorrowedWorker {
    pub pid: u32,
    pub pidfd: RawFd,
    pub ctrl: RawFd,
    pub conn: Option<RawFd>,
}

/// What the supervisor hands over, by fd number.
pub struct Borrowed<'a> {
    pub listener: RawFd,
    pub ctl: RawFd,
    pub metrics: Option<RawFd>,
    pub state: RawFd,
    pub qemu: Option<RawFd>,
    pub worker: Option<BorrowedWorker>,
    pub recorded: &'a Recorded,
}

/// The worker as taken over.
pub struct TakenWorker {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub ctrl: UnixStream,
    pub conn: Option<UnixStream>,
}

/// What the successor takes over.
pub struct Taken {
    pub listener: UnixListener,
    pub ctl: UnixListener,
    pub metrics: Option<TcpListener>,
    pub state: OwnedFd,
    pub qemu: Option<UnixStream>,
    pub worker: Option<TakenWorker>,
    pub recorded: Recorded,
}

/// The handover's bytes, and every fd it names.
fn encode(h: &Borrowed<'_>) -> (Vec<u8>, Vec<RawFd>) {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let w = h.worker.as_ref();
    let fds = [
        Some(h.listener),
        Some(h.ctl),
        h.metrics,
        Some(h.state),
        h.qemu,
        w.map(|w| w.pidfd),
        w.map(|w| w.ctrl),
        w.and_then(|w| w.conn),
    ];
    for fd in fds {
        out.extend_from_slice(&fd.unwrap_or(-1).to_le_bytes());
    }
    out.extend_from_slice(&w.map_or(0, |w| w.pid).to_le_bytes());
    let mut named: Vec<RawFd> = fds.into_iter().flatten().collect();
    h.recorded.encode(&mut out, &mut named);
    (out, named)
}

/// Takes the handover's fds and record from `bytes`. `take_fd` owns a named fd (checking it).
fn decode(bytes: &[u8], take_fd: &mut dyn FnMut(RawFd) -> Option<OwnedFd>) -> Result<Taken, HandoverError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(HandoverError::Malformed)?;
    let (version, mut rest) = rest.split_first_chunk::<4>().ok_or(HandoverError::Malformed)?;
    let version = u32::from_le_bytes(*version);
    if version != VERSION {
        return Err(HandoverError::UnknownVersion(version));
    }
    let mut fd = |rest: &mut &[u8], required: bool| -> Result<Option<OwnedFd>, HandoverError> {
        let (n, r) = rest.split_first_chunk::<4>().ok_or(HandoverError::Malformed)?;
        *rest = r;
        match i32::from_le_bytes(*n) {
            -1 if !required => Ok(None),
            -1 => Err(HandoverError::Malformed),
            n => take_fd(n).map(Some).ok_or(HandoverError::BadFd(n)),
        }
    };
    let required = |f: Option<OwnedFd>| f.ok_or(HandoverError::Malformed);
    let listener = required(fd(&mut rest, true)?)?;
    let ctl = required(fd(&mut rest, true)?)?;
    let metrics = fd(&mut rest, false)?;
    let state = required(fd(&mut rest, true)?)?;
    let qemu = fd(&mut rest, false)?;
    let pidfd = fd(&mut rest, false)?;
    let ctrl = fd(&mut rest, false)?;
    let conn = fd(&mut rest, false)?;
    let (pid, mut rest) = rest.split_first_chunk::<4>().ok_or(HandoverError::Malformed)?;
    let pid = u32::from_le_bytes(*pid);
    let recorded = Recorded::decode(&mut rest, take_fd).ok_or(HandoverError::Malformed)?;
    if !rest.is_empty() {
        return Err(HandoverError::Malformed);
    }
    let worker = match (pid, pidfd, ctrl) {
        (0, None, None) => None,
        (pid, Some(pidfd), Some(ctrl)) if pid != 0 => {
            Some(TakenWorker { pid, pidfd, ctrl: ctrl.into(), conn: conn.map(UnixStream::from) })
        }
        _ => return Err(HandoverError::Malformed),
    };
    Ok(Taken {
        listener: listener.into(),
        ctl: ctl.into(),
        metrics: metrics.map(TcpListener::from),
        state,
        qemu: qemu.map(UnixStream::from),
        worker,
        recorded,
    })
}

fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd number with integer arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Re-executes `exe` with `args` and the handover: returns only on failure (then every fd
/// is close-on-exec again).
pub fn exec(exe: &Path, args: &[OsString], h: &Borrowed<'_>) -> io::Result<std::convert::Infallible> {
    let (bytes, fds) = encode(h);
    // SAFETY: a NUL-terminated name and plain flags; the returned fd is checked.
    let raw = unsafe { libc::memfd_create(c"incfs-supervisor-handover".as_ptr(), 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nothing else.
    let mut memfd = unsafe { File::from_raw_fd(raw) };
    memfd.write_all(&bytes)?;
    memfd.rewind()?;
    let restore = |fds: &[RawFd]| {
        for &fd in fds {
            let _ = set_cloexec(fd, true);
        }
    };
    for &fd in &fds {
        if let Err(e) = set_cloexec(fd, false) {
            restore(&fds);
            return Err(e);
        }
    }
    let mut cmd = Command::new(exe);
    cmd.args(args).arg(ARG).arg(raw.to_string());
    let err = cmd.exec();
    restore(&fds);
    Err(err)
}

/// Takes the handover in memfd `fd` (the successor, at start).
pub fn take(fd: RawFd) -> Result<Taken, HandoverError> {
    if fd < 3 {
        return Err(HandoverError::BadFd(fd));
    }
    // SAFETY: the previous supervisor passed this memfd to this process alone.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    (&mut file).take(MAX_BYTES).read_to_end(&mut bytes)?;
    let mut taken: Vec<RawFd> = vec![fd];
    let mut take_fd = |n: RawFd| -> Option<OwnedFd> {
        // Open, ours, and named once: then ours to own, and close-on-exec from now on.
        if n < 3 || taken.contains(&n) || set_cloexec(n, true).is_err() {
            return None;
        }
        taken.push(n);
        // SAFETY: an open fd the previous supervisor handed to this process, taken once.
        Some(unsafe { OwnedFd::from_raw_fd(n) })
    };
    decode(&bytes, &mut take_fd)
}

#[cfg(test)]
mod tests {
    use super::super::relay::{req, Message};
    use super::*;
    use std::os::fd::{AsRawFd, BorrowedFd};

    fn eventfd() -> OwnedFd {
        // SAFETY: plain flags; the returned fd is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn the_supervisors_state_round_trips() {
        let dir = tempfile::tempdir().expect("tmp");
        let listener = UnixListener::bind(dir.path().join("s")).expect("bind");
        let ctl = UnixListener::bind(dir.path().join("s.ctl")).expect("bind");
        let (qemu, _qemu_peer) = UnixStream::pair().expect("pair");
        let (ctrl, _ctrl_peer) = UnixStream::pair().expect("pair");
        let (state, pidfd) = (eventfd(), eventfd());
        let mut rec = Recorded::default();
        rec.apply(Message::new(req::SET_OWNER, vec![], vec![])).expect("owner");
        rec.apply(Message::new(req::SET_VRING_CALL, 0u64.to_le_bytes().to_vec(), vec![eventfd()])).expect("call");
        let h = Borrowed {
            listener: listener.as_raw_fd(),
            ctl: ctl.as_raw_fd(),
            metrics: None,
            state: state.as_raw_fd(),
            qemu: Some(qemu.as_raw_fd()),
            worker: Some(BorrowedWorker { pid: 4242, pidfd: pidfd.as_raw_fd(), ctrl: ctrl.as_raw_fd(), conn: None }),
            recorded: &rec,
        };
        let (bytes, fds) = encode(&h);
        assert_eq!(fds.len(), 7, "six fds and the record's one");
        // In one process the "successor" takes duplicates of the same fds.
        let mut dup = |n: RawFd| {
            // SAFETY: `n` is open (owned above), borrowed only to duplicate it.
            (n >= 0).then(|| unsafe { BorrowedFd::borrow_raw(n) }.try_clone_to_owned().ok()).flatten()
        };
        let t = decode(&bytes, &mut dup).expect("decode");
        assert!(t.qemu.is_some() && t.metrics.is_none());
        let w = t.worker.expect("worker");
        assert_eq!((w.pid, w.conn.is_none()), (4242, true));
        assert_eq!(t.recorded.messages().count(), 2);

        // Another version is refused; so is anything malformed.
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(decode(&other, &mut dup), Err(HandoverError::UnknownVersion(2))));
        for cut in [0, 7, 12, 20, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], &mut dup).is_err(), "cut at {cut}");
        }
        let mut no_listener = bytes.clone();
        no_listener[12..16].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(decode(&no_listener, &mut dup).is_err());
        // A closed fd is refused by the real taker.
        let mut closed = bytes.clone();
        closed[12..16].copy_from_slice(&9999i32.to_le_bytes());
        let mut checked = |n: RawFd| (set_cloexec(n, true).is_ok()).then(|| dup(n)).flatten();
        assert!(matches!(decode(&closed, &mut checked), Err(HandoverError::BadFd(9999))));
    }
}
