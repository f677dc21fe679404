//! The one vhost-user device server: a socket, one frontend at a time, one
//! [`VhostUserBackend`] for every [`Device`].

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::Listener;
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::chain::{walk, walk_head};
use crate::inflight::{self, QueueInflight, Recovery};
use crate::queue::{exit_event, InFlight, QueueState, Queues, DEFAULT_POLL_MAX};
use crate::{Completer, Device, Error, GuestMem, Mem, Result, ServerStopper, Vring};

/// What every device server is configured with, whatever the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest virtqueue size the frontend may configure (power of two).
    pub queue_size: u16,
    /// Worker threads serving the queues (see [`Device::thread_masks`]).
    pub threads: usize,
    /// Offer VIRTIO_RING_F_EVENT_IDX (notification suppression).
    pub event_idx: bool,
    /// Longest adaptive poll of a queue that ran dry (zero: never poll): for that long at
    /// most the worker thread keeps looking at the ring instead of sleeping, as QEMU's
    /// iothreads do (poll-max-ns). The window adapts below this, so an idle queue costs
    /// nothing.
    pub poll_max: Duration,
    /// Longest wait, when the frontend stops a queue (GET_VRING_BASE, e.g. at a live
    /// migration's switch-over), for the chains in flight to complete; past it they are
    /// given up. Set it above the devices' own read timeout, which answers a parked read.
    pub stop_drain: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            queue_size: 1024,
            threads: 1,
            event_idx: true,
            poll_max: DEFAULT_POLL_MAX,
            stop_drain: Duration::from_secs(30),
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<()> {
        if !self.queue_size.is_power_of_two() {
            return Err(Error::Config("queue_size must be a power of two"));
        }
        if self.threads == 0 {
            return Err(Error::Config("threads must be at least 1"));
        }
        Ok(())
    }
}

/// Largest device state a frontend may send (SET_DEVICE_STATE_FD, load).
pub const MAX_DEVICE_STATE: u64 = 16 << 20;

/// A device state transfer under way: the thread copying it through the frontend's pipe,
/// which returns what it read when loading.
type Transfer = std::thread::JoinHandle<std::io::Result<Option<Vec<u8>>>>;

/// The vhost-user backend of one frontend connection: the device plus its queues.
struct Backend<D> {
    device: D,
    cfg: ServerConfig,
    mem: Mem,
    queues: Queues,
    transfer: std::sync::Mutex<Option<Transfer>>,
}

