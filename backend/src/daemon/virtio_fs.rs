//! `incfsd run`: the image as a vhost-user virtio-fs device, served by this process on its
//! socket, or (the default) as the worker of a supervisor ([`crate::supervisor`]) that owns
//! the socket and relays QEMU's connection to it.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use incfs_fuse::{Dispatcher, InitInfo, MigrationState, VirtioFs, VirtioFsConfig, VirtioFsServer};
use incfs_vhost::ServerStopper;
use tokio::runtime::Handle;

use super::{serve_device, DaemonConfig, Device, DeviceServer, Error, Result};
use crate::engine::Engine;
use crate::fs::MountFs;
use crate::supervisor::state::{decode_device_state, encode_device_state, StateRegion, WorkerState};
use crate::supervisor::{relay, WorkerFds};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub daemon: DaemonConfig,
    /// Queues, queue threads and polling.
    pub device: VirtioFsConfig,
}

/// Serves the image as a virtio-fs device until SIGINT/SIGTERM.
pub fn run(cfg: RunConfig) -> Result<()> {
    serve_device::<FsDevice>(cfg.daemon, (cfg.device, None))
}

/// Serves the image on the connection a supervisor relays (`--worker-fds`), until the
/// supervisor closes it or SIGINT/SIGTERM.
pub fn run_worker(mut cfg: RunConfig, fds: WorkerFds) -> Result<()> {
    cfg.device.inflight = true;
    serve_device::<FsDevice>(cfg.daemon, (cfg.device, Some(fds)))
}

/// What a live migration carries of the mount: the FUSE session and the control channel's
/// open handles, in the format of the worker state region (docs/migration.md).
struct FsMigration {
    fs: Arc<MountFs>,
    /// A worker's region, kept up to date with a loaded state (a worker killed right after
    /// the switch-over hands it on).
    region: Option<Arc<StateRegion>>,
}

impl MigrationState for FsMigration {
    fn save(&self, session: Option<&InitInfo>) -> std::io::Result<Vec<u8>> {
        Ok(encode_device_state(&WorkerState { session: session.copied(), handles: self.fs.control().saved() }))
    }

    fn load(&self, state: &[u8]) -> std::io::Result<Option<InitInfo>> {
        let state = decode_device_state(state).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.fs.control().restore(&state.handles);
        if let Some(r) = &self.region {
            r.store(&state);
        }
        tracing::info!(
            session = state.session.is_some(),
            handles = state.handles.handles.len(),
            "mount state taken over from a migration's source"
        );
        Ok(state.session)
    }
}

/// A worker's connection, state region and ready pipe, until it serves.
struct Worker {
    fds: Mutex<Option<WorkerFds>>,
    metrics: Mutex<Option<std::net::TcpListener>>,
    state: Arc<StateRegion>,
}

struct FsDevice {
    fs: Arc<MountFs>,
    engine: Arc<Engine>,
    cfg: VirtioFsConfig,
    worker: Option<Worker>,
}

impl Device for FsDevice {
    type Config = (VirtioFsConfig, Option<WorkerFds>);
    type Server = FsServer;
    const THREAD_NAME: &'static str = "incfsd-io";

    fn open((cfg, fds): Self::Config, engine: Arc<Engine>) -> Result<Self> {
        let img = engine.image();
        tracing::info!(image = %img.id, inodes = img.manifest.inodes.len(), bytes = img.data_size(), "image loaded");
        let worker = match fds {
            None => None,
            Some(mut fds) => {
                // A region this binary does not know (another version's) is refused: the
                // supervisor keeps the worker it has.
                let state = StateRegion::open(&fds.state)
                    .map_err(|e| Error::io("open the worker state region", std::io::Error::other(e)))?;
                let metrics = Mutex::new(fds.metrics.take());
                Some(Worker { fds: Mutex::new(Some(fds)), metrics, state: Arc::new(state) })
            }
        };
        let fs = Arc::new(MountFs::new(engine.clone()));
        if let Some(w) = &worker {
            // The guest's open control handles of a previous worker serve on here.
            let saved = w.state.load().handles;
            if !saved.handles.is_empty() {
                tracing::info!(handles = saved.handles.len(), "control handles taken over from the previous worker");
            }
            fs.control().restore(&saved);
            fs.control().set_observer(w.state.clone());
        }
        Ok(FsDevice { fs, engine, cfg, worker })
    }

