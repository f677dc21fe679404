//! Feeds arbitrary bytes to the FUSE dispatcher as one request (after a real INIT), with an
//! arbitrary writable-buffer size, and checks the reply invariants of what it writes there,
//! at once or when a parked request completes.
#![no_main]

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use incfs_fuse::abi::{self, OutHeader};
use incfs_fuse::{
    Attr, DirEntry, DirSink, Dispatcher, Entry, Errno, FileSystem, FuseConfig, ReadReply, Reply, Response, ScatterBuf,
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
    fn read(
        &self,
        _ino: u64,
        _fh: u64,
        offset: u64,
        size: u32,
        _ctx: &incfs_fuse::Context,
        out: &mut ScatterBuf<'_>,
    ) -> ReadReply {
        match offset % 4 {
            // Parked, with one byte more than asked: it must be clamped.
            1 | 3 => ReadReply::bytes(Reply::pending(async move { Ok(vec![7u8; size as usize + 1]) }), size, out),
            // Writes what it may, then claims one byte more: the dispatcher must refuse that.
            2 => ReadReply::Done(out.write(0, &vec![7u8; size as usize]).map(|()| size + 1).map_err(|_| libc::EIO)),
            _ => ReadReply::Done(out.write(0, &vec![7u8; size as usize]).map(|()| size).map_err(|_| libc::EIO)),
        }
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

/// A reply of `n` bytes at the start of `out`: within the buffer, a header that tells the
/// truth and an errno the guest can take.
fn check(out: &[u8], n: u32) {
    let n = n as usize;
    assert!(n >= 16 && n <= out.len(), "reply {n} of {}", out.len());
    let (hdr, _) = abi::read_struct::<OutHeader>(out).expect("out header");
    assert_eq!(hdr.len as usize, n);
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
    let mut init_out = vec![0u8; 4096];
    assert!(matches!(d.dispatch(&init_req, &mut ScatterBuf::from_slice(&mut init_out)), Response::Done(_)));

    let mut out = vec![0u8; capacity];
    match d.dispatch(req, &mut ScatterBuf::from_slice(&mut out)) {
        Response::None => {}
        Response::Done(n) => check(&out, n),
        Response::Pending(mut fut) => {
            // The trivial filesystem's futures complete on first poll.
            let mut cx = Context::from_waker(Waker::noop());
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(Some(write)) => {
                    let mut late = vec![0u8; capacity];
                    if let Some(n) = write(&mut ScatterBuf::from_slice(&mut late)) {
                        check(&late, n);
                    }
                }
                Poll::Ready(None) => {}
                Poll::Pending => panic!("trivial future pending"),
            }
        }
    }
});
