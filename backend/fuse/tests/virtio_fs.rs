//! End-to-end tests without QEMU: the test frontend drives our daemon through vhost-user.

mod common;

use std::time::{Duration, Instant};

use common::*;
use incfs_fuse::abi;
use incfs_fuse::{ServerConfig, VirtioFsConfig};
use incfs_testing::{DescSpec, FrontendConfig, FuseFrontend, FuseReply};
use vm_memory::ByteValued;

fn errno<T: std::fmt::Debug>(r: incfs_testing::Result<T>) -> i32 {
    match r {
        Err(e) => e.errno().unwrap_or_else(|| panic!("not a FUSE error: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

fn connect(h: &Harness) -> FuseFrontend {
    FuseFrontend::connect(&h.socket).expect("connect")
}

#[test]
fn every_opcode() {
    let mut h = Harness::start(VirtioFsConfig::default(), 1);
    let mut f = connect(&h);

    // Before INIT everything is EIO.
    assert_eq!(errno(f.getattr(ROOT)), libc::EIO);

    let init = f.init().expect("init");
    assert_eq!((init.major, init.minor), (7, abi::KERNEL_MINOR_VERSION));
    assert_eq!(init.max_pages, 256);
    assert_eq!(init.max_readahead, 1 << 20);
    assert_eq!(init.flags & abi::FUSE_EXPORT_SUPPORT, 0);
    assert_eq!(init.flags & abi::FUSE_POSIX_LOCKS, 0);
    assert_ne!(init.flags & abi::FUSE_DO_READDIRPLUS, 0);
    assert_ne!(init.flags & abi::FUSE_MAX_PAGES, 0);

    // LOOKUP / GETATTR.
    let e = f.lookup(ROOT, b"file").expect("lookup file");
    assert_eq!((e.nodeid, e.attr.size, e.generation), (FILE, FILE_SIZE as u64, 1));
    assert_eq!((e.entry_valid, e.attr_valid, e.attr_valid_nsec), (1, 1, 500_000_000));
    let hard = f.lookup(ROOT, b"hard").expect("lookup hard");
    assert_eq!((hard.nodeid, hard.attr.nlink), (FILE, 2));
    assert_eq!(h.fs.lookup_count(FILE), 2);
    assert_eq!(errno(f.lookup(ROOT, b"nope")), libc::ENOENT);
    assert_eq!(errno(f.lookup(FILE, b"x")), libc::ENOTDIR);
    assert_eq!(errno(f.lookup(ROOT, &[b'a'; 256])), libc::ENAMETOOLONG);
    let a = f.getattr(DIR).expect("getattr");
    assert_eq!(a.attr.mode, libc::S_IFDIR | 0o555);
    assert_eq!(errno(f.getattr(999)), libc::ENOENT);

    // READLINK.
    assert_eq!(f.readlink(LINK).expect("readlink"), b"file");
    assert_eq!(errno(f.readlink(FILE)), libc::EINVAL);

    // OPEN / READ / FLUSH / RELEASE.
    let (fh, oflags) = f.open(FILE, libc::O_RDONLY as u32).expect("open");
    assert_eq!((fh, oflags), (FILE * 100, abi::FOPEN_KEEP_CACHE));
    assert_eq!(errno(f.open(FILE, libc::O_RDWR as u32)), libc::EROFS);
    assert_eq!(errno(f.open(ROOT, 0)), libc::EISDIR);
    let data = file_data();
    assert_eq!(f.read(FILE, fh, 0, 1 << 20).expect("read all"), data);
    assert_eq!(f.read(FILE, fh, 4000, 200).expect("read middle"), &data[4000..4200]);
    assert!(f.read(FILE, fh, FILE_SIZE as u64 + 10, 4096).expect("read past end").is_empty());
    assert_eq!(errno(f.read(FILE, fh, 0, (1 << 20) + 4096)), libc::EINVAL);
    assert_eq!(errno(f.read(999, 0, 0, 10)), libc::ENOENT);
    f.flush(FILE, fh).expect("flush");
    f.release(FILE, fh).expect("release");

    // WRITE goes to the filesystem, which is read-only by default.
    assert_eq!(errno(f.write(FILE, fh, 0, b"abc")), libc::EROFS);

    // OPENDIR / READDIR / READDIRPLUS / RELEASEDIR.
    let (dfh, _) = f.opendir(ROOT).expect("opendir");
    assert_eq!(errno(f.opendir(FILE)), libc::ENOTDIR);
    let ents = f.readdir(ROOT, dfh, 0, 4096).expect("readdir");
    let names: Vec<&[u8]> = ents.iter().map(|e| e.name.as_slice()).collect();
    assert_eq!(names, [&b"."[..], b"..", b"dir", b"file", b"hard", b"link", b"slow"]);
    assert_eq!(ents[5].typ, u32::from(libc::DT_LNK));
    // Resume from a cookie, with a buffer that holds two entries.
    let ents = f.readdir(ROOT, dfh, 3, 64).expect("readdir part");
    let names: Vec<&[u8]> = ents.iter().map(|e| e.name.as_slice()).collect();
    assert_eq!(names, [&b"file"[..], b"hard"]);
    assert_eq!(ents[1].off, 5);
    // A buffer too small for any entry: an empty reply (the guest's problem).
    assert!(f.readdir(ROOT, dfh, 0, 8).expect("tiny readdir").is_empty());
    let before = h.fs.lookup_count(DIR);
    let plus = f.readdirplus(ROOT, dfh, 0, 4096).expect("readdirplus");
    assert_eq!(plus.len(), 7);
    assert_eq!(plus[0].entry.map(|e| e.nodeid), Some(0), "'.' carries no lookup");
    let d = plus.iter().find(|e| e.name == b"dir").and_then(|e| e.entry).expect("dir entry");
    assert_eq!((d.nodeid, d.attr.mode), (DIR, libc::S_IFDIR | 0o555));
    assert_eq!(h.fs.lookup_count(DIR), before + 1);
    // Only entries that fit are looked up.
    let one = f.readdirplus(ROOT, dfh, 2, 160).expect("readdirplus one");
    assert_eq!(one.len(), 1);
    assert_eq!(h.fs.lookup_count(DIR), before + 2);
    // "file" and "hard" are the same inode: two more lookups of it.
    assert_eq!(h.fs.lookup_count(FILE), 4);
    assert_eq!(errno(f.readdir(FILE, 0, 0, 4096)), libc::ENOTDIR);
    f.releasedir(ROOT, dfh).expect("releasedir");

    // FORGET / BATCH_FORGET (hiprio queue, no reply).
    f.forget(FILE, 1).expect("forget");
    f.batch_forget(&[(FILE, 1), (DIR, 2)]).expect("batch forget");
    // Processed in order on one queue, so a round trip on that queue proves they were seen.
    f.raw_on(0, abi::FUSE_GETATTR, ROOT, abi::GetattrIn::default().as_slice(), 200).expect("getattr on hiprio");
    assert_eq!(h.fs.lookup_count(FILE), 2);
    assert_eq!(h.fs.lookup_count(DIR), before);

    // STATFS.
    let st = f.statfs(ROOT).expect("statfs");
    assert_eq!((st.blocks, st.files, st.bsize, st.namelen), (100, 6, 4096, 255));

    // GETXATTR: probe, fetch, too small, missing.
    let probe = f.getxattr(FILE, b"user.test", 0).expect("probe");
    let (out, _) = abi::read_struct::<abi::GetxattrOut>(&probe).expect("getxattr_out");
    assert_eq!(out.size, 5);
    assert_eq!(f.getxattr(FILE, b"user.test", 5).expect("value"), b"hello");
    assert_eq!(f.getxattr(FILE, b"user.test", 64).expect("value"), b"hello");
    assert_eq!(errno(f.getxattr(FILE, b"user.test", 4)), libc::ERANGE);
    assert_eq!(errno(f.getxattr(FILE, b"user.none", 64)), libc::ENODATA);

    // LISTXATTR.
    let probe = f.listxattr(FILE, 0).expect("list probe");
    let (out, _) = abi::read_struct::<abi::GetxattrOut>(&probe).expect("getxattr_out");
    assert_eq!(out.size, 21);
    assert_eq!(f.listxattr(FILE, 21).expect("list"), b"user.test\0user.other\0");
    assert_eq!(errno(f.listxattr(FILE, 20)), libc::ERANGE);
    assert!(f.listxattr(DIR, 100).expect("empty list").is_empty());

    // ACCESS.
    f.access(FILE, libc::R_OK as u32).expect("access r");
    f.access(FILE, 0).expect("access f");
    assert_eq!(errno(f.access(FILE, libc::W_OK as u32)), libc::EROFS);
    assert_eq!(errno(f.access(FILE, libc::X_OK as u32)), libc::EACCES);

    // LSEEK.
    assert_eq!(f.lseek(FILE, fh, 100, libc::SEEK_DATA as u32).expect("seek data"), 100);
    assert_eq!(f.lseek(FILE, fh, 100, libc::SEEK_HOLE as u32).expect("seek hole"), FILE_SIZE as u64);
    assert_eq!(errno(f.lseek(FILE, fh, FILE_SIZE as u64, libc::SEEK_DATA as u32)), libc::ENXIO);
    assert_eq!(errno(f.lseek(FILE, fh, 0, libc::SEEK_END as u32)), libc::EINVAL);

    // Mutations: EROFS. Unknown: ENOSYS.
    for op in [
        abi::FUSE_SETATTR,
        abi::FUSE_MKNOD,
        abi::FUSE_MKDIR,
        abi::FUSE_UNLINK,
        abi::FUSE_RMDIR,
        abi::FUSE_RENAME,
        abi::FUSE_RENAME2,
        abi::FUSE_LINK,
        abi::FUSE_SYMLINK,
        abi::FUSE_CREATE,
        abi::FUSE_SETXATTR,
        abi::FUSE_REMOVEXATTR,
        abi::FUSE_FALLOCATE,
        abi::FUSE_COPY_FILE_RANGE,
        abi::FUSE_TMPFILE,
    ] {
        let r = f.raw(op, ROOT, b"name\0\0\0\0\0\0\0\0", 256).expect("mutation");
        assert_eq!(r.header.error, -libc::EROFS, "opcode {op}");
    }
    for op in
        [0, 7, 19, abi::FUSE_GETLK, abi::FUSE_BMAP, abi::FUSE_IOCTL, abi::FUSE_POLL, abi::FUSE_STATX, 1000, u32::MAX]
    {
        let r = f.raw(op, ROOT, &[0u8; 64], 256).expect("unknown");
        assert_eq!(r.header.error, -libc::ENOSYS, "opcode {op}");
    }

    // DESTROY ends the session; INIT starts a new one.
    f.destroy().expect("destroy");
    assert_eq!(*h.fs.destroyed.lock().expect("lock"), 1);
    assert_eq!(errno(f.getattr(ROOT)), libc::EIO);
    f.init().expect("re-init");
    f.getattr(ROOT).expect("getattr after re-init");

    drop(f);
    for r in h.join() {
        assert!(r.expect("serve_one"), "served a frontend");
    }
}

#[test]
fn init_negotiation() {
    let mut h = Harness::start(VirtioFsConfig::default(), 1);
    let mut f = connect(&h);
    // An old guest without MAX_PAGES gets 32 pages; flags we do not support are dropped.
    let out = f.init_with(7, 31, abi::FUSE_ASYNC_READ | abi::FUSE_WRITEBACK_CACHE, 4 << 20).expect("init");
    assert_eq!((out.minor, out.flags, out.max_pages, out.max_readahead), (31, abi::FUSE_ASYNC_READ, 32, 1 << 20));
    // Max pages bounds READ size.
    let (fh, _) = f.open(FILE, 0).expect("open");
    let r = f.read(FILE, fh, 0, 4096 * 256).expect("read 1 MiB is still within our limit");
    assert_eq!(r.len(), FILE_SIZE);
    // Wrong major: EPROTO for older.
    assert_eq!(errno(f.init_with(6, 31, 0, 0)), libc::EPROTO);
    // Newer major: we answer with our version so the guest can retry.
    let out = f.init_with(8, 0, 0, 0).expect("newer major");
    assert_eq!((out.major, out.minor), (7, abi::KERNEL_MINOR_VERSION));
    drop(f);
    h.join();
}

/// Garbage of every kind is answered (or returned empty) and never breaks the daemon.
#[test]
fn hostile_requests() {
    let mut h = Harness::start(VirtioFsConfig::default(), 1);
    let mut f = connect(&h);
    f.init().expect("init");
    let q = 1;

    // Short in_header: no unique to answer, returned with length 0.
    let c = f.roundtrip_descs(q, &[DescSpec::In(vec![1; 10]), DescSpec::Out(100)]).expect("short");
    assert_eq!(c.used_len, 0);

    // Zero-length chain.
    let c = f.roundtrip_descs(q, &[DescSpec::In(vec![])]).expect("empty");
    assert_eq!(c.used_len, 0);
    let c = f.roundtrip_descs(q, &[DescSpec::Out(0)]).expect("empty out");
    assert_eq!(c.used_len, 0);

    // The len field lies (larger than the bytes present).
    let (mut req, unique) = f.build_request(abi::FUSE_GETATTR, ROOT, abi::GetattrIn::default().as_slice());
    req[0..4].copy_from_slice(&4000u32.to_le_bytes());
    let c = f.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(200)]).expect("lying len");
    let r = FuseReply::parse(&c.bytes, c.used_len).expect("reply");
    assert_eq!((r.header.error, r.header.unique, c.used_len), (-libc::EINVAL, unique, 16));

    // Name not NUL-terminated.
    let r = f.raw(abi::FUSE_LOOKUP, ROOT, b"file", 200).expect("no nul");
    assert_eq!(r.header.error, -libc::EINVAL);
    // Name with the NUL beyond 255 bytes.
    let mut long = vec![b'x'; 300];
    long.push(0);
    assert_eq!(f.raw(abi::FUSE_LOOKUP, ROOT, &long, 200).expect("long").header.error, -libc::ENAMETOOLONG);

    // Truncated op bodies.
    for op in [
        abi::FUSE_READ,
        abi::FUSE_OPEN,
        abi::FUSE_RELEASE,
        abi::FUSE_GETXATTR,
        abi::FUSE_LSEEK,
        abi::FUSE_INIT,
        abi::FUSE_READDIR,
        abi::FUSE_WRITE,
        abi::FUSE_ACCESS,
        abi::FUSE_FLUSH,
    ] {
        let r = f.raw(op, FILE, &[0u8; 3], 300).expect("truncated");
        assert_eq!(r.header.error, -libc::EINVAL, "opcode {op}");
    }
    // BATCH_FORGET whose count lies.
    let mut body = abi::BatchForgetIn { count: 1_000_000, dummy: 0 }.as_slice().to_vec();
    body.extend_from_slice(abi::ForgetOne { nodeid: FILE, nlookup: 1 }.as_slice());
    let (req, _) = f.build_request(abi::FUSE_BATCH_FORGET, 0, &body);
    assert_eq!(f.roundtrip_descs(0, &[DescSpec::In(req)]).expect("batch forget").used_len, 0);

    // Wrong direction: writable before readable.
    let (req, _) = f.build_request(abi::FUSE_GETATTR, ROOT, &[0u8; 16]);
    let c = f.roundtrip_descs(q, &[DescSpec::Out(200), DescSpec::In(req)]).expect("wrong direction");
    assert_eq!(c.used_len, 0);

    // No writable part for a request that needs a reply.
    let (req, _) = f.build_request(abi::FUSE_GETATTR, ROOT, &[0u8; 16]);
    assert_eq!(f.roundtrip_descs(q, &[DescSpec::In(req)]).expect("no out").used_len, 0);

    // Writable part too small for the reply: an error reply instead of an overflow.
    let (req, unique) = f.build_request(abi::FUSE_GETATTR, ROOT, &[0u8; 16]);
    let c = f.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(40)]).expect("small out");
    let r = FuseReply::parse(&c.bytes, c.used_len).expect("reply");
    assert_eq!((r.header.error, r.header.unique, c.used_len), (-libc::EIO, unique, 16));
    let (req, _) = f.build_request(abi::FUSE_GETATTR, ROOT, &[0u8; 16]);
    assert_eq!(f.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(8)]).expect("tiny out").used_len, 0);

    // READ larger than the writable buffer.
    let body = abi::ReadIn { size: 8192, ..Default::default() };
    let r = f.raw(abi::FUSE_READ, FILE, body.as_slice(), 4096).expect("read > buffer");
    assert_eq!(r.header.error, -libc::EINVAL);

    // Descriptors pointing outside guest memory.
    let (req, _) = f.build_request(abi::FUSE_GETATTR, ROOT, &[0u8; 16]);
    let c = f
        .roundtrip_descs(
            q,
            &[DescSpec::In(req.clone()), DescSpec::Raw { addr: 0xdead_0000_0000, len: 4096, write: true }],
        )
        .expect("bad out addr");
    assert_eq!(c.used_len, 0);
    let c = f
        .roundtrip_descs(q, &[DescSpec::Raw { addr: 0x1000, len: 64, write: false }, DescSpec::Out(200)])
        .expect("bad in addr");
    assert_eq!(c.used_len, 0);
    let c = f
        .roundtrip_descs(q, &[DescSpec::Raw { addr: u64::MAX - 10, len: u32::MAX, write: false }, DescSpec::Out(200)])
        .expect("wrapping addr");
    assert_eq!(c.used_len, 0);

    // A readable part larger than any request may be.
    let (mut req, unique) = f.build_request(abi::FUSE_WRITE, FILE, &[0u8; 40]);
    req.resize(1 << 20, 0xaa);
    let c = f
        .roundtrip_descs(q, &[DescSpec::In(req.clone()), DescSpec::In(vec![0; 16 << 10]), DescSpec::Out(64)])
        .expect("oversize");
    let r = FuseReply::parse(&c.bytes, c.used_len).expect("reply");
    assert_eq!((r.header.error, r.header.unique), (-libc::EINVAL, unique));

    // Random garbage, many times, split over descriptors in odd ways.
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..200 {
        let len = (rnd() % 300) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        if i % 2 == 0 && bytes.len() >= 40 {
            // A plausible header with a random opcode and a consistent length.
            bytes[0..4].copy_from_slice(&(len as u32).to_le_bytes());
            bytes[4..8].copy_from_slice(&((rnd() % 60) as u32).to_le_bytes());
        }
        let split = if bytes.is_empty() { 0 } else { (rnd() as usize) % bytes.len() };
        let (a, b) = bytes.split_at(split);
        let out = (rnd() % 512) as u32;
        let c = f
            .roundtrip_descs(q, &[DescSpec::In(a.to_vec()), DescSpec::In(b.to_vec()), DescSpec::Out(out)])
            .expect("garbage round trip");
        assert!(c.used_len <= out);
    }

    // Still serving, with the session intact (garbage INITs may have re-initialized it).
    f.init().expect("init again");
    assert_eq!(f.lookup(ROOT, b"file").expect("lookup").nodeid, FILE);
    let (fh, _) = f.open(FILE, 0).expect("open");
    assert_eq!(f.read(FILE, fh, 0, 4096).expect("read"), &file_data()[..4096]);

    drop(f);
    for r in h.join() {
        assert!(r.expect("serve_one"), "served a frontend");
    }
}

