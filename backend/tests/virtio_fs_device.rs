//! `incfsd run` serving a real packed image, driven over vhost-user by a frontend that plays
//! QEMU's part (no guest): every opcode a read-only filesystem needs, the error paths, and
//! hostile requests, after which good requests are still served.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use incfs_fuse::abi;
use std::time::Duration;

use incfs_testing::{DescSpec, FrontendConfig, FuseFrontend, FuseReply};
use support::*;
use vm_memory::ByteValued;

const ROOT: u64 = 1;

fn tree(src: &Path) -> (Vec<u8>, Vec<u8>) {
    std::fs::create_dir_all(src.join("dir/empty")).expect("mkdir");
    let data = pseudo_random(1, 3 * 4096 + 500);
    std::fs::write(src.join("dir/file"), &data).expect("file");
    std::fs::hard_link(src.join("dir/file"), src.join("hard")).expect("hard link");
    std::os::unix::fs::symlink("dir/file", src.join("link")).expect("symlink");
    let mut sparse = pseudo_random(2, 4096);
    sparse.extend(vec![0u8; 4 * 4096]);
    sparse.extend(pseudo_random(3, 4096));
    std::fs::write(src.join("sparse"), &sparse).expect("sparse");
    std::fs::set_permissions(src.join("dir/file"), std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let p = std::ffi::CString::new(src.join("dir").as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: valid C strings and buffer.
    assert_eq!(unsafe { libc::lsetxattr(p.as_ptr(), c"user.color".as_ptr(), b"blue".as_ptr().cast(), 4, 0) }, 0);
    (data, sparse)
}

fn err(r: FuseReply) -> i32 {
    -r.header.error
}

#[test]
fn every_opcode_against_a_real_image() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    let (data, sparse) = tree(&src);
    let store = t.path().join("store");
    let id =
        incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0.to_string();
    let d =
        RunDaemon::start(store.to_str().expect("utf8"), &id, &t.path().join("cache"), &t.path().join("fs.sock"), &[]);
    let mut f = FuseFrontend::connect(&d.socket).expect("connect");
    let init = f.init().expect("INIT");
    assert!(init.max_pages >= 32, "max_pages {}", init.max_pages);

    // LOOKUP, GETATTR, hard links share an inode, stable numbers.
    let dir = f.lookup(ROOT, b"dir").expect("dir");
    assert_eq!(dir.attr.mode & libc::S_IFMT, libc::S_IFDIR);
    let file = f.lookup(dir.nodeid, b"file").expect("file");
    assert_eq!((file.attr.size, file.attr.mode & 0o7777, file.attr.nlink), (data.len() as u64, 0o640, 2));
    assert!(file.entry_valid >= 3600 && file.attr_valid >= 3600, "immutable: long timeouts");
    assert_eq!(f.lookup(ROOT, b"hard").expect("hard").nodeid, file.nodeid);
    assert_eq!(f.getattr(file.nodeid).expect("getattr").attr.size, data.len() as u64);
    assert_eq!(f.lookup(ROOT, b"missing").map_err(|e| e.errno()).err(), Some(Some(libc::ENOENT)));
    assert_eq!(f.getattr(999_999).map_err(|e| e.errno()).err(), Some(Some(libc::ENOENT)));

    // READLINK.
    let link = f.lookup(ROOT, b"link").expect("link");
    assert_eq!(f.readlink(link.nodeid).expect("readlink"), b"dir/file");
    assert_eq!(f.readlink(file.nodeid).map_err(|e| e.errno()).err(), Some(Some(libc::EINVAL)));

    // OPEN (read-only, page cache kept), READ (aligned, unaligned, past EOF), FLUSH, RELEASE.
    let (fh, open_flags) = f.open(file.nodeid, libc::O_RDONLY as u32).expect("open");
    assert!(open_flags & abi::FOPEN_KEEP_CACHE != 0 && open_flags & abi::FOPEN_DIRECT_IO == 0);
    assert_eq!(f.read(file.nodeid, fh, 0, 1 << 20).expect("read"), data);
    assert_eq!(f.read(file.nodeid, fh, 4000, 300).expect("read"), &data[4000..4300]);
    assert!(f.read(file.nodeid, fh, data.len() as u64 + 7, 4096).expect("past eof").is_empty());
    f.flush(file.nodeid, fh).expect("flush");
    f.release(file.nodeid, fh).expect("release");
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(f.open(file.nodeid, flags as u32).map_err(|e| e.errno()).err(), Some(Some(libc::EROFS)));
    }
    assert_eq!(f.open(dir.nodeid, 0).map_err(|e| e.errno()).err(), Some(Some(libc::EISDIR)));

    // OPENDIR, READDIR, READDIRPLUS, RELEASEDIR.
    let (dfh, _) = f.opendir(dir.nodeid).expect("opendir");
    let names: Vec<Vec<u8>> =
        f.readdir(dir.nodeid, dfh, 0, 4096).expect("readdir").into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec![b".".to_vec(), b"..".to_vec(), b"empty".to_vec(), b"file".to_vec()]);
    let plus = f.readdirplus(dir.nodeid, dfh, 0, 4096).expect("readdirplus");
    let e = plus.iter().find(|e| e.name == b"file").expect("file entry");
    assert_eq!(e.entry.as_ref().map(|x| x.nodeid), Some(file.nodeid));
    // Resume from a cookie.
    let rest = f.readdir(dir.nodeid, dfh, plus[2].off, 4096).expect("resume");
    assert_eq!(rest.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), vec![b"file".to_vec()]);
    f.releasedir(dir.nodeid, dfh).expect("releasedir");
    let empty = f.lookup(dir.nodeid, b"empty").expect("empty");
    let (efh, _) = f.opendir(empty.nodeid).expect("opendir empty");
    assert_eq!(f.readdir(empty.nodeid, efh, 0, 4096).expect("readdir").len(), 2);

    // STATFS, ACCESS.
    assert!(f.statfs(ROOT).expect("statfs").blocks > 0);
    f.access(file.nodeid, libc::R_OK as u32).expect("access R");
    assert_eq!(f.access(file.nodeid, libc::W_OK as u32).map_err(|e| e.errno()).err(), Some(Some(libc::EROFS)));

    // GETXATTR (with the size probe), LISTXATTR, incfs's id and size.
    assert_eq!(f.getxattr(dir.nodeid, b"user.color", 64).expect("getxattr"), b"blue");
    assert_eq!(f.getxattr(dir.nodeid, b"user.color", 2).map_err(|e| e.errno()).err(), Some(Some(libc::ERANGE)));
    assert_eq!(f.getxattr(dir.nodeid, b"user.none", 64).map_err(|e| e.errno()).err(), Some(Some(libc::ENODATA)));
    let id_hex = f.getxattr(file.nodeid, b"user.incfs.id", 64).expect("incfs id");
    assert_eq!(id_hex.len(), 32);
    assert!(id_hex.iter().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(f.getxattr(file.nodeid, b"user.incfs.size", 64).expect("size"), (data.len() as u64).to_le_bytes());
    let list = f.listxattr(file.nodeid, 4096).expect("listxattr");
    assert!(list.split(|&b| b == 0).any(|n| n == b"user.incfs.id"));

    // LSEEK: holes are the zero blocks.
    let sp = f.lookup(ROOT, b"sparse").expect("sparse");
    let (sfh, _) = f.open(sp.nodeid, 0).expect("open");
    assert_eq!(f.lseek(sp.nodeid, sfh, 10, libc::SEEK_HOLE as u32).expect("hole"), 4096);
    assert_eq!(f.lseek(sp.nodeid, sfh, 4096, libc::SEEK_DATA as u32).expect("data"), 5 * 4096);
    assert_eq!(f.read(sp.nodeid, sfh, 0, 1 << 20).expect("read sparse"), sparse);

    // FORGET and BATCH_FORGET have no reply; the mount goes on.
    f.forget(file.nodeid, 1).expect("forget");
    f.batch_forget(&[(dir.nodeid, 1), (link.nodeid, 1)]).expect("batch forget");

    // Every mutation is EROFS; an unknown opcode is ENOSYS.
    for op in [
        abi::FUSE_MKDIR,
        abi::FUSE_UNLINK,
        abi::FUSE_RMDIR,
        abi::FUSE_RENAME,
        abi::FUSE_SETATTR,
        abi::FUSE_SYMLINK,
        abi::FUSE_CREATE,
        abi::FUSE_SETXATTR,
        abi::FUSE_REMOVEXATTR,
    ] {
        assert_eq!(err(f.raw(op, ROOT, &[0u8; 64], 256).expect("raw")), libc::EROFS, "opcode {op}");
    }
    assert_eq!(f.write(file.nodeid, 0, 0, b"x").map_err(|e| e.errno()).err(), Some(Some(libc::EROFS)));
    assert_eq!(err(f.raw(4242, ROOT, &[], 256).expect("raw")), libc::ENOSYS);

    // Garbage: short headers, lying lengths, no NUL, empty chains, reply buffers too small,
    // descriptors outside guest memory. Each gets an error reply or is dropped.
    let q = 1;
    assert_eq!(f.roundtrip_descs(q, &[DescSpec::In(vec![0xff; 7]), DescSpec::Out(64)]).expect("short").used_len, 0);
    assert_eq!(f.roundtrip_descs(q, &[DescSpec::In(vec![])]).expect("empty").used_len, 0);
    let (mut req, _) = f.build_request(abi::FUSE_GETATTR, ROOT, abi::GetattrIn::default().as_slice());
    req[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let c = f.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(200)]).expect("lying len");
    assert_eq!(-FuseReply::parse(&c.bytes, c.used_len).expect("reply").header.error, libc::EINVAL);
    assert_eq!(err(f.raw(abi::FUSE_LOOKUP, ROOT, b"dir", 256).expect("no nul")), libc::EINVAL);
    let (req, _) = f.build_request(abi::FUSE_READ, file.nodeid, &[1u8; 8]);
    let c = f.roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Out(256)]).expect("truncated read");
    assert_eq!(-FuseReply::parse(&c.bytes, c.used_len).expect("reply").header.error, libc::EINVAL);
    let (req, _) = f.build_request(abi::FUSE_GETATTR, ROOT, abi::GetattrIn::default().as_slice());
    let c = f
        .roundtrip_descs(q, &[DescSpec::In(req), DescSpec::Raw { addr: u64::MAX - 100, len: 4096, write: true }])
        .expect("wild");
    assert_eq!(c.used_len, 0);
    let mut x = 99u64;
    for _ in 0..200 {
        let n = (x % 300) as usize;
        let junk: Vec<u8> = (0..n).map(|i| (x.wrapping_mul(i as u64 + 1) >> 13) as u8).collect();
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let _ = f.roundtrip_descs(q, &[DescSpec::In(junk), DescSpec::Out((x % 512) as u32)]);
    }
    // Still serving, with the right bytes.
    let (fh, _) = f.open(file.nodeid, 0).expect("open after garbage");
    assert_eq!(f.read(file.nodeid, fh, 0, 1 << 20).expect("read after garbage"), data);
    assert_eq!(f.lookup(ROOT, b"link").expect("lookup after garbage").nodeid, link.nodeid);
}

