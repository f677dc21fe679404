//! The vhost-user-fs device: virtqueues in, FUSE dispatcher, replies out.
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1..=N carry requests. Each queue
//! belongs to one epoll worker thread of vhost-user-backend; with `threads` > 1 the request
//! queues are spread round-robin over the threads (the hiprio queue stays with thread 0).
//!
//! A request whose reply is ready is completed inline on the queue thread. A request whose
//! filesystem answer is pending is parked on the tokio runtime; when it resolves, the task
//! writes the reply and puts the chain on the used ring itself. Every completion happens
//! under the vring's lock and only if the queue is still the one the request came from
//! (same generation, still started): after GET_VRING_BASE or a device reset, stale replies
//! are dropped instead of being written into buffers the guest may have reused.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use thiserror::Error;
use tokio::runtime::Handle;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::abi::{InHeader, OutHeader};
use crate::dispatch::{Dispatcher, FuseConfig, Response};
use crate::filesystem::FileSystem;
pub use crate::server::ServerStopper;
use crate::server::{exit_event, QueueState, Queues, DEFAULT_POLL_MAX};
use incfs_buf::ScatterBuf;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Errors of the device.
#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid device configuration: {0}")]
    Config(&'static str),
    #[error("cannot listen on vhost-user socket {path}: {source}")]
    Listen { path: String, source: vhost::vhost_user::Error },
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    #[error("I/O: {0}")]
    Io(std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Device-level configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Number of request queues (not counting the hiprio queue). The guest uses at most
    /// what its `num-request-queues` says.
    pub request_queues: usize,
    /// Largest virtqueue size the frontend may configure (power of two).
    pub queue_size: u16,
    /// Number of worker threads handling queues (at most `request_queues`).
    pub threads: usize,
    /// Offer VIRTIO_RING_F_EVENT_IDX (notification suppression).
    pub event_idx: bool,
    /// FUSE limits offered at INIT.
    pub fuse: FuseConfig,
    /// Longest adaptive poll of a queue that ran dry (zero: never poll); see
    /// `incfs_fuse::server::QueuePoll`.
    pub poll_max: std::time::Duration,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            request_queues: 1,
            queue_size: 1024,
            threads: 1,
            event_idx: true,
            fuse: FuseConfig::default(),
            poll_max: DEFAULT_POLL_MAX,
        }
    }
}

impl DeviceConfig {
    fn validate(&self) -> Result<()> {
        // 63: the queue masks are u64 and queue 0 is hiprio.
        if self.request_queues == 0 || self.request_queues > 63 {
            return Err(Error::Config("request_queues must be 1..=63"));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(Error::Config("queue_size must be a power of two"));
        }
        if self.threads == 0 {
            return Err(Error::Config("threads must be at least 1"));
        }
        Ok(())
    }

    fn num_queues(&self) -> usize {
        self.request_queues + 1
    }

    /// Queue masks per worker thread: hiprio with thread 0, request queue q with thread
    /// (q - 1) % threads.
    fn thread_masks(&self) -> Vec<u64> {
        let threads = self.threads.min(self.request_queues).max(1);
        let mut masks = vec![0u64; threads];
        masks[0] |= 1;
        for q in 1..=self.request_queues {
            masks[(q - 1) % threads] |= 1 << q;
        }
        masks
    }
}

/// Validated layout of one descriptor chain.
struct Chain {
    head: u16,
    /// The readable part, copied out (bounded by `max_request_len`).
    request: Vec<u8>,
    /// The readable part was longer than allowed; `request` holds its start only.
    oversize: bool,
    /// Writable descriptors, each checked to lie inside guest memory.
    writable: Vec<(GuestAddress, usize)>,
}

#[derive(Debug)]
enum ChainError {
    ReadableAfterWritable,
    OutOfMemory,
    Read,
}

/// Walks a chain: readable descriptors first, then writable ones, all inside guest memory.
/// Copies at most `max_in` readable bytes.
fn parse_chain<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    max_in: usize,
) -> std::result::Result<Chain, (u16, ChainError)>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let head = chain.head_index();
    let mut request = Vec::new();
    let mut oversize = false;
    let mut writable = Vec::new();
    let mut out_capacity = 0usize;
    for desc in chain {
        let addr = desc.addr();
        let len = desc.len() as usize;
        if !GuestMemoryBackend::check_range(mem, addr, len) {
            return Err((head, ChainError::OutOfMemory));
        }
        if desc.is_write_only() {
            out_capacity = out_capacity.saturating_add(len);
            if len > 0 {
                writable.push((addr, len));
            }
        } else {
            if !writable.is_empty() || out_capacity > 0 {
                return Err((head, ChainError::ReadableAfterWritable));
            }
            let room = max_in.saturating_sub(request.len());
            let take = len.min(room);
            if take < len {
                oversize = true;
            }
            if take > 0 {
                let start = request.len();
                request.resize(start + take, 0);
                mem.read_slice(&mut request[start..], addr).map_err(|_| (head, ChainError::Read))?;
            }
        }
    }
    Ok(Chain { head, request, oversize, writable })
}

