//! Opening the cache's files as ssh treats `~/.ssh`: a cache belongs to one Unix user (the
//! daemons of that user share it). Its directory is created 0700 and its files 0600; a
//! directory or file that another user owns or that group or others can write is refused,
//! and no file is opened through a symbolic link.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The mode of a new cache directory.
const DIR_MODE: u32 = 0o700;
/// The mode of a new cache file.
pub(super) const FILE_MODE: u32 = 0o600;

/// Why a cache directory or file is refused.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeCacheFile {
    #[error("{path} is owned by uid {owner}, not by this user (uid {me}): a cache belongs to one user")]
    ForeignOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is writable by group or others (mode {mode:o}): `chmod go-w` it, or use another cache")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path} is a symbolic link or not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
}

impl From<UnsafeCacheFile> for io::Error {
    fn from(e: UnsafeCacheFile) -> Self {
        io::Error::new(io::ErrorKind::PermissionDenied, e)
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses what another user owns or what group or others can write.
fn check_owner_and_mode(path: &Path, meta: &fs::Metadata) -> Result<(), UnsafeCacheFile> {
    let me = euid();
    if meta.uid() != me {
        return Err(UnsafeCacheFile::ForeignOwner { path: path.into(), owner: meta.uid(), me });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(UnsafeCacheFile::Writable { path: path.into(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

/// Creates `dir` (0700, its parents as usual) if needed, then checks it. `dir` itself may
/// be a symbolic link (to put a cache elsewhere): what it points to is checked.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(UnsafeCacheFile::NotADirectory { path: dir.into() }.into());
    }
    check_owner_and_mode(dir, &meta)?;
    Ok(())
}

/// Opens (creating 0600 if needed) one of the cache's files, never through a link, and
/// checks the file opened.
pub(super) fn open_private_file(dir: &Path, name: &str) -> io::Result<File> {
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        // O_NONBLOCK: a FIFO planted in place of a file must not hang the open.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| refuse_link(e, &path))?;
    check_file(&path, &file)?;
    Ok(file)
}

/// Reads a whole file of the cache (a saved manifest), never through a link.
pub(super) fn read_private_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| refuse_link(e, path))?;
    check_file(path, &file)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The permissions of the temporary files renamed into the cache.
pub(super) fn file_permissions() -> Permissions {
    Permissions::from_mode(FILE_MODE)
}

fn check_file(path: &Path, file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(UnsafeCacheFile::NotAFile { path: path.into() }.into());
    }
    check_owner_and_mode(path, &meta)?;
    Ok(())
}

/// O_NOFOLLOW fails with ELOOP on a link: say so.
fn refuse_link(e: io::Error, path: &Path) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        UnsafeCacheFile::NotAFile { path: path.into() }.into()
    } else {
        e
    }
}
