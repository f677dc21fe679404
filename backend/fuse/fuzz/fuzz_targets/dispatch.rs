//! Feeds arbitrary bytes to the FUSE dispatcher as one request (after a real INIT), with an
//! arbitrary writable-buffer size, both through the zero-copy READ path and the ordinary
//! one, and checks the reply invariants.
#![no_main]

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use incfs_fuse::abi::{self, OutHeader};
use incfs_fuse::{
    Attr, DirEntry, DirSink, Dispatcher, Entry, Errno, FileSystem, FuseConfig, Reply, ReplyBuf, Response, ScatterBuf,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::ByteValued;

/// Root (1) with one file "f" (2) that has an xattr; reads of odd offsets are pending.
struct Trivial;

impl FileSystem for Trivial {
    fn lookup(&self, parent: u64, name: &[u8]) -> Result<Entry, Errno> {
        if parent == 1 && name == b"f" {
            Ok(Entry { ino: 2, attr: self.getattr(2)?.0, ..Default::default() })
        } else {
            Err(libc::ENOENT)
        }
    }
    fn getattr(&self, ino: u64) -> Result<(Attr, Duration), Errno> {
        match ino {
            1 => Ok((Attr { ino, mode: libc::S_IFDIR | 0o555, ..Default::default() }, Duration::ZERO)),
            2 => Ok((Attr { ino, mode: libc::S_IFREG | 0o444, size: 100, ..Default::default() }, Duration::ZERO)),
            _ => Err(libc::ENOENT),
        }
    }
    fn read(&self, _ino: u64, _fh: u64, offset: u64, size: u32, _ctx: &incfs_fuse::Context) -> Reply<Vec<u8>> {
        // Deliberately return up to size + 1 bytes: the dispatcher must clamp.
        let n = (size as usize + 1).min(8192);
        if offset % 2 == 1 {
            Reply::pending(async move { Ok(vec![7u8; n]) })
        } else {
            Reply::ok(vec![7u8; n])
        }
    }
    fn read_direct(
        &self,
        _ino: u64,
        _fh: u64,
        offset: u64,
        size: u32,
        _ctx: &incfs_fuse::Context,
        buf: &mut ScatterBuf<'_>,
    ) -> Option<u32> {
        // Writes everything it may, then claims one byte more on offsets that are 2 mod 4:
        // the dispatcher must refuse that.
        buf.write(0, &vec![7u8; size as usize]).ok()?;
        (offset % 4 != 3).then_some(size + (offset % 4 == 2) as u32)
    }
    fn readdir(&self, _ino: u64, _fh: u64, offset: u64, sink: &mut dyn DirSink) -> Result<(), Errno> {
        let names: [&[u8]; 3] = [b".", b"..", b"f"];
        for (i, n) in names.iter().enumerate().skip(offset.min(3) as usize) {
            if !sink.add(DirEntry { ino: 1 + (i as u64 == 2) as u64, offset: i as u64 + 1, kind: 4, name: n }) {
                break;
            }
        }
        Ok(())
    }
    fn getxattr(&self, _ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        if name == b"user.x" {
            Ok(vec![1; 300])
        } else {
            Err(libc::ENODATA)
        }
    }
    fn listxattr(&self, _ino: u64) -> Result<Vec<Vec<u8>>, Errno> {
        Ok(vec![b"user.x".to_vec()])
    }
}

fn check(reply: &ReplyBuf, capacity: usize) {
    assert!(reply.len() <= capacity, "reply {} > capacity {}", reply.len(), capacity);
    let (hdr, _) = abi::read_struct::<OutHeader>(&reply.head).expect("out header");
    assert_eq!(hdr.len as usize, reply.len());
    assert!(hdr.error <= 0 && hdr.error > -4096);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let capacity = usize::from(u16::from_le_bytes([data[0], data[1]])) * 32;
    let req = &data[2..];
    let d = Dispatcher::new(Arc::new(Trivial), FuseConfig::default());
    let init = abi::InitIn { major: 7, minor: 38, max_readahead: 1 << 20, flags: u32::MAX, ..Default::default() };
    let mut init_req =
        abi::InHeader { len: 40 + 64, opcode: abi::FUSE_INIT, unique: 1, ..Default::default() }.as_slice().to_vec();
    init_req.extend_from_slice(init.as_slice());
    assert!(matches!(d.dispatch(&init_req, 4096), Response::Ready(_)));

    // The zero-copy READ path first, as the device tries it: within the buffer, a header
    // that tells the truth, or nothing at all.
    let mut out = vec![0u8; capacity];
    if let Some(n) = d.read_direct(req, &mut ScatterBuf::from_slice(&mut out)) {
        let n = n as usize;
        assert!(n >= 16 && n <= capacity, "direct reply {n} of {capacity}");
        let (hdr, _) = abi::read_struct::<OutHeader>(&out).expect("out header");
        assert_eq!((hdr.len as usize, hdr.error), (n, 0));
    }

    match d.dispatch(req, capacity) {
        Response::None => {}
        Response::Ready(r) => check(&r, capacity),
        Response::Pending(mut fut) => {
            // The trivial filesystem's futures complete on first poll.
            let mut cx = Context::from_waker(Waker::noop());
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(Some(r)) => check(&r, capacity),
                Poll::Ready(None) => {}
                Poll::Pending => panic!("trivial future pending"),
            }
        }
    }
});
