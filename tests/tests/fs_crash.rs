//! `incfsd run`'s worker killed with SIGKILL under a running virtio-fs guest: the supervisor
//! keeps QEMU's connection, starts a new worker and replays the device state into it; the
//! requests the dead worker had taken from the rings are resubmitted from the inflight area
//! and its FUSE session is taken over from the state region (docs/restart.md). QEMU 7.2 has
//! no reconnect for vhost-user-fs: without the supervisor the mount would hang for good.
//!
//! - `fs_survives_ten_worker_kills_under_readers`: buffered, O_DIRECT and mmap readers
//!   checksum image files through a cache smaller than what they read (misses parked all
//!   along, behind a 40 ms link) while the worker is killed at ten random moments (seed
//!   printed; `INCFS_CRASH_SEED` repeats a run). No error in the guest, every checksum
//!   right, the supervisor's pid unchanged, and the longest stall the guest saw.
//! - `fs_survives_ten_upgrades_under_readers`: the same readers while a new binary is
//!   installed over the one the daemon runs and `incfsd upgrade` replaces the worker, ten
//!   times: each new worker runs the binary now on disk, and so does the supervisor,
//!   re-executed in place (its pid stays).
//! - `a_read_parked_at_the_kill_completes`: a READ waits behind a 5 s link when the worker is
//!   killed; the next worker resubmits it and the guest gets the right bytes.

use std::process::Command;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use incfs_e2e::check::{self, sha256_hex, PieceDigest};
use incfs_e2e::*;

/// What the guest's kernel says when virtio-fs or its ring went wrong.
const DMESG_ERRORS: &str = "virtio.*broken|is not a head|I/O error|(virtiofs|virtio_fs|fuse).*(error|fail|timeout)";

/// Expected `GC MMAP` digest of `data` read page by page in `seed`'s order.
fn expected_mmap(data: &[u8], seed: u64) -> (usize, String) {
    let pages = data.len().div_ceil(4096);
    let mut d = PieceDigest::default();
    for i in check::page_order(pages, seed) {
        d.add(i as u64, &data[i * 4096..((i + 1) * 4096).min(data.len())]);
    }
    (pages, d.hex())
}

/// Waits until the supervisor `daemon` has a worker other than `old`; its pid.
fn next_worker(daemon: &Daemon, old: Option<u32>) -> u32 {
    let t = Instant::now();
    loop {
        if let Some(w) = daemon.worker_pid().filter(|w| Some(*w) != old) {
            return w;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no new worker within 30 s:\n{}", daemon.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill_9(pid: u32) {
    // SAFETY: kill with a pid and a signal number.
    let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {pid}");
}

/// What happens to the worker ten times under the readers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Event {
    /// SIGKILL.
    Kill,
    /// A new binary installed over the one the daemon was started from, then
    /// `incfsd upgrade`.
    Upgrade,
}

#[test]
fn fs_survives_ten_worker_kills_under_readers() {
    ten_events_under_readers("fs-crash", Event::Kill);
}

#[test]
fn fs_survives_ten_upgrades_under_readers() {
    ten_events_under_readers("fs-upgrade", Event::Upgrade);
}

/// Copies `from` to `to` through a new file renamed into place (a new inode, as a package
/// upgrade installs it, while the old one may still run).
fn install(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).expect("copy incfsd");
    std::fs::rename(&tmp, to).expect("install incfsd");
}

