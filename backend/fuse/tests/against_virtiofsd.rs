//! The test frontend against a reference daemon (QEMU's C virtiofsd, or the Rust one), to
//! show that it speaks plain vhost-user-fs and not only to our backend. Ignored by default:
//! run with `cargo test -p incfs-fuse --test against_virtiofsd -- --ignored`, with
//! `VIRTIOFSD=/path/to/virtiofsd` (default /usr/lib/qemu/virtiofsd).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use incfs_fuse::abi;
use incfs_testing::FuseFrontend;

#[test]
#[ignore = "needs a virtiofsd binary"]
fn frontend_drives_virtiofsd() {
    let bin = std::env::var("VIRTIOFSD").unwrap_or_else(|_| "/usr/lib/qemu/virtiofsd".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    let content: Vec<u8> = (0..20000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(shared.join("hello"), &content).expect("write");
    let socket = dir.path().join("vfsd.sock");
    // Both daemons accept these spellings.
    let mut child = Command::new(&bin)
        .arg(format!("--socket-path={}", socket.display()))
        .arg("-o")
        .arg(format!("source={}", shared.display()))
        .arg("-o")
        .arg("cache=none")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn virtiofsd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    let result = std::panic::catch_unwind(|| {
        let mut f = FuseFrontend::connect(&socket).expect("connect");
        let init = f.init().expect("init");
        assert_eq!(init.major, 7);
        let e = f.lookup(abi::ROOT_ID, b"hello").expect("lookup");
        assert_eq!(e.attr.size, content.len() as u64);
        let (fh, _) = f.open(e.nodeid, libc::O_RDONLY as u32).expect("open");
        assert_eq!(f.read(e.nodeid, fh, 0, 32768).expect("read"), content);
        let (dfh, _) = f.opendir(abi::ROOT_ID).expect("opendir");
        let ents = f.readdirplus(abi::ROOT_ID, dfh, 0, 4096).expect("readdirplus");
        assert!(ents.iter().any(|d| d.name == b"hello"), "{ents:?}");
        // Queue depth > 1.
        let toks: Vec<u16> = (0..8).map(|i| f.submit_read(1, e.nodeid, fh, i * 1000, 1000).expect("submit")).collect();
        f.kick(1).expect("kick");
        let done = f.wait_all(1, &toks).expect("wait");
        assert_eq!(done.len(), 8);
        f.release(e.nodeid, fh).expect("release");
        f.forget(e.nodeid, 1).expect("forget");
    });
    let _ = child.kill();
    let _ = child.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}
