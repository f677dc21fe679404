//! Warm-cache benchmark over vhost-user + FUSE with no guest: incfsd against virtiofsd
//! serving the same tree, and N incfsd daemons sharing one cache.
//!
//! cargo run --release -p incfs-backend --example bench -- [--virtiofsd PATH] [--seconds S] [--rounds N]
//!
//! Prints one line per figure with the baseline beside it (the median of --rounds rounds, the
//! daemons taking turns to go first, each round listed). Every daemon is driven the same
//! way: one frontend per daemon, one request in flight, on one request queue, with EVENT_IDX
//! negotiated as QEMU guests do.
//!
//! Two incfsd binaries side by side (e.g. before and after a change), instead of virtiofsd:
//!
//! bench --incfsd NEW --baseline-incfsd OLD [--label new --baseline-label old]
//!
//! Both serve the same packed image (packed by --incfsd), each from its own cache directory,
//! warmed by its own binary the same way; the baseline takes virtiofsd's column, and only the
//! warm figures are printed (no packing, no N-daemon table). `--incfsd-args "..."` and
//! `--baseline-args "..."` add options to either daemon's `incfsd run`, so one binary can be
//! measured against itself (`--verify-cached`, `--sandbox none --seccomp none`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use incfs_testing::{FrontendConfig, FuseFrontend};

struct Args {
    /// Drive this already running daemon with one workload, then exit (for profiling).
    socket: Option<PathBuf>,
    workload: String,
    work: PathBuf,
    virtiofsd: Option<PathBuf>,
    /// A second incfsd binary to compare against, in place of virtiofsd.
    baseline_incfsd: Option<PathBuf>,
    /// Column names: the measured incfsd and the baseline.
    label: String,
    baseline_label: Option<String>,
    seconds: f64,
    /// Rounds per comparison figure (the median is reported).
    rounds: usize,
    incfsd: PathBuf,
    /// Extra options for the measured daemon's `incfsd run` and the baseline's (both
    /// whitespace-separated), e.g. the same binary with `--verify-cached` against without.
    incfsd_args: Vec<String>,
    baseline_args: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        socket: None,
        workload: "rand-4k".into(),
        work: std::env::temp_dir().join("incfs-bench"),
        virtiofsd: ["/root/.cargo/bin/virtiofsd", "/usr/local/bin/virtiofsd"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists()),
        baseline_incfsd: None,
        label: "incfsd".into(),
        baseline_label: None,
        seconds: 3.0,
        rounds: 5,
        incfsd: std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("incfsd")))
            .unwrap_or_else(|| "incfsd".into()),
        incfsd_args: Vec::new(),
        baseline_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--work" => a.work = v.into(),
            "--virtiofsd" => a.virtiofsd = Some(v.into()),
            "--seconds" => a.seconds = v.parse().expect("--seconds"),
            "--rounds" => a.rounds = v.parse().expect("--rounds"),
            "--incfsd" => a.incfsd = v.into(),
            "--baseline-incfsd" => a.baseline_incfsd = Some(v.into()),
            "--label" => a.label = v,
            "--baseline-label" => a.baseline_label = Some(v),
            "--socket" => a.socket = Some(v.into()),
            "--workload" => a.workload = v,
            "--incfsd-args" => a.incfsd_args = v.split_whitespace().map(String::from).collect(),
            "--baseline-args" => a.baseline_args = v.split_whitespace().map(String::from).collect(),
            _ => panic!("unknown option {k}"),
        }
    }
    a
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

const BIG: u64 = 256 << 20;
const SMALL_DIRS: usize = 20;
const SMALL_PER_DIR: usize = 100;
const WIDE: usize = 5000;