impl<D: Device> Backend<D> {
    /// Pops, walks and hands to the device every chain on queue `qidx`, then signals the
    /// guest once if any was completed inline. With inflight tracking, each chain is marked
    /// in flight as it is popped, and the first run after SET_INFLIGHT_FD first resubmits
    /// what a previous backend left in flight.
    fn process_queue(&self, vring: &Vring, qidx: usize) -> std::io::Result<()> {
        let Some(queue) = self.queues.get(qidx) else {
            return Ok(());
        };
        let event_idx = self.queues.event_idx();
        let max_request = self.device.max_request_len();
        let used_any = AtomicBool::new(false);
        let inflight = queue.inflight();
        // Draining (handing over to a successor): take nothing more from the ring.
        if queue.drain.draining.load(Ordering::Acquire) {
            return Ok(());
        }
        let resumed = match inflight.as_ref().filter(|_| queue.take_recover()) {
            Some(area) => self.resubmit(vring, qidx, queue, area, &used_any),
            None => false,
        };
        loop {
            let mem = self.mem.memory();
            let (chain, generation) = {
                let mut state = vring.get_mut();
                let generation = queue.generation.load(Ordering::Acquire);
                let queue_state = state.get_queue_mut();
                // Stopped (GET_VRING_BASE) while this batch ran: pop nothing more.
                let chain = if queue_state.ready() { queue_state.pop_descriptor_chain(&*mem) } else { None };
                if let (Some(chain), Some(area)) = (&chain, &inflight) {
                    area.popped(chain.head_index(), queue.next_counter());
                }
                // Counted under the vring lock, as the stop marks the queue not ready: a
                // stop either sees this chain in flight or finds nothing more popped.
                (chain.map(|c| (c, InFlight::new(queue))), generation)
            };
            let Some((chain, in_flight)) = chain else { break };
            let chain = walk(&mem, chain, max_request);
            drop(mem);
            let completer = Completer::new(
                vring.clone(),
                self.mem.clone(),
                in_flight,
                generation,
                event_idx,
                chain.head,
                &used_any,
            );
            self.device.process(qidx, chain, completer);
        }
        if resumed || used_any.load(Ordering::Relaxed) {
            // After a restart, always: the previous backend may have published its last
            // completion and died before signalling it, and EVENT_IDX's test counts only
            // entries this backend added. A spurious interrupt costs the guest one look.
            let needed = resumed || !event_idx || vring.needs_notification().unwrap_or(true);
            if needed {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }

    /// The queue starts on an inflight area: settles it against the used ring, moves the
    /// avail index past every chain popped before, and hands the chains still in flight to
    /// the device again, oldest first. Returns whether it resumed a started area, after
    /// which the guest must be signalled even if nothing is resubmitted (a crash may have
    /// lost the signal of a completion).
    fn resubmit(
        &self,
        vring: &Vring,
        qidx: usize,
        queue: &Arc<QueueState>,
        area: &Arc<QueueInflight>,
        used_any: &AtomicBool,
    ) -> bool {
        let mem = self.mem.memory();
        let (recovery, table, size, generation, in_flight) = {
            let mut state = vring.get_mut();
            let q = state.get_queue_mut();
            let used = q.used_idx(&*mem, Ordering::Acquire).ok().filter(|_| q.ready());
            let Some(used) = used.map(|u| u.0) else {
                queue.keep_recover();
                return false;
            };
            let recovery = area.recover(used, q.size());
            if let Recovery::Resume { next_avail, counter, .. } = &recovery {
                q.set_next_avail(*next_avail);
                q.set_next_used(used);
                queue.set_counter(*counter);
            }
            let in_flight: Vec<InFlight> = match &recovery {
                Recovery::Resume { heads, .. } => heads.iter().map(|_| InFlight::new(queue)).collect(),
                _ => Vec::new(),
            };
            (recovery, GuestAddress(q.desc_table()), q.size(), queue.generation.load(Ordering::Acquire), in_flight)
        };
        let Recovery::Resume { heads, next_avail, .. } = recovery else { return false };
        info!(queue = qidx, resubmitted = heads.len(), next_avail, "queue resumed from the inflight area");
        let max_request = self.device.max_request_len();
        for (head, in_flight) in heads.into_iter().zip(in_flight) {
            let chain = walk_head(&mem, table, size, head, max_request);
            let completer = Completer::new(
                vring.clone(),
                self.mem.clone(),
                in_flight,
                generation,
                self.queues.event_idx(),
                head,
                used_any,
            );
            self.device.process(qidx, chain, completer);
        }
        true
    }
}

impl<D: Device> VhostUserBackend for Backend<D> {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | self.device.features();
        if self.cfg.event_idx {
            f |= 1u64 << VIRTIO_RING_F_EVENT_IDX;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD: dirty-page logging for live migration, for every device: every write
        // into guest memory goes through a Completer, which marks it while logging is on.
        self.device.protocol_features() | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn acked_features(&self, features: u64) {
        let on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if on != self.queues.dirty_log() {
            info!(on, "dirty-page logging (VHOST_F_LOG_ALL)");
        }
        self.queues.set_dirty_log(on);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.get_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        self.device.set_config(offset, buf)
    }

    fn set_event_idx(&self, enabled: bool) {
        self.queues.set_event_idx(enabled);
    }

    fn update_memory(&self, _mem: Mem) -> std::io::Result<()> {
        // The same GuestMemoryAtomic we hold is updated in place by the handler.
        Ok(())
    }

    fn reset_device(&self) {
        self.queues.stop_all();
        self.device.reset();
    }

    fn get_inflight_fd(&self, req: &VhostUserInflight) -> std::io::Result<(VhostUserInflight, File)> {
        inflight::create(req, self.device.num_queues())
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> std::io::Result<()> {
        let areas = inflight::map(msg, &file, self.device.num_queues())?;
        info!(queues = areas.len(), queue_size = msg.queue_size, "inflight I/O tracking area set");
        for (q, area) in areas.into_iter().enumerate() {
            if let Some(state) = self.queues.get(q) {
                state.set_inflight(area);
            }
        }
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        mut file: File,
    ) -> std::io::Result<Option<File>> {
        use std::io::{Read, Write};
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "state transfer of a running device"));
        }
        // The copy runs after the answer (the frontend reads or writes the pipe only then),
        // on a thread of its own; CHECK_DEVICE_STATE waits for it.
        let transfer: Transfer = match direction {
            VhostTransferStateDirection::SAVE => {
                let state = self.device.save_state()?;
                info!(bytes = state.len(), "device state saved for a migration");
                std::thread::Builder::new().name("incfs-state-save".into()).spawn(move || {
                    file.write_all(&state)?;
                    Ok(None)
                })?
            }
            VhostTransferStateDirection::LOAD => {
                std::thread::Builder::new().name("incfs-state-load".into()).spawn(move || {
                    let mut state = Vec::new();
                    (&mut file).take(MAX_DEVICE_STATE + 1).read_to_end(&mut state)?;
                    if state.len() as u64 > MAX_DEVICE_STATE {
                        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "device state too large"));
                    }
                    Ok(Some(state))
                })?
            }
        };
        if let Some(old) = self.transfer.lock().unwrap_or_else(|e| e.into_inner()).replace(transfer) {
            // A transfer never checked: its result no longer matters.
            drop(old.join());
        }
        Ok(None)
    }

    fn check_device_state(&self) -> std::io::Result<()> {
        let Some(transfer) = self.transfer.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no device state transfer"));
        };
        let result = transfer.join().map_err(|_| std::io::Error::other("the state transfer thread panicked"))?;
        match result {
            Ok(Some(state)) => {
                self.device.load_state(&state)?;
                info!(bytes = state.len(), "device state loaded from a migration");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                warn!("device state transfer failed: {e}");
                Err(e)
            }
        }
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.queues.masks()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_event()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        let given_up = self.queues.stop(queue_index as usize, self.cfg.stop_drain);
        if given_up > 0 {
            warn!(queue = queue_index, given_up, "queue stopped with requests still in flight");
        }
        self.device.queue_stopped(queue_index as usize, self.queues.dirty_log());
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        self.queues.handle_event(device_event, evset, vrings, thread_id, &self.mem, |vring, qidx| {
            self.process_queue(vring, qidx)
        });
        Ok(())
    }
}