/// A parked read completes later while other requests on the same queue are answered inline.
#[test]
fn pending_read_does_not_block_queue() {
    let mut h = Harness::start(VirtioFsConfig::default(), 1);
    let mut f = connect(&h);
    f.init().expect("init");
    let q = 1;
    let (fh, _) = f.open(SLOW, 0).expect("open slow");
    let start = Instant::now();
    let slow = f.submit_read(q, SLOW, fh, 0, 4096).expect("submit slow");
    let mut quick = Vec::new();
    for _ in 0..8 {
        let (req, _) = f.build_request(abi::FUSE_GETATTR, FILE, abi::GetattrIn::default().as_slice());
        quick.push(f.submit(q, &req, 200).expect("submit quick"));
    }
    f.kick(q).expect("kick");
    let done = f.wait_all(q, &quick).expect("quick ones");
    assert!(start.elapsed() < SLOW_DELAY, "inline replies waited for the parked read");
    for c in &done {
        let r = FuseReply::parse(&c.bytes, c.used_len).expect("reply");
        assert_eq!(r.header.error, 0);
    }
    assert_eq!(f.in_flight(q), 1);
    // More requests while the read is parked.
    assert_eq!(f.lookup(ROOT, b"dir").expect("lookup").nodeid, DIR);
    let done = f.wait_all(q, &[slow]).expect("slow one");
    assert!(start.elapsed() >= SLOW_DELAY);
    let r = FuseReply::parse(&done[0].bytes, done[0].used_len).expect("reply");
    assert_eq!((r.header.error, r.body.as_slice()), (0, &b"slow!"[..]));
    assert_eq!(done[0].used_len, 16 + 5);

    // Several parked reads at once complete together, not one after the other.
    let start = Instant::now();
    let toks: Vec<u16> = (0..16).map(|i| f.submit_read(q, SLOW, fh, i % 5, 4096).expect("submit")).collect();
    f.kick(q).expect("kick");
    let done = f.wait_all(q, &toks).expect("all slow");
    assert!(start.elapsed() < SLOW_DELAY * 3, "parked reads were serialized");
    for (i, c) in done.iter().enumerate() {
        let r = FuseReply::parse(&c.bytes, c.used_len).expect("reply");
        assert_eq!(r.body, &b"slow!"[(i % 5)..]);
    }

    drop(f);
    for r in h.join() {
        assert!(r.expect("serve_one"), "served a frontend");
    }
}

