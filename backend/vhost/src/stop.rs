//! Stopping a server from another thread (a signal handler task, a test): the connection
//! being served ends, and so does any wait for the next one.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Stops a server: disconnects the frontend being served and makes its `serve_one` return
/// `Ok(false)` from then on (also while it waits for a frontend).
#[derive(Clone)]
pub struct ServerStopper {
    inner: Arc<StopState>,
}

/// Requests taken from the rings and not yet answered, and whether new ones may be taken
/// (a worker handing over to its successor drains).
#[derive(Default)]
pub(crate) struct Drain {
    pub(crate) draining: AtomicBool,
    pub(crate) outstanding: AtomicUsize,
}

struct StopState {
    stopped: AtomicBool,
    drain: Arc<Drain>,
    /// Wakes a server waiting for a connection.
    event: EventFd,
    connection: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
}

impl ServerStopper {
    pub fn new() -> std::io::Result<Self> {
        Ok(ServerStopper {
            inner: Arc::new(StopState {
                stopped: AtomicBool::new(false),
                drain: Arc::new(Drain::default()),
                event: EventFd::new(EFD_NONBLOCK)?,
                connection: Mutex::new(None),
            }),
        })
    }

    /// Stops the server.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        if let Err(e) = self.inner.event.write(1) {
            warn!(error = %e, "cannot wake the server");
        }
        if let Ok(guard) = self.inner.connection.lock() {
            if let Some(h) = guard.as_ref() {
                h.shutdown();
            }
        }
    }

    /// Stops taking requests from the rings (the connection stays) and waits up to
    /// `timeout` for those taken to be answered. Returns how many are still unanswered: with
    /// inflight tracking, a successor resubmits them.
    pub fn drain(&self, timeout: Duration) -> usize {
        let d = &self.inner.drain;
        d.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        loop {
            let left = d.outstanding.load(Ordering::Acquire);
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub(crate) fn drain_state(&self) -> Arc<Drain> {
        self.inner.drain.clone()
    }

    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    /// The connection `stop` ends (None once it is over).
    pub(crate) fn set_connection(&self, handle: Option<vhost_user_backend::ShutdownHandle>) {
        if let Ok(mut slot) = self.inner.connection.lock() {
            *slot = handle;
        }
    }

    /// Blocks until `listener` has a frontend waiting (true) or the server is stopped (false).
    pub fn wait_for_frontend(&self, listener: RawFd) -> std::io::Result<bool> {
        let mut fds = [
            libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.inner.event.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        loop {
            if self.is_stopped() {
                return Ok(false);
            }
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if self.is_stopped() {
                return Ok(false);
            }
            if fds[0].revents != 0 {
                return Ok(true);
            }
        }
    }
}
