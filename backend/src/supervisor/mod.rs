//! The supervisor of `incfsd run`: owns the vhost-user socket and QEMU's connection, and
//! relays QEMU's control messages to a worker process (the same binary with `--worker-fds`)
//! that does everything else. When the worker dies, a new one is started and brought to the
//! device's state by replaying the recorded messages; the requests it had taken from the
//! rings are resubmitted from the inflight area, and its FUSE session is taken from the
//! state region ([`state`]). QEMU sees nothing but a pause. See docs/restart.md.
//!
//! The supervisor never maps guest memory nor touches a ring: kick and call eventfds, rings
//! and guest memory are the worker's alone, so the relay costs nothing per FUSE request. It
//! handles one QEMU message at a time, so at most one is outstanding when a worker dies; it
//! is sent again to the next worker.

mod handover;
pub mod relay;
pub mod state;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use relay::{expects_reply, req, Message, Recorded, RelayError, PF_INFLIGHT_SHMFD, PF_RELAYED};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// A worker that dies this soon after its start counts towards a crash loop.
const QUICK_DEATH: Duration = Duration::from_secs(1);
/// Quick deaths in a row after which the supervisor gives up.
const CRASH_LOOP: u32 = 5;
/// How long an old worker may take to drain and exit on an upgrade (it waits at most a
/// second for its requests).
const DRAIN_GRACE: Duration = Duration::from_secs(3);
/// How long a worker may take to exit once its connection is closed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("vhost-user relay")]
    Relay(#[from] RelayError),
    #[error("the worker failed to start ({0})")]
    WorkerFailed(ExitStatus),
    #[error("the worker died {0} times in a row within a second of its start; giving up")]
    CrashLoop(u32),
    #[error("inherited fd {fd} cannot be the vhost-user listener: {problem}")]
    InheritedFd { fd: RawFd, problem: String },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> SupervisorError {
    move |source| SupervisorError::Io { context, source }
}

type Result<T, E = SupervisorError> = std::result::Result<T, E>;

/// How the supervisor runs.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The binary workers are started from (resolved once at start).
    pub exe: PathBuf,
    /// The worker's command line (this process's, without the program name).
    pub worker_args: Vec<OsString>,
    pub socket: PathBuf,
    /// The socket was created by whoever started incfsd (libvirt's `--fd`): theirs to
    /// remove, not ours.
    pub socket_inherited: bool,
    /// Printed on stderr once the first worker is ready.
    pub ready_line: String,
    /// The metrics endpoint's address (`--metrics`): bound here, served by the workers.
    pub metrics: Option<std::net::SocketAddr>,
    /// When the user started the daemon (CLOCK_MONOTONIC ns), handed to the first worker
    /// (`--started-ns`) so that its time to ready counts from there; workers started later
    /// (after a crash, an upgrade) count from their own start.
    pub started_ns: Option<u64>,
    /// Queues of the device and their largest size (for the inflight area).
    pub num_queues: u16,
    pub queue_size: u16,
}

/// A running worker, its control channel, and its end of the relayed connection.
struct Worker {
    child: WorkerProcess,
    pidfd: OwnedFd,
    /// Hands the worker one frontend connection after another ([`req::CONNECT`]).
    ctrl: UnixStream,
    /// The frontend connection relayed to it, if any.
    conn: Option<UnixStream>,
    started: Instant,
}

/// A worker process, our child, by pid.
struct WorkerProcess {
    pid: u32,
}

impl WorkerProcess {
    fn id(&self) -> u32 {
        self.pid
    }

