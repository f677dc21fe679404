//! The one error type of this crate.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed image manifest: {0}")]
    Manifest(String),
    #[error("image {expected} failed verification: manifest hashes to {actual}")]
    ImageIdMismatch { expected: String, actual: String },
    #[error("HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    /// A CA file, client certificate or key that TLS cannot use.
    #[error("{what}: {source}")]
    HttpSetup {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// A request to the store failed (EIO); the typed failure keeps the status and source.
    #[error("remote: {0}")]
    Fetch(#[from] crate::store::FetchFailure),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The read's deadline passed before its blocks arrived (ETIME, as incfs).
    #[error("read timed out waiting for blocks")]
    Timeout,
    /// Not possible yet, but soon: a block's hash is still being fetched (EAGAIN).
    #[error("not ready: {0}")]
    NotReady(String),
    /// Data failed verification against the Merkle tree (EBADMSG, as incfs).
    #[error("block failed verification: {0}")]
    Corrupt(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The errno a guest sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Timeout => libc::ETIME,
            Error::Corrupt(_) => libc::EBADMSG,
            Error::NotFound(_) => libc::ENOENT,
            Error::Invalid(_) => libc::EINVAL,
            Error::NotReady(_) => libc::EAGAIN,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a description of what was being done to an io::Result.
pub trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