fn ten_events_under_readers(name: &str, event: Event) {
    const KILLS: usize = 10;
    const DURATION_S: u64 = 40;
    const MMAP_SEED: u64 = 7;
    let files: Vec<(String, Vec<u8>)> =
        (0..5).map(|i| (format!("data/r{i}"), pseudo_random(200 + i as u64, (2 << 20) + 4096 * i + 123))).collect();
    let work = WorkDir::new(name);
    let src = work.join("src");
    for (p, d) in &files {
        write_file(&src, p, d);
    }
    let store = work.join("store");
    let image = pack(&src, &store);
    let nginx = Nginx::start(&store, &work.path);
    let proxy = DelayProxy::start(env!("CARGO_BIN_EXE_delay-proxy"), &nginx.url, 40);
    let sums: String = files.iter().map(|(p, d)| format!("{}  /mnt/{p}\n", sha256_hex(d))).collect();
    let names: Vec<String> = files.iter().map(|(p, _)| format!("/mnt/{p}")).collect();
    let names = names.join(" ");
    let script = format!(
        r#"#!/bin/sh
fail() {{ echo "CRASH-FAIL $*"; exit 1; }}
now() {{ cut -d. -f1 /proc/uptime; }}
mount -t virtiofs incfs /mnt || fail mount
cat > /tmp/sums <<'EOF'
{sums}EOF
END=$(( $(now) + {DURATION_S} ))
(sleep $(( {DURATION_S} + 120 )); echo "CRASH-FAIL watchdog: the workload hung"; poweroff -f) &
echo WORKLOAD-START
guest-check stall /mnt/data/r0 {DURATION_S} > /tmp/stall.out &
jobs_to_wait=$!
buffered() {{
    n=0
    while [ $(now) -lt $END ]; do
        [ $1 = 0 ] && echo 3 > /proc/sys/vm/drop_caches
        sha256sum -c -s /tmp/sums || echo "BAD-READ buffered $1 round $n"
        n=$((n + 1))
    done
    echo "READER buffered$1 ROUNDS $n"
}}
direct() {{
    n=0
    while [ $(now) -lt $END ]; do
        for f in {names}; do
            dd if=$f of=/tmp/direct bs=64k iflag=direct 2>/dev/null || echo "BAD-READ direct $f round $n"
            want=$(grep " $f\$" /tmp/sums | cut -d' ' -f1)
            got=$(sha256sum /tmp/direct | cut -d' ' -f1)
            [ "$got" = "$want" ] || echo "BAD-READ direct sum $f round $n"
        done
        n=$((n + 1))
    done
    echo "READER direct ROUNDS $n"
}}
mapped() {{
    n=0
    while [ $(now) -lt $END ]; do
        for f in {names}; do
            guest-check mmap $f {MMAP_SEED} || echo "BAD-READ mmap $f round $n"
        done
        n=$((n + 1))
    done
    echo "READER mmap ROUNDS $n"
}}
buffered 0 &
jobs_to_wait="$jobs_to_wait $!"
buffered 1 &
jobs_to_wait="$jobs_to_wait $!"
direct &
jobs_to_wait="$jobs_to_wait $!"
mapped > /tmp/mmap.out &
jobs_to_wait="$jobs_to_wait $!"
wait $jobs_to_wait
cat /tmp/stall.out /tmp/mmap.out
echo WORKLOAD-END
dmesg | grep -iE '{DMESG_ERRORS}' && fail "kernel reported errors"
echo 3 > /proc/sys/vm/drop_caches
sha256sum -c -s /tmp/sums || fail "image files after the kills"
echo CRASH-OK
"#
    );
    let _vm = vm_lock();
    // A cache smaller than what the readers read: misses (parked, completed out of order)
    // go on all along, not only in the first round.
    let args = ["--read-timeout-ms", "120000", "--cache-size", "4M"];
    // Started from a copy of the binary that each upgrade replaces on disk.
    let bin = work.join("bin/incfsd");
    std::fs::create_dir_all(work.join("bin")).expect("mkdir bin");
    install(&incfsd_bin(), &bin);
    let socket = work.join("fs.sock");
    let daemon = Arc::new(Daemon::start_binary(&bin, &socket, &work.join("cache"), &proxy.url, &image, &args));
    let supervisor = daemon.pid();
    let seed = std::env::var("INCFS_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    println!("kill seed: {seed} (INCFS_CRASH_SEED={seed} repeats it)");
    let (start_tx, start_rx) = mpsc::channel::<()>();
    let workers = Arc::new(Mutex::new(Vec::new()));
    let killer = {
        let (daemon, workers, bin, socket) = (daemon.clone(), workers.clone(), bin.clone(), socket.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            if start_rx.recv_timeout(Duration::from_secs(300)).is_err() {
                return;
            }
            let mut worker = next_worker(&daemon, None);
            workers.lock().unwrap_or_else(|p| p.into_inner()).push(worker);
            for k in 0..KILLS {
                std::thread::sleep(Duration::from_millis(1500 + rng.below(2000)));
                let t = Instant::now();
                match event {
                    Event::Kill => kill_9(worker),
                    Event::Upgrade => {
                        install(&incfsd_bin(), &bin);
                        let out = Command::new(incfsd_bin())
                            .args(["upgrade", "--socket"])
                            .arg(&socket)
                            .output()
                            .expect("run incfsd upgrade");
                        let said = String::from_utf8_lossy(&out.stdout).into_owned();
                        assert!(
                            out.status.success(),
                            "incfsd upgrade: {said} {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                        let new: u32 = said.trim().rsplit(' ').next().and_then(|p| p.parse().ok()).expect("worker pid");
                        // The new worker runs the binary now on disk, not the replaced one; so
                        // does the supervisor, re-executed in place (same pid).
                        let exe = std::fs::read_link(format!("/proc/{new}/exe")).expect("worker exe");
                        assert_eq!(exe, bin, "the upgraded worker runs {}", exe.display());
                        let t = Instant::now();
                        while std::fs::read_link(format!("/proc/{}/exe", daemon.pid())).ok().as_ref() != Some(&bin) {
                            assert!(t.elapsed() < Duration::from_secs(10), "the supervisor did not re-execute itself");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                worker = next_worker(&daemon, Some(worker));
                workers.lock().unwrap_or_else(|p| p.into_inner()).push(worker);
                println!("event {}: worker {worker} serving {:?} after it began", k + 1, t.elapsed());
            }
            if event == Event::Upgrade {
                // A binary that cannot start: the upgrade fails, says so, and the old worker
                // serves on.
                let broken = bin.with_extension("broken");
                std::fs::write(&broken, "#!/bin/sh\necho 'incfsd: cannot start' >&2\nexit 3\n").expect("write");
                std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
                std::fs::rename(&broken, &bin).expect("install the broken binary");
                let out =
                    Command::new(incfsd_bin()).args(["upgrade", "--socket"]).arg(&socket).output().expect("upgrade");
                let said = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(
                    !out.status.success() && said.contains("failed to start") && said.contains("serves on"),
                    "a broken upgrade: {said}"
                );
                assert_eq!(daemon.worker_pid(), Some(worker), "the old worker serves on");
                install(&incfsd_bin(), &bin);
                println!("a broken binary: the upgrade failed ({}), the old worker serves on", said.trim());
            }
        })
    };
    let mut start_tx = Some(start_tx);
    let run = run_vm(&work.path, &daemon, &script, 600, |line| {
        if line.contains("WORKLOAD-START") {
            if let Some(tx) = start_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    drop(start_tx);
    killer.join().expect("killer thread");
    let stderr = plain(&daemon.stderr());
    let workers = workers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(workers.len(), KILLS + 1, "the kills did not all happen:\n{}\n{stderr}", run.console);
    assert_eq!(daemon.pid(), supervisor);
    let mut distinct = workers.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), KILLS + 1, "a new worker each time: {workers:?}");
    assert!(
        run.console.contains("CRASH-OK") && run.status == 0,
        "guest failed (status {}):\n{}\ndaemon's stderr:\n{stderr}",
        run.status,
        run.console
    );
    for bad in ["BAD-", "CRASH-FAIL", "GC ERR"] {
        assert!(!run.console.contains(bad), "{bad} in the guest's output");
    }
    let end = run.console.find("WORKLOAD-END").expect("workload end");
    let rounds = |who: &str| -> u64 {
        run.console[..end]
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("READER {who} ROUNDS ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no rounds of {who}"))
    };
    for who in ["buffered0", "buffered1", "direct", "mmap"] {
        assert!(rounds(who) >= 2, "reader {who} made only {} rounds", rounds(who));
    }
    let results = run.results();
    let mmaps: Vec<&Vec<String>> = results.iter().filter(|r| r[0] == "MMAP").collect();
    assert!(mmaps.len() >= files.len() * 2, "only {} mmap checks", mmaps.len());
    for r in mmaps {
        let data = &files.iter().find(|(p, _)| format!("/mnt/{p}") == r[1]).expect("a known file").1;
        let (pages, digest) = expected_mmap(data, MMAP_SEED);
        assert_eq!((r[2].as_str(), r[3].as_str()), (pages.to_string().as_str(), digest.as_str()), "mmap {}", r[1]);
    }
    let replayed =
        if event == Event::Kill { "worker brought to the device state" } else { "upgraded worker took the device" };
    assert!(stderr.contains(replayed), "no replay logged:\n{stderr}");
    let gaps: Vec<(f64, u64)> = results
        .iter()
        .filter(|r| r.first().is_some_and(|k| k == "GAP"))
        .filter_map(|r| Some((r.get(1)?.parse().ok()?, r.get(2)?.parse().ok()?)))
        .collect();
    let stall = results.iter().find(|r| r.first().is_some_and(|k| k == "STALL")).expect("GC STALL line");
    let resubmitted: u64 = stderr
        .lines()
        .filter_map(|l| l.split("resubmitted=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    // How long the device had no worker: from the supervisor seeing the death to the new
    // worker holding the replayed state.
    let at = |l: &str| -> Option<f64> {
        let t = l.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
        let mut hms = t.split(':').map(|x| x.parse::<f64>().ok());
        Some(hms.next()?? * 3600.0 + hms.next()?? * 60.0 + hms.next()??)
    };
    let mut died = None;
    let mut downtimes = Vec::new();
    for l in stderr.lines() {
        if l.contains("worker died") || (event == Event::Upgrade && l.contains("worker started")) {
            died = at(l);
        } else if l.contains("worker brought to the device state") || l.contains("upgraded worker took the device") {
            if let (Some(d), Some(b)) = (died.take(), at(l)) {
                downtimes.push(((b - d) * 1000.0).round() as u64);
            }
        }
    }
    println!("old worker gone (kill) or new one started (upgrade) to new worker serving, ms: {downtimes:?}");
    println!("stalls over 200 ms seen by the guest (at s, ms): {gaps:?}");
    println!("longest stall: {} ms over {KILLS} events; reads: {}", stall[1], stall[2]);
    println!("requests resubmitted by new workers: {resubmitted}");
    let longest: u64 = stall[1].parse().expect("ms");
    assert!(longest < 15_000, "the guest waited {longest} ms at once");
}

#[test]
fn a_read_parked_at_the_kill_completes() {
    // The guest reads 64 KiB of one file (fetched, then cached), then an O_DIRECT read of
    // another, a miss behind a 5 s round trip; while it is parked it reads the first file
    // again and again (hits). The worker is killed then.
    let fast = pseudo_random(11, 1 << 20);
    let slow = pseudo_random(12, 1 << 20);
    let work = WorkDir::new("fs-parked");
    let src = work.join("src");
    write_file(&src, "fast.bin", &fast);
    write_file(&src, "slow.bin", &slow);
    let store = work.join("store");
    let image = pack(&src, &store);
    let nginx = Nginx::start(&store, &work.path);
    let proxy = DelayProxy::start(env!("CARGO_BIN_EXE_delay-proxy"), &nginx.url, 5000);
    let script = format!(
        r#"#!/bin/sh
fail() {{ echo "PARKED-FAIL $*"; exit 1; }}
mount -t virtiofs incfs /mnt || fail mount
rd() {{ dd if=/mnt/$1 bs=64k skip=$2 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1; }}
[ "$(rd fast.bin 0)" = {fast64} ] || fail "first read of fast.bin"
(rd slow.bin 8 > /tmp/slow.sum; echo SLOW-DONE) &
sleep 1
echo SLOW-PARKED
i=0
while [ $i -lt 24 ]; do
    [ "$(rd fast.bin 0)" = {fast64} ] || echo "BAD-FAST $i"
    i=$((i + 1))
done
echo FAST-DONE
(sleep 60; echo "PARKED-FAIL watchdog: the parked read never completed"; poweroff -f) &
sleep 2
while [ ! -s /tmp/slow.sum ]; do sleep 0.2; done
[ "$(cat /tmp/slow.sum)" = {slow64} ] || fail "the parked read returned other bytes"
[ "$(rd fast.bin 0)" = {fast64} ] || fail "a read after the kill"
echo PARKED-OK
"#,
        fast64 = sha256_hex(&fast[..64 << 10]),
        slow64 = sha256_hex(&slow[8 * (64 << 10)..9 * (64 << 10)]),
    );
    let _vm = vm_lock();
    let args = ["--read-timeout-ms", "120000", "--fetch-timeout-ms", "30000"];
    let daemon = Daemon::start_with(&work.join("fs.sock"), &work.join("cache"), &proxy.url, &image, &args);
    let mut killed = None;
    let mut slow_done = false;
    let run = run_vm(&work.path, &daemon, &script, 240, |line| {
        slow_done |= line.contains("SLOW-DONE");
        if line.contains("FAST-DONE") && killed.is_none() {
            let worker = daemon.worker_pid().expect("a worker");
            kill_9(worker);
            killed = Some(!slow_done);
            println!("killed worker {worker} (the slow read pending: {})", !slow_done);
        }
    });
    let stderr = plain(&daemon.stderr());
    assert_eq!(killed, Some(true), "the slow read was not pending at the kill");
    assert!(
        run.console.contains("PARKED-OK") && run.status == 0,
        "guest failed (status {}):\n{}\ndaemon's stderr:\n{stderr}",
        run.status,
        run.console
    );
    assert!(!run.console.contains("BAD-FAST"), "a fast read failed");
    assert!(stderr.contains("resubmitted=1"), "the new worker did not resubmit the parked read:\n{stderr}");
}
