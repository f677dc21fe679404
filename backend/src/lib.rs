//! virtio-incfs host daemon: the devices that serve incremental images to VM guests.
//!
//! Data flows one way: device (guest request) -> filesystem ([`fs`], [`control`]) -> block
//! engine (`incfs_storage`: cache -> fetch -> store). The storage modules are re-exported
//! here under their old paths. [`daemon`] runs a device (`incfsd run`, `incfsd blk`) and has
//! the backend's own error type.

pub mod blk;
pub mod control;
pub mod daemon;
pub mod fs;
pub mod metrics;
pub mod sandbox;
pub mod supervisor;

pub use incfs_storage::{cache, dict, engine, error, http_store_server, image, inspect, layout, pack, store, trace};
pub use incfs_storage::{Error, Result};

/// The old name of [`http_store_server`], still used by `backend/tests/support`.
#[doc(hidden)]
pub use incfs_storage::http_store_server as serve;