/// A read still parked when a queue stop gives up waiting for it (`stop_drain`) must not be
/// completed into the stopped ring. (Within `stop_drain` it is answered before the stop
/// returns: incfs-backend's `a_queue_stop_waits_for_the_read_parked_on_it`.)
#[test]
fn stopped_queue_drops_parked_reply() {
    let mut cfg = VirtioFsConfig::default();
    cfg.server.stop_drain = Duration::from_millis(50);
    let mut h = Harness::start(cfg, 1);
    let mut f = connect(&h);
    f.init().expect("init");
    let (fh, _) = f.open(SLOW, 0).expect("open slow");
    let _slow = f.submit_read(1, SLOW, fh, 0, 4096).expect("submit slow");
    f.kick(1).expect("kick");
    // Give the daemon time to pop and park it, then stop the queue as QEMU would.
    std::thread::sleep(Duration::from_millis(100));
    let base = f.stop_queue(1).expect("get_vring_base");
    assert_eq!(base, 3, "INIT, OPEN and the parked READ were popped");
    std::thread::sleep(SLOW_DELAY + Duration::from_millis(300));
    assert!(f.poll(1).expect("poll").is_empty(), "a stale reply reached a stopped queue");
    // The other queue still works.
    let r = f.raw_on(0, abi::FUSE_GETATTR, ROOT, abi::GetattrIn::default().as_slice(), 200).expect("hiprio");
    assert_eq!(r.header.error, 0);
    drop(f);
    for r in h.join() {
        assert!(r.expect("serve_one"), "served a frontend");
    }
}

