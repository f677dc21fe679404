//! The pending-read interface end to end: `incfsd run` serving an image over vhost-user-fs to
//! a QEMU guest (qemu/run-vm) that uses the static `incfs-guest` CLI and a C program linked
//! against `libincfs_guest.a`. See docs/pending-reads.md.
//!
//! Needs qemu/setup's packages (it is run once here) and gcc. The guest binaries come from
//! `$INCFS_GUEST_DIR` (a directory with `incfs-guest` and `libincfs_guest.a`), else they are
//! built on first use into `<target>/guest-static` with
//! `RUSTFLAGS=-C target-feature=+crt-static cargo build --release -p incfs-guest
//! --target x86_64-unknown-linux-gnu` (a separate target dir: the outer cargo holds the lock
//! of this one).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use incfs::pack::{pack, PackOptions};
use incfs::store::Store;
use support::{pseudo_random, Fault, FaultServer, INCFSD};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// Guest VMs run one at a time: the scenarios time reads, and TCG is slow enough alone.
static VM: Mutex<()> = Mutex::new(());

fn guest_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("INCFS_GUEST_DIR") {
            return PathBuf::from(d);
        }
        // <target>/debug/incfsd -> <target>
        let target = Path::new(INCFSD).parent().and_then(|p| p.parent()).expect("target dir").join("guest-static");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-p", "incfs-guest", "--target", "x86_64-unknown-linux-gnu"])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace())
            .status()
            .expect("run cargo");
        assert!(status.success(), "building the static incfs-guest failed");
        target.join("x86_64-unknown-linux-gnu/release")
    })
    .clone()
}

fn qemu_setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let s = Command::new(workspace().join("qemu/setup")).status().expect("run qemu/setup");
        assert!(s.success(), "qemu/setup failed");
    });
}

/// `incfsd run` on a fresh socket; killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, store: &str, image: &str, extra: &[&str]) -> Daemon {
        let socket = dir.join("incfs.sock");
        let log = dir.join("incfsd.log");
        let child = Command::new(INCFSD)
            .arg("run")
            .arg("--socket")
            .arg(&socket)
            .args(["--store", store, "--image", image])
            .arg("--cache")
            .arg(dir.join("cache"))
            .args(extra)
            .env("INCFS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start incfsd");
        let d = Daemon { child, socket, log };
        let t = Instant::now();
        while !std::fs::read_to_string(&d.log).unwrap_or_default().contains("incfsd: serving") {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "incfsd did not start: {}",
                std::fs::read_to_string(&d.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots a guest with the daemon as tag `incfs`, `incfs-guest` at /bin and `adds`; returns
/// (status, console).
fn run_vm(dir: &Path, d: &Daemon, script: &str, adds: &[(PathBuf, &str)]) -> (i32, String) {
    qemu_setup();
    let s = dir.join("run.sh");
    std::fs::write(&s, script).expect("script");
    let mut cmd = Command::new(workspace().join("qemu/run-vm"));
    cmd.arg("--fs").arg(format!("{}:incfs", d.socket.display())).arg("--script").arg(&s);
    cmd.arg("--add").arg(format!("{}:/bin/incfs-guest", guest_dir().join("incfs-guest").display()));
    for (host, guest) in adds {
        cmd.arg("--add").arg(format!("{}:{guest}", host.display()));
    }
    let mut child = cmd.args(["--timeout", "240"]).stdin(Stdio::null()).stdout(Stdio::piped()).spawn().expect("run-vm");
    let mut console = String::new();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut buf = Vec::new();
    while out.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
        println!("guest| {line}");
        console.push_str(&line);
        console.push('\n');
        buf.clear();
    }
    let status = child.wait().expect("wait").code().unwrap_or(-1);
    (status, console)
}

struct Image {
    dir: tempfile::TempDir,
    store: PathBuf,
    id: String,
    /// Host copies of the files (for --add).
    a: PathBuf,
    b: PathBuf,
}

/// `a`: 5 blocks and a bit, `b`: one partial block.
fn image() -> Image {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("a"), pseudo_random(11, 5 * 4096 + 100)).expect("a");
    std::fs::write(src.join("sub/b"), pseudo_random(12, 3000)).expect("b");
    let store = dir.path().join("store");
    let id = pack(&src, &Store::new(&store), &PackOptions { progress: false, ..PackOptions::default() })
        .expect("pack")
        .0
        .to_string();
    let (a, b) = (src.join("a"), src.join("sub/b"));
    Image { dir, store, id, a, b }
}

