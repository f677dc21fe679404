//! A virtio-blk request as a hostile guest lays it out, from the walked chain on: the
//! descriptor lengths and the header and data bytes are the input, the transport's walk is
//! modelled (zero-length descriptors skipped, at most `max_readable` bytes copied), then
//! `validate` and `interpret` run against arbitrary disk geometry. Guest memory itself is
//! not part of this target: the walk over real descriptor tables is incfs-vhost's.
#![no_main]

use incfs::blk::request::{
    interpret, max_readable, validate, ChainError, Limits, Request, Support, HEADER_LEN, SECTOR_SIZE, SEGMENT_LEN,
};
use incfs_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // Geometry within what DeviceConfig::validate allows: max_data is size_max * seg_max,
    // 4 KiB..64 MiB (kept to 1 MiB here so a run stays fast).
    let capacity = input.u64() & !(SECTOR_SIZE - 1);
    let max_data = (4096 + input.u32() as usize % (1 << 20)) & !511;
    let limits = Limits {
        capacity,
        max_data,
        max_discard_sectors: input.u32() % (1 << 23) + 1,
        max_discard_seg: u32::from(input.u8()) + 1,
    };
    let flags = input.u8();
    let support = Support { writable: flags & 1 != 0, discard: flags & 2 != 0, write_zeroes: flags & 4 != 0 };
    let error = match flags >> 3 & 3 {
        1 => Some(incfs_vhost::ChainError::OutsideMemory),
        2 => Some(incfs_vhost::ChainError::ReadableAfterWritable),
        _ => None,
    };
    // Descriptors: (length, device-writable), at guest addresses from `base` on.
    let mut addr = input.u64();
    let ndesc = input.u8() % 8;
    let (mut readable_len, mut writable, mut writable_len) = (0usize, Vec::new(), 0usize);
    for _ in 0..ndesc {
        let len = input.u32() as usize % (max_data + 64);
        let write = input.u8() & 1 != 0;
        if len == 0 {
            continue;
        }
        if write {
            writable_len = writable_len.saturating_add(len);
            writable.push((GuestAddress(addr), len));
        } else {
            readable_len += len;
        }
        addr = addr.wrapping_add(len as u64);
    }
    // The bytes the walk copies: the input's rest, as much of it as the readable part holds.
    let max_in = max_readable(&limits);
    let mut request = input.rest().to_vec();
    request.resize(readable_len.min(max_in), 0);
    if error.is_some() {
        request.clear();
    }
    let walked = incfs_vhost::Chain { head: 3, request, readable_len, writable: writable.clone(), writable_len, error };
    let mut chain = match validate(walked, &limits) {
        Ok(chain) => chain,
        Err((head, status, e)) => {
            assert_eq!(head, 3);
            match e {
                // No writable byte, or the last one's address overflows.
                ChainError::NoStatus => assert!(
                    status.is_none() && writable.last().is_none_or(|&(a, l)| a.0.checked_add(l as u64 - 1).is_none())
                ),
                ChainError::Malformed(_) => assert!(status.is_some()),
            }
            return;
        }
    };
    // The status byte is the last writable byte; the regions left hold the rest.
    let &(last, last_len) = writable.last().expect("a valid chain has a status byte");
    assert_eq!(chain.status, GuestAddress(last.0 + (last_len as u64 - 1)));
    assert_eq!(chain.writable_len + 1, writable_len);
    assert_eq!(chain.writable.iter().map(|r| r.1).sum::<usize>(), chain.writable_len);
    assert!(chain.writable_len <= max_data);
    assert!(chain.readable.len() >= HEADER_LEN && chain.readable.len() <= max_in);
    let inside = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= capacity);
    match interpret(&mut chain, &limits, support) {
        Request::Read { offset, len } => {
            assert!(len == chain.writable_len && len % 512 == 0 && len <= max_data);
            assert!(inside(offset, len as u64));
        }
        Request::Write { offset, data } => {
            assert!(support.writable && data.len() % 512 == 0 && data.len() <= max_data);
            assert!(inside(offset, data.len() as u64));
        }
        Request::Discard(segs) | Request::WriteZeroes(segs) => {
            assert!(!segs.is_empty() && segs.len() <= limits.max_discard_seg as usize);
            assert!(segs.len() * SEGMENT_LEN <= max_in);
            for s in segs {
                assert!(s.len <= u64::from(limits.max_discard_sectors) * SECTOR_SIZE);
                assert!(inside(s.offset, s.len));
            }
        }
        Request::Flush | Request::GetId | Request::Status(_) => {}
    }
});