/// Several request queues spread over worker threads, and a batch in flight on each.
#[test]
fn multiqueue_and_batches() {
    multiqueue(false);
}

/// The same with EVENT_IDX notification suppression.
#[test]
fn multiqueue_and_batches_event_idx() {
    multiqueue(true);
}

fn multiqueue(event_idx: bool) {
    let cfg = VirtioFsConfig {
        request_queues: 3,
        server: ServerConfig { threads: 2, ..Default::default() },
        ..Default::default()
    };
    let mut h = Harness::start(cfg, 1);
    let fcfg = FrontendConfig { request_queues: 3, event_idx, ..Default::default() };
    let mut f = FuseFrontend::connect_with(&h.socket, fcfg).expect("connect");
    f.init().expect("init");
    let (fh, _) = f.open(FILE, 0).expect("open");
    let data = file_data();
    for q in 1..=3 {
        let reqs: Vec<(u32, u64, Vec<u8>, u32)> = (0..32u64)
            .map(|i| {
                let body = abi::ReadIn { fh, offset: i * 100, size: 1000, ..Default::default() };
                (abi::FUSE_READ, FILE, body.as_slice().to_vec(), 1016)
            })
            .collect();
        let replies = f.batch(q, &reqs).expect("batch");
        for (i, r) in replies.iter().enumerate() {
            assert_eq!(r.header.error, 0);
            assert_eq!(r.body, &data[i * 100..i * 100 + 1000], "queue {q} read {i}");
        }
    }
    // Parked reads on every queue, completed from tokio tasks.
    let (sfh, _) = f.open(SLOW, 0).expect("open slow");
    let toks: Vec<(usize, u16)> = (1..=3)
        .flat_map(|q| (0..4).map(move |_| q))
        .map(|q| (q, f.submit_read(q, SLOW, sfh, 0, 100).expect("submit")))
        .collect();
    for q in 1..=3 {
        f.kick(q).expect("kick");
    }
    for q in 1..=3 {
        let mine: Vec<u16> = toks.iter().filter(|(qq, _)| *qq == q).map(|(_, t)| *t).collect();
        for c in f.wait_all(q, &mine).expect("slow reads") {
            assert_eq!(FuseReply::parse(&c.bytes, c.used_len).expect("reply").body, b"slow!");
        }
    }
    drop(f);
    for r in h.join() {
        assert!(r.expect("serve_one"), "served a frontend");
    }
}

