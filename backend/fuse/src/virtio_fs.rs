//! The virtio-fs device: FUSE requests from the queues to the dispatcher, replies back.
//!
//! Queue 0 is the hiprio queue (FORGET, INTERRUPT), queues 1..=N carry requests. With
//! `threads` > 1 the request queues are spread round-robin over the worker threads (the
//! hiprio queue stays with thread 0).
//!
//! Each request is dispatched with the guest's writable buffers as host memory, under the
//! vring lock, so READ data goes from the filesystem straight into the guest. A request whose
//! filesystem answer is pending is completed from a tokio task when it resolves, into the
//! same buffers. The transport (queues, completion, stop) is `incfs_vhost`.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use incfs_buf::ScatterBuf;
use incfs_vhost::{round_robin, Chain, Completer, Device, DeviceServer, ServerConfig, VhostUserProtocolFeatures};
use tokio::runtime::Handle;
use tracing::debug;

use crate::abi::{InHeader, OutHeader};
use crate::dispatch::{Dispatcher, FuseConfig, Response};
use crate::filesystem::{FileSystem, InitInfo};
pub use incfs_vhost::{Error, Result, ServerStopper};

/// Device-level configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioFsConfig {
    /// Number of request queues (not counting the hiprio queue). The guest uses at most
    /// what its `num-request-queues` says.
    pub request_queues: usize,
    /// FUSE limits offered at INIT.
    pub fuse: FuseConfig,
    /// Queue size, worker threads (at most `request_queues` are used), EVENT_IDX, polling.
    pub server: ServerConfig,
    /// Offer inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD). QEMU's
    /// vhost-user-fs never uses it; the supervisor of `incfsd run` does, for its workers.
    pub inflight: bool,
}

impl Default for VirtioFsConfig {
    fn default() -> Self {
        VirtioFsConfig {
            request_queues: 1,
            fuse: FuseConfig::default(),
            server: ServerConfig::default(),
            inflight: false,
        }
    }
}

impl VirtioFsConfig {
    fn validate(&self) -> Result<()> {
        // 63: the queue masks are u64 and queue 0 is hiprio.
        if self.request_queues == 0 || self.request_queues > 63 {
            return Err(Error::Config("request_queues must be 1..=63"));
        }
        Ok(())
    }

    fn num_queues(&self) -> usize {
        self.request_queues + 1
    }

    /// Queue masks per worker thread: hiprio with thread 0, request queue q with thread
    /// (q - 1) % threads.
    fn thread_masks(&self, threads: usize) -> Vec<u64> {
        let mut masks = round_robin(1, self.num_queues(), threads);
        masks[0] |= 1;
        masks
    }
}

/// What a live migration carries of a virtio-fs device besides the FUSE session: the
/// filesystem's own state (incfsd: the control channel's open handles), in a versioned
/// format of the implementer's.
pub trait MigrationState: Send + Sync {
    /// The device's state, with `session` (None before the guest's INIT).
    fn save(&self, session: Option<&InitInfo>) -> std::io::Result<Vec<u8>>;
    /// Takes over a source's state (hostile bytes: checked) and returns its session.
    fn load(&self, state: &[u8]) -> std::io::Result<Option<InitInfo>>;
}

/// The virtio-fs device of one frontend connection.
pub struct VirtioFs {
    dispatcher: Arc<Dispatcher>,
    cfg: VirtioFsConfig,
    rt: Handle,
    /// Offered with DEVICE_STATE when set.
    migration: Option<Arc<dyn MigrationState>>,
}

impl VirtioFs {
    pub fn new(fs: Arc<dyn FileSystem>, cfg: VirtioFsConfig, rt: Handle) -> Self {
        Self::with_dispatcher(Dispatcher::new(fs, cfg.fuse), cfg, rt)
    }

    /// With a dispatcher set up by the caller (a session observer, a resumed session).
    pub fn with_dispatcher(dispatcher: Dispatcher, cfg: VirtioFsConfig, rt: Handle) -> Self {
        VirtioFs { dispatcher: Arc::new(dispatcher), cfg, rt, migration: None }
    }

    /// Live migration of the device (VHOST_USER_PROTOCOL_F_DEVICE_STATE), its state saved
    /// and loaded by `migration`.
    pub fn with_migration(mut self, migration: Option<Arc<dyn MigrationState>>) -> Self {
        self.migration = migration;
        self
    }

    /// Serves an already connected frontend `stream` until it hangs up or `stopper` stops
    /// it (the worker of `incfsd run`'s supervisor).
    pub fn serve_stream(self, stream: UnixStream, stopper: &ServerStopper) -> Result<()> {
        self.cfg.validate()?;
        let cfg = self.cfg.server;
        incfs_vhost::serve_stream(stream, self, cfg, stopper)
    }
}

impl Device for VirtioFs {
    const NAME: &'static str = "incfs-virtio-fs";

    fn num_queues(&self) -> usize {
        self.cfg.num_queues()
    }

    fn thread_masks(&self, threads: usize) -> Vec<u64> {
        self.cfg.thread_masks(threads)
    }

