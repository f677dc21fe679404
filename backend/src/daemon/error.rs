//! The backend's own error: what `incfsd` and its daemons fail with. Storage and device
//! errors are kept whole as sources, so that `main` can print the chain.
//!
//! `crate::error` stays the storage crate's module: the device modules' request paths and
//! the control files return storage errors, which carry the errno the guest sees.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Image, store, cache, engine, trace or pack (already says what it was doing).
    #[error(transparent)]
    Storage(#[from] incfs_storage::Error),
    #[error("virtio-fs device")]
    VirtioFs(#[from] incfs_fuse::Error),
    /// The vhost-user-blk device, whose errors are storage errors for now.
    #[error("vhost-user-blk device")]
    Blk(#[source] incfs_storage::Error),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("sandbox")]
    Sandbox(#[from] crate::sandbox::Error),
    #[error("supervisor")]
    Supervisor(#[from] crate::supervisor::SupervisorError),
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0} is not a regular file")]
    NotARegularFile(String),
    /// A command line or settings file that cannot be served (says what and where).
    #[error("{0}")]
    Settings(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The message and its sources, joined by ": ". A source whose text its parent already
    /// ends with (error types that print their source themselves) is not repeated.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            let text = e.to_string();
            if !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            next = e.source();
        }
        out
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_each_cause_once() {
        let storage = incfs_storage::Error::io("read manifest", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(Error::from(storage).chain(), "read manifest: entity not found");
        let blk = Error::Blk(incfs_storage::Error::Invalid("queues must be 1..=64".into()));
        assert_eq!(blk.chain(), "vhost-user-blk device: invalid argument: queues must be 1..=64");
        let io = Error::io("start runtime", io::Error::from(io::ErrorKind::OutOfMemory));
        assert_eq!(io.chain(), "start runtime: out of memory");
    }
}