#[test]
fn a_frontend_may_reconnect_and_inode_numbers_stay_stable() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    let (data, _) = tree(&src);
    let store = t.path().join("store");
    let id =
        incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0.to_string();
    let d = RunDaemon::start(
        store.to_str().expect("utf8"),
        &id,
        &t.path().join("cache"),
        &t.path().join("fs.sock"),
        &["--queues", "2"],
    );
    let first = {
        let mut f = FuseFrontend::connect(&d.socket).expect("connect");
        f.init().expect("init");
        f.lookup(ROOT, b"hard").expect("lookup").nodeid
    };
    // QEMU restarting, or the next VM on the same socket.
    let mut f = FuseFrontend::connect(&d.socket).expect("reconnect");
    f.init().expect("init");
    let e = f.lookup(ROOT, b"hard").expect("lookup");
    assert_eq!(e.nodeid, first);
    let (fh, _) = f.open(e.nodeid, 0).expect("open");
    assert_eq!(f.read(e.nodeid, fh, 0, 1 << 20).expect("read"), data);
}

/// The worker killed after it published a reply but before it signalled it (the window
/// CI's blk crash test once hit): the supervisor starts the next worker, which resumes the
/// queue from the inflight area with nothing to resubmit, and must still signal the guest,
/// which asked (EVENT_IDX) to be told of anything past what it collected. By EVENT_IDX's
/// rule alone, which counts only the entries the new worker added, it would not.
#[test]
fn a_reply_a_killed_worker_never_signalled_is_signalled_by_the_next() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    tree(&src);
    let store = t.path().join("store");
    let id =
        incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0.to_string();
    let d =
        RunDaemon::start(store.to_str().expect("utf8"), &id, &t.path().join("cache"), &t.path().join("fs.sock"), &[]);
    let worker = d.worker_pid(None);
    let cfg = FrontendConfig { event_idx: true, ..Default::default() };
    let mut f = FuseFrontend::connect_with(&d.socket, cfg).expect("connect");
    f.init().expect("INIT");
    let e = f.lookup(ROOT, b"hard").expect("lookup");
    // A signal of an earlier reply may still be pending (collected without waiting for it).
    f.wait_signal(1, Duration::ZERO).expect("clear");
    // A GETATTR is answered and signalled; the test plays the lost signal by leaving the
    // reply uncollected, as a guest that never saw the interrupt would.
    let (req, unique) = f.build_request(abi::FUSE_GETATTR, e.nodeid, abi::GetattrIn::default().as_slice());
    let out_len = (size_of::<abi::OutHeader>() + size_of::<abi::AttrOut>()) as u32;
    f.submit(1, &req, out_len).expect("submit");
    f.kick(1).expect("kick");
    assert!(f.wait_signal(1, Duration::from_secs(20)).expect("poll"), "the reply was signalled");
    let published = f.used_index(1).expect("used");
    assert_eq!(f.in_flight(1), 1, "not collected");
    // SAFETY: a signal to the daemon's worker, a child of our child.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    let next = d.worker_pid(Some(worker));
    assert!(
        f.wait_signal(1, Duration::from_secs(20)).expect("poll"),
        "worker {next} resumed the queue without signalling the guest"
    );
    assert_eq!(f.used_index(1).expect("used"), published, "answered once, not again");
    let done = f.wait_some(1).expect("collect");
    assert_eq!(done.len(), 1);
    let reply = FuseReply::parse(&done[0].bytes, done[0].used_len).expect("reply");
    assert_eq!((reply.header.unique, reply.header.error), (unique, 0));
    // The queue goes on under the new worker.
    assert_eq!(f.getattr(e.nodeid).expect("getattr").attr.ino, e.attr.ino);
}