/// With EVENT_IDX the daemon polls a queue that ran dry for a while before it sleeps: a
/// frontend that sends its next request within that window needs no kick. Whatever the
/// window, no request is ever left unnoticed.
#[test]
fn adaptive_polling_saves_kicks_and_loses_no_request() {
    let mut kicks_by_window = Vec::new();
    for poll_max in [Duration::ZERO, Duration::from_micros(50), Duration::from_millis(20)] {
        let cfg = VirtioFsConfig { server: ServerConfig { poll_max, ..Default::default() }, ..Default::default() };
        let mut h = Harness::start(cfg, 1);
        let fcfg = FrontendConfig { event_idx: true, ..Default::default() };
        let mut f = FuseFrontend::connect_with(&h.socket, fcfg).expect("connect");
        f.init().expect("init");
        let (fh, _) = f.open(FILE, 0).expect("open");
        let data = file_data();
        let q = 1;
        let kicks0 = f.kicks(q);
        let n = 2000u64;
        for i in 0..n {
            let off = (i * 37) % 4000;
            assert_eq!(
                f.read(FILE, fh, off, 64).expect("read"),
                &data[off as usize..off as usize + 64],
                "{poll_max:?} read {i}"
            );
            // Now and then a pause longer than any window: the daemon must have re-enabled
            // notifications and asked for a kick.
            if i % 500 == 499 {
                std::thread::sleep(Duration::from_millis(30));
            }
        }
        let kicks = f.kicks(q) - kicks0;
        println!("poll {poll_max:?}: {kicks} kicks for {n} requests");
        kicks_by_window.push(kicks);
        drop(f);
        for r in h.join() {
            assert!(r.expect("serve_one"), "served a frontend");
        }
    }
    // Without polling a kick is saved only when the next request beats the daemon's
    // re-enabling of notifications. With a window longer than the frontend's turnaround,
    // kicks are needed only while the window regrows (from 4 us, doubling) at the start and
    // after each pause that reset it.
    let (none, wide) = (kicks_by_window[0], kicks_by_window[2]);
    assert!(wide <= 100 && wide < none / 2, "kicks: {kicks_by_window:?}");
}

