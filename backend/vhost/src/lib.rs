//! The vhost-user layer of incfsd, shared by its devices (virtio-fs, vhost-user-blk).
//!
//! - [`DeviceServer`]: a socket serving one frontend (QEMU) at a time, with the one
//!   `VhostUserBackend` implementation: features, config space, queues and their worker
//!   threads, EVENT_IDX, adaptive polling, reset and stop.
//! - [`Device`]: what a device adds: its queues, feature bits, config space, and what it does
//!   with a popped chain.
//! - [`Chain`]: a popped chain, walked and validated (readable then writable, all inside
//!   guest memory).
//! - [`Completer`]: completes a chain under the vring lock, inline on the queue thread or
//!   later from a task, writing bytes or filling the guest's buffers in place through a
//!   [`ScatterBuf`].
//! - [`ServerStopper`]: stops a server from another thread.
//!
//! A device answers a request inline when it can; otherwise it detaches the completer into
//! a tokio task, which completes the chain when the answer is there.

mod chain;
mod completion;
mod inflight;
mod queue;
mod server;
mod stop;

use std::io;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

pub use chain::{Chain, ChainError, Region};
pub use completion::Completer;
pub use incfs_buf::ScatterBuf;
pub use queue::DEFAULT_POLL_MAX;
pub use server::{round_robin, serve_stream, DeviceServer, ServerConfig};
pub use stop::ServerStopper;
pub use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// Guest memory as the vhost-user handler maps it: each region with the bitmap that marks
/// what the backend wrote in the frontend's dirty log (VHOST_USER_SET_LOG_BASE) while a
/// migration runs; without a log, nothing is marked.
type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;

/// Guest memory as the vhost-user handler maintains it.
type Mem = GuestMemoryAtomic<GuestMem>;

/// A virtqueue as the vhost-user handler keeps it.
type Vring = vhost_user_backend::VringRwLock<Mem>;

/// Errors of a device server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid device configuration: {0}")]
    Config(&'static str),
    #[error("cannot listen on vhost-user socket {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// Setting up or serving a frontend connection failed.
    #[error("vhost-user: cannot {context}: {source}")]
    VhostUser {
        context: &'static str,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot create the vhost-user handler: {0}")]
    Handler(#[source] vhost_user_backend::VhostUserHandlerError),
    /// The daemon's request-handling thread panicked (its payload is not kept: it is not an
    /// error, nor shareable between threads).
    #[error("the vhost-user daemon thread panicked")]
    DaemonPanicked,
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

impl From<vhost_user_backend::Error> for Error {
    fn from(e: vhost_user_backend::Error) -> Self {
        use vhost_user_backend::Error as Daemon;
        let vhost_user = |context, source| Error::VhostUser { context, source };
        match e {
            Daemon::NewVhostUserHandler(e) => Error::Handler(e),
            Daemon::CreateBackendListener(e) => vhost_user("create the backend listener", e),
            Daemon::CreateBackendReqHandler(e) => vhost_user("create the backend request handler", e),
            Daemon::CreateVhostUserListener(e) => vhost_user("create the listener", e),
            Daemon::HandleRequest(e) => vhost_user("handle a request", e),
            Daemon::StartDaemon(source) => Error::Io { context: "start the vhost-user daemon thread", source },
            Daemon::WaitDaemon(_) => Error::DaemonPanicked,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A virtio device served by [`DeviceServer`]. One is made per frontend connection.
///
/// The server handles the transport: it offers VIRTIO_F_VERSION_1, INDIRECT_DESC,
/// PROTOCOL_FEATURES and (per [`ServerConfig::event_idx`]) EVENT_IDX on top of
/// [`features`](Device::features), pops chains, walks them, and hands each to
/// [`process`](Device::process) with the [`Completer`] that answers it.
pub trait Device: Send + Sync + 'static {
    /// Name of the device (vhost-user daemon name, logs).
    const NAME: &'static str;

    /// Virtqueues offered.
    fn num_queues(&self) -> usize;

    /// Which queues each worker thread serves (bit q of a thread's mask: queue q), for at
    /// most `threads` threads. Default: round robin.
    fn thread_masks(&self, threads: usize) -> Vec<u64> {
        round_robin(0, self.num_queues(), threads)
    }

    /// Device-type virtio feature bits.
    fn features(&self) -> u64;

    /// vhost-user protocol features.
    fn protocol_features(&self) -> VhostUserProtocolFeatures;

    /// GET_CONFIG: `size` bytes of the config space from `offset`.
    fn get_config(&self, _offset: u32, _size: u32) -> Vec<u8> {
        Vec::new()
    }

    /// SET_CONFIG.
    fn set_config(&self, _offset: u32, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }

    /// Most readable bytes of a chain copied into [`Chain::request`].
    fn max_request_len(&self) -> usize;

    /// The device was reset or its frontend is gone (parked completions are already
    /// invalidated).
    fn reset(&self) {}

    /// The frontend stopped queue `queue` (GET_VRING_BASE), whose chains in flight were
    /// answered first. `migrating`: it did so while logging dirty memory, i.e. at a live
    /// migration's switch-over, after which another daemon may serve this device's state.
    fn queue_stopped(&self, _queue: usize, _migrating: bool) {}

    /// The device's internal state for a live migration's destination (QEMU 8.2+ asks a
    /// vhost-user-fs backend for it, `VHOST_USER_PROTOCOL_F_DEVICE_STATE`, which the device
    /// then offers), taken once the frontend stopped every queue. Versioned: the destination
    /// may run another release.
    fn save_state(&self) -> io::Result<Vec<u8>> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this device has no state to migrate"))
    }

    /// Takes over the state a source's [`save_state`](Device::save_state) gave, before the
    /// frontend starts the queues. Hostile bytes (a frontend may send anything): checked,
    /// an error refuses them.
    fn load_state(&self, _state: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this device has no state to migrate"))
    }

    /// Handles a chain popped from queue `queue`, on that queue's worker thread: completes
    /// it through `completer` now, or detaches the completer and completes it later. A
    /// chain with [`Chain::error`] must be completed too, as the device's protocol says.
    fn process(&self, queue: usize, chain: Chain, completer: Completer<'_>);
}
