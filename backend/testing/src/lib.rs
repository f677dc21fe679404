//! Synchronous vhost-user frontends that play QEMU's (and the guest driver's) part against
//! incfsd's devices, for tests and benchmarks only (never a dependency of the daemon).
//!
//! - [`Transport`]: the device-independent half: guest memory, split rings, feature
//!   negotiation, request chains, EVENT_IDX.
//! - [`FuseFrontend`]: FUSE requests over virtio-fs; works against any vhost-user-fs daemon.
//! - [`blk::BlkFrontend`]: virtio-blk requests.

pub mod blk;
mod fuse;
mod transport;

pub use fuse::{DirEntryOwned, FrontendConfig, FuseFrontend, FuseReply};
pub use transport::{Completion, DescSpec, FrontendError, Result, Transport, TransportConfig};