fn check(status: i32, console: &str, d: &Daemon) {
    if status != 0 {
        println!("--- incfsd log ---\n{}", std::fs::read_to_string(&d.log).unwrap_or_default());
    }
    assert_eq!(status, 0, "guest script failed (see the console above)");
    assert!(console.contains("E2E-OK"), "guest script did not reach its end");
}

const PRELUDE: &str = r#"#!/bin/sh
fail() { echo "E2E-FAIL: $*"; exit 1; }
mount -t virtiofs incfs /mnt || fail mount
# Wait (up to ~20 s) until `incfs-guest pending` lists a record matching $1; keep it in /tmp/p.
wait_pending() {
    for i in $(seq 1 40); do
        incfs-guest pending /mnt --timeout-ms 500 > /tmp/p
        cat /tmp/p
        grep -q "$1" /tmp/p && return 0
    done
    fail "no pending read matching $1"
}
"#;

#[test]
fn guest_fill_completes_a_blocked_read_and_a_wrong_fill_times_out() {
    let _vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    let d = Daemon::start(
        img.dir.path(),
        img.store.to_str().expect("utf8"),
        &img.id,
        &["--fill-from", "guest", "--read-timeout-ms", "6000"],
    );
    let mut bad = std::fs::read(&img.b).expect("b");
    bad[100] ^= 0xff;
    let bad_path = img.dir.path().join("bad-b");
    std::fs::write(&bad_path, &bad).expect("bad");
    let script = format!(
        r#"{PRELUDE}
ls -a /mnt | grep -q pending_reads && fail "control files must not be listed"
ID=$(incfs-guest id /mnt a) || fail id
incfs-guest status /mnt a | grep -q "blocks=0/6 fully_loaded=no" || fail "status before"

# 1. A reader blocks on a missing block; the data loader sees it and fills it.
dd if=/mnt/a of=/tmp/r1 bs=4096 skip=1 count=1 2>/tmp/r1.err &
R=$!
wait_pending "file_id=$ID block=1 .* path=a"
kill -0 $R 2>/dev/null || fail "the reader should still be blocked"
incfs-guest fill /mnt a --from /copy/a || fail "fill a"
wait $R || fail "reader failed: $(cat /tmp/r1.err)"
dd if=/copy/a of=/tmp/e1 bs=4096 skip=1 count=1 2>/dev/null
cmp /tmp/r1 /tmp/e1 || fail "wrong bytes"
incfs-guest status /mnt a | grep -q "blocks=6/6 fully_loaded=yes ranges=0-6" || fail "status after fill"
cmp /mnt/a /copy/a || fail "whole file"

# 2. A wrong block is refused with EBADMSG; the reader keeps waiting, then gets ETIME.
IDB=$(incfs-guest id /mnt sub/b)
T0=$(date +%s)
# O_DIRECT: exactly one FUSE READ. A page-cache read may be retried by the guest kernel
# (readahead, then read_folio), each attempt waiting a full read timeout.
dd if=/mnt/sub/b of=/tmp/r2 bs=4096 count=1 iflag=direct 2>/tmp/r2.err &
R=$!
wait_pending "file_id=$IDB block=0 .* path=sub/b"
incfs-guest fill /mnt sub/b --from /copy/bad-b > /tmp/f2 2>&1 && fail "a wrong block was accepted"
cat /tmp/f2
grep -q "Bad message" /tmp/f2 || fail "expected EBADMSG"
sleep 1
kill -0 $R 2>/dev/null || fail "the reader should keep waiting after a rejected fill"
wait $R && fail "the reader should fail"
cat /tmp/r2.err
grep -q "Timer expired" /tmp/r2.err || fail "expected ETIME"
T1=$(date +%s)
[ $((T1 - T0)) -ge 5 ] || fail "failed before the read timeout"
[ $((T1 - T0)) -le 12 ] || fail "failed long after the read timeout"
incfs-guest status /mnt > /tmp/s
cat /tmp/s
grep -q "^fill_blocks_rejected 1$" /tmp/s || fail "rejected counter"
grep -q "^reads_failed_timed_out 1$" /tmp/s || fail "timeout counter"
grep -q "^engine_verify_failures 1$" /tmp/s || fail "verify counter"
grep -q "last_read_error file_id=$IDB block=0 errno=62" /tmp/s || fail "last read error"
incfs-guest status /mnt sub/b | grep -q "blocks=0/1 fully_loaded=no" || fail "nothing stored"
# The right data afterwards works.
incfs-guest fill /mnt sub/b --from /copy/b || fail "good fill"
cmp /mnt/sub/b /copy/b || fail "b bytes"
echo E2E-OK
"#
    );
    let (status, console) = run_vm(
        img.dir.path(),
        &d,
        &script,
        &[(img.a.clone(), "/copy/a"), (img.b.clone(), "/copy/b"), (bad_path, "/copy/bad-b")],
    );
    check(status, &console, &d);
}

