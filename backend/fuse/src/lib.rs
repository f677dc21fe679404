//! FUSE over virtio-fs (vhost-user-fs) for incfsd.
//!
//! - [`abi`]: the FUSE kernel ABI structs and constants.
//! - [`filesystem`]: the [`FileSystem`] trait a read-only image implements.
//! - [`dispatch`]: request decoding and reply encoding, independent of the transport.
//! - [`virtio_fs`]: the virtio-fs device on `incfs_vhost`'s device server, and [`serve`].
//!
//! The test frontend that plays QEMU's part is in the dev-only crate `incfs-testing`.
//!
//! Typical use by the daemon:
//!
//! ```text
//! let fs: Arc<dyn FileSystem> = Arc::new(MountFs::new(..));
//! let mut server = VirtioFsServer::bind(&socket, fs, VirtioFsConfig::default(), rt.handle().clone())?;
//! let stopper = server.stopper();           // stopper.stop() from a signal handler task
//! while server.serve_one()? {}              // one frontend (QEMU) after another
//! ```

pub mod abi;

pub mod dispatch;
pub mod filesystem;
pub mod virtio_fs;

pub use dispatch::{Dispatcher, FuseConfig, ReplyBuf, ReplyFuture, ReplyWriter, Response, SessionObserver};
pub use filesystem::{
    read_to_vec, Attr, BoxFuture, Context, DirEntry, DirSink, Entry, Errno, FileSystem, InitInfo, ReadFill, ReadReply,
    Reply, StatFs,
};
pub use incfs_buf::ScatterBuf;
pub use incfs_vhost::ServerConfig;
pub use virtio_fs::{serve, Error, MigrationState, Result, ServerStopper, VirtioFs, VirtioFsConfig, VirtioFsServer};
