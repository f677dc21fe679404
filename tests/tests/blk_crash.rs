//! `incfsd blk` killed with SIGKILL under a running guest, and restarted: QEMU reconnects
//! (`reconnect=1`) and the requests in flight at the crash are resubmitted by the new daemon
//! from QEMU's inflight area (docs/restart.md).
//!
//! - `blk_survives_ten_kills_under_writes_and_readers`: an overlay disk, a guest writing with
//!   fsync and reading back, parallel readers checksumming image files, ten kills at random
//!   moments (seed printed; `INCFS_CRASH_SEED` repeats a run). No I/O error in the guest,
//!   every read correct, e2fsck clean, and the longest stall the guest saw per kill.
//! - `a_request_parked_at_the_kill_completes_exactly_once`: a miss parked behind a slow link
//!   while fast hits complete after it (out of order), the daemon killed then. Without
//!   inflight tracking QEMU rewinds the ring to the used index: a completed hit is answered
//!   twice (the guest's virtio ring breaks) and the parked miss never is.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use incfs_e2e::check::sha256_hex;
use incfs_e2e::*;

/// An image with a disk, served by nginx behind a delaying proxy, and what `incfsd blk`
/// needs to serve it again and again on one socket.
struct Setup {
    work: WorkDir,
    _nginx: Nginx,
    proxy: DelayProxy,
    image: String,
    socket: PathBuf,
}

impl Setup {
    /// `make_disk` writes `disk.img` into the directory it is given.
    fn new(name: &str, rtt_ms: u32, make_disk: impl FnOnce(&Path, &Path)) -> Setup {
        let work = WorkDir::new(name);
        make_disk(&work.path, &work.join("src"));
        let store = work.join("store");
        let image = pack(&work.join("src"), &store);
        let nginx = Nginx::start(&store, &work.path);
        let proxy = DelayProxy::start(env!("CARGO_BIN_EXE_delay-proxy"), &nginx.url, rtt_ms);
        let socket = work.join("blk.sock");
        Setup { work, _nginx: nginx, proxy, image, socket }
    }

    /// `incfsd blk` on the disk, read-only (a fetch may take longer than the round trip).
    fn daemon(&self) -> Daemon {
        let args = ["--read-timeout-ms", "120000", "--fetch-timeout-ms", "30000"];
        Daemon::start_blk(&self.socket, &self.work.join("cache"), &self.proxy.url, &self.image, "disk.img", &args)
    }
}

