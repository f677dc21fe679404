//! A tiny in-memory filesystem and a daemon harness for the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use incfs_fuse::{
    Attr, Context, DirEntry, DirSink, Entry, Errno, FileSystem, ReadReply, Reply, ScatterBuf, StatFs, VirtioFsConfig,
    VirtioFsServer,
};

pub const ROOT: u64 = 1;
pub const DIR: u64 = 2;
pub const FILE: u64 = 3;
pub const LINK: u64 = 4;
pub const SLOW: u64 = 5;
pub const INNER: u64 = 6;

/// Size of FILE: three pages and a bit.
pub const FILE_SIZE: usize = 3 * 4096 + 100;
pub const SLOW_DELAY: Duration = Duration::from_millis(400);

pub fn file_data() -> Vec<u8> {
    (0..FILE_SIZE).map(|i| (i % 251) as u8).collect()
}

struct Node {
    attr: Attr,
    children: Vec<(&'static [u8], u64)>,
}

/// root/
///   dir/inner      (small file)
///   file           (FILE_SIZE bytes, xattr user.test = "hello", 2 links)
///   hard           (hard link to file)
///   link -> file
///   slow           (reads complete after SLOW_DELAY)
pub struct TestFs {
    nodes: HashMap<u64, Node>,
    data: Vec<u8>,
    /// Outstanding lookup counts, to check FORGET handling.
    pub lookups: Mutex<HashMap<u64, u64>>,
    pub destroyed: Mutex<u32>,
    pub inits: Mutex<u32>,
}

fn attr(ino: u64, mode: u32, size: u64, nlink: u32) -> Attr {
    Attr {
        ino,
        size,
        blocks: size.div_ceil(512),
        mode,
        nlink,
        blksize: 4096,
        mtime: 1_700_000_000,
        ..Default::default()
    }
}

impl TestFs {
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                attr: attr(ROOT, libc::S_IFDIR | 0o555, 4096, 3),
                children: vec![(b"dir", DIR), (b"file", FILE), (b"hard", FILE), (b"link", LINK), (b"slow", SLOW)],
            },
        );
        nodes.insert(DIR, Node { attr: attr(DIR, libc::S_IFDIR | 0o555, 4096, 2), children: vec![(b"inner", INNER)] });
        nodes.insert(FILE, Node { attr: attr(FILE, libc::S_IFREG | 0o444, FILE_SIZE as u64, 2), children: vec![] });
        nodes.insert(LINK, Node { attr: attr(LINK, libc::S_IFLNK | 0o777, 4, 1), children: vec![] });
        nodes.insert(SLOW, Node { attr: attr(SLOW, libc::S_IFREG | 0o444, 5, 1), children: vec![] });
        nodes.insert(INNER, Node { attr: attr(INNER, libc::S_IFREG | 0o400, 3, 1), children: vec![] });
        TestFs {
            nodes,
            data: file_data(),
            lookups: Mutex::new(HashMap::new()),
            destroyed: Mutex::new(0),
            inits: Mutex::new(0),
        }
    }

    pub fn lookup_count(&self, ino: u64) -> u64 {
        self.lookups.lock().map(|m| m.get(&ino).copied().unwrap_or(0)).unwrap_or(0)
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.nodes.get(&ino).ok_or(libc::ENOENT)
    }
}

fn slice_at(data: &[u8], offset: u64, size: u32) -> Vec<u8> {
    let start = (offset.min(data.len() as u64)) as usize;
    let end = start.saturating_add(size as usize).min(data.len());
    data[start..end].to_vec()
}

impl FileSystem for TestFs {
    fn init(&self, _info: &incfs_fuse::InitInfo) {
        if let Ok(mut n) = self.inits.lock() {
            *n += 1;
        }
    }

