//! The daemon's sandbox, kept apart from its logic (as virtiofsd keeps `sandbox.rs` and
//! `seccomp.rs`). A daemon serves every VM of the host from hostile input (guests, the
//! store, the network), so it confines itself in two steps:
//!
//! 1. [`Sandbox::enter`], first thing, while the process is still single-threaded (mount
//!    namespaces, Landlock and capabilities are per thread; threads inherit them):
//!    RLIMIT_NOFILE; the filesystem view (a mount namespace whose root is an empty tmpfs
//!    holding only the paths the daemon uses, at the same paths, or Landlock on those
//!    paths); every capability dropped; no_new_privs.
//! 2. [`Sandbox::lock`], once the cache, store, overlay, sockets and listeners are open and
//!    the runtime's threads run, before the first frontend: `--sandbox chroot` chroots
//!    (the root is shared by all threads), then the seccomp filter goes on every thread
//!    (TSYNC).
//!
//! See docs/sandbox.md.

mod error;
mod landlock_rules;
mod mount_ns;
pub mod privileges;
pub mod seccomp;

use std::path::PathBuf;

pub use error::{Error, Result};
pub use seccomp::SeccompMode;

/// Default RLIMIT_NOFILE: the daemon holds a few cache files, its listeners, three
/// eventfds per queue, the guest's memory regions and its HTTP connections.
pub const DEFAULT_RLIMIT_NOFILE: u64 = 4096;

/// Files the C library's resolver reads for each host name lookup (HTTP stores named by
/// host name resolve again whenever a new connection opens).
pub const RESOLVER_FILES: &[&str] =
    &["/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf"];

/// How the daemon's view of the filesystem is narrowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsSandbox {
    /// A mount namespace (in a user namespace when unprivileged) and pivot_root into an
    /// empty root holding only the paths the daemon uses; Landlock when namespaces are
    /// refused; nothing (with a warning) when Landlock is missing too.
    #[default]
    Namespace,
    /// Landlock on the paths the daemon uses (any user, Linux 5.13+).
    Landlock,
    /// chroot into an empty directory once everything is open (root or CAP_SYS_CHROOT):
    /// nothing is reachable by path afterwards.
    Chroot,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxConfig {
    pub fs: FsSandbox,
    pub seccomp: SeccompMode,
    /// RLIMIT_NOFILE (soft and hard); None leaves it as it is.
    pub rlimit_nofile: Option<u64>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            fs: FsSandbox::default(),
            seccomp: SeccompMode::default(),
            rlimit_nofile: Some(DEFAULT_RLIMIT_NOFILE),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A path the daemon opens by name after the sandbox is entered: it stays reachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reachable {
    /// What it is, for messages: "the cache", "the store".
    pub what: &'static str,
    /// Absolute; an existing file or directory.
    pub path: PathBuf,
    pub access: Access,
    /// Opened while serving (a local store's blobs, the recorded trace), not only while
    /// starting: `--sandbox chroot` cannot have those.
    pub while_serving: bool,
}

/// The filesystem sandbox in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InForce {
    Namespace,
    Landlock {
        complete: bool,
    },
    /// Entered at [`Sandbox::lock`].
    Chroot,
    None,
}

/// A sandbox entered, to be locked before serving.
#[derive(Debug)]
#[must_use = "lock() installs the seccomp filter"]
pub struct Sandbox {
    pub fs: InForce,
    seccomp: SeccompMode,
}

impl Sandbox {
    /// Step 1, before any thread starts: see the module's doc. `paths` are what stays
    /// reachable.
    pub fn enter(cfg: &SandboxConfig, paths: &[Reachable]) -> Result<Sandbox> {
        if cfg.fs != FsSandbox::None {
            match thread_count() {
                Some(1) => {}
                Some(n) => return Err(Error::ThreadsRunning(n)),
                None => tracing::warn!("sandbox: cannot count threads (no /proc); assuming one"),
            }
        }
        if let Some(n) = cfg.rlimit_nofile {
            privileges::limit_open_files(n)?;
        }
        let fs = match cfg.fs {
            FsSandbox::Namespace => {
                // SAFETY: geteuid cannot fail.
                let privileged = unsafe { libc::geteuid() } == 0 || privileges::has_sys_admin();
                match mount_ns::enter(paths, privileged)? {
                    Ok(()) => InForce::Namespace,
                    Err(mount_ns::Unavailable(e)) => {
                        tracing::warn!("sandbox: no mount namespace ({e}); falling back to Landlock");
                        landlock(paths)?
                    }
                }
            }
            FsSandbox::Landlock => landlock(paths)?,
            FsSandbox::Chroot => {
                if let Some(r) = paths.iter().find(|r| r.while_serving) {
                    return Err(Error::UnreachableInChroot { what: r.what, path: r.path.clone() });
                }
                InForce::Chroot
            }
            FsSandbox::None => InForce::None,
        };
        let keep: &[u32] = if fs == InForce::Chroot { &[privileges::CAP_SYS_CHROOT] } else { &[] };
        privileges::drop_capabilities(keep)?;
        privileges::set_no_new_privs()?;
        Ok(Sandbox { fs, seccomp: cfg.seccomp })
    }

    /// Step 2, once everything is open and before serving: chroot if asked, then the
    /// seccomp filter on every thread. Logs what is in force.
    pub fn lock(self) -> Result<()> {
        if self.fs == InForce::Chroot {
            mount_ns::chroot_empty()?;
            privileges::drop_capabilities(&[])?;
        }
        seccomp::install(self.seccomp)?;
        let fs = match self.fs {
            InForce::Namespace => "mount namespace with only the paths in use",
            InForce::Landlock { complete: true } => "Landlock on the paths in use",
            InForce::Landlock { complete: false } => "Landlock on the paths in use, partly enforced by this kernel",
            InForce::Chroot => "chroot into an empty directory",
            InForce::None => "none",
        };
        let seccomp = match self.seccomp {
            SeccompMode::Kill => "allow-list, others kill",
            SeccompMode::Log => "allow-list, others logged",
            SeccompMode::None => "none",
        };
        if matches!(self.fs, InForce::None | InForce::Landlock { complete: false }) || self.seccomp != SeccompMode::Kill
        {
            tracing::warn!(filesystem = fs, seccomp, "sandbox weaker than the default");
        } else {
            tracing::info!(filesystem = fs, seccomp, "sandbox in force; capabilities dropped, no_new_privs");
        }
        Ok(())
    }
}

fn landlock(paths: &[Reachable]) -> Result<InForce> {
    use ::landlock::RulesetStatus;
    Ok(match landlock_rules::restrict(paths)? {
        RulesetStatus::FullyEnforced => InForce::Landlock { complete: true },
        RulesetStatus::PartiallyEnforced => InForce::Landlock { complete: false },
        RulesetStatus::NotEnforced => {
            tracing::warn!("sandbox: this kernel has no Landlock; the filesystem is not sandboxed");
            InForce::None
        }
    })
}

/// Threads of this process, from /proc (None without it).
fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

/// An error and its sources, joined by ": ", for a log line.
fn describe(e: &Error) -> String {
    let mut out = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}
