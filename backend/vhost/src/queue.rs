//! Queues and their polling: per-queue generations that keep parked completions out of
//! stopped rings, which worker thread serves which queue, EVENT_IDX, and the drain loop with
//! its adaptive polling.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::inflight::QueueInflight;
use crate::stop::Drain;
use crate::Vring;

/// One queue's state shared by its worker thread and the tasks completing its requests.
pub(crate) struct QueueState {
    /// Bumped when the queue is stopped or the device reset, so a reply parked under an
    /// older generation is dropped instead of written into a ring that is gone.
    pub(crate) generation: AtomicU64,
    pub(crate) poll: QueuePoll,
    /// Inflight I/O tracking, once the frontend gave an area (SET_INFLIGHT_FD).
    inflight: Mutex<Option<Arc<QueueInflight>>>,
    /// Set with a new area: the chains it holds are resubmitted when the queue next runs.
    recover: AtomicBool,
    /// Counter of the next chain popped (inflight tracking).
    counter: AtomicU64,
    /// The frontend acked VHOST_F_LOG_ALL: what the backend writes into guest memory is
    /// marked in its dirty log (shared by all queues of the connection).
    dirty_log: Arc<AtomicBool>,
    /// Chains popped and not yet completed (nor given up by the device).
    in_flight: AtomicUsize,
    /// GET_VRING_BASE is waiting for the chains in flight: the queue is not ready any more,
    /// so nothing new is popped, but these may still complete.
    draining: AtomicBool,
    /// The server's count of chains taken and not answered, and whether to take more
    /// (an upgrade's hand-over drains the whole server).
    pub(crate) drain: Arc<Drain>,
}

/// One chain in flight on a queue, from its pop until its completer is dropped (completed,
/// or given up by the device): what GET_VRING_BASE waits for.
pub(crate) struct InFlight(Arc<QueueState>);

impl InFlight {
    pub(crate) fn new(queue: &Arc<QueueState>) -> Self {
        queue.in_flight.fetch_add(1, Ordering::AcqRel);
        queue.drain.outstanding.fetch_add(1, Ordering::AcqRel);
        InFlight(queue.clone())
    }

    pub(crate) fn queue(&self) -> &Arc<QueueState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        let _ = self.0.drain.outstanding.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

impl QueueState {
    fn new(poll_max: Duration, dirty_log: Arc<AtomicBool>, drain: Arc<Drain>) -> Self {
        QueueState {
            drain,
            generation: AtomicU64::new(0),
            poll: QueuePoll::new(poll_max),
            inflight: Mutex::new(None),
            recover: AtomicBool::new(false),
            counter: AtomicU64::new(0),
            dirty_log,
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// Whether a chain of this queue may still complete though the ring is not ready: the
    /// stop is waiting for it.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether guest memory the backend writes must be marked in the dirty log.
    pub(crate) fn dirty_log(&self) -> bool {
        self.dirty_log.load(Ordering::Acquire)
    }

    pub(crate) fn inflight(&self) -> Option<Arc<QueueInflight>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SET_INFLIGHT_FD: track this queue's chains in `area` from now on.
    pub(crate) fn set_inflight(&self, area: QueueInflight) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(area));
        self.recover.store(true, Ordering::Release);
    }

    /// Whether the queue must recover from its area before popping (once per area).
    pub(crate) fn take_recover(&self) -> bool {
        self.recover.swap(false, Ordering::AcqRel)
    }

    /// Recovery could not run yet (queue not ready): try again at the next kick.
    pub(crate) fn keep_recover(&self) {
        self.recover.store(true, Ordering::Release);
    }