#[test]
fn slow_remote_shows_pending_reads_during_the_fetch_and_the_read_log() {
    let _vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = rt.block_on(FaultServer::start(&img.store));
    // Every blob request waits 3 s: reads stay pending while the fetch is under way.
    server.set_always(Some(Fault::Stall(Duration::from_secs(3))));
    let d = Daemon::start(img.dir.path(), &server.url(), &img.id, &["--read-timeout-ms", "30000"]);
    let script = format!(
        r#"{PRELUDE}
ID=$(incfs-guest id /mnt a) || fail id
cat /mnt/a > /tmp/ra &
R=$!
wait_pending "file_id=$ID block=0 .* path=a"
kill -0 $R 2>/dev/null || fail "the read should still wait for the remote"
wait $R || fail "read failed"
cmp /tmp/ra /copy/a || fail "wrong bytes"
incfs-guest pending /mnt > /tmp/p2
[ -s /tmp/p2 ] && fail "nothing should be pending any more"
incfs-guest log /mnt > /tmp/log
cat /tmp/log
for b in 0 1 2 3 4 5; do grep -q "file_id=$ID block=$b .*path=a" /tmp/log || fail "block $b not in the log"; done
incfs-guest status /mnt | grep -E "reads_delayed_pending |engine_remote_requests"
echo E2E-OK
"#
    );
    let (status, console) = run_vm(img.dir.path(), &d, &script, &[(img.a.clone(), "/copy/a")]);
    check(status, &console, &d);
    assert!(server.state.requests.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

const C_LOADER: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>
#include "incfs_guest.h"

/* A data loader in the shape of Android's: epoll on the pending-reads fd, then take the
 * records and write the blocks from a local copy. The first block it writes is corrupted
 * once, to see -EBADMSG. Exits 0 when the file is fully loaded. */
int main(int argc, char** argv) {
    if (argc != 4) { fprintf(stderr, "usage: loader MOUNT FILE COPY\n"); return 2; }
    IncFsControl* c = IncFs_Open(argv[1]);
    if (!c) { perror("IncFs_Open"); return 1; }
    IncFsFileId id = IncFs_GetId(c, argv[2]);
    if (!IncFs_IsValidFileId(id)) { fprintf(stderr, "no id\n"); return 1; }
    char hex[33] = {0};
    IncFs_FileIdToString(id, hex);
    printf("loader: file id %s\n", hex);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", argv[1], argv[2]);
    int fd = open(path, O_RDONLY);
    int copy = open(argv[3], O_RDONLY);
    if (fd < 0 || copy < 0) { perror("open"); return 1; }
    if (IncFs_IsFullyLoaded(fd) != -ENODATA) { fprintf(stderr, "expected -ENODATA\n"); return 1; }
    int pfd = IncFs_GetControlFd(c, PENDING_READS);
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = pfd };
    if (pfd < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, pfd, &ev) != 0) { perror("epoll"); return 1; }
    printf("loader: ready\n");
    fflush(stdout);
    int corrupted = 0, filled = 0;
    while (IncFs_IsFullyLoaded(fd) != 0) {
        struct epoll_event out;
        int n = epoll_wait(ep, &out, 1, 30000);
        if (n <= 0) { fprintf(stderr, "epoll_wait: nothing in 30 s\n"); return 1; }
        IncFsReadInfoWithUid reads[64];
        size_t count = 64;
        int r = IncFs_WaitForPendingReadsWithUid(c, 0, reads, &count);
        if (r == -ETIMEDOUT) continue;
        if (r != 0) { fprintf(stderr, "wait: %d\n", r); return 1; }
        for (size_t i = 0; i < count; i++) {
            if (memcmp(&reads[i].id, &id, sizeof id) != 0) continue;
            char buf[4096];
            ssize_t len = pread(copy, buf, sizeof buf, (off_t)reads[i].block * 4096);
            if (len < 0) { perror("pread"); return 1; }
            printf("loader: pending block %d serial %u uid %d\n", reads[i].block, reads[i].serialNo, reads[i].uid);
            IncFsDataBlock b = { .fileFd = fd, .pageIndex = reads[i].block, .compression = INCFS_COMPRESSION_KIND_NONE,
                                 .kind = INCFS_BLOCK_KIND_DATA, .dataSize = (uint32_t)len, .data = buf };
            if (!corrupted) {
                buf[0] ^= 1;
                int w = IncFs_WriteBlocks(&b, 1);
                if (w != -EBADMSG) { fprintf(stderr, "corrupt block: got %d, want -EBADMSG\n", w); return 1; }
                printf("loader: corrupted block refused with -EBADMSG\n");
                buf[0] ^= 1;
                corrupted = 1;
            }
            int w = IncFs_WriteBlocks(&b, 1);
            if (w != 1) { fprintf(stderr, "IncFs_WriteBlocks: %d\n", w); return 1; }
            filled++;
        }
    }
    IncFsBlockRange ranges[16];
    IncFsFilledRanges fr;
    IncFsSpan span = { .data = (const char*)ranges, .size = sizeof ranges };
    if (IncFs_GetFilledRanges(fd, span, &fr) != 0 || fr.dataRangesCount != 1 || fr.dataRanges[0].begin != 0 || fr.dataRanges[0].end != 6) {
        fprintf(stderr, "filled ranges wrong\n"); return 1;
    }
    IncFsBlockCounts bc;
    if (IncFs_GetFileBlockCountByPath(c, argv[2], &bc) != 0 || bc.totalDataBlocks != 6 || bc.filledDataBlocks != 6) {
        fprintf(stderr, "block counts wrong\n"); return 1;
    }
    IncFsMetrics m;
    /* The reader's own completion is counted after its reply: do not insist on it here. */
    if (IncFs_GetMetrics(argv[1], &m) != 0) { fprintf(stderr, "metrics failed\n"); return 1; }
    printf("loader: filled %d blocks, fully loaded, reads delayed %u\n", filled, m.readsDelayedPending);
    IncFs_DeleteControl(c);
    return 0;
}
"#;