/// Live migration: while the frontend logs dirty pages (LOG_SHMFD, VHOST_F_LOG_ALL), every
/// page a READ reply was written into is marked, as the used ring is; before logging and
/// after it ends, replies mark nothing.
#[test]
fn read_replies_are_marked_in_the_dirty_log_while_logging() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    let (data, _) = tree(&src);
    let store = t.path().join("store");
    let id =
        incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0.to_string();
    let d =
        RunDaemon::start(store.to_str().expect("utf8"), &id, &t.path().join("cache"), &t.path().join("fs.sock"), &[]);
    let mut f = FuseFrontend::connect(&d.socket).expect("connect");
    f.init().expect("INIT");
    let dir = f.lookup(ROOT, b"dir").expect("dir");
    let file = f.lookup(dir.nodeid, b"file").expect("file");
    let (fh, _) = f.open(file.nodeid, libc::O_RDONLY as u32).expect("open");
    let slots = f.slots_range();
    let in_slots = |pages: &[u64]| pages.iter().filter(|p| slots.contains(p)).count();

    f.start_dirty_log().expect("start logging");
    assert_eq!(f.take_dirty_pages().expect("log"), Vec::<u64>::new(), "nothing written yet");
    assert_eq!(f.read(file.nodeid, fh, 0, 1 << 20).expect("read"), data);
    let dirty = f.take_dirty_pages().expect("log");
    // The reply: a 16-byte header and 3 pages and a bit of data, in one slot's buffer.
    let want = (16 + data.len()).div_ceil(4096);
    assert!(in_slots(&dirty) >= want, "{} reply pages marked, want {want} at least: {dirty:x?}", in_slots(&dirty));
    assert!(dirty.len() > in_slots(&dirty), "the used ring's page is marked too: {dirty:x?}");

    f.stop_dirty_log().expect("stop logging");
    f.take_dirty_pages().expect("log");
    assert_eq!(f.read(file.nodeid, fh, 0, 1 << 20).expect("read"), data);
    let after = f.take_dirty_pages().expect("log");
    assert_eq!(in_slots(&after), 0, "logging is off: replies are not marked: {after:x?}");
}

