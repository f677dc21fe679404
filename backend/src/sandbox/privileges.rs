//! Privileges a serving daemon gives up: capabilities, gaining privileges through exec, and
//! file descriptors beyond a limit.

use std::io;

use super::{Error, Result};

/// CAP_SYS_ADMIN, which mount namespaces need without a user namespace.
const CAP_SYS_ADMIN: u32 = 21;

/// CAP_SYS_CHROOT, the one capability `--sandbox chroot` needs until it has chrooted.
pub const CAP_SYS_CHROOT: u32 = 18;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapUserHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapUserData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the calling thread but `keep` (capability numbers): the
/// bounding set (so that none comes back through exec), the ambient set, then the
/// effective, permitted and inheritable sets. Threads started afterwards inherit the
/// result, which is why this runs before any.
pub fn drop_capabilities(keep: &[u32]) -> Result<()> {
    for cap in 0..64u32 {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Past the last capability this kernel knows.
                Some(libc::EINVAL) => break,
                // Without CAP_SETPCAP (an unprivileged daemon) the bounding set stays as
                // it is; no_new_privs keeps exec from granting anything anyway.
                Some(libc::EPERM) => break,
                _ => return Err(Error::last_os("drop a capability from the bounding set")),
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let cleared =
        unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) };
    if cleared != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(Error::last_os("clear the ambient capabilities"));
    }
    let mut data = [CapUserData::default(); 2];
    for &cap in keep {
        let word = &mut data[(cap / 32) as usize];
        word.effective |= 1 << (cap % 32);
        word.permitted |= 1 << (cap % 32);
    }
    let header = CapUserHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    // SAFETY: capset reads one header and two data words, both valid for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(Error::last_os("drop capabilities"));
    }
    Ok(())
}

/// Whether the calling thread has CAP_SYS_ADMIN in its effective set.
pub fn has_sys_admin() -> bool {
    let header = CapUserHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapUserData::default(); 2];
    // SAFETY: capget writes two data words into `data`, valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
    r == 0 && data[0].effective & (1 << CAP_SYS_ADMIN) != 0
}

/// PR_SET_NO_NEW_PRIVS: exec can never grant privileges again (setuid bits, file
/// capabilities), for this thread and those it starts.
pub fn set_no_new_privs() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::last_os("set no_new_privs"));
    }
    Ok(())
}

/// Sets both limits on open file descriptors to `n`, lowering the hard limit so that it
/// cannot be raised again. An unprivileged daemon cannot go above its hard limit: it
/// keeps that one, with a warning. Returns the limit in force.
pub fn limit_open_files(n: u64) -> Result<u64> {
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `current`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(Error::last_os("read RLIMIT_NOFILE"));
    }
    let set = |n: u64| {
        let limit = libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
        // SAFETY: setrlimit reads one rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 }
    };
    if set(n) {
        return Ok(n);
    }
    let hard: u64 = current.rlim_max;
    if n > hard && set(hard) {
        tracing::warn!(asked = n, hard, "cannot raise RLIMIT_NOFILE above the hard limit; keeping the hard limit");
        return Ok(hard);
    }
    Err(Error::last_os(format!("set RLIMIT_NOFILE to {n}")))
}
