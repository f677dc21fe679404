//! The sandbox of `incfsd run`/`blk`, applied in forked children of the test process: the
//! seccomp filter the daemon installs kills (or, in `log` mode, lets through) system calls
//! outside its allow-list while the daemon's own calls work, and the filesystem sandbox
//! leaves only the kept paths reachable.
//!
//! Each case runs in a child made with fork(): a filter or a namespace is for the whole
//! process, and the child of a fork has one thread, as the daemon when it enters the
//! sandbox. The child ends with _exit, never returning into the test harness.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use incfs::sandbox::{seccomp, Access, FsSandbox, Reachable, Sandbox, SandboxConfig, SeccompMode};

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

/// Runs `f` in a forked child; its return value is the exit status (a panic exits 101).
fn in_child(f: impl FnOnce() -> i32) -> End {
    // SAFETY: the child only runs `f` (which allocates; glibc's malloc is usable after
    // fork) and then _exit, without unwinding into the harness or running atexit hooks.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked; `status` is a valid int to fill.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        End::Signaled(libc::WTERMSIG(status))
    } else {
        End::Exited(libc::WEXITSTATUS(status))
    }
}

/// What a serving daemon does: file I/O on an open file, a new file by name, a thread,
/// sockets of its three families, an eventfd, saving an image dictionary in its cache
/// (opened before the filter, as the daemon's). Returns 0, or the step that failed.
fn daemon_like_calls(dir: &Path, cache: &incfs::cache::BlockCache) -> i32 {
    let path = dir.join("data");
    let Ok(f) = fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) else {
        return 10;
    };
    if f.write_all_at(b"block", 4096).is_err() {
        return 11;
    }
    let mut buf = [0u8; 5];
    if f.read_exact_at(&mut buf, 4096).is_err() || &buf != b"block" || f.metadata().is_err() || f.sync_data().is_err() {
        return 12;
    }
    if fs::write(dir.join("trace.tmp"), b"x")
        .and_then(|()| fs::rename(dir.join("trace.tmp"), dir.join("trace")))
        .is_err()
    {
        return 13;
    }
    match std::thread::spawn(|| 7).join() {
        Ok(7) => {}
        _ => return 14,
    }
    for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
        // SAFETY: socket with constant arguments, closed at once.
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        // SAFETY: closes the fd just made.
        if fd < 0 || unsafe { libc::close(fd) } != 0 {
            return 15;
        }
    }
    // SAFETY: eventfd with flags only; the fd is closed at once.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    // SAFETY: closes the fd just made.
    if efd < 0 || unsafe { libc::close(efd) } != 0 {
        return 16;
    }
    // The first block that needs the image's dictionary saves it (a temporary file renamed:
    // renameat, which once killed the worker).
    let id = [3u8; 32];
    if cache.save_dictionary(&id, b"a dictionary").is_err() || cache.load_dictionary(&id).is_none() {
        return 17;
    }
    0
}

/// Installs the daemon's filter in a child, checks that the daemon's own calls work, then
/// makes `forbidden`.
fn filtered(mode: SeccompMode, forbidden: impl FnOnce() -> i32) -> End {
    let dir = tempfile::tempdir().expect("tmp");
    let programs = seccomp::programs(mode).expect("filters compile");
    assert_eq!(programs.len(), 3, "the allow-list and two refusals");
    let cache = incfs::cache::BlockCache::open(&dir.path().join("cache")).expect("cache");
    in_child(|| {
        seccomp::install(mode).expect("install");
        match daemon_like_calls(dir.path(), &cache) {
            0 => forbidden(),
            step => step,
        }
    })
}

#[test]
fn calls_outside_the_allow_list_kill_the_process() {
    // Raw system calls with constant or null arguments; they are refused before the kernel
    // reads any of them.
    // SAFETY: PTRACE_TRACEME takes no pointers.
    let ptrace = || unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) as i32 };
    assert_eq!(filtered(SeccompMode::Kill, ptrace), End::Signaled(libc::SIGSYS), "ptrace");
    // SAFETY: NUL-terminated constant strings and a null data pointer.
    let mount = || unsafe { libc::mount(c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
    assert_eq!(filtered(SeccompMode::Kill, mount), End::Signaled(libc::SIGSYS), "mount");
    let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
    // SAFETY: a NUL-terminated path and a null-terminated argv that outlive the call.
    let execve = || unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), std::ptr::null()) };
    assert_eq!(filtered(SeccompMode::Kill, execve), End::Signaled(libc::SIGSYS), "execve");
    // SAFETY: unshare takes only flags.
    let unshare = || unsafe { libc::unshare(libc::CLONE_NEWUSER) };
    assert_eq!(filtered(SeccompMode::Kill, unshare), End::Signaled(libc::SIGSYS), "unshare");
}

#[test]
fn no_new_process_and_no_executable_memory() {
    // std spawns with clone3 (refused with ENOSYS) then clone without CLONE_THREAD, or
    // fork: either is a new process, and kills.
    let spawn = || std::process::Command::new("/bin/true").status().map_or(1, |_| 0);
    assert_eq!(filtered(SeccompMode::Kill, spawn), End::Signaled(libc::SIGSYS), "spawn");
    // SAFETY: an anonymous mapping that is never used.
    let exec_map = || unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        (p == libc::MAP_FAILED) as i32
    };
    assert_eq!(filtered(SeccompMode::Kill, exec_map), End::Signaled(libc::SIGSYS), "mmap PROT_EXEC");
}