/// GET_VRING_BASE (a migration's switch-over, a guest's driver stopping the device) answers
/// only once the chains the daemon took are complete: a READ parked on a slow remote is
/// answered into the ring first, so the avail index handed back counts nothing unanswered.
#[test]
fn a_queue_stop_waits_for_the_read_parked_on_it() {
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    let (data, _) = tree(&src);
    let store = t.path().join("store");
    let id =
        incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0.to_string();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(FaultServer::start(&store));
    let stall = std::time::Duration::from_millis(1500);
    server.set_always(Some(Fault::Stall(stall)));
    let d = RunDaemon::start(&server.url(), &id, &t.path().join("cache"), &t.path().join("fs.sock"), &[]);
    let mut f = FuseFrontend::connect(&d.socket).expect("connect");
    f.init().expect("INIT");
    let dir = f.lookup(ROOT, b"dir").expect("dir");
    let file = f.lookup(dir.nodeid, b"file").expect("file");
    let (fh, _) = f.open(file.nodeid, libc::O_RDONLY as u32).expect("open");

    let token = f.submit_read(1, file.nodeid, fh, 0, 1 << 16).expect("submit");
    f.kick(1).expect("kick");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(f.poll(1).expect("poll").len(), 0, "the read waits for the stalled remote");
    let asked = std::time::Instant::now();
    let next_avail = f.stop_queue(1).expect("GET_VRING_BASE");
    let waited = asked.elapsed();
    assert_eq!(next_avail, 5, "INIT, two LOOKUPs, OPEN and the READ taken");
    assert!(waited >= std::time::Duration::from_millis(800), "the stop waited for the read ({waited:?})");
    let done = f.poll(1).expect("poll");
    assert_eq!(done.iter().map(|c| c.token).collect::<Vec<_>>(), vec![token], "answered before the stop returned");
    let reply = incfs_testing::FuseReply::parse(&done[0].bytes, done[0].used_len).expect("reply");
    assert_eq!(reply.into_result().expect("read"), data);
    drop(server);
}