/// What a completion needs, cloneable into a tokio task.
#[derive(Clone)]
struct Completer {
    vring: VringRwLock,
    mem: Mem,
    queue: Arc<QueueState>,
    generation: u64,
    event_idx: bool,
}

impl Completer {
    /// Completes a chain: under the vring lock (so GET_VRING_BASE, which marks the queue not
    /// ready under the same lock, cannot interleave) and only if the queue is still the one
    /// the chain came from, `write` gets the writable descriptors as host memory and returns
    /// the reply's length, and the chain goes on the used ring (optionally signalled); or
    /// `None`, and the chain stays with the device (parked). Returns whether a used entry was
    /// added.
    fn complete(
        &self,
        head: u16,
        writable: &[(GuestAddress, usize)],
        write: impl FnOnce(&mut ScatterBuf<'_>) -> Option<u32>,
        signal: bool,
    ) -> bool {
        let mut state = self.vring.get_mut();
        if self.queue.generation.load(Ordering::Acquire) != self.generation || !state.get_queue().ready() {
            debug!(head, "dropping reply for a stopped queue");
            return false;
        }
        // The guard keeps these mappings alive until the write is done, whatever the
        // frontend does to the memory table meanwhile.
        let mem = self.mem.memory();
        let mut segs = Vec::with_capacity(writable.len());
        for &(addr, len) in writable {
            // A descriptor across two memory regions is several host ranges.
            for slice in mem.get_slices(addr, len) {
                let Ok(slice) = slice else {
                    warn!(head, "writable descriptor outside guest memory");
                    return false;
                };
                segs.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
            }
        }
        // SAFETY: parse_chain checked every descriptor lies in guest memory, get_slices
        // mapped each to host memory that `mem` keeps mapped for this scope, and the device
        // owns the descriptors until add_used. Guest descriptors could overlap each other;
        // that only garbles what this guest reads, never host memory.
        let mut buf = unsafe { ScatterBuf::new(segs) };
        let Some(len) = write(&mut buf) else { return false };
        if let Err(e) = state.add_used(head, len) {
            warn!(head, error = %e, "add_used failed");
            return false;
        }
        if signal {
            let needed = !self.event_idx || state.needs_notification().unwrap_or(true);
            if needed {
                if let Err(e) = state.signal_used_queue() {
                    warn!(error = %e, "cannot signal used queue");
                }
            }
        }
        true
    }
}

/// The vhost-user backend for one frontend connection.
struct FsBackend {
    dispatcher: Arc<Dispatcher>,
    cfg: DeviceConfig,
    rt: Handle,
    mem: Mem,
    queues: Queues,
}

impl FsBackend {
    fn new(fs: Arc<dyn FileSystem>, cfg: DeviceConfig, rt: Handle, mem: Mem) -> Self {
        let queues = Queues::new(cfg.num_queues(), cfg.thread_masks(), cfg.poll_max);
        FsBackend { dispatcher: Arc::new(Dispatcher::new(fs, cfg.fuse)), cfg, rt, mem, queues }
    }