    pub(crate) fn next_counter(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn set_counter(&self, next: u64) {
        self.counter.store(next, Ordering::Relaxed);
    }
}

/// Adaptive polling of a queue that ran dry, as QEMU's iothreads do (poll-max-ns): for a
/// while the worker thread keeps looking at the ring, notifications still off, instead of
/// sleeping. A request the guest adds meanwhile is picked up without its kick and our
/// wake-up, the two costliest steps of a round trip when the host is otherwise idle. The
/// window grows when the queue was woken soon after it slept and drops to nothing when it
/// slept longer than the maximum, so an idle queue, or one whose guest is slow anyway,
/// costs no CPU.
pub(crate) struct QueuePoll {
    max_ns: u64,
    cur_ns: AtomicU64,
    /// When the worker last went to sleep on this queue (ns since `epoch`), 0 if awake.
    slept_at: AtomicU64,
    epoch: Instant,
}

/// Default longest poll window. QEMU's iothreads default to 32 us, but their other side is
/// a vCPU of the same process; ours is a guest (or frontend) that must itself be woken to
/// send the next request, which took 50-100 us on the virtualized hosts measured
/// (docs/benchmarks.md). The window adapts below this, so an idle queue costs nothing.
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(100);

/// First window after a short sleep.
const POLL_START_NS: u64 = 4_000;

impl QueuePoll {
    pub(crate) fn new(max: Duration) -> Self {
        QueuePoll {
            max_ns: u64::try_from(max.as_nanos()).unwrap_or(u64::MAX),
            cur_ns: AtomicU64::new(0),
            slept_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// A kick woke the worker: size the next window by how long it slept.
    fn woke(&self) {
        let at = self.slept_at.swap(0, Ordering::Relaxed);
        if at == 0 || self.max_ns == 0 {
            return;
        }
        let slept = self.now_ns().saturating_sub(at);
        let cur = self.cur_ns.load(Ordering::Relaxed);
        let next = if slept <= self.max_ns { (cur * 2).clamp(POLL_START_NS, self.max_ns) } else { 0 };
        self.cur_ns.store(next, Ordering::Relaxed);
    }

    /// Looks for new work for up to the current window; true if some came. Gives up early
    /// when `elsewhere` reports work for another queue of the thread, which must not wait
    /// for this one's window.
    fn spin(&self, has_work: &impl Fn() -> bool, elsewhere: &impl Fn() -> bool) -> bool {
        let window = self.cur_ns.load(Ordering::Relaxed);
        if window == 0 {
            return false;
        }
        let end = self.now_ns().saturating_add(window);
        while self.now_ns() < end {
            if has_work() {
                return true;
            }
            if elsewhere() {
                return false;
            }
            std::hint::spin_loop();
        }
        false
    }

    fn sleeping(&self) {
        self.slept_at.store(self.now_ns(), Ordering::Relaxed);
    }
}

/// The queues of a device: their states, which worker thread serves which (one bit per
/// queue in each thread's mask), and whether EVENT_IDX was negotiated.
pub(crate) struct Queues {
    states: Vec<Arc<QueueState>>,
    masks: Vec<u64>,
    event_idx: AtomicBool,
    dirty_log: Arc<AtomicBool>,
}

impl Queues {
    /// `n` queues served by threads with these `masks`; `poll_max`: longest adaptive poll
    /// window (zero: never poll).
    pub(crate) fn new(n: usize, masks: Vec<u64>, poll_max: Duration, drain: Arc<Drain>) -> Self {
        let dirty_log = Arc::new(AtomicBool::new(false));
        Queues {
            states: (0..n).map(|_| Arc::new(QueueState::new(poll_max, dirty_log.clone(), drain.clone()))).collect(),
            masks,
            event_idx: AtomicBool::new(false),
            dirty_log,
        }
    }

    pub(crate) fn dirty_log(&self) -> bool {
        self.dirty_log.load(Ordering::Acquire)
    }

    /// SET_FEATURES with or without VHOST_F_LOG_ALL: logging starts or stops.
    pub(crate) fn set_dirty_log(&self, on: bool) {
        self.dirty_log.store(on, Ordering::Release);
    }

    pub(crate) fn get(&self, q: usize) -> Option<&Arc<QueueState>> {
        self.states.get(q)
    }

    /// For `VhostUserBackend::queues_per_thread`.
    pub(crate) fn masks(&self) -> Vec<u64> {
        self.masks.clone()
    }

    pub(crate) fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    pub(crate) fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Acquire)
    }

    /// VHOST_USER_GET_VRING_BASE stops queue `q` (already marked not ready, so nothing new
    /// is popped): first the chains in flight complete, for up to `drain`, since the ring
    /// state the frontend gets back (and hands to a migration's destination) counts them as
    /// taken; then whatever is still parked is invalidated. Returns how many were given up.
    pub(crate) fn stop(&self, q: usize, drain: Duration) -> usize {
        let Some(s) = self.states.get(q) else { return 0 };
        s.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + drain;
        let mut pause = Duration::from_micros(50);
        while s.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        let left = s.in_flight.load(Ordering::Acquire);
        s.draining.store(false, Ordering::Release);
        s.generation.fetch_add(1, Ordering::AcqRel);
        left
    }