/// A thread polling one queue does not make another queue it serves wait for the window.
#[test]
fn polling_one_queue_does_not_hold_up_another() {
    let cfg = VirtioFsConfig {
        request_queues: 2,
        server: ServerConfig { threads: 1, poll_max: Duration::from_millis(50), ..Default::default() },
        ..Default::default()
    };
    let mut h = Harness::start(cfg, 1);
    let fcfg = FrontendConfig { request_queues: 2, event_idx: true, ..Default::default() };
    let mut f = FuseFrontend::connect_with(&h.socket, fcfg).expect("connect");
    f.init().expect("init");
    let (fh, _) = f.open(FILE, 0).expect("open");
    let data = file_data();
    let read_on = |f: &mut FuseFrontend, q: usize, off: u64| {
        let body = abi::ReadIn { fh, offset: off, size: 100, ..Default::default() };
        let r = f.batch(q, &[(abi::FUSE_READ, FILE, body.as_slice().to_vec(), 116)]).expect("read");
        assert_eq!(r[0].body, &data[off as usize..off as usize + 100]);
    };
    // Grow queue 1's window to its maximum with requests close together.
    for i in 0..50 {
        read_on(&mut f, 1, i);
    }
    // Alternate queues: each request on queue 2 comes while queue 1 is being polled.
    let t = Instant::now();
    for i in 0..40 {
        read_on(&mut f, 1 + (i % 2) as usize, i);
    }
    // Waiting out the window each time would take 20 x 50 ms = 1 s.
    assert!(t.elapsed() < Duration::from_millis(500), "40 requests took {:?}", t.elapsed());
    drop(f);
    for r in h.join() {
        assert!(r.expect("serve_one"), "served a frontend");
    }
}