/// The tree: one large file, 2000 small files in 20 directories, one 5000-entry directory.
fn make_tree(src: &Path) {
    if src.join(".done").exists() {
        return;
    }
    let _ = std::fs::remove_dir_all(src);
    std::fs::create_dir_all(src.join("wide")).expect("mkdir");
    let mut x = 0x1234_5678_9abc_def1u64;
    let big: Vec<u8> = (0..BIG / 8).flat_map(|_| xorshift(&mut x).to_le_bytes()).collect();
    std::fs::write(src.join("big"), big).expect("big");
    for d in 0..SMALL_DIRS {
        let dir = src.join(format!("small/d{d:02}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..SMALL_PER_DIR {
            let len = 4096 + (xorshift(&mut x) % 12288) as usize;
            let data: Vec<u8> = (0..len).map(|i| (i as u64 ^ x) as u8).collect();
            std::fs::write(dir.join(format!("f{f:03}")), data).expect("small");
        }
    }
    for i in 0..WIDE {
        std::fs::write(src.join(format!("wide/entry-{i:05}")), b"").expect("wide");
    }
    std::fs::write(src.join(".done"), b"").expect("done");
}

fn incfsd(a: &Args, args: &[&str]) -> String {
    incfsd_bin(&a.incfsd, args)
}

/// Runs `bin` with `args`; the last line it printed.
fn incfsd_bin(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).stderr(Stdio::inherit()).output().expect("run incfsd");
    assert!(out.status.success(), "{} {args:?} failed", bin.display());
    String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string()
}

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn wait_socket(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_incfsd(a: &Args, store: &Path, id: &str, cache: &Path, n: usize) -> Daemon {
    start_incfsd_bin(&a.incfsd, &a.work, store, id, cache, &n.to_string(), &a.incfsd_args)
}

fn start_incfsd_bin(
    bin: &Path,
    work: &Path,
    store: &Path,
    id: &str,
    cache: &Path,
    name: &str,
    extra: &[String],
) -> Daemon {
    let socket = work.join(format!("incfsd-{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(bin)
        .args(["run", "--threads", "1", "--queues", "1", "--image", id, "--store"])
        .arg(store)
        .arg("--cache")
        .arg(cache)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .expect("start incfsd");
    wait_socket(&socket);
    Daemon { child, socket }
}

fn start_virtiofsd(bin: &Path, src: &Path, work: &Path) -> Daemon {
    let socket = work.join("virtiofsd.sock");
    let _ = std::fs::remove_file(&socket);
    let child = Command::new(bin)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(src)
        .args(["--cache", "always", "--sandbox", "none", "--seccomp", "none", "--thread-pool-size", "0"])
        .stderr(Stdio::null())
        .spawn()
        .expect("start virtiofsd");
    wait_socket(&socket);
    Daemon { child, socket }
}

fn connect(d: &Daemon) -> FuseFrontend {
    let mut f = FuseFrontend::connect_with(
        &d.socket,
        FrontendConfig { slots: 4, event_idx: true, ..FrontendConfig::default() },
    )
    .expect("connect");
    f.init().expect("FUSE INIT");
    f
}

fn lookup_path(f: &mut FuseFrontend, path: &str) -> u64 {
    path.split('/').fold(1, |ino, name| f.lookup(ino, name.as_bytes()).expect("lookup").nodeid)
}

/// (operations, bytes) done in `secs` seconds.
fn workload(f: &mut FuseFrontend, which: &str, secs: f64, seed: u64) -> (u64, u64) {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let (mut ops, mut bytes) = (0u64, 0u64);
    let mut x = seed | 1;
    match which {
        "seq-128k" | "rand-4k" => {
            let ino = lookup_path(f, "big");
            let (fh, _) = f.open(ino, libc::O_RDONLY as u32).expect("open");
            let mut off = 0;
            while Instant::now() < stop {
                for _ in 0..64 {
                    let (o, n) = if which == "seq-128k" {
                        off = (off + (128 << 10)) % BIG;
                        (off, 128 << 10)
                    } else {
                        ((xorshift(&mut x) % (BIG / 4096)) * 4096, 4096)
                    };
                    let d = f.read(ino, fh, o, n).expect("read");
                    assert_eq!(d.len(), n as usize);
                    ops += 1;
                    bytes += d.len() as u64;
                }
            }
            let _ = f.release(ino, fh);
        }
        "lookup-getattr" => {
            while Instant::now() < stop {
                let d = xorshift(&mut x) as usize % SMALL_DIRS;
                let dir = lookup_path(f, &format!("small/d{d:02}"));
                for _ in 0..32 {
                    let i = xorshift(&mut x) as usize % SMALL_PER_DIR;
                    let e = f.lookup(dir, format!("f{i:03}").as_bytes()).expect("lookup");
                    f.getattr(e.nodeid).expect("getattr");
                    let _ = f.forget(e.nodeid, 1);
                    ops += 1;
                }
            }
        }
        "readdir" => {
            let ino = lookup_path(f, "wide");
            while Instant::now() < stop {
                let (fh, _) = f.opendir(ino).expect("opendir");
                let mut cookie = 0;
                loop {
                    let ents = f.readdir(ino, fh, cookie, 64 << 10).expect("readdir");
                    let Some(last) = ents.last() else { break };
                    cookie = last.off;
                    ops += ents.len() as u64;
                }
                let _ = f.releasedir(ino, fh);
            }
        }
        _ => unreachable!(),
    }
    (ops, bytes)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn rate(which: &str, (ops, bytes): (u64, u64), secs: f64) -> (f64, &'static str) {
    match which {
        "seq-128k" => (bytes as f64 / 1e6 / secs, "MB/s"),
        "readdir" => (ops as f64 / secs, "entries/s"),
        _ => (ops as f64 / secs, "ops/s"),
    }
}

/// Packing throughput with every core, one core, and `tar | zstd -3` on every core as what a
/// user would otherwise run to publish a tree.
fn pack_figures(a: &Args, src: &Path) {
    let bytes: u64 = walk_bytes(src);
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let pack_with = |threads: Option<&str>| {
        let store = a.work.join("pack-bench");
        let _ = std::fs::remove_dir_all(&store);
        let mut c = Command::new(&a.incfsd);
        c.arg("pack").arg(src).arg("--store").arg(&store).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(n) = threads {
            c.env("RAYON_NUM_THREADS", n);
        }
        // Earlier writes still being flushed would be charged to this run's final fsync.
        // SAFETY: sync(2) takes no arguments.
        unsafe { libc::sync() };
        let secs = time(&mut || assert!(c.status().expect("pack").success()));
        let _ = std::fs::remove_dir_all(&store);
        bytes as f64 / 1e6 / secs
    };
    let all = pack_with(None);
    let one = pack_with(Some("1"));
    let zstd = Command::new("sh")
        .arg("-c")
        .arg(format!("tar -C {} -cf - . | zstd -3 -T0 -q -o /dev/null -f", src.display()))
        .stderr(Stdio::null())
        .status()
        .ok()
        .filter(|s| s.success())
        .map(|_| ());
    println!(
        "# packing {:.0} MB ({} cores)",
        bytes as f64 / 1e6,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("{:<16} {:>9.0} MB/s  1 core {:>6.0} MB/s {:>7.2}x", "pack", all, one, all / one);
    if zstd.is_some() {
        let cmd = format!("tar -C {} -cf - . | zstd -3 -T0 -q -o /dev/null -f", src.display());
        let secs = time(&mut || {
            let _ = Command::new("sh").arg("-c").arg(&cmd).status();
        });
        let z = bytes as f64 / 1e6 / secs;
        println!("{:<16} {:>9.0} MB/s  tar|zstd -3 {:>6.0} MB/s {:>7.2}x", "pack", all, z, all / z);
    }
    println!();
}

/// Every block of the tree into `cache` through `bin`: the large file with `incfsd cat`, the
/// small files read through a running daemon.
fn warm_cache(bin: &Path, work: &Path, store: &Path, id: &str, cache: &Path) {
    let out = Command::new(bin)
        .args(["cat", "--image", id, "--store"])
        .arg(store)
        .arg("--cache")
        .arg(cache)
        .arg("big")
        .output()
        .expect("cat");
    assert!(out.status.success(), "{} cat failed", bin.display());
    let d = start_incfsd_bin(bin, work, store, id, cache, "warm", &[]);
    let mut f = connect(&d);
    for dd in 0..SMALL_DIRS {
        for i in 0..SMALL_PER_DIR {
            let ino = lookup_path(&mut f, &format!("small/d{dd:02}/f{i:03}"));
            let (fh, _) = f.open(ino, 0).expect("open");
            f.read(ino, fh, 0, 1 << 16).expect("read");
        }
    }
}

fn walk_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => walk_bytes(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

const WORKLOADS: [&str; 4] = ["seq-128k", "rand-4k", "lookup-getattr", "readdir"];

fn main() {
    let a = args();
    if let Some(socket) = &a.socket {
        let d = Daemon { child: Command::new("true").spawn().expect("true"), socket: socket.clone() };
        let mut f = connect(&d);
        let w = a.workload.as_str();
        let (r, unit) = rate(w, workload(&mut f, w, a.seconds, 7), a.seconds);
        println!("{w} {r:.0} {unit}");
        std::mem::forget(d);
        return;
    }
    std::fs::create_dir_all(&a.work).expect("work dir");
    let src = a.work.join("src");
    make_tree(&src);
    let store = a.work.join("store");
    let id = incfsd(&a, &["pack", src.to_str().expect("utf8"), "--store", store.to_str().expect("utf8")]);
    // A baseline incfsd serves the tree as it packs it itself: an older one may not read this
    // one's image format (and a newer format is part of what is compared).
    let (base_store, base_id) = match &a.baseline_incfsd {
        Some(bin) => {
            let s = a.work.join("store-baseline");
            let _ = std::fs::remove_dir_all(&s);
            let id = incfsd_bin(bin, &["pack", src.to_str().expect("utf8"), "--store", s.to_str().expect("utf8")]);
            (s, id)
        }
        None => (store.clone(), id.clone()),
    };
    if a.baseline_incfsd.is_none() {
        pack_figures(&a, &src);
    }
    // Warm the shared cache: every block once.
    let cache = a.work.join("cache");
    // The baseline binary gets a cache of its own, warmed the same way by itself. Both are
    // made afresh: a cache file left from an earlier run is not in the page cache the way a
    // fresh one is (in one run the kernel's part of seq-128k, filemap_get_read_batch, went
    // from under 1 % to 7-10 % of the daemon's time on the older file, whichever binary
    // read it), which would pass for a difference between the binaries.
    let baseline_cache = a.work.join("cache-baseline");
    if a.baseline_incfsd.is_some() {
        let _ = std::fs::remove_dir_all(&cache);
        let _ = std::fs::remove_dir_all(&baseline_cache);
    }
    warm_cache(&a.incfsd, &a.work, &store, &id, &cache);
    if let Some(bin) = &a.baseline_incfsd {
        warm_cache(bin, &a.work, &base_store, &base_id, &baseline_cache);
    }
    let secs = a.seconds;
    let rounds = a.rounds.max(1);
    let (ours_label, base_label) = match (&a.baseline_incfsd, &a.baseline_label) {
        (_, Some(l)) => (a.label.as_str(), l.as_str()),
        (Some(_), None) => (a.label.as_str(), "baseline"),
        (None, None) => (a.label.as_str(), "virtiofsd"),
    };
    let baseline: Option<(&PathBuf, bool)> = match (&a.baseline_incfsd, &a.virtiofsd) {
        (Some(b), _) => Some((b, true)),
        (None, Some(v)) => Some((v, false)),
        (None, None) => None,
    };
    if let Some(b) = &a.baseline_incfsd {
        println!("# {ours_label}: {} {}", a.incfsd.display(), a.incfsd_args.join(" "));
        println!("# {base_label}: {} {}", b.display(), a.baseline_args.join(" "));
    }
    println!("# warm cache, one request in flight per daemon, {secs} s per figure, median of {rounds} rounds (daemons alternate who goes first)");
    println!(
        "{:<16} {:>14} {:>14} {:>8}   rounds ({ours_label}/{base_label})",
        "workload", ours_label, base_label, "ratio"
    );
    for w in WORKLOADS {
        let ours = |seed| {
            let d = start_incfsd(&a, &store, &id, &cache, 0);
            let mut f = connect(&d);
            rate(w, workload(&mut f, w, secs, seed), secs).0
        };
        let base = |(bin, is_incfsd): (&PathBuf, bool), seed| {
            let d = if is_incfsd {
                start_incfsd_bin(bin, &a.work, &base_store, &base_id, &baseline_cache, "baseline", &a.baseline_args)
            } else {
                start_virtiofsd(bin, &src, &a.work)
            };
            let mut f = connect(&d);
            rate(w, workload(&mut f, w, secs, seed), secs).0
        };
        let (mut rs, mut bs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let seed = 7 + round as u64;
            match baseline {
                Some(bin) if round % 2 == 1 => {
                    bs.push(base(bin, seed));
                    rs.push(ours(seed));
                }
                Some(bin) => {
                    rs.push(ours(seed));
                    bs.push(base(bin, seed));
                }
                None => rs.push(ours(seed)),
            }
        }
        let unit = rate(w, (0, 0), 1.0).1;
        let (r, b) = (median(&rs), median(&bs));
        let each: Vec<String> = rs
            .iter()
            .zip(bs.iter().chain(std::iter::repeat(&f64::NAN)))
            .map(|(x, y)| format!("{x:.0}/{y:.0}"))
            .collect();
        if bs.is_empty() {
            println!("{w:<16} {r:>9.0} {unit:<4} {:>14} {:>8}", "(no virtiofsd)", "-");
        } else {
            println!("{w:<16} {r:>9.0} {unit:<4} {b:>9.0} {unit:<4} {:>7.2}x   {}", r / b, each.join(" "));
        }
    }
    if a.baseline_incfsd.is_some() {
        return;
    }
    println!();
    println!("# N incfsd daemons on one warm cache at once (aggregate), baseline: 1 daemon");
    println!("{:<16} {:>8} {:>14} {:>14} {:>8}", "workload", "daemons", "aggregate", "per daemon", "scaling");
    for w in ["seq-128k", "rand-4k"] {
        let mut one = 0.0;
        for n in [1usize, 2, 4] {
            let daemons: Vec<Daemon> = (0..n).map(|i| start_incfsd(&a, &store, &id, &cache, i)).collect();
            let socks: Vec<Arc<PathBuf>> = daemons.iter().map(|d| Arc::new(d.socket.clone())).collect();
            let threads: Vec<_> = socks
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let w = w.to_string();
                    std::thread::spawn(move || {
                        let mut f = FuseFrontend::connect_with(
                            &s,
                            FrontendConfig { slots: 4, event_idx: true, ..FrontendConfig::default() },
                        )
                        .expect("connect");
                        f.init().expect("init");
                        workload(&mut f, &w, secs, 11 + i as u64)
                    })
                })
                .collect();
            let total =
                threads.into_iter().map(|t| t.join().expect("thread")).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let (r, unit) = rate(w, total, secs);
            if n == 1 {
                one = r;
            }
            println!("{w:<16} {n:>8} {r:>9.0} {unit:<4} {:>9.0} {unit:<4} {:>7.2}x", r / n as f64, r / one);
            drop(daemons);
        }
    }
}