    fn bind(&self, socket: &Path, rt: Handle) -> Result<FsServer> {
        let Some(worker) = &self.worker else {
            let migration: Arc<dyn MigrationState> = Arc::new(FsMigration { fs: self.fs.clone(), region: None });
            return Ok(FsServer::Socket(VirtioFsServer::bind_migratable(
                socket,
                self.fs.clone(),
                self.cfg,
                rt,
                Some(migration),
            )?));
        };
        let fds = worker.fds.lock().unwrap_or_else(|e| e.into_inner()).take();
        let fds = fds.ok_or_else(|| Error::io("serve", std::io::Error::other("worker fds already taken")))?;
        let stopper = ServerStopper::new().map_err(|e| Error::io("create the stop event", e))?;
        Ok(FsServer::Worker(WorkerServer {
            ctrl: fds.ctrl,
            ready: Some(fds.ready),
            fs: self.fs.clone(),
            cfg: self.cfg,
            rt,
            state: worker.state.clone(),
            stopper,
        }))
    }

    fn metrics_listener(&self) -> Option<std::net::TcpListener> {
        self.worker.as_ref().and_then(|w| w.metrics.lock().unwrap_or_else(|e| e.into_inner()).take())
    }

    fn ready_line(&self, cfg: &DaemonConfig) -> String {
        format!("incfsd: serving image {} on {}", cfg.image, cfg.socket.display())
    }

    fn finish(&self) {
        self.engine.flush_stats();
    }
}

/// `incfsd run`'s server: its own socket, or a supervisor's relayed connections.
enum FsServer {
    Socket(VirtioFsServer),
    Worker(WorkerServer),
}

/// The worker's server: serves the frontend connections its supervisor hands it, one after
/// another, each with a fresh device that takes over a FUSE session a previous worker left.
struct WorkerServer {
    ctrl: UnixStream,
    ready: Option<File>,
    fs: Arc<MountFs>,
    cfg: VirtioFsConfig,
    rt: Handle,
    state: Arc<StateRegion>,
    stopper: ServerStopper,
}

impl WorkerServer {
    /// The next connection from the supervisor, None once it hung up or we are stopped.
    fn next_connection(&mut self) -> Result<Option<UnixStream>> {
        let waiting =
            self.stopper.wait_for_frontend(self.ctrl.as_raw_fd()).map_err(|e| Error::io("wait for a frontend", e))?;
        if !waiting {
            return Ok(None);
        }
        let msg = relay::recv(&self.ctrl).map_err(|e| Error::io("receive a frontend", std::io::Error::other(e)))?;
        match msg {
            None => Ok(None),
            Some(mut m) if m.request == relay::req::CONNECT && m.fds.len() == 1 => {
                Ok(m.fds.pop().map(UnixStream::from))
            }
            Some(m) => {
                Err(Error::io("receive a frontend", std::io::Error::other(format!("unexpected message {}", m.request))))
            }
        }
    }

    fn serve_one(&mut self) -> Result<bool> {
        let Some(conn) = self.next_connection()? else { return Ok(false) };
        let dispatcher = Dispatcher::new(self.fs.clone(), self.cfg.fuse).with_observer(self.state.clone());
        if let Some(session) = self.state.load().session {
            // The guest's INIT was answered by a previous worker: serve on in that session.
            dispatcher.resume(&session);
            tracing::info!(minor = session.minor, "FUSE session taken over from the previous worker");
        }
        let migration: Arc<dyn MigrationState> =
            Arc::new(FsMigration { fs: self.fs.clone(), region: Some(self.state.clone()) });
        VirtioFs::with_dispatcher(dispatcher, self.cfg, self.rt.clone())
            .with_migration(Some(migration))
            .serve_stream(conn, &self.stopper)?;
        Ok(true)
    }
}

impl DeviceServer for FsServer {
    fn stopper(&self) -> ServerStopper {
        match self {
            FsServer::Socket(s) => s.stopper(),
            FsServer::Worker(w) => w.stopper.clone(),
        }
    }

    fn announce_ready(&mut self, line: &str) {
        match self {
            FsServer::Socket(_) => eprintln!("{line}"),
            FsServer::Worker(w) => {
                // The supervisor prints the ready line; it waits for this byte.
                if let Some(Err(e)) = w.ready.take().map(|mut f| f.write_all(b"R")) {
                    tracing::warn!("cannot tell the supervisor the worker is ready: {e}");
                }
            }
        }
    }

    fn serve_one(&mut self) -> Result<bool> {
        match self {
            FsServer::Socket(s) => Ok(s.serve_one()?),
            FsServer::Worker(w) => w.serve_one(),
        }
    }
}