/// A vhost-user device server listening on a socket, serving one frontend at a time, each
/// with a fresh device from `new_device`.
pub struct DeviceServer<D: Device> {
    listener: Listener,
    cfg: ServerConfig,
    new_device: Box<dyn Fn() -> D + Send>,
    stopper: ServerStopper,
}

impl<D: Device> DeviceServer<D> {
    /// Binds `socket` (replacing a stale socket file there; the file is removed on drop).
    pub fn bind(socket: &Path, cfg: ServerConfig, new_device: impl Fn() -> D + Send + 'static) -> Result<Self> {
        let listener = Listener::new(socket, true)
            .map_err(|source| Error::Listen { path: socket.display().to_string(), source })?;
        Self::with_listener(listener, cfg, Box::new(new_device))
    }

    /// Serves on an already bound listener (socket activation, tests).
    pub fn from_listener(
        listener: UnixListener,
        cfg: ServerConfig,
        new_device: impl Fn() -> D + Send + 'static,
    ) -> Result<Self> {
        Self::with_listener(Listener::from(listener), cfg, Box::new(new_device))
    }

    fn with_listener(listener: Listener, cfg: ServerConfig, new_device: Box<dyn Fn() -> D + Send>) -> Result<Self> {
        cfg.validate()?;
        let stopper = ServerStopper::new().map_err(|source| Error::Io { context: "create the stop event", source })?;
        Ok(DeviceServer { listener, cfg, new_device, stopper })
    }

