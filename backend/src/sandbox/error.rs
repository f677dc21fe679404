//! What setting up the sandbox fails with. A sandbox that cannot be set up as asked is an
//! error at start-up, never a daemon that runs less confined than it says.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Mount namespaces, Landlock and capabilities are per thread: set up after other
    /// threads started, they would leave those threads outside.
    #[error("the sandbox must be entered before any thread starts, but {0} threads run")]
    ThreadsRunning(usize),
    #[error("--sandbox chroot leaves nothing reachable by path, but {what} ({}) is used after start-up; use --sandbox namespace or landlock", path.display())]
    UnreachableInChroot { what: &'static str, path: PathBuf },
    #[error("build the seccomp filter")]
    SeccompFilter(#[from] seccompiler::BackendError),
    #[error("install the seccomp filter")]
    SeccompInstall(#[from] seccompiler::Error),
    #[error("Landlock ruleset")]
    Landlock(#[from] landlock::RulesetError),
    #[error("Landlock rule")]
    LandlockPath(#[from] landlock::PathFdError),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The last OS error, with what was being done.
    pub(crate) fn last_os(context: impl Into<String>) -> Self {
        Error::io(context, io::Error::last_os_error())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