/// After a frontend disconnects, serve_one returns and the next one is served.
#[test]
fn reconnect() {
    let mut h = Harness::start(VirtioFsConfig::default(), 2);
    for _ in 0..2 {
        let mut f = connect(&h);
        // A parked read in flight at disconnect must not trouble the daemon.
        f.init().expect("init");
        let (fh, _) = f.open(SLOW, 0).expect("open");
        f.submit_read(1, SLOW, fh, 0, 10).expect("submit");
        f.kick(1).expect("kick");
        assert_eq!(f.lookup(ROOT, b"file").expect("lookup").nodeid, FILE);
        drop(f);
    }
    let results = h.join();
    assert_eq!(results.len(), 2);
    for r in results {
        assert!(r.expect("serve_one"), "served a frontend");
    }
    // Each disconnect ended the FUSE session.
    assert_eq!(*h.fs.destroyed.lock().expect("lock"), 2);
    assert_eq!(*h.fs.inits.lock().expect("lock"), 2);
    std::thread::sleep(SLOW_DELAY);
}

/// The stopper disconnects a connected frontend.
#[test]
fn stopper_ends_connection() {
    let mut h = Harness::start(VirtioFsConfig::default(), 3);
    let fcfg = FrontendConfig { timeout: Duration::from_millis(500), ..Default::default() };
    let mut f = FuseFrontend::connect_with(&h.socket, fcfg).expect("connect");
    f.init().expect("init");
    h.stopper.stop();
    // The first serve_one served us; the following ones see the stop without a frontend.
    let results: Vec<bool> = h.join().into_iter().map(|r| r.expect("serve_one")).collect();
    assert_eq!(results, [true, false, false]);
    assert!(f.getattr(ROOT).is_err());
}

/// A stop while nobody is connected ends a waiting serve_one.
#[test]
fn stopper_ends_wait() {
    let mut h = Harness::start(VirtioFsConfig::default(), 1);
    std::thread::sleep(Duration::from_millis(100));
    h.stopper.stop();
    let results: Vec<bool> = h.join().into_iter().map(|r| r.expect("serve_one")).collect();
    assert_eq!(results, [false]);
}
