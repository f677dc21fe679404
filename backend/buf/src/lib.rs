//! The buffer every layer reads into: scattered host memory. Zero-copy READ replies go from
//! the host file straight into the guest's writable buffers (one `preadv`), instead of into a
//! `Vec` that is then copied into guest memory. virtiofsd answers READ the same way.
//!
//! A [`ScatterBuf`] is the writable part of one descriptor chain as host memory. The guest may
//! look at that memory at any time, so no Rust reference to it is ever made: the kernel
//! writes it (`preadv`) or raw-pointer copies do. Offsets are relative to a base that the
//! dispatcher moves past the FUSE out_header before handing the buffer to the filesystem.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;

/// Most iovecs one `preadv` takes (IOV_MAX on Linux).
const IOV_MAX: usize = 1024;

/// Host memory of a guest's writable descriptors, valid for `'a`.
pub struct ScatterBuf<'a> {
    segs: Vec<(*mut u8, usize)>,
    total: usize,
    base: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

impl<'a> ScatterBuf<'a> {
    /// # Safety
    /// Every `(ptr, len)` must be valid for writes of `len` bytes for `'a`, and must not
    /// overlap memory Rust holds a reference to. (Segments overlapping each other, as a
    /// guest's descriptors may, only garble what ends up there.)
    pub unsafe fn new(segs: Vec<(*mut u8, usize)>) -> Self {
        let total = segs.iter().map(|s| s.1).sum();
        ScatterBuf { segs, total, base: 0, _mem: PhantomData }
    }

    /// A buffer over memory the caller owns (tests, and transports that are not guests).
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        // SAFETY: the exclusive borrow of `buf` lasts as long as the ScatterBuf.
        unsafe { Self::new(vec![(buf.as_mut_ptr(), buf.len())]) }
    }

    /// Bytes from the base to the end.
    pub fn len(&self) -> usize {
        self.total - self.base
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves the base to `base` bytes from the start of the writable area.
    pub fn set_base(&mut self, base: usize) {
        self.base = base.min(self.total);
    }

    fn check(&self, at: usize, len: usize) -> io::Result<usize> {
        match at.checked_add(len) {
            Some(end) if end <= self.len() => Ok(self.base + at),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "outside the guest buffer")),
        }
    }

    /// Calls `f(ptr, n)` for each piece of [start, start + len) in segment order.
    fn pieces(&self, start: usize, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) {
        let (mut skip, mut left, mut done) = (start, len, 0);
        for &(ptr, seg) in &self.segs {
            if left == 0 {
                break;
            }
            if skip >= seg {
                skip -= seg;
                continue;
            }
            let n = (seg - skip).min(left);
            // SAFETY: skip < seg, so the pointer stays inside the segment.
            f(unsafe { ptr.add(skip) }, n, done);
            done += n;
            left -= n;
            skip = 0;
        }
    }

    /// Reads `len` bytes of `file` at `offset` into [at, at + len). Returns the bytes read,
    /// fewer only at end of file.
    pub fn read_from(&mut self, file: &File, offset: u64, at: usize, len: usize) -> io::Result<usize> {
        let start = self.check(at, len)?;
        let mut done = 0;
        let mut iov = Vec::with_capacity(self.segs.len().min(IOV_MAX));
        while done < len {
            iov.clear();
            self.pieces(start + done, len - done, |p, n, _| {
                if iov.len() < IOV_MAX {
                    iov.push(libc::iovec { iov_base: p.cast(), iov_len: n });
                }
            });
            let pos = offset
                .checked_add(done as u64)
                .and_then(|p| i64::try_from(p).ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            // SAFETY: each iovec lies inside a segment valid for writes (see `new`); the count
            // is at most IOV_MAX.
            let r = unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, pos) };
            match r {
                0 => break,
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Fills [at, at + len) with zeroes.
    pub fn zero(&mut self, at: usize, len: usize) -> io::Result<()> {
        let start = self.check(at, len)?;
        // SAFETY: every piece lies inside a segment valid for writes.
        self.pieces(start, len, |p, n, _| unsafe { p.write_bytes(0, n) });
        Ok(())
    }

    /// Copies `data` to [at, at + data.len()).
    pub fn write(&mut self, at: usize, data: &[u8]) -> io::Result<()> {
        let start = self.check(at, data.len())?;
        // SAFETY: every piece lies inside a segment valid for writes, and `data` is Rust
        // memory, never guest memory, so they do not overlap.
        self.pieces(start, data.len(), |p, n, done| unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr().add(done), p, n)
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Three segments of odd sizes over one Vec, as a guest's scattered pages would be.
    fn scattered(mem: &mut [u8]) -> ScatterBuf<'_> {
        let p = mem.as_mut_ptr();
        // SAFETY: disjoint ranges of `mem`, which outlives the buffer.
        unsafe { ScatterBuf::new(vec![(p, 5), (p.add(5), 4096), (p.add(4101), 3000)]) }
    }

    #[test]
    fn reads_zeroes_and_writes_across_segments_relative_to_the_base() {
        let mut f = tempfile::tempfile().expect("tempfile");
        let content: Vec<u8> = (0..10000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&content).expect("write");
        let mut mem = vec![0xaau8; 7101];
        {
            let mut b = scattered(&mut mem);
            assert_eq!(b.len(), 7101);
            b.set_base(16);
            assert_eq!(b.read_from(&f, 100, 0, 5000).expect("read"), 5000);
            b.zero(5000, 85).expect("zero");
            // Short at end of file.
            assert_eq!(b.read_from(&f, 9000, 5085, 2000).expect("read"), 1000);
            b.set_base(0);
            b.write(0, &[7; 16]).expect("write");
            assert!(b.read_from(&f, 0, 7000, 200).is_err(), "past the end is refused");
            assert!(b.zero(usize::MAX, 2).is_err());
        }
        assert_eq!(&mem[..16], &[7; 16]);
        assert_eq!(&mem[16..5016], &content[100..5100]);
        assert!(mem[5016..5101].iter().all(|&b| b == 0));
        assert_eq!(&mem[5101..6101], &content[9000..]);
        assert!(mem[6101..].iter().all(|&b| b == 0xaa));
    }
}
