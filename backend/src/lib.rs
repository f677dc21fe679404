//! virtio-incfs host side: incremental images, the lazy block engine, and the devices that
//! serve them to VM guests.
//!
//! Data flows one way: device (guest request) -> filesystem -> [`engine`] (cache -> fetch ->
//! remote). The image format lives in [`image`]; stores and remotes in [`store`].

pub mod blk;
pub mod cache;
pub mod control;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fs;
pub mod image;
pub mod inspect;
pub mod metrics;
pub mod pack;
pub mod serve;
pub mod store;
pub mod trace;

pub use error::{Error, Result};