    fn kill(&self) -> io::Result<()> {
        // SAFETY: kill with the pid of our own child, not yet reaped.
        if unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self) -> io::Result<ExitStatus> {
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a live status int.
            let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
            if r >= 0 {
                return Ok(ExitStatus::from_raw(status));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The worker is gone (died, hung up, or answered nonsense): start another.
struct WorkerGone;

/// Runs the supervisor until SIGINT/SIGTERM (forwarded to the worker, whose exit ends it),
/// on `inherited` if given (a listening socket bound at `cfg.socket`, see
/// [`inherited_listener`]), else on a socket it binds at `cfg.socket`.
pub fn run(cfg: SupervisorConfig, inherited: Option<UnixListener>) -> Result<()> {
    // Whatever the supervisor restricts, the workers it starts inherit (seccomp, Landlock,
    // namespaces all survive execve), and a worker needs the network and the files its own
    // sandbox keeps until it locks itself. So the supervisor only gives up what no worker
    // needs either: gaining privileges through exec.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SupervisorError::Io { context: "set no_new_privs", source: io::Error::last_os_error() });
    }
    let ctl_path = control_socket(&cfg.socket);
    let stale: &[&PathBuf] = match inherited {
        Some(_) => &[&ctl_path],
        None => &[&cfg.socket, &ctl_path],
    };
    for path in stale {
        if path.exists() {
            // A stale socket of a previous run (as the vhost crate's listener does).
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = match inherited {
        Some(l) => l,
        None => UnixListener::bind(&cfg.socket).map_err(io_err("listen on the vhost-user socket"))?,
    };
    let ctl = UnixListener::bind(&ctl_path).map_err(io_err("listen on the control socket"))?;
    // Owner only: it replaces the worker.
    std::fs::set_permissions(&ctl_path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io_err("restrict the control socket"))?;
    let metrics = match cfg.metrics {
        Some(addr) => Some(std::net::TcpListener::bind(addr).map_err(io_err("listen for metrics"))?),
        None => None,
    };
    let state = state::StateRegion::create().map_err(|e| match e {
        state::StateError::Io(source) => SupervisorError::Io { context: "create the state region", source },
        other => SupervisorError::Io { context: "create the state region", source: io::Error::other(other) },
    })?;
    let mut sup = Supervisor::new(cfg, ctl, metrics, state)?;
    // Started before a frontend comes, so that a bad image or store fails `incfsd run` at once.
    let w = sup.start_worker(true)?;
    sup.worker = Some(w);
    eprintln!("{}", sup.cfg.ready_line);
    let result = sup.serve(&listener, None);
    sup.finish();
    result
}

/// Goes on as the supervisor a previous binary handed over to (`--supervisor-state FD`):
/// same socket, same QEMU connection, same worker.
pub fn resume(cfg: SupervisorConfig, handover_fd: RawFd) -> Result<()> {
    let h = handover::take(handover_fd).map_err(|e| SupervisorError::Io {
        context: "take over from the previous supervisor",
        source: io::Error::other(e),
    })?;
    let mut sup = Supervisor::new(cfg, h.ctl, h.metrics, h.state)?;
    sup.worker = h.worker.map(|w| Worker {
        child: WorkerProcess { pid: w.pid },
        pidfd: w.pidfd,
        ctrl: w.ctrl,
        conn: w.conn,
        started: Instant::now(),
    });
    tracing::info!(
        connected = h.qemu.is_some(),
        messages = h.recorded.messages().count(),
        "supervisor upgraded in place"
    );
    let resumed = h.qemu.map(|q| (q, h.recorded));
    let result = sup.serve(&h.listener, resumed);
    sup.finish();
    result
}

/// Takes fd `fd`, inherited from whoever started incfsd (libvirt's `--fd`, QEMU's "backend
/// program conventions"), as the vhost-user listener, after checking that it is one: an
/// open, listening Unix stream socket. Returns it with the path it is bound at (the control
/// socket goes beside it). It is made close-on-exec: workers must not hold it.
pub fn inherited_listener(fd: RawFd) -> Result<(UnixListener, PathBuf)> {
    let bad = |problem: String| SupervisorError::InheritedFd { fd, problem };
    let int_opt = |name: libc::c_int| -> Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt with a live int and its length; the result is checked.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, name, (&mut v as *mut libc::c_int).cast(), &mut len) };
        if r != 0 {
            return Err(bad(format!("not an open socket ({})", io::Error::last_os_error())));
        }
        Ok(v)
    };
    if fd < 0 {
        return Err(bad("not an fd".into()));
    }
    if int_opt(libc::SO_DOMAIN)? != libc::AF_UNIX || int_opt(libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err(bad("not a Unix stream socket".into()));
    }
    if int_opt(libc::SO_ACCEPTCONN)? == 0 {
        return Err(bad("a socket that does not listen".into()));
    }
    // SAFETY: sockaddr_un is plain data; getsockname fills at most `len` bytes of it.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: getsockname with a live sockaddr_un and its length; the result is checked.
    if unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) } != 0 {
        return Err(bad(format!("not an open socket ({})", io::Error::last_os_error())));
    }
    let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>()).min(addr.sun_path.len());
    let raw: Vec<u8> = addr.sun_path[..path_len].iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    // An unnamed or abstract socket (first byte 0) has no path for the control socket.
    if raw.is_empty() {
        return Err(bad("not bound to a path (the control socket goes beside it)".into()));
    }
    let path = PathBuf::from(<OsString as std::os::unix::ffi::OsStringExt>::from_vec(raw));
    // SAFETY: fcntl on a checked, open fd with integer arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(bad(format!("not an open socket ({})", io::Error::last_os_error())));
    }
    // SAFETY: an open listening socket this process inherited and nothing else owns: the
    // command line hands it to us, once.
    Ok((unsafe { UnixListener::from_raw_fd(fd) }, path))
}

