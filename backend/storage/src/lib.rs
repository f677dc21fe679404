//! virtio-incfs storage: everything below the devices. It knows nothing of FUSE or vhost;
//! the devices call down into it, never the other way round.
//!
//! - [`image`]: the image format (manifest, Merkle tree) and [`pack`] to make one;
//!   [`dict`]: the image's zstd dictionary.
//! - [`store`]: where blobs and manifests live (a directory or an HTTP(S) server);
//!   [`http_store_server`] serves a directory store over HTTP (`incfsd serve`).
//! - [`cache`]: the block cache shared by every daemon of a host.
//! - [`engine`]: verified reads of an image's files, fetching missing blocks lazily.
//! - [`trace`]: recorded read orders, replayed as prefetch.

pub mod cache;
pub mod dict;
pub mod engine;
pub mod error;
pub mod http_store_server;
pub mod image;
pub mod inspect;
pub mod layout;
pub mod pack;
pub mod store;
pub mod trace;

pub use error::{Error, Result};
