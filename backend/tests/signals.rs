//! How `incfsd run` ends on signals: the first SIGTERM/SIGINT starts a graceful shutdown,
//! a second one ends the process at once even while that shutdown is stuck.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use incfs_testing::FuseFrontend;
use support::*;

const ROOT: u64 = 1;

/// `incfsd run` on `store`, returned once it has printed its ready line.
fn start_run(store: &str, id: &str, dir: &Path, extra: &[&str]) -> Child {
    let (cache, socket) = (dir.join("cache"), dir.join("fs.sock"));
    let mut args: Vec<&OsStr> = ["run", "--image", id, "--store", store, "--cache"].map(OsStr::new).to_vec();
    args.extend([cache.as_os_str(), OsStr::new("--socket"), socket.as_os_str()]);
    args.extend(extra.iter().map(OsStr::new));
    start_until_ready(&args)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// The exit status if the child exits within `limit`.
fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Kills the daemon if a test fails before it exits.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A daemon whose graceful shutdown hangs: its last step writes the recorded trace through
/// `trace.tmp`, which is a FIFO nobody reads, so opening it blocks (as a write to a stuck
/// network filesystem would). A frontend has read a file, so there is a trace to write.
/// Returns the daemon once the first `first` signal is being handled and the shutdown is
/// stuck.
fn stuck_in_shutdown(dir: &Path, first: i32) -> Killed {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f"), pseudo_random(1, 64 << 10)).expect("write");
    let store = dir.join("store");
    let id = incfs::pack::pack(&src, &incfs::store::Store::new(&store), &Default::default()).expect("pack").0;
    let trace = dir.join("trace.txt");
    let fifo = std::ffi::CString::new(trace.with_extension("tmp").into_os_string().into_encoded_bytes()).expect("path");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");

    let trace_arg = trace.to_str().expect("utf8");
    let mut d = Killed(start_run(store.to_str().expect("utf8"), &id.to_string(), dir, &["--record-trace", trace_arg]));
    let mut f = FuseFrontend::connect(&dir.join("fs.sock")).expect("connect");
    f.init().expect("init");
    let e = f.lookup(ROOT, b"f").expect("lookup");
    let (fh, _) = f.open(e.nodeid, 0).expect("open");
    assert_eq!(f.read(e.nodeid, fh, 0, 4096).expect("read").len(), 4096);
    drop(f);

    signal(&d.0, first);
    assert_eq!(wait_for(&mut d.0, Duration::from_secs(2)), None, "the shutdown was meant to hang on the FIFO");
    d
}

#[test]
fn a_second_sigterm_ends_a_stuck_shutdown() {
    let t = tempfile::tempdir().expect("tmp");
    let mut d = stuck_in_shutdown(t.path(), libc::SIGTERM);
    signal(&d.0, libc::SIGTERM);
    let st = wait_for(&mut d.0, Duration::from_secs(5)).expect("still running 5 s after the second SIGTERM");
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "{st:?}");
}

#[test]
fn sigint_then_sigint_ends_a_stuck_shutdown() {
    let t = tempfile::tempdir().expect("tmp");
    let mut d = stuck_in_shutdown(t.path(), libc::SIGINT);
    signal(&d.0, libc::SIGINT);
    let st = wait_for(&mut d.0, Duration::from_secs(5)).expect("still running 5 s after the second SIGINT");
    assert_eq!(st.code(), Some(128 + libc::SIGINT), "{st:?}");
}