/// The supervisor's control socket, beside the vhost-user socket: `incfsd upgrade` talks to
/// it.
pub fn control_socket(socket: &std::path::Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Longest request on the control socket.
const MAX_CONTROL_REQUEST: usize = 64;

struct Supervisor {
    cfg: SupervisorConfig,
    signals: UnixStream,
    /// SIGHUP: upgrade the worker.
    hup: UnixStream,
    /// The control socket (`incfsd upgrade`).
    ctl: UnixListener,
    /// The metrics listener, handed to every worker.
    metrics: Option<std::net::TcpListener>,
    quick_deaths: u32,
    worker: Option<Worker>,
    /// The state region of the current frontend connection.
    state_fd: Option<OwnedFd>,
    stopping: bool,
    /// The number of the last SIGTERM or SIGINT: a second one exits with 128 + it, as the
    /// daemon does (and a shell reports a process that signal killed).
    last_signal: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Waits until one of `fds` is readable (or hung up); returns which.
fn poll(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `p` is a live array of `p.len()` pollfds.
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(p.iter().map(|x| x.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open with a pid and no flags; the returned fd is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the live array; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two new fds owned by nothing else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// Lets a child inherit `fd` (its copy only: called between fork and exec).
fn inherit(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd number with integer arguments.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How waiting for or relaying a frontend ended.
enum Outcome {
    /// QEMU hung up.
    Hangup,
    /// SIGTERM/SIGINT: the worker has exited.
    Stopped,
    /// The worker was upgraded; now the supervisor re-executes itself.
    Reexec,
}

impl Supervisor {
    fn new(
        cfg: SupervisorConfig,
        ctl: UnixListener,
        metrics: Option<std::net::TcpListener>,
        state: OwnedFd,
    ) -> Result<Supervisor> {
        let (signals, signals_tx) = UnixStream::pair().map_err(io_err("create the signal pipe"))?;
        let last_signal = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for sig in [SIGTERM, SIGINT] {
            let tx = signals_tx.try_clone().map_err(io_err("create the signal pipe"))?;
            signal_hook::low_level::pipe::register(sig, tx).map_err(io_err("handle SIGTERM and SIGINT"))?;
            signal_hook::flag::register_usize(sig, last_signal.clone(), sig as usize)
                .map_err(io_err("handle SIGTERM and SIGINT"))?;
        }
        signals.set_nonblocking(true).map_err(io_err("create the signal pipe"))?;
        let (hup, hup_tx) = UnixStream::pair().map_err(io_err("create the signal pipe"))?;
        signal_hook::low_level::pipe::register(SIGHUP, hup_tx).map_err(io_err("handle SIGHUP"))?;
        hup.set_nonblocking(true).map_err(io_err("create the signal pipe"))?;
        Ok(Supervisor {
            cfg,
            signals,
            hup,
            ctl,
            metrics,
            quick_deaths: 0,
            worker: None,
            state_fd: Some(state),
            stopping: false,
            last_signal,
        })
    }

    /// At exit: the sockets' files go, the worker is ended.
    fn finish(&mut self) {
        if !self.cfg.socket_inherited {
            let _ = std::fs::remove_file(&self.cfg.socket);
        }
        let _ = std::fs::remove_file(control_socket(&self.cfg.socket));
        if let Some(w) = self.worker.take() {
            self.end_worker(w);
        }
    }

    /// Serves frontends one after another, starting with `resumed` (a connection and its
    /// record taken over from the previous supervisor binary).
    fn serve(&mut self, listener: &UnixListener, mut resumed: Option<(UnixStream, Recorded)>) -> Result<()> {
        loop {
            let (qemu, mut rec) = match resumed.take() {
                Some(r) => r,
                None => match self.accept(listener)? {
                    Ok(qemu) => {
                        tracing::info!("vhost-user frontend connected (relayed to the worker)");
                        if self.connect_worker().is_err() {
                            self.respawn(&Recorded::default(), true)?;
                        }
                        (qemu, Recorded::default())
                    }
                    Err(Outcome::Reexec) => {
                        self.reexec(listener, None, &Recorded::default());
                        continue;
                    }
                    Err(Outcome::Stopped) => return Ok(()),
                    Err(Outcome::Hangup) => continue,
                },
            };
            let served = self.relay_connection(&qemu, &mut rec);
            if let Ok(Outcome::Reexec) = served {
                self.reexec(listener, Some(&qemu), &rec);
                // Still here: the exec failed (logged); this binary relays on.
                resumed = Some((qemu, rec));
                continue;
            }
            drop(qemu);
            // The worker sees the hang-up, resets the device and waits for the next one.
            if let Some(w) = self.worker.as_mut() {
                w.conn = None;
            }
            match served {
                Ok(Outcome::Hangup) | Ok(Outcome::Reexec) => tracing::info!("frontend gone; waiting for the next one"),
                Ok(Outcome::Stopped) => return Ok(()),
                // A frontend that sent what the relay refuses loses its connection, not
                // the daemon: the next one is served.
                Err(SupervisorError::Relay(e)) => {
                    tracing::error!("frontend connection ended: {e}; waiting for the next one")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Re-executes this supervisor from the binary on disk, handing it everything over:
    /// the sockets, QEMU's connection, the worker and the record. Returns only if that
    /// failed (logged): this binary serves on.
    fn reexec(&mut self, listener: &UnixListener, qemu: Option<&UnixStream>, rec: &Recorded) {
        let (Some(state), Some(w)) = (self.state_fd.as_ref(), self.worker.as_ref()) else { return };
        let h = handover::Borrowed {
            listener: listener.as_raw_fd(),
            ctl: self.ctl.as_raw_fd(),
            metrics: self.metrics.as_ref().map(|m| m.as_raw_fd()),
            state: state.as_raw_fd(),
            qemu: qemu.map(|q| q.as_raw_fd()),
            worker: Some(handover::BorrowedWorker {
                pid: w.child.id(),
                pidfd: w.pidfd.as_raw_fd(),
                ctrl: w.ctrl.as_raw_fd(),
                conn: w.conn.as_ref().map(|c| c.as_raw_fd()),
            }),
            recorded: rec,
        };
        let err = match handover::exec(&self.cfg.exe, &self.cfg.worker_args, &h) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        tracing::error!("cannot re-execute the supervisor, the old one serves on: {err}");
    }

    /// Hands the worker its end of a new frontend connection.
    fn connect_worker(&mut self) -> Result<(), WorkerGone> {
        let w = self.worker.as_mut().ok_or(WorkerGone)?;
        let (conn, worker_conn) = UnixStream::pair().map_err(|_| WorkerGone)?;
        relay::send(&w.ctrl, &Message::new(req::CONNECT, Vec::new(), vec![OwnedFd::from(worker_conn)]))
            .map_err(|_| WorkerGone)?;
        w.conn = Some(conn);
        Ok(())
    }

    /// Starts a worker and waits until it is ready. `first`: the daemon's first start, where
    /// a failure ends `incfsd run` (later, a failure counts towards a crash loop).
    fn start_worker(&mut self, first: bool) -> Result<Worker> {
        loop {
            match self.spawn_worker() {
                Ok(w) => return Ok(w),
                Err(SupervisorError::WorkerFailed(status)) if !first && !self.stopping => {
                    tracing::error!(%status, "worker failed to start");
                    self.count_death(Duration::ZERO)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn_worker(&mut self) -> Result<Worker> {
        let (ctrl, worker_ctrl) = UnixStream::pair().map_err(io_err("create the worker's control channel"))?;
        let (mut ready, ready_tx) = pipe().map_err(io_err("create the ready pipe"))?;
        let state_fd = self.state_fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        let metrics_fd = self.metrics.as_ref().map_or(-1, |l| l.as_raw_fd());
        let fds = [worker_ctrl.as_raw_fd(), state_fd, ready_tx.as_fd().as_raw_fd(), metrics_fd];
        let mut cmd = Command::new(&self.cfg.exe);
        cmd.args(&self.cfg.worker_args).arg("--worker-fds").arg(format!("{},{},{},{}", fds[0], fds[1], fds[2], fds[3]));
        if let Some(ns) = self.cfg.started_ns.take() {
            cmd.arg("--started-ns").arg(ns.to_string());
        }
        // SAFETY: only async-signal-safe calls (fcntl, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in fds.into_iter().filter(|&fd| fd >= 0) {
                    inherit(fd)?;
                }
                // The worker must not outlive the supervisor: nothing could relay for it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // By pid, not std's Child: a supervisor re-executed for an upgrade keeps its worker.
        let child = WorkerProcess { pid: cmd.spawn().map_err(io_err("start the worker"))?.id() };
        drop((worker_ctrl, ready_tx));
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SupervisorError::Io { context: "watch the worker", source: e });
            }
        };
        tracing::info!(pid = child.id(), "worker started");
        // One byte once the worker serves; end of file if it exited first.
        let mut b = [0u8; 1];
        let n = loop {
            match ready.read(&mut b) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.unwrap_or(0),
            }
        };
        if n == 0 {
            let status = child.wait().map_err(io_err("wait for the worker"))?;
            return Err(SupervisorError::WorkerFailed(status));
        }
        Ok(Worker { child, pidfd, ctrl, conn: None, started: Instant::now() })
    }

    /// A worker died: counts it, gives up on a crash loop, backs off on quick deaths.
    fn count_death(&mut self, lived: Duration) -> Result<()> {
        if lived < QUICK_DEATH {
            self.quick_deaths += 1;
        } else {
            self.quick_deaths = 0;
        }
        if self.quick_deaths >= CRASH_LOOP {
            return Err(SupervisorError::CrashLoop(self.quick_deaths));
        }
        std::thread::sleep(Duration::from_millis(100) * self.quick_deaths);
        Ok(())
    }

    /// Closes the worker's channels and waits for it to exit (killed if it takes long).
    fn end_worker(&mut self, mut w: Worker) {
        drop((w.conn.take(), w.ctrl));
        let exited = poll(&[w.pidfd.as_raw_fd()], Some(EXIT_GRACE)).map(|r| r[0]).unwrap_or(false);
        if !exited {
            tracing::warn!(pid = w.child.id(), "worker did not exit; killing it");
            let _ = w.child.kill();
        }
        let _ = w.child.wait();
    }

    /// A signal arrived: forward it to the worker and wait for the worker to finish.
    fn stop(&mut self) {
        let mut buf = [0u8; 16];
        while matches!((&self.signals).read(&mut buf), Ok(n) if n > 0) {}
        tracing::info!("signal received, stopping");
        self.stopping = true;
        if let Some(w) = self.worker.take() {
            // SAFETY: kill with the pid of our own child, not yet reaped.
            unsafe { libc::kill(w.child.id() as libc::pid_t, libc::SIGTERM) };
            loop {
                let r =
                    poll(&[w.pidfd.as_raw_fd(), self.signals.as_raw_fd()], None).unwrap_or_else(|_| vec![true, false]);
                if r[0] {
                    break;
                }
                if r[1] {
                    eprintln!("incfsd: second signal, exiting without finishing the shutdown");
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    self.finish();
                    let sig = self.last_signal.load(std::sync::atomic::Ordering::Relaxed) as i32;
                    std::process::exit(128 + sig);
                }
            }
            let _ = w.child.wait();
        }
    }

    /// Waits for a frontend, keeping the idle worker alive: its connection, or how the wait
    /// ended.
    fn accept(&mut self, listener: &UnixListener) -> Result<Result<UnixStream, Outcome>> {
        loop {
            let pidfd = self.worker.as_ref().map_or(-1, |w| w.pidfd.as_raw_fd());
            let fds =
                [listener.as_raw_fd(), pidfd, self.signals.as_raw_fd(), self.ctl.as_raw_fd(), self.hup.as_raw_fd()];
            let r = poll(&fds, None).map_err(io_err("wait for a frontend"))?;
            if r[2] {
                self.stop();
                return Ok(Err(Outcome::Stopped));
            }
            if (r[3] || r[4]) && self.control(r[3], &Recorded::default(), false)? {
                return Ok(Err(Outcome::Reexec));
            }
            if r[1] {
                self.respawn(&Recorded::default(), false)?;
                continue;
            }
            if r[0] {
                let (s, _) = listener.accept().map_err(io_err("accept a frontend"))?;
                return Ok(Ok(s));
            }
        }
    }

    /// A request on the control socket (`from_socket`) or SIGHUP: upgrade the worker, and
    /// answer the request with the outcome. True when the worker was upgraded: the
    /// supervisor then re-executes itself from the binary on disk.
    fn control(&mut self, from_socket: bool, rec: &Recorded, connected: bool) -> Result<bool> {
        if !from_socket {
            let mut buf = [0u8; 16];
            while matches!((&self.hup).read(&mut buf), Ok(n) if n > 0) {}
            return Ok(match self.upgrade(rec, connected) {
                Ok(pid) => {
                    tracing::info!(pid, "SIGHUP: worker upgraded");
                    true
                }
                Err(e) => {
                    tracing::error!("SIGHUP: upgrade failed, the old worker serves on: {e}");
                    false
                }
            });
        }
        let Ok((mut client, _)) = self.ctl.accept() else { return Ok(false) };
        let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = Vec::new();
        let mut buf = [0u8; MAX_CONTROL_REQUEST];
        while req.len() < MAX_CONTROL_REQUEST && !req.contains(&b'\n') {
            match client.read(&mut buf[..MAX_CONTROL_REQUEST - req.len()]) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let (answer, upgraded) = match req.split(|&b| b == b'\n').next() {
            Some(b"upgrade") => match self.upgrade(rec, connected) {
                Ok(pid) => (format!("ok supervisor {} worker {pid}\n", std::process::id()), true),
                Err(e) => (format!("error: {e}; the old worker serves on\n"), false),
            },
            _ => ("error: unknown request (known: upgrade)\n".to_string(), false),
        };
        let _ = std::io::Write::write_all(&mut client, answer.as_bytes());
        Ok(upgraded)
    }

    /// Replaces the worker by one started from the binary on disk: the new one opens the
    /// image and cache first (warm); then the old one is stopped and the new one takes the
    /// connection and the recorded state, resubmitting what the old one left in flight. If
    /// the new one fails to start (or refuses the state region's version), the old one
    /// serves on. The new worker's pid.
    fn upgrade(&mut self, rec: &Recorded, connected: bool) -> Result<u32, String> {
        let new = self.spawn_worker().map_err(|e| e.to_string())?;
        let pid = new.child.id();
        if let Some(old) = self.worker.replace(new) {
            // Drained: it takes nothing more from the rings, answers what it took (up to a
            // second), and exits without a reset. What it could not answer stays marked in
            // the inflight area for the new worker; its FUSE session and handles stay in the
            // state region.
            // SAFETY: kill with the pid of our own child, not yet reaped.
            unsafe { libc::kill(old.child.id() as libc::pid_t, libc::SIGUSR1) };
            let exited = poll(&[old.pidfd.as_raw_fd()], Some(DRAIN_GRACE)).map(|r| r[0]).unwrap_or(false);
            if !exited {
                tracing::warn!(pid = old.child.id(), "old worker did not drain in time; killing it");
                let _ = old.child.kill();
            }
            let _ = old.child.wait();
        }
        if connected {
            match self.connect_worker().and_then(|()| self.replay(rec)) {
                Ok(()) => tracing::info!(pid, messages = rec.messages().count(), "upgraded worker took the device"),
                Err(WorkerGone) => self.respawn(rec, true).map_err(|e| e.to_string())?,
            }
        }
        Ok(self.worker.as_ref().map_or(pid, |w| w.child.id()))
    }

    /// Relays one frontend connection, recording its state in `rec`.
    fn relay_connection(&mut self, qemu: &UnixStream, rec: &mut Recorded) -> Result<Outcome> {
        loop {
            let pidfd = self.worker.as_ref().map_or(-1, |w| w.pidfd.as_raw_fd());
            let fds = [qemu.as_raw_fd(), pidfd, self.signals.as_raw_fd(), self.ctl.as_raw_fd(), self.hup.as_raw_fd()];
            let r = poll(&fds, None).map_err(io_err("wait for the frontend"))?;
            if r[2] {
                self.stop();
                return Ok(Outcome::Stopped);
            }
            if (r[3] || r[4]) && self.control(r[3], rec, true)? {
                return Ok(Outcome::Reexec);
            }
            if r[1] {
                self.respawn(rec, true)?;
                continue;
            }
            if r[0] {
                let Some(msg) = relay::recv(qemu)? else { return Ok(Outcome::Hangup) };
                self.relay_message(qemu, msg, rec)?;
            }
        }
    }

    /// Relays one message from QEMU and its reply, across worker deaths; records it.
    fn relay_message(&mut self, qemu: &UnixStream, mut msg: Message, rec: &mut Recorded) -> Result<()> {
        relay::check_request(&msg).inspect_err(|e| tracing::error!(request = msg.request, "refused: {e}"))?;
        if msg.request == req::SET_PROTOCOL_FEATURES {
            // The worker tracks requests in flight for its successor (the supervisor's
            // inflight area), whatever QEMU knows of it.
            let f = msg.u64_at(0).unwrap_or(0) | PF_INFLIGHT_SHMFD;
            msg.payload[..8].copy_from_slice(&f.to_le_bytes());
        }
        let reply_expected = expects_reply(&msg, rec.reply_ack());
        loop {
            if msg.request == req::SET_VRING_KICK && !rec.has_inflight() {
                match self.make_inflight() {
                    Ok(set) => rec.apply(set)?,
                    Err(WorkerGone) => {
                        self.respawn(rec, true)?;
                        continue;
                    }
                }
            }
            match self.exchange(&msg, reply_expected) {
                Ok(reply) => {
                    let mut acked = true;
                    if let Some(mut reply) = reply {
                        if msg.request == req::GET_PROTOCOL_FEATURES {
                            let f = reply.u64_at(0).unwrap_or(0) & PF_RELAYED;
                            if reply.payload.len() >= 8 {
                                reply.payload[..8].copy_from_slice(&f.to_le_bytes());
                            }
                        }
                        acked = !(msg.need_reply() && reply.u64_at(0).is_some_and(|v| v != 0));
                        relay::send(qemu, &reply)?;
                    }
                    if acked {
                        rec.apply(msg)?;
                    }
                    return Ok(());
                }
                Err(WorkerGone) => self.respawn(rec, true)?,
            }
        }
    }

    /// Sends `msg` to the worker and returns its reply if one is expected.
    fn exchange(&mut self, msg: &Message, reply_expected: bool) -> Result<Option<Message>, WorkerGone> {
        let w = self.worker.as_ref().ok_or(WorkerGone)?;
        let conn = w.conn.as_ref().ok_or(WorkerGone)?;
        relay::send(conn, msg).map_err(|_| WorkerGone)?;
        if !reply_expected {
            return Ok(None);
        }
        let r = poll(&[conn.as_raw_fd(), w.pidfd.as_raw_fd()], None).map_err(|_| WorkerGone)?;
        if !r[0] {
            return Err(WorkerGone);
        }
        match relay::recv(conn) {
            Ok(Some(reply)) if reply.is_reply() && reply.request == msg.request => Ok(Some(reply)),
            Ok(Some(reply)) => {
                tracing::error!("{}", RelayError::WrongReply { sent: msg.request, got: reply.request });
                Err(WorkerGone)
            }
            Ok(None) | Err(_) => Err(WorkerGone),
        }
    }

    /// QEMU's vhost-user-fs never asks for an inflight area, so the supervisor does, before
    /// the first ring starts: the worker makes it, and every later worker gets the same one.
    fn make_inflight(&mut self) -> Result<Message, WorkerGone> {
        let mut payload = vec![0u8; 24];
        payload[16..18].copy_from_slice(&self.cfg.num_queues.to_le_bytes());
        payload[18..20].copy_from_slice(&self.cfg.queue_size.to_le_bytes());
        let get = Message::new(req::GET_INFLIGHT_FD, payload, Vec::new());
        let reply = self.exchange(&get, true)?.ok_or(WorkerGone)?;
        if reply.payload.len() != 24 || reply.fds.len() != 1 {
            tracing::error!("the worker's inflight area reply is malformed");
            return Err(WorkerGone);
        }
        let set = Message::new(req::SET_INFLIGHT_FD, reply.payload, reply.fds);
        self.exchange(&set, false)?;
        tracing::info!("inflight area made for the worker");
        Ok(set)
    }

    /// The worker is gone: reaps it and starts another; with a frontend `connected`, hands
    /// it the connection and replays `rec` into it.
    fn respawn(&mut self, rec: &Recorded, connected: bool) -> Result<()> {
        loop {
            if let Some(w) = self.worker.take() {
                let _ = w.child.kill();
                let status = w.child.wait().ok();
                let signal = status.and_then(|s| s.signal());
                tracing::warn!(pid = w.child.id(), ?status, ?signal, "worker died; starting another");
                self.count_death(w.started.elapsed())?;
            }
            let w = self.start_worker(false)?;
            let started = w.started;
            self.worker = Some(w);
            if !connected {
                return Ok(());
            }
            match self.connect_worker().and_then(|()| self.replay(rec)) {
                Ok(()) => {
                    tracing::info!(messages = rec.messages().count(), "worker brought to the device state");
                    return Ok(());
                }
                Err(WorkerGone) => {
                    // Died during replay: counted at the top of the loop.
                    if let Some(w) = self.worker.as_mut() {
                        w.started = started;
                    }
                }
            }
        }
    }

    /// Sends every recorded message (without asking for acks), then a GET_FEATURES whose
    /// answer says the worker has taken them all.
    fn replay(&mut self, rec: &Recorded) -> Result<(), WorkerGone> {
        for m in rec.messages() {
            let m = m.replayed().map_err(|_| WorkerGone)?;
            // Without an ack asked for, only what is always answered (SET_LOG_BASE) is.
            let answered = expects_reply(&m, false);
            self.exchange(&m, answered)?;
        }
        self.exchange(&Message::new(req::GET_FEATURES, Vec::new(), Vec::new()), true)?;
        Ok(())
    }
}

/// The fds a worker was started with (`--worker-fds CTRL,STATE,READY`).
#[derive(Debug)]
pub struct WorkerFds {
    /// The supervisor's control channel: frontend connections come through it.
    pub ctrl: UnixStream,
    /// The state region.
    pub state: File,
    /// Written once when the worker serves.
    pub ready: File,
    /// The metrics listener (`--metrics`), bound once by the supervisor so that an old and a
    /// new worker can both hold it during an upgrade.
    pub metrics: Option<std::net::TcpListener>,
}

impl WorkerFds {
    /// Takes the fds named on the command line (CTRL,STATE,READY,METRICS; METRICS -1 for
    /// none). Only call once, at start: the fds are this process's from then on.
    pub fn take(spec: &str) -> io::Result<WorkerFds> {
        let fds: Vec<RawFd> = spec.split(',').map(|s| s.parse::<RawFd>()).collect::<Result<_, _>>().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "--worker-fds takes CTRL,STATE,READY,METRICS fd numbers")
        })?;
        let [conn, state, ready, metrics] = fds[..] else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "--worker-fds takes four fd numbers"));
        };
        for fd in [conn, state, ready].into_iter().chain((metrics != -1).then_some(metrics)) {
            // SAFETY: fcntl on an fd number: checks it is open, and keeps it from later children.
            if fd < 3 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("--worker-fds: fd {fd} is not open")));
            }
        }
        // SAFETY: the supervisor passed these open fds to this process alone.
        Ok(unsafe {
            WorkerFds {
                ctrl: UnixStream::from_raw_fd(conn),
                state: File::from_raw_fd(state),
                ready: File::from_raw_fd(ready),
                metrics: (metrics != -1).then(|| std::net::TcpListener::from_raw_fd(metrics)),
            }
        })
    }
}