    fn process_queue(&self, vring: &VringRwLock, qidx: usize) -> std::io::Result<()> {
        let Some(queue) = self.queues.get(qidx) else {
            return Ok(());
        };
        let event_idx = self.queues.event_idx();
        let max_in = self.cfg.fuse.max_request_len();
        let mut used_any = false;
        loop {
            let mem = self.mem.memory();
            let (chain, generation) = {
                let mut state = vring.get_mut();
                let generation = queue.generation.load(Ordering::Acquire);
                (state.get_queue_mut().pop_descriptor_chain(&*mem), generation)
            };
            let Some(chain) = chain else { break };
            let completer =
                Completer { vring: vring.clone(), mem: self.mem.clone(), queue: queue.clone(), generation, event_idx };
            let chain = match parse_chain(&mem, chain, max_in) {
                Ok(c) => c,
                Err((head, e)) => {
                    debug!(queue = qidx, head, error = ?e, "bad descriptor chain");
                    used_any |= completer.complete(head, &[], |_| Some(0), false);
                    continue;
                }
            };
            drop(mem);
            let Chain { head, request, oversize, writable, .. } = chain;
            let mut pending = None;
            // READ data goes from the filesystem straight into the guest's buffers.
            used_any |= completer.complete(
                head,
                &writable,
                |out| {
                    let response = if oversize {
                        oversize_response(&request, out)
                    } else {
                        self.dispatcher.dispatch(&request, out)
                    };
                    match response {
                        Response::None => Some(0),
                        Response::Done(n) => Some(n),
                        Response::Pending(fut) => {
                            pending = Some(fut);
                            None
                        }
                    }
                },
                false,
            );
            if let Some(fut) = pending {
                // Parked: the chain stays ours until the reply is written.
                self.rt.spawn(async move {
                    let write = fut.await;
                    completer.complete(head, &writable, |out| Some(write.map_or(0, |w| w(out).unwrap_or(0))), true);
                });
            }
        }
        if used_any {
            let needed = !event_idx || vring.needs_notification().unwrap_or(true);
            if needed {
                vring.signal_used_queue()?;
            }
        }
        Ok(())
    }
}

/// An EINVAL reply for a request whose readable part exceeds the limit, if its header is
/// readable and there is room.
fn oversize_response(start: &[u8], out: &mut ScatterBuf<'_>) -> Response {
    let Some((hdr, _)) = crate::abi::read_struct::<InHeader>(start) else {
        return Response::None;
    };
    debug!(unique = hdr.unique, "request larger than max_request_len");
    let reply = OutHeader { len: 16, error: -libc::EINVAL, unique: hdr.unique };
    match out.write(0, vm_memory::ByteValued::as_slice(&reply)) {
        Ok(()) => Response::Done(reply.len),
        // No room for even an out_header.
        Err(_) => Response::None,
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.cfg.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.cfg.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.cfg.event_idx {
            f |= 1u64 << VIRTIO_RING_F_EVENT_IDX;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Not CONFIG: QEMU 7.1..8.0 crash on it, and QEMU knows the tag itself.
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
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
        self.dispatcher.reset();
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.queues.masks()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        exit_event()
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        self.queues.stop(queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        self.queues.handle_event(device_event, evset, vrings, thread_id, &self.mem, |vring, qidx| {
            self.process_queue(vring, qidx)
        });
        Ok(())
    }
}

/// A vhost-user-fs server listening on a socket, serving one frontend at a time.
pub struct VirtioFsServer {
    listener: Listener,
    fs: Arc<dyn FileSystem>,
    cfg: DeviceConfig,
    rt: Handle,
    stopper: ServerStopper,
}

impl VirtioFsServer {
    /// Binds `socket` (replacing a stale socket file there; the file is removed on drop).
    pub fn bind(socket: &Path, fs: Arc<dyn FileSystem>, cfg: DeviceConfig, rt: Handle) -> Result<Self> {
        let listener = Listener::new(socket, true)
            .map_err(|source| Error::Listen { path: socket.display().to_string(), source })?;
        Self::with_listener(listener, fs, cfg, rt)
    }

    /// Serves on an already bound listener (socket activation, tests).
    pub fn from_listener(
        listener: UnixListener,
        fs: Arc<dyn FileSystem>,
        cfg: DeviceConfig,
        rt: Handle,
    ) -> Result<Self> {
        Self::with_listener(Listener::from(listener), fs, cfg, rt)
    }

    fn with_listener(listener: Listener, fs: Arc<dyn FileSystem>, cfg: DeviceConfig, rt: Handle) -> Result<Self> {
        cfg.validate()?;
        let stopper = ServerStopper::new().map_err(Error::Io)?;
        Ok(VirtioFsServer { listener, fs, cfg, rt, stopper })
    }

    /// A handle that stops the server from another thread.
    pub fn stopper(&self) -> ServerStopper {
        self.stopper.clone()
    }

    /// Blocks until a frontend connects or the server is stopped; true if one is waiting.
    fn wait_for_frontend(&self) -> Result<bool> {
        self.stopper.wait_for_frontend(self.listener.as_raw_fd()).map_err(Error::Io)
    }

    /// Waits for one frontend, serves it until it disconnects, and returns `Ok(true)`; call
    /// again to accept the next one (QEMU reconnecting, a new benchmark run). Returns
    /// `Ok(false)` once the server has been stopped.
    pub fn serve_one(&mut self) -> Result<bool> {
        if !self.wait_for_frontend()? {
            return Ok(false);
        }
        let mem: Mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(FsBackend::new(self.fs.clone(), self.cfg, self.rt.clone(), mem.clone()));
        let mut daemon = VhostUserDaemon::new("incfs-virtio-fs".to_string(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        daemon.start(&mut self.listener).map_err(|e| Error::Daemon(e.to_string()))?;
        info!("vhost-user frontend connected");
        self.stopper.set_connection(daemon.shutdown_handle());
        // A stop() that raced with the connection setup.
        if self.stopper.is_stopped() {
            daemon.request_shutdown();
        }
        let result = daemon.wait();
        self.stopper.set_connection(None);
        // Whatever is still parked must not complete into a ring that is gone.
        backend.queues.stop_all();
        backend.dispatcher.reset();
        // Dropping the daemon stops and joins its queue threads.
        drop(daemon);
        info!("vhost-user frontend disconnected");
        match result {
            Ok(()) => Ok(true),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => Ok(true),
            Err(e) => Err(Error::Daemon(e.to_string())),
        }
    }
}

/// Serves one frontend connection on `socket` and returns when it disconnects. To serve
/// frontends one after another on the same socket, use [`VirtioFsServer`].
pub fn serve(socket: &Path, fs: Arc<dyn FileSystem>, cfg: DeviceConfig, rt: Handle) -> Result<()> {
    VirtioFsServer::bind(socket, fs, cfg, rt)?.serve_one().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        let cfg = DeviceConfig { request_queues: 3, threads: 2, ..Default::default() };
        assert_eq!(cfg.thread_masks(), vec![0b1011, 0b0100]);
        let cfg = DeviceConfig { request_queues: 1, threads: 4, ..Default::default() };
        assert_eq!(cfg.thread_masks(), vec![0b11]);
    }
}
