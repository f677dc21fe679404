//! virtio-incfs host daemon: the devices that serve incremental images to VM guests.
//!
//! Data flows one way: device (guest request) -> filesystem ([`fs`], [`control`]) -> block
//! engine (`incfs_storage`: cache -> fetch -> store). The storage modules are re-exported
//! here under their old paths.

pub mod blk;
pub mod control;
pub mod daemon;
pub mod fs;
pub mod metrics;

pub use incfs_storage::{cache, engine, error, image, inspect, pack, serve, store, trace};
pub use incfs_storage::{Error, Result};
