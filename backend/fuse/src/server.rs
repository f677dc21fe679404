//! What every vhost-user device server here shares: a stop handle that ends the connection
//! being served and any wait for the next one, from another thread; per-queue generations
//! that keep parked replies out of stopped rings; and the queue event loop.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Stops a server: disconnects the frontend being served and makes its `serve_one` return
/// `Ok(false)` from then on (also while it waits for a frontend).
#[derive(Clone)]
pub struct ServerStopper {
    inner: Arc<StopState>,
}

struct StopState {
    stopped: AtomicBool,
    /// Wakes a server waiting for a connection.
    event: EventFd,
    connection: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
}

impl ServerStopper {
    pub fn new() -> std::io::Result<Self> {
        Ok(ServerStopper {
            inner: Arc::new(StopState { stopped: AtomicBool::new(false), event: EventFd::new(EFD_NONBLOCK)?, connection: Mutex::new(None) }),
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

    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    /// The connection `stop` ends (None once it is over).
    pub fn set_connection(&self, handle: Option<vhost_user_backend::ShutdownHandle>) {
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

/// One queue's generation: bumped when the queue is stopped or the device reset, so a reply
/// parked under an older generation is dropped instead of written into a ring that is gone.
pub struct QueueState {
    pub generation: std::sync::atomic::AtomicU64,
}

/// The generations of every queue of a device.
pub struct Queues(Vec<Arc<QueueState>>);

impl Queues {
    pub fn new(n: usize) -> Self {
        Queues((0..n).map(|_| Arc::new(QueueState { generation: std::sync::atomic::AtomicU64::new(0) })).collect())
    }

    pub fn get(&self, q: usize) -> Option<&Arc<QueueState>> {
        self.0.get(q)
    }

    /// Invalidates what is parked on queue `q` (VHOST_USER_GET_VRING_BASE stops it).
    pub fn stop(&self, q: usize) {
        if let Some(s) = self.0.get(q) {
            s.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Invalidates everything parked (reset, disconnect).
    pub fn stop_all(&self) {
        for s in &self.0 {
            s.generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Global index of the `local`-th queue of the worker thread whose queue mask is `mask`.
pub fn global_queue(masks: &[u64], thread_id: usize, local: usize) -> Option<usize> {
    let mask = *masks.get(thread_id)?;
    (0..64).filter(|q| mask & (1u64 << q) != 0).nth(local)
}

/// Runs `process` on a kicked queue. With EVENT_IDX, notifications are off while it runs and
/// it runs again if the guest added requests meanwhile. Errors come from rings the guest
/// placed badly: logged, not returned, since an error would end the worker thread and every
/// queue it serves.
pub fn drain_queue(vring: &VringRwLock, event_idx: bool, qidx: usize, mut process: impl FnMut() -> std::io::Result<()>) {
    if !event_idx {
        if let Err(e) = process() {
            debug!(queue = qidx, error = %e, "queue processing failed");
        }
        return;
    }
    loop {
        if let Err(e) = vring.disable_notification() {
            debug!(queue = qidx, error = %e, "disable_notification failed");
        }
        if let Err(e) = process() {
            debug!(queue = qidx, error = %e, "queue processing failed");
        }
        match vring.enable_notification() {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                debug!(queue = qidx, error = %e, "enable_notification failed");
                break;
            }
        }
    }
}

/// The event a worker thread waits on to exit.
pub fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            warn!(error = %e, "cannot create exit event");
            None
        }
    }
}