#[test]
fn c_loader_waits_in_epoll_and_fills() {
    let _vm = VM.lock().unwrap_or_else(|e| e.into_inner());
    let img = image();
    let gd = guest_dir();
    let src = img.dir.path().join("loader.c");
    std::fs::write(&src, C_LOADER).expect("c");
    let bin = img.dir.path().join("loader");
    let out = Command::new("gcc")
        .args(["-static", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg("-I")
        .arg(workspace().join("guest-driver/include"))
        .arg(gd.join("libincfs_guest.a"))
        .args(["-lpthread", "-ldl", "-lm"])
        .output()
        .expect("run gcc");
    assert!(out.status.success(), "gcc: {}", String::from_utf8_lossy(&out.stderr));
    let d = Daemon::start(
        img.dir.path(),
        img.store.to_str().expect("utf8"),
        &img.id,
        &["--fill-from", "guest", "--read-timeout-ms", "20000"],
    );
    let script = format!(
        r#"{PRELUDE}
loader /mnt a /copy/a > /tmp/loader.out 2>&1 &
L=$!
for i in $(seq 1 100); do grep -q ready /tmp/loader.out && break; sleep 0.1; done
cat /mnt/a > /tmp/ra 2>/tmp/ra.err || fail "read: $(cat /tmp/ra.err)"
wait $L; S=$?
cat /tmp/loader.out
[ $S = 0 ] || fail "loader exit $S"
cmp /tmp/ra /copy/a || fail "wrong bytes"
grep -q "refused with -EBADMSG" /tmp/loader.out || fail "no EBADMSG seen"
echo E2E-OK
"#
    );
    let (status, console) = run_vm(img.dir.path(), &d, &script, &[(img.a.clone(), "/copy/a"), (bin, "/bin/loader")]);
    check(status, &console, &d);
}
