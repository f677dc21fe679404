//! The seccomp-bpf allow-list of a serving daemon: the system calls the daemon makes once
//! everything is open, and nothing else (no exec, no fork, no mount, no ptrace, no new
//! namespaces, no kernel keyring, no bpf, no io_uring, no set*id).
//!
//! Three filters are stacked (the kernel applies the strictest answer of all):
//! - the allow-list: anything not on it kills the process (`kill`) or is logged to the
//!   audit log and allowed (`log`);
//! - two refusals with an errno, for calls that libraries make and handle when they fail:
//!   `clone3` answers ENOSYS so that glibc falls back to `clone`, whose flags a filter can
//!   see (only threads are allowed, not processes); `socket` outside AF_UNIX, AF_INET and
//!   AF_INET6 answers EAFNOSUPPORT.
//!
//! Both are installed on every thread at once (TSYNC): the runtime's threads and the
//! signal thread already run when the filter goes on.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::Result;

/// What a system call outside the allow-list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kills the process (SIGSYS, the audit log names the call).
    #[default]
    Kill,
    /// Logs the call to the audit log (SECCOMP_RET_LOG) and lets it run: to find what is
    /// missing from the list without losing the VM.
    Log,
    /// No filter.
    None,
}

/// Installs the filters on every thread of the process (TSYNC). Also sets
/// PR_SET_NO_NEW_PRIVS, which an unprivileged process needs for a filter.
pub fn install(mode: SeccompMode) -> Result<()> {
    for program in programs(mode)? {
        seccompiler::apply_filter_all_threads(&program)?;
    }
    Ok(())
}

/// The compiled filters for `mode`, in installation order (none for `SeccompMode::None`).
pub fn programs(mode: SeccompMode) -> Result<Vec<BpfProgram>> {
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::None => return Ok(Vec::new()),
    };
    let arch = target_arch();
    let allow = SeccompFilter::new(allow_list()?, mismatch, SeccompAction::Allow, arch)?;
    let refuse =
        |errno: i32, rules| SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch);
    // The allow-list goes on last: installing a filter calls prctl and seccomp, which it
    // refuses.
    Ok(vec![
        refuse(libc::ENOSYS, BTreeMap::from([(libc::SYS_clone3, Vec::new())]))?.try_into()?,
        refuse(libc::EAFNOSUPPORT, BTreeMap::from([(libc::SYS_socket, vec![other_socket_family()?])]))?.try_into()?,
        allow.try_into()?,
    ])
}

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    return TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(target_arch = "riscv64")]
    return TargetArch::riscv64;
}

/// System calls allowed whatever their arguments.
const ALLOWED: &[libc::c_long] = &[
    // Memory: the allocator, thread stacks, guest memory (mmap of the frontend's fds).
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_msync,
    // vhost-user-blk's inflight area (GET_INFLIGHT_FD): a memfd handed to the frontend.
    libc::SYS_memfd_create,
    // File I/O on open fds: the cache (pread/pwrite, holes punched, OFD locks through
    // fcntl), the overlay, trace files, stderr.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fadvise64,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_fchmod,
    libc::SYS_dup,
    libc::SYS_dup3,
    // Paths that stay reachable: the recorded trace (written and renamed), a local store's
    // blobs, the published trace, the socket file removed at exit, DNS's /etc files.
    libc::SYS_openat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    // tempfile's persist (the cache's saved dictionaries): no more than renameat2 allows.
    libc::SYS_renameat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_readlinkat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    // The runtime: epoll, eventfds, futexes, timers, sleeping, yielding.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    libc::SYS_ppoll,
    libc::SYS_pselect6,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    // Sockets: the vhost-user socket (recvmsg with SCM_RIGHTS, accept of the next
    // frontend), the metrics endpoint, the HTTP client and DNS over UDP. No bind or listen:
    // the listeners are bound before the filter. `socket` is narrowed to three families by
    // a refusal filter.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_shutdown,
    // Threads (clone itself is below, narrowed to threads), signals, exit.
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_uname,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Calls older x86_64 code paths still make.
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_stat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lstat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_access,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_readlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_arch_prctl,
];

fn allow_list() -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Threads only: a clone without CLONE_THREAD is a new process (fork, or exec's vfork).
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule([Cond::new(0, Len::Qword, Op::MaskedEq(thread), thread)?])?]);
    // No executable mappings: the daemon loads no code once it serves (W^X).
    let exec = libc::PROT_EXEC as u64;
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(nr, vec![rule([Cond::new(2, Len::Dword, Op::MaskedEq(exec), 0)?])?]);
    }
    // Threads name themselves; nothing else of prctl's.
    let prctl = [libc::PR_SET_NAME, libc::PR_GET_NAME]
        .into_iter()
        .map(|op| rule([Cond::new(0, Len::Dword, Op::Eq, op as u64)?]))
        .collect::<Result<_>>()?;
    rules.insert(libc::SYS_prctl, prctl);
    // Non-blocking and close-on-exec flags, and the bytes waiting on a socket.
    let ioctl = [libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX, libc::FIONREAD]
        .into_iter()
        .map(|op| rule([Cond::new(1, Len::Dword, Op::Eq, op)?]))
        .collect::<Result<_>>()?;
    rules.insert(libc::SYS_ioctl, ioctl);
    Ok(rules)
}

/// `socket(domain, ...)` with a domain other than AF_UNIX, AF_INET and AF_INET6.
fn other_socket_family() -> Result<SeccompRule> {
    let families = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];
    rule(families.into_iter().map(|f| Cond::new(0, Len::Dword, Op::Ne, f as u64)).collect::<Result<Vec<_>, _>>()?)
}

/// A rule that matches when all `conditions` hold.
fn rule(conditions: impl IntoIterator<Item = Cond>) -> Result<SeccompRule> {
    Ok(SeccompRule::new(conditions.into_iter().collect())?)
}
