//! The daemon's view of the filesystem: a mount namespace whose root is an empty read-only
//! tmpfs holding only the paths the daemon still uses, bind-mounted at the same paths
//! (`--sandbox namespace`), or an empty, deleted directory as root (`--sandbox chroot`).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::{Access, Error, Reachable, Result};

/// Why a mount namespace could not be entered: the caller falls back to Landlock.
#[derive(Debug)]
pub struct Unavailable(pub io::Error);

/// Unshares a mount namespace (inside a new user namespace when not privileged) and
/// pivots into a new root holding only `paths`. The process must be single-threaded: a
/// namespace is per thread. `Err(Unavailable)` before anything changed when namespaces
/// are refused; any other error leaves the process in an unknown state and must end it.
pub fn enter(paths: &[Reachable], privileged: bool) -> Result<Result<(), Unavailable>> {
    let (uid, gid) = (
        // SAFETY: getuid and getgid cannot fail.
        unsafe { libc::getuid() },
        // SAFETY: as above.
        unsafe { libc::getgid() },
    );
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !privileged {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(flags) } != 0 {
        return Ok(Err(Unavailable(io::Error::last_os_error())));
    }
    if !privileged {
        // The daemon keeps its own ids inside, so that the cache's files stay its own.
        fs::write("/proc/self/setgroups", "deny").map_err(|e| Error::io("deny setgroups", e))?;
        fs::write("/proc/self/uid_map", format!("{uid} {uid} 1")).map_err(|e| Error::io("write uid_map", e))?;
        fs::write("/proc/self/gid_map", format!("{gid} {gid} 1")).map_err(|e| Error::io("write gid_map", e))?;
    }
    // Nothing mounted here propagates back to the host.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, "make / private")?;

    // The paths are opened first: the new root is mounted over the temporary directory,
    // which may hold some of them (a socket or cache under /tmp).
    let sources = bind_order(paths)
        .into_iter()
        .map(|r| {
            let file = File::open(&r.path).map_err(|e| Error::io(format!("open {}", r.path.display()), e))?;
            Ok((r, file))
        })
        .collect::<Result<Vec<_>>>()?;
    let cwd = std::env::current_dir().ok();
    let new_root = std::env::temp_dir();
    mount(Some("tmpfs"), &new_root, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "mount tmpfs")?;
    for (r, source) in &sources {
        // The new root is mounted on the temporary directory: a kept path at or above it
        // (a socket in /tmp) is bound without its submounts, or the copy would carry the new
        // root itself, which is made read-only below.
        let recursive = !new_root.starts_with(&r.path);
        bind(r, source, &new_root, recursive)?;
    }
    remount(&new_root, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "new root")?;
    drop(sources);
    pivot_root(&new_root)?;
    // Relative paths of the command line still resolve when the working directory is on
    // the way to a kept path; otherwise they fail, as anything outside does.
    let back = cwd.filter(|d| std::env::set_current_dir(d).is_ok());
    if back.is_none() {
        std::env::set_current_dir("/").map_err(|e| Error::io("chdir /", e))?;
    }
    Ok(Ok(()))
}

/// `paths` once each (read-write wins), shallowest first: a path inside another is bound
/// after it, over it, with its own access.
fn bind_order(paths: &[Reachable]) -> Vec<Reachable> {
    let mut order: Vec<Reachable> = Vec::new();
    for r in paths {
        match order.iter_mut().find(|o| o.path == r.path) {
            Some(o) if r.access == Access::ReadWrite => o.access = Access::ReadWrite,
            Some(_) => {}
            None => order.push(r.clone()),
        }
    }
    order.sort_by_key(|r| r.path.components().count());
    order
}

/// Bind-mounts `source` (an open file or directory) at `r.path` under `root`, read-only
/// when asked, never with devices, set-user-id files or executables.
fn bind(r: &Reachable, source: &File, root: &Path, recursive: bool) -> Result<()> {
    let target = under(root, &r.path);
    let is_dir = source.metadata().map_err(|e| Error::io(format!("stat {}", r.path.display()), e))?.is_dir();
    if is_dir {
        fs::create_dir_all(&target).map_err(|e| Error::io(format!("create {}", target.display()), e))?;
    } else if !target.exists() {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&target)
            .map_err(|e| Error::io(format!("create {}", target.display()), e))?;
    }
    let from = PathBuf::from(format!("/proc/self/fd/{}", source.as_raw_fd()));
    let what = format!("bind {}", r.path.display());
    let rec = if recursive { libc::MS_REC } else { 0 };
    mount(Some(from.as_os_str().to_str().unwrap_or_default()), &target, None, libc::MS_BIND | rec, &what)?;
    let ro = if r.access == Access::ReadOnly { libc::MS_RDONLY } else { 0 };
    let flags = ro | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | kept_atime_flags(&target);
    if let Err(e) = remount(&target, libc::MS_BIND | flags, &what) {
        // A user namespace cannot change some flags of the host's mounts: the bind stays,
        // with the host's flags.
        tracing::warn!("sandbox: {}; kept as the host mounts it", super::describe(&e));
    }
    Ok(())
}