    fn destroy(&self) {
        if let Ok(mut n) = self.destroyed.lock() {
            *n += 1;
        }
        if let Ok(mut m) = self.lookups.lock() {
            m.clear();
        }
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno> {
        let p = self.node(parent)?;
        if p.attr.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        let ino = p.children.iter().find(|(n, _)| *n == name).map(|(_, i)| *i).ok_or(libc::ENOENT)?;
        if let Ok(mut m) = self.lookups.lock() {
            *m.entry(ino).or_default() += 1;
        }
        Ok(Entry {
            ino,
            generation: 1,
            attr: self.node(ino)?.attr,
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_millis(1500),
        })
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if let Ok(mut m) = self.lookups.lock() {
            let c = m.entry(ino).or_default();
            *c = c.saturating_sub(nlookup);
        }
    }

    fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno> {
        Ok((self.node(ino)?.attr, Duration::from_secs(1)))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        if ino == LINK {
            Ok(b"file".to_vec())
        } else {
            self.node(ino)?;
            Err(libc::EINVAL)
        }
    }

    fn open(&self, ino: u64, flags: u32) -> Result<(u64, u32), Errno> {
        let n = self.node(ino)?;
        if n.attr.mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(libc::EISDIR);
        }
        if (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(libc::EROFS);
        }
        Ok((ino * 100, incfs_fuse::abi::FOPEN_KEEP_CACHE))
    }

    fn read(&self, ino: u64, _fh: u64, offset: u64, size: u32, _ctx: &Context, out: &mut ScatterBuf<'_>) -> ReadReply {
        let reply = match ino {
            FILE => Reply::ok(slice_at(&self.data, offset, size)),
            INNER => Reply::ok(slice_at(b"abc", offset, size)),
            SLOW => Reply::pending(async move {
                tokio::time::sleep(SLOW_DELAY).await;
                Ok(slice_at(b"slow!", offset, size))
            }),
            _ if self.nodes.contains_key(&ino) => Reply::err(libc::EISDIR),
            _ => Reply::err(libc::ENOENT),
        };
        ReadReply::bytes(reply, size, out)
    }

    fn readdir(&self, ino: u64, _fh: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno> {
        let n = self.node(ino)?;
        if n.attr.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        let parent = ROOT; // both directories live in the root
        let mut all: Vec<(&[u8], u64)> = vec![(b".", ino), (b"..", parent)];
        all.extend(n.children.iter().map(|(name, i)| (*name, *i)));
        for (i, (name, child)) in all.iter().enumerate().skip(offset as usize) {
            let kind = match self.node(*child)?.attr.mode & libc::S_IFMT {
                libc::S_IFDIR => libc::DT_DIR,
                libc::S_IFLNK => libc::DT_LNK,
                _ => libc::DT_REG,
            };
            if !sink.add(DirEntry { ino: *child, offset: i as u64 + 1, kind: kind.into(), name }) {
                break;
            }
        }
        Ok(())
    }

    fn statfs(&self, _ino: u64) -> Result<StatFs, Errno> {
        Ok(StatFs { blocks: 100, files: 6, ..Default::default() })
    }

    fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        self.node(ino)?;
        if ino == FILE && name == b"user.test" {
            Ok(b"hello".to_vec())
        } else {
            Err(libc::ENODATA)
        }
    }

    fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        self.node(ino)?;
        Ok(if ino == FILE { vec![b"user.test".to_vec(), b"user.other".to_vec()] } else { vec![] })
    }

    fn lseek(&self, ino: u64, _fh: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        let size = self.node(ino)?.attr.size;
        if offset >= size {
            return Err(libc::ENXIO);
        }
        match whence as i32 {
            libc::SEEK_DATA => Ok(offset),
            libc::SEEK_HOLE => Ok(size),
            _ => Err(libc::EINVAL),
        }
    }
}

/// A daemon serving a [`TestFs`] on a socket in a temporary directory.
pub struct Harness {
    pub fs: Arc<TestFs>,
    pub socket: PathBuf,
    pub rt: tokio::runtime::Runtime,
    pub stopper: incfs_fuse::ServerStopper,
    /// Serves `connections` frontends in turn, then returns each result.
    pub thread: Option<JoinHandle<Vec<incfs_fuse::Result<bool>>>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub fn start(cfg: VirtioFsConfig, connections: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vfs.sock");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let fs = Arc::new(TestFs::new());
        let mut server = VirtioFsServer::bind(&socket, fs.clone(), cfg, rt.handle().clone()).expect("bind");
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || (0..connections).map(|_| server.serve_one()).collect());
        Harness { fs, socket, rt, stopper, thread: Some(thread), _dir: dir }
    }

    /// Waits for the server thread (all its connections must have ended).
    pub fn join(&mut self) -> Vec<incfs_fuse::Result<bool>> {
        self.thread.take().map(|t| t.join().expect("server thread panicked")).unwrap_or_default()
    }
}