    /// Invalidates everything parked (reset, disconnect).
    pub(crate) fn stop_all(&self) {
        for s in &self.states {
            s.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// `VhostUserBackend::handle_event` of a device: the kicked queue (the `device_event`-th
    /// of worker `thread_id`, whose vrings are `vrings`) is drained with
    /// `process(vring, global queue index)`.
    pub(crate) fn handle_event<M: GuestAddressSpace>(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
        mem: &M,
        mut process: impl FnMut(&Vring, usize) -> std::io::Result<()>,
    ) {
        if evset != EventSet::IN {
            return;
        }
        let local = usize::from(device_event);
        let (Some(vring), Some(qidx)) = (vrings.get(local), global_queue(&self.masks, thread_id, local)) else {
            return;
        };
        let Some(queue) = self.get(qidx) else { return };
        drain_queue(vring, vrings, self.event_idx(), qidx, queue, mem, || process(vring, qidx));
    }
}

/// Global index of the `local`-th queue of the worker thread whose queue mask is `mask`.
fn global_queue(masks: &[u64], thread_id: usize, local: usize) -> Option<usize> {
    let mask = *masks.get(thread_id)?;
    (0..64).filter(|q| mask & (1u64 << q) != 0).nth(local)
}

/// Runs `process` on a kicked queue. With EVENT_IDX, notifications are off while it runs, it
/// runs again if the guest added requests meanwhile, and before re-enabling notifications it
/// polls the ring for a while (see [`QueuePoll`]); `siblings` are all the vrings of the
/// worker thread, `vring` among them. Errors come from rings the guest placed
/// badly: logged, not returned, since an error would end the worker thread and every queue
/// it serves.
fn drain_queue<M>(
    vring: &Vring,
    siblings: &[Vring],
    event_idx: bool,
    qidx: usize,
    queue: &QueueState,
    mem: &M,
    mut process: impl FnMut() -> std::io::Result<()>,
) where
    M: GuestAddressSpace,
{
    if !event_idx {
        if let Err(e) = process() {
            debug!(queue = qidx, error = %e, "queue processing failed");
        }
        return;
    }
    queue.poll.woke();
    let pending = |v: &Vring| {
        let state = v.get_ref();
        let q = state.get_queue();
        q.ready() && q.avail_idx(&*mem.memory(), Ordering::Acquire).is_ok_and(|i| i.0 != q.next_avail())
    };
    let has_work = || pending(vring);
    // The other queues of this worker thread (`siblings` holds them all, `vring` included).
    let elsewhere = || siblings.iter().any(|v| !std::ptr::eq(v, vring) && pending(v));
    loop {
        if let Err(e) = vring.disable_notification() {
            debug!(queue = qidx, error = %e, "disable_notification failed");
        }
        if let Err(e) = process() {
            debug!(queue = qidx, error = %e, "queue processing failed");
        }
        if queue.poll.spin(&has_work, &elsewhere) {
            continue;
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
    queue.poll.sleeping();
}

/// The event a worker thread waits on to exit.
pub(crate) fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            warn!(error = %e, "cannot create exit event");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_window_grows_after_short_sleeps_and_drops_after_a_long_one() {
        let p = QueuePoll::new(Duration::from_secs(1));
        let window = || p.cur_ns.load(Ordering::Relaxed);
        let never = || false;
        assert!(!p.spin(&|| panic!("no window yet: never looks"), &never));
        let mut seen = Vec::new();
        for _ in 0..4 {
            p.sleeping();
            p.woke();
            seen.push(window());
        }
        assert_eq!(seen, [4_000, 8_000, 16_000, 32_000], "doubling from 4 us");
        assert!(p.spin(&|| true, &never), "work seen while polling");
        let t = Instant::now();
        assert!(!p.spin(&never, &never));
        assert!(t.elapsed() >= Duration::from_micros(32), "polled the whole window");
        assert!(!p.spin(&never, &|| true), "another queue has work: stop at once");
        // Asleep longer than the maximum: polling would have been wasted.
        let p = QueuePoll::new(Duration::from_micros(100));
        p.cur_ns.store(100_000, Ordering::Relaxed);
        p.sleeping();
        std::thread::sleep(Duration::from_millis(2));
        p.woke();
        assert_eq!(p.cur_ns.load(Ordering::Relaxed), 0);
        // A kick without a sleep recorded (the first one) changes nothing; no maximum, no polling.
        p.woke();
        assert_eq!(p.cur_ns.load(Ordering::Relaxed), 0);
        let off = QueuePoll::new(Duration::ZERO);
        off.sleeping();
        off.woke();
        assert_eq!(off.cur_ns.load(Ordering::Relaxed), 0);
    }
}