/// The atime flags of the mount holding `path`: a user namespace may not change them.
fn kept_atime_flags(path: &Path) -> libc::c_ulong {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs is plain data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    if flags & (libc::MS_NOATIME | libc::MS_RELATIME) == 0 {
        flags |= libc::MS_STRICTATIME;
    }
    flags
}

/// `path` (absolute) re-rooted under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn remount(target: &Path, flags: libc::c_ulong, what: &str) -> Result<()> {
    mount(None, target, None, libc::MS_REMOUNT | flags, &format!("remount {what}"))
}

fn mount(source: Option<&str>, target: &Path, fstype: Option<&str>, flags: libc::c_ulong, what: &str) -> Result<()> {
    let cstr = |s: &[u8]| CString::new(s).map_err(|e| Error::io(what.to_string(), io::Error::other(e)));
    let source = source.map(|s| cstr(s.as_bytes())).transpose()?;
    let target_c = cstr(target.as_os_str().as_bytes())?;
    let fstype = fstype.map(|s| cstr(s.as_bytes())).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string living through the call.
    let r = unsafe { libc::mount(ptr(&source), target_c.as_ptr(), ptr(&fstype), flags, std::ptr::null()) };
    if r != 0 {
        return Err(Error::last_os(format!("{what} ({})", target.display())));
    }
    Ok(())
}

/// Makes `new_root` (a mount point) the root and detaches the old root, so that no path
/// leads back to the host's filesystem.
fn pivot_root(new_root: &Path) -> Result<()> {
    std::env::set_current_dir(new_root).map_err(|e| Error::io(format!("chdir {}", new_root.display()), e))?;
    let dot = c".";
    // SAFETY: pivot_root(".", "."): both arguments are NUL-terminated strings. The old root
    // ends up stacked under the new one, and is detached next.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(Error::last_os("pivot_root"));
    }
    // SAFETY: umount2 of "." with MNT_DETACH: a NUL-terminated string and flags.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(Error::last_os("detach the old root"));
    }
    std::env::set_current_dir("/").map_err(|e| Error::io("chdir /", e))
}

/// Chroots into an empty directory that is deleted first, so that nothing can be created
/// in it. CAP_SYS_CHROOT is needed; all threads share the root, so this may run late.
pub fn chroot_empty() -> Result<()> {
    let mut template = std::env::temp_dir().join("incfsd-root.XXXXXX").into_os_string().into_vec();
    template.push(0);
    // SAFETY: mkdtemp rewrites the XXXXXX of a NUL-terminated template it owns for the call.
    if unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) }.is_null() {
        return Err(Error::last_os("create an empty directory to chroot into"));
    }
    template.pop();
    let dir = PathBuf::from(std::ffi::OsString::from_vec(template));
    std::env::set_current_dir(&dir).map_err(|e| Error::io(format!("chdir {}", dir.display()), e))?;
    fs::remove_dir(&dir).map_err(|e| Error::io(format!("remove {}", dir.display()), e))?;
    let dot = c".";
    // SAFETY: chroot(".") with a NUL-terminated string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(Error::last_os("chroot"));
    }
    std::env::set_current_dir("/").map_err(|e| Error::io("chdir /", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(path: &str, access: Access) -> Reachable {
        Reachable { what: "test", path: PathBuf::from(path), access, while_serving: false }
    }

    #[test]
    fn binds_each_path_once_outer_first_read_write_winning() {
        let order = bind_order(&[
            keep("/w/cache", Access::ReadWrite),
            keep("/w/store", Access::ReadOnly),
            keep("/w", Access::ReadOnly),
            keep("/w", Access::ReadWrite),
            keep("/w/store", Access::ReadOnly),
        ]);
        assert_eq!(
            order,
            [keep("/w", Access::ReadWrite), keep("/w/cache", Access::ReadWrite), keep("/w/store", Access::ReadOnly)]
        );
        assert_eq!(under(Path::new("/new"), Path::new("/w/cache")), PathBuf::from("/new/w/cache"));
    }
}