    /// A handle that stops the server from another thread.
    pub fn stopper(&self) -> ServerStopper {
        self.stopper.clone()
    }

    /// Waits for one frontend, serves it until it disconnects, and returns `Ok(true)`; call
    /// again to accept the next one (QEMU reconnecting, a new benchmark run). Returns
    /// `Ok(false)` once the server has been stopped.
    pub fn serve_one(&mut self) -> Result<bool> {
        let waiting = self
            .stopper
            .wait_for_frontend(self.listener.as_raw_fd())
            .map_err(|source| Error::Io { context: "wait for a frontend", source })?;
        if !waiting {
            return Ok(false);
        }
        let device = (self.new_device)();
        let listener = &mut self.listener;
        serve_connection(device, self.cfg, &self.stopper, |daemon| daemon.start(listener))
    }
}

/// Serves `device` on `stream`, a frontend connection that is already established (relayed
/// by the supervisor of `incfsd run`), until it hangs up or `stopper` stops it.
pub fn serve_stream<D: Device>(
    stream: UnixStream,
    device: D,
    cfg: ServerConfig,
    stopper: &ServerStopper,
) -> Result<()> {
    cfg.validate()?;
    serve_connection(device, cfg, stopper, |daemon| daemon.start_stream(stream)).map(|_| ())
}

/// Serves one frontend connection, set up by `connect`, with `device`.
fn serve_connection<D: Device>(
    device: D,
    cfg: ServerConfig,
    stopper: &ServerStopper,
    connect: impl FnOnce(&mut VhostUserDaemon<Arc<Backend<D>>>) -> vhost_user_backend::Result<()>,
) -> Result<bool> {
    let masks = device.thread_masks(cfg.threads);
    // Chains an earlier connection left parked stay counted until their completers are
    // dropped (they can no longer complete): an upgrade's drain waits for them too.
    let drain = stopper.drain_state();
    let queues = Queues::new(device.num_queues(), masks, cfg.poll_max, drain);
    let mem: Mem = GuestMemoryAtomic::new(GuestMem::new());
    let backend = Arc::new(Backend { device, cfg, mem: mem.clone(), queues, transfer: Default::default() });
    let mut daemon = VhostUserDaemon::new(D::NAME.to_string(), backend.clone(), mem)?;
    connect(&mut daemon)?;
    info!(device = D::NAME, "vhost-user frontend connected");
    stopper.set_connection(daemon.shutdown_handle());
    // A stop() that raced with the connection setup.
    if stopper.is_stopped() {
        daemon.request_shutdown();
    }
    let result = daemon.wait();
    stopper.set_connection(None);
    // Whatever is still parked must not complete into a ring that is gone.
    backend.queues.stop_all();
    backend.device.reset();
    // Dropping the daemon stops and joins its queue threads.
    drop(daemon);
    info!(device = D::NAME, "vhost-user frontend disconnected");
    match result {
        Ok(()) => Ok(true),
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Queue masks that spread queues `first..n` round-robin over at most `threads` worker
/// threads (never more threads than queues), queue `first` on thread 0.
pub fn round_robin(first: usize, n: usize, threads: usize) -> Vec<u64> {
    let threads = threads.min(n.saturating_sub(first)).max(1);
    let mut masks = vec![0u64; threads];
    for q in first..n.min(64) {
        masks[(q - first) % threads] |= 1 << q;
    }
    masks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_masks() {
        assert_eq!(round_robin(0, 3, 2), vec![0b101, 0b010]);
        assert_eq!(round_robin(0, 1, 4), vec![0b1]);
        assert_eq!(round_robin(1, 4, 2), vec![0b1010, 0b0100]);
    }
}