    fn features(&self) -> u64 {
        // No device-type features: the server's transport features are all virtio-fs needs.
        0
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Not CONFIG: QEMU 7.1..8.0 crash on it, and QEMU knows the tag itself.
        let mut f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.cfg.inflight {
            f |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        if self.migration.is_some() {
            f |= VhostUserProtocolFeatures::DEVICE_STATE;
        }
        f
    }

    fn save_state(&self) -> std::io::Result<Vec<u8>> {
        match &self.migration {
            Some(m) => m.save(self.dispatcher.session().as_ref()),
            None => Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "no migration state")),
        }
    }

    fn load_state(&self, state: &[u8]) -> std::io::Result<()> {
        let Some(m) = &self.migration else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "no migration state"));
        };
        if let Some(session) = m.load(state)? {
            // The guest's INIT was answered by the source: serve on in that session.
            self.dispatcher.resume(&session);
        }
        Ok(())
    }

    fn max_request_len(&self) -> usize {
        self.cfg.fuse.max_request_len()
    }

    fn reset(&self) {
        self.dispatcher.reset();
    }

    fn process(&self, queue: usize, chain: Chain, completer: Completer<'_>) {
        if let Some(e) = chain.error {
            debug!(queue, head = chain.head, error = %e, "bad descriptor chain");
            completer.complete_empty();
            return;
        }
        let oversize = chain.oversize();
        // Every reply, READ data included, is written straight into the guest's buffers under
        // the vring lock; a parked request keeps its chain until its writer has run.
        let mut pending = None;
        completer.fill(&chain.writable, |out| {
            let response = if oversize {
                oversize_response(&chain.request, out)
            } else {
                self.dispatcher.dispatch(&chain.request, out)
            };
            match response {
                Response::None => Some(0),
                Response::Done(n) => Some(n),
                Response::Pending(fut) => {
                    pending = Some(fut);
                    None
                }
            }
        });
        if let Some(fut) = pending {
            let completer = completer.detach();
            let writable = chain.writable;
            self.rt.spawn(async move {
                match fut.await {
                    Some(write) => completer.fill(&writable, |out| Some(write(out).unwrap_or(0))),
                    None => completer.complete_empty(),
                };
            });
        }
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

/// A vhost-user-fs server listening on a socket, serving one frontend at a time.
pub struct VirtioFsServer {
    server: DeviceServer<VirtioFs>,
}

impl VirtioFsServer {
    /// Binds `socket` (replacing a stale socket file there; the file is removed on drop).
    pub fn bind(socket: &Path, fs: Arc<dyn FileSystem>, cfg: VirtioFsConfig, rt: Handle) -> Result<Self> {
        Self::bind_migratable(socket, fs, cfg, rt, None)
    }

    /// As `bind`, each connection's device migratable with `migration` (if given).
    pub fn bind_migratable(
        socket: &Path,
        fs: Arc<dyn FileSystem>,
        cfg: VirtioFsConfig,
        rt: Handle,
        migration: Option<Arc<dyn MigrationState>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let server = DeviceServer::bind(socket, cfg.server, move || {
            VirtioFs::new(fs.clone(), cfg, rt.clone()).with_migration(migration.clone())
        })?;
        Ok(VirtioFsServer { server })
    }

    /// Serves on an already bound listener (socket activation, tests).
    pub fn from_listener(
        listener: UnixListener,
        fs: Arc<dyn FileSystem>,
        cfg: VirtioFsConfig,
        rt: Handle,
    ) -> Result<Self> {
        cfg.validate()?;
        let server =
            DeviceServer::from_listener(listener, cfg.server, move || VirtioFs::new(fs.clone(), cfg, rt.clone()))?;
        Ok(VirtioFsServer { server })
    }

    /// A handle that stops the server from another thread.
    pub fn stopper(&self) -> ServerStopper {
        self.server.stopper()
    }

    /// Waits for one frontend, serves it until it disconnects, and returns `Ok(true)`; call
    /// again to accept the next one (QEMU reconnecting, a new benchmark run). Returns
    /// `Ok(false)` once the server has been stopped.
    pub fn serve_one(&mut self) -> Result<bool> {
        self.server.serve_one()
    }
}

/// Serves one frontend connection on `socket` and returns when it disconnects. To serve
/// frontends one after another on the same socket, use [`VirtioFsServer`].
pub fn serve(socket: &Path, fs: Arc<dyn FileSystem>, cfg: VirtioFsConfig, rt: Handle) -> Result<()> {
    VirtioFsServer::bind(socket, fs, cfg, rt)?.serve_one().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        let cfg = VirtioFsConfig {
            request_queues: 3,
            server: ServerConfig { threads: 2, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(cfg.thread_masks(cfg.server.threads), vec![0b1011, 0b0100]);
        let cfg = VirtioFsConfig {
            request_queues: 1,
            server: ServerConfig { threads: 4, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(cfg.thread_masks(cfg.server.threads), vec![0b11]);
    }
}