#[test]
fn blk_survives_ten_kills_under_writes_and_readers() {
    const KILLS: usize = 10;
    const DURATION_S: u64 = 50;
    let readers: Vec<(String, Vec<u8>)> =
        (0..6).map(|i| (format!("data/r{i}"), pseudo_random(100 + i as u64, (3 << 20) + 4096 * i))).collect();
    let s = Setup::new("blk-crash", 40, |work, src| {
        let tree = work.join("tree");
        for (p, d) in &readers {
            write_file(&tree, p, d);
        }
        mkfs_ext4(&tree, src, 96);
    });
    let sums: String = readers.iter().map(|(p, d)| format!("{}  /mnt/{p}\n", sha256_hex(d))).collect();
    let script = format!(
        r#"#!/bin/sh
fail() {{ echo "CRASH-FAIL $*"; exit 1; }}
now() {{ cut -d. -f1 /proc/uptime; }}
mount -t ext4 /dev/vda /mnt || fail mount
mkdir -p /mnt/w
cat > /tmp/sums <<'EOF'
{sums}EOF
END=$(( $(now) + {DURATION_S} ))
(sleep $(( {DURATION_S} + 120 )); echo "CRASH-FAIL watchdog: the workload hung"; poweroff -f) &
echo WORKLOAD-START
guest-check stall /dev/vda {DURATION_S} > /tmp/stall.out &
jobs_to_wait=$!
reader() {{
    n=0
    while [ $(now) -lt $END ]; do
        [ $1 = 0 ] && echo 3 > /proc/sys/vm/drop_caches
        sha256sum -c -s /tmp/sums || echo "BAD-READ reader $1 round $n"
        n=$((n + 1))
    done
    echo "READER $1 ROUNDS $n"
}}
reader 0 &
jobs_to_wait="$jobs_to_wait $!"
reader 1 &
jobs_to_wait="$jobs_to_wait $!"
i=0
while [ $(now) -lt $END ]; do
    slot=$((i % 16))
    dd if=/dev/urandom of=/tmp/src bs=64k count=$(( i % 6 + 1 )) 2>/dev/null
    want=$(sha256sum /tmp/src | cut -d' ' -f1)
    dd if=/tmp/src of=/mnt/w/f$slot bs=64k conv=fsync 2>/dev/null || echo "BAD-WRITE $i"
    echo "$want  /mnt/w/f$slot" > /tmp/w.$slot
    got=$(dd if=/mnt/w/f$slot bs=64k iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || echo "BAD-READBACK $i"
    i=$((i + 1))
done
echo "WRITER ROUNDS $i"
wait $jobs_to_wait
cat /tmp/stall.out
echo WORKLOAD-END
dmesg | grep -E '{DMESG_ERRORS}' && fail "kernel reported disk errors"
sync
umount /mnt || fail umount
e2fsck -fn /dev/vda || fail "e2fsck found problems"
echo FSCK-CLEAN
mount -t ext4 -o ro /dev/vda /mnt || fail remount
sha256sum -c -s /tmp/sums || fail "image files after remount"
cat /tmp/w.* | sha256sum -c -s || fail "written files after remount"
find /mnt -type f -exec cat {{}} + > /dev/null || fail "full read"
umount /mnt
echo CRASH-OK
"#
    );
    // A cache smaller than what the readers read: misses (parked, completed out of order)
    // go on all along, not only in the first round.
    let start = {
        let (socket, work, proxy, image) =
            (s.socket.clone(), s.work.path.clone(), s.proxy.url.clone(), s.image.clone());
        move || {
            let ov = work.join("vm.overlay");
            let args = ["--read-timeout-ms", "120000", "--cache-size", "8M", "--overlay", ov.to_str().expect("utf8")];
            Daemon::start_blk(&socket, &work.join("cache"), &proxy, &image, "disk.img", &args)
        }
    };
    let _vm = vm_lock();
    let daemon = Arc::new(Mutex::new(Some(start())));
    let seed = std::env::var("INCFS_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    println!("kill seed: {seed} (INCFS_CRASH_SEED={seed} repeats it)");
    // The killer: once the workload runs, ten kills 1.5 to 3.5 s apart, each followed by a
    // restart on the same socket and overlay.
    let (start_tx, start_rx) = mpsc::channel::<()>();
    let killer = {
        let daemon = daemon.clone();
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            if start_rx.recv_timeout(Duration::from_secs(300)).is_err() {
                return Vec::new();
            }
            let mut kills = Vec::new();
            for k in 0..KILLS {
                std::thread::sleep(Duration::from_millis(1500 + rng.below(2000)));
                let mut d = daemon.lock().unwrap_or_else(|p| p.into_inner());
                let parked = d.as_ref().map(|d| d.metric("incfs_blk_reads_parked_total")).unwrap_or(0);
                let t = Instant::now();
                if let Some(mut old) = d.take() {
                    old.kill_9();
                }
                *d = Some(start());
                println!(
                    "kill {}: daemon restarted in {:?} (reads parked so far by the killed one: {parked})",
                    k + 1,
                    t.elapsed()
                );
                kills.push(t);
            }
            kills
        })
    };
    let mut args = vec!["--blk".to_string(), s.socket.display().to_string(), "--reconnect".into(), "1".into()];
    args.extend(e2fsck_in_guest());
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let mut start_tx = Some(start_tx);
    let run = run_vm_with(&s.work.path, &args, &script, 600, |line| {
        if line.contains("WORKLOAD-START") {
            if let Some(tx) = start_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    drop(start_tx);
    let kills = killer.join().expect("killer thread");
    let stderr = daemon.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|d| d.stderr()).unwrap_or_default();
    assert_eq!(kills.len(), KILLS, "the kills did not all happen:\n{}", run.console);
    assert!(
        run.console.contains("CRASH-OK"),
        "guest failed (status {}):\n{}\nlast daemon's stderr:\n{stderr}",
        run.status,
        run.console
    );
    assert_eq!(run.status, 0);
    for bad in ["BAD-", "CRASH-FAIL"] {
        assert!(!run.console.contains(bad), "{bad} in the guest's output");
    }
    let end = run.console.find("WORKLOAD-END").expect("workload end");
    let writer_rounds: u64 = run.console[..end]
        .lines()
        .find_map(|l| l.trim().strip_prefix("WRITER ROUNDS "))
        .and_then(|n| n.trim().parse().ok())
        .expect("writer rounds");
    assert!(writer_rounds >= 20, "the writer made only {writer_rounds} rounds");
    // The stalls the guest saw: reads of the device that waited over 200 ms.
    let results = run.results();
    let gaps: Vec<(f64, u64)> = results
        .iter()
        .filter(|r| r.first().is_some_and(|k| k == "GAP"))
        .filter_map(|r| Some((r.get(1)?.parse().ok()?, r.get(2)?.parse().ok()?)))
        .collect();
    let stall = results.iter().find(|r| r.first().is_some_and(|k| k == "STALL")).expect("GC STALL line");
    println!("stalls over 200 ms seen by the guest (at s, ms): {gaps:?}");
    println!("longest stall: {} ms over {} kills; reads: {}", stall[1], KILLS, stall[2]);
    let longest: u64 = stall[1].parse().expect("ms");
    assert!(longest < 15_000, "the guest waited {longest} ms at once");
}

#[test]
fn a_request_parked_at_the_kill_completes_exactly_once() {
    // A raw disk (no filesystem: no metadata reads over the slow link). The guest reads 64 KiB
    // at 1 MiB once (fetched, then cached), then starts a read at 6 MiB, a miss behind a 5 s
    // round trip, and while it is parked reads a 4 KiB block at 1 MiB 24 times (hits,
    // completed after it). The daemon is killed then, and restarted. (The round trip leaves
    // the hits about 4 s, ten times what they take on an idle machine.)
    let disk = pseudo_random(7, 8 << 20);
    let s = Setup::new("blk-ooo", 5000, |_, src| write_file(src, "disk.img", &disk));
    let slice = |off: usize, len: usize| sha256_hex(&disk[off..off + len]);
    let script = format!(
        r#"#!/bin/sh
fail() {{ echo "OOO-FAIL $*"; exit 1; }}
rd() {{ dd if=/dev/vda bs=$1 skip=$2 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }}
[ "$(rd 64k 16)" = {fast64} ] || fail "first read at 1 MiB"
(rd 64k 96 > /tmp/slow.sum; echo SLOW-DONE) &
sleep 1
echo SLOW-PARKED
i=0
while [ $i -lt 24 ]; do
    [ "$(rd 4k 256)" = {fast4} ] || echo "BAD-FAST $i"
    i=$((i + 1))
done
echo FAST-DONE
(sleep 60; echo "OOO-FAIL watchdog: the parked read never completed"; poweroff -f) &
sleep 2
while [ ! -s /tmp/slow.sum ]; do sleep 0.2; done
[ "$(cat /tmp/slow.sum)" = {slow} ] || fail "the parked read returned other bytes"
[ "$(rd 4k 256)" = {fast4} ] || fail "a read after the restart"
dmesg | grep -E '{DMESG_ERRORS}' && fail "kernel reported disk errors"
echo OOO-OK
"#,
        fast64 = slice(1 << 20, 64 << 10),
        fast4 = slice(1 << 20, 4096),
        slow = slice(6 << 20, 64 << 10),
    );
    let _vm = vm_lock();
    let mut daemon = Some(s.daemon());
    let mut killed = None;
    let args = ["--blk", s.socket.to_str().expect("utf8"), "--reconnect", "1"];
    let mut slow_done = false;
    let run = run_vm_with(&s.work.path, &args, &script, 240, |line| {
        slow_done |= line.contains("SLOW-DONE");
        if line.contains("FAST-DONE") && killed.is_none() {
            let mut d = daemon.take().expect("daemon");
            let parked = d.metric("incfs_blk_reads_parked_total");
            d.kill_9();
            killed = Some((parked, !slow_done));
            daemon = Some(s.daemon());
            println!("killed with {parked} reads parked (the slow one pending: {}); restarted", !slow_done);
        }
    });
    let stderr = daemon.as_ref().map(|d| d.stderr()).unwrap_or_default();
    let (parked, slow_pending) = killed.expect("the guest never got to FAST-DONE");
    assert!(parked >= 2 && slow_pending, "the slow read was not parked at the kill ({parked} parked)");
    assert!(
        run.console.contains("OOO-OK") && run.status == 0,
        "guest failed (status {}):\n{}\nrestarted daemon's stderr:\n{stderr}",
        run.status,
        run.console
    );
    assert!(!run.console.contains("BAD-FAST"), "a fast read failed");
    assert!(
        plain(&stderr).contains("resubmitted=1"),
        "the restarted daemon did not resubmit the parked read:\n{stderr}"
    );
}