#[test]
fn refused_calls_answer_an_errno_libraries_handle() {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let refusals = move || {
        // SAFETY: socket with constant arguments; a refused call returns -1.
        if unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) } != -1 || errno() != libc::EAFNOSUPPORT {
            return 20;
        }
        // SAFETY: clone3 with a null argument is refused before the kernel reads it.
        if unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) } != -1 || errno() != libc::ENOSYS {
            return 21;
        }
        0
    };
    assert_eq!(filtered(SeccompMode::Kill, refusals), End::Exited(0));
}

#[test]
fn log_mode_lets_unlisted_calls_through() {
    // SAFETY: PTRACE_TRACEME with no tracer only marks the child as traceable.
    let ptrace = || unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) as i32 };
    assert_eq!(filtered(SeccompMode::Log, ptrace), End::Exited(0));
}

/// Enters the filesystem sandbox in a child with one kept directory, then checks what it
/// can reach, locks (seccomp) and checks the daemon's calls still work.
fn confined(fs_sandbox: FsSandbox) -> End {
    let kept = tempfile::tempdir().expect("tmp");
    let outside = tempfile::tempdir().expect("tmp");
    fs::write(kept.path().join("kept"), b"kept").expect("write");
    fs::write(outside.path().join("secret"), b"secret").expect("write");
    let paths = [Reachable {
        what: "the test directory",
        path: kept.path().to_path_buf(),
        access: Access::ReadWrite,
        while_serving: true,
    }];
    let cfg = SandboxConfig { fs: fs_sandbox, seccomp: SeccompMode::Kill, rlimit_nofile: Some(256) };
    let cache = incfs::cache::BlockCache::open(&kept.path().join("cache")).expect("cache");
    in_child(|| {
        let sandbox = match Sandbox::enter(&cfg, &paths) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("enter: {e:?}");
                return 30;
            }
        };
        if sandbox.fs == incfs::sandbox::InForce::None {
            eprintln!("no filesystem sandbox on this host: only seccomp is checked");
        } else {
            if fs::read(outside.path().join("secret")).is_ok() || fs::read("/etc/passwd").is_ok() {
                return 31;
            }
            let mut s = String::new();
            if fs::File::open(kept.path().join("kept")).and_then(|mut f| f.read_to_string(&mut s)).is_err()
                || s != "kept"
            {
                return 32;
            }
        }
        if sandbox.lock().is_err() {
            return 33;
        }
        daemon_like_calls(kept.path(), &cache)
    })
}

#[test]
fn namespace_sandbox_keeps_only_the_given_paths() {
    assert_eq!(confined(FsSandbox::Namespace), End::Exited(0));
}

#[test]
fn refused_namespaces_fall_back_to_landlock() {
    // A host that refuses namespaces, made with a filter of the test's own: unshare fails
    // with EPERM, as without user namespaces.
    let refuse_unshare = seccompiler::SeccompFilter::new(
        [(libc::SYS_unshare, Vec::new())].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().expect("arch"),
    )
    .and_then(seccompiler::BpfProgram::try_from)
    .expect("filter");
    let dir = tempfile::tempdir().expect("tmp");
    let paths = [Reachable {
        what: "a directory",
        path: dir.path().to_path_buf(),
        access: Access::ReadOnly,
        while_serving: true,
    }];
    let cfg = SandboxConfig { fs: FsSandbox::Namespace, seccomp: SeccompMode::None, rlimit_nofile: None };
    let end = in_child(|| {
        seccompiler::apply_filter(&refuse_unshare).expect("install");
        match Sandbox::enter(&cfg, &paths).map(|s| s.fs) {
            Ok(incfs::sandbox::InForce::Landlock { .. }) => 0,
            // A kernel without Landlock: the fallback's fallback, with a warning.
            Ok(incfs::sandbox::InForce::None) => 0,
            other => {
                eprintln!("{other:?}");
                40
            }
        }
    });
    assert_eq!(end, End::Exited(0));
}

#[test]
fn landlock_sandbox_keeps_only_the_given_paths() {
    assert_eq!(confined(FsSandbox::Landlock), End::Exited(0));
}

/// A kept path that is the temporary directory itself (where the new root is mounted), as
/// for a socket in /tmp: it stays writable. Bound with its submounts, it carried the new
/// root along, read-only, and `incfsd run --socket /tmp/x.sock` could not listen.
#[test]
fn the_temporary_directory_kept_stays_writable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let socket = tmp.path().join("incfsd.sock");
    let paths = [Reachable {
        what: "the socket's directory",
        path: tmp.path().to_path_buf(),
        access: Access::ReadWrite,
        while_serving: true,
    }];
    let cfg = SandboxConfig { fs: FsSandbox::Namespace, seccomp: SeccompMode::None, rlimit_nofile: None };
    let end = in_child(|| {
        // The new root goes on the temporary directory: make it the kept one.
        std::env::set_var("TMPDIR", tmp.path());
        match Sandbox::enter(&cfg, &paths) {
            Ok(s) if s.fs == incfs::sandbox::InForce::None => {
                eprintln!("no filesystem sandbox on this host: nothing to check");
                return 0;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("enter: {e:?}");
                return 50;
            }
        }
        match std::os::unix::net::UnixListener::bind(&socket) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("listen on {}: {e}", socket.display());
                51
            }
        }
    });
    assert_eq!(end, End::Exited(0));
    assert!(socket.exists(), "the socket was made in the host's directory");
}
