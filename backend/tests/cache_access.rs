//! A second Unix user of the host can neither read, write nor stall a cache: every file is
//! the owner's alone, so there is nothing to open, and so no lock to take.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use incfs::cache::BlockCache;
use incfs::image::merkle;

/// The unprivileged user the child becomes (nobody).
const OTHER_UID: u32 = 65534;

/// In a forked child that became `OTHER_UID`: whether every way in to `path` was refused.
fn refused_to_another_user(path: &Path) -> bool {
    let c = CString::new(path.as_os_str().as_bytes()).expect("path");
    let dir = CString::new(path.parent().expect("parent").as_os_str().as_bytes()).expect("dir");
    // SAFETY: the child only makes system calls on these C strings and exits; it touches no
    // lock or allocation the parent's other threads might hold.
    match unsafe { libc::fork() } {
        0 => {
            // SAFETY: plain system calls on valid, NUL-terminated strings.
            let ok = unsafe {
                libc::setgid(OTHER_UID) == 0
                    && libc::setuid(OTHER_UID) == 0
                    && libc::open(c.as_ptr(), libc::O_RDONLY) < 0
                    && libc::open(c.as_ptr(), libc::O_RDWR) < 0
                    && libc::open(dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) < 0
            };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        pid if pid > 0 => {
            let mut status = 0;
            // SAFETY: waits for the child forked above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
        }
        _ => panic!("fork: {}", std::io::Error::last_os_error()),
    }
}

#[test]
fn a_second_user_can_neither_read_write_nor_lock_the_cache() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: becoming another user needs root");
        return;
    }
    // A parent everyone may traverse, so only the cache's own modes keep the other user out.
    let t = tempfile::tempdir().expect("tmp");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = t.path().join("cache");
    let cache = BlockCache::open(&dir).expect("cache");
    let block = vec![3u8; 4096];
    cache.insert_verified(&[(merkle::leaf_hash(&block), &block[..])]).expect("insert");
    let mut names: Vec<String> =
        fs::read_dir(&dir).expect("ls").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in ["header", "blocks", "slots", "log", "lock"] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    for name in &names {
        let p = dir.join(name);
        assert!(refused_to_another_user(&p), "another user got into {}", p.display());
    }
}
