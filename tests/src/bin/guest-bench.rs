//! Guest-side benchmark program (static, copied into a QEMU guest by tests/bench/). Each
//! subcommand prints one result line starting with "GB ":
//!
//! ```text
//! guest-bench seq FILE SECS          GB seq-128k <MB/s> <bytes> <secs>
//!     sequential 128 KiB read(2)s of FILE from the start, the page cache dropped before
//!     each pass (echo 3 > /proc/sys/vm/drop_caches), for about SECS seconds
//! guest-bench seq-direct FILE SECS   GB seq-128k-direct <MB/s> <bytes> <secs>
//!     the same with O_DIRECT: every read(2) is one 128 KiB READ to the daemon, no guest
//!     page cache or readahead in between (as the FUSE-level benchmark sends them)
//! guest-bench rand FILE SECS SEED    GB rand-4k <ops/s> <ops> <secs> <direct|buffered>
//!     4 KiB preads at random 4 KiB-aligned offsets; O_DIRECT (no guest page cache) if the
//!     mount accepts it, else buffered with POSIX_FADV_RANDOM, each offset read once per pass
//!     (a shuffled permutation) and the cache dropped between passes
//! guest-bench stat DIR SECS          GB stat <ops/s> <ops> <secs>
//!     lstat of every entry of every subdirectory of DIR, dentries and inodes dropped before
//!     each pass (so each stat is a LOOKUP, or a LOOKUP + GETATTR, on the host)
//! guest-bench readdir DIR SECS       GB readdir <entries/s> <entries> <secs>
//!     list DIR completely, caches dropped before each pass
//! guest-bench readall DIR THREADS    GB readall <files> <bytes> <secs>
//!     read every regular file under DIR once (THREADS threads)
//! ```
//! Only the measured loops are timed, not the cache drops.

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["seq", file, secs] => seq(file, secs_arg(secs)),
        ["seq-direct", file, secs] => seq_direct(file, secs_arg(secs)),
        ["rand", file, secs, seed] => rand(file, secs_arg(secs), seed.parse().expect("seed")),
        ["stat", dir, secs] => stat(dir, secs_arg(secs)),
        ["readdir", dir, secs] => readdir(dir, secs_arg(secs)),
        ["readall", dir, threads] => readall(dir, threads.parse().expect("threads")),
        _ => {
            eprintln!("usage: guest-bench seq|rand|stat|readdir|readall ARGS (see source)");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn secs_arg(s: &str) -> Duration {
    Duration::from_secs_f64(s.parse().expect("seconds"))
}

fn drop_caches() {
    // sync first is pointless (read-only), but harmless and cheap.
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", b"3") {
        eprintln!("guest-bench: drop_caches: {e}");
    }
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Timed passes over a list, up to a time budget. Only `pass` is timed (the caller's cache
/// drops between passes are not); the clock is read every 64 operations.
struct Budget {
    secs: Duration,
    spent: Duration,
    ops: u64,
}

impl Budget {
    fn new(secs: Duration) -> Self {
        Budget { secs, spent: Duration::ZERO, ops: 0 }
    }

    fn left(&self) -> bool {
        self.spent < self.secs
    }

    /// Runs `op` on every item, in chunks of 64, stopping part-way when the budget runs out.
    fn pass<T>(&mut self, items: &[T], mut op: impl FnMut(&T)) {
        let t = Instant::now();
        for chunk in items.chunks(64) {
            for item in chunk {
                op(item);
                self.ops += 1;
            }
            if self.spent + t.elapsed() >= self.secs {
                break;
            }
        }
        self.spent += t.elapsed();
    }
}

fn seq(file: &str, secs: Duration) {
    let mut buf = vec![0u8; 128 << 10];
    let (mut bytes, mut spent) = (0u64, Duration::ZERO);
    while spent < secs {
        drop_caches();
        let mut f = File::open(file).unwrap_or_else(|e| panic!("open {file}: {e}"));
        let t = Instant::now();
        loop {
            let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {file}: {e}"));
            if n == 0 {
                break;
            }
            bytes += n as u64;
            if spent + t.elapsed() >= secs {
                break;
            }
        }
        spent += t.elapsed();
    }
    let s = spent.as_secs_f64();
    println!("GB seq-128k {:.1} {bytes} {s:.3}", bytes as f64 / 1e6 / s);
}

fn seq_direct(file: &str, secs: Duration) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .unwrap_or_else(|e| panic!("open {file} O_DIRECT: {e}"));
    let mut buf = Aligned::new(128 << 10);
    let (mut bytes, mut off) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed() < secs {
        let n = f.read_at(buf.slice(), off).unwrap_or_else(|e| panic!("pread {file}@{off}: {e}"));
        bytes += n as u64;
        off = if n == 0 { 0 } else { off + n as u64 };
    }
    let s = t.elapsed().as_secs_f64();
    println!("GB seq-128k-direct {:.1} {bytes} {s:.3}", bytes as f64 / 1e6 / s);
}

/// A page-aligned buffer for O_DIRECT.
struct Aligned(*mut u8, usize);

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null());
        Aligned(p, len)
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: self.1 bytes allocated in new, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

fn rand(file: &str, secs: Duration, seed: u64) {
    let size = std::fs::metadata(file).unwrap_or_else(|e| panic!("stat {file}: {e}")).len();
    let blocks = size / 4096;
    assert!(blocks > 0, "{file} is smaller than 4 KiB");
    let mut x = seed | 1;
    let mut buf = Aligned::new(4096);
    let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(file);
    let mode = if direct.is_ok() { "direct" } else { "buffered" };
    let (ops, spent) = if let Ok(f) = direct {
        drop_caches();
        let mut ops = 0u64;
        let t = Instant::now();
        while t.elapsed() < secs {
            for _ in 0..64 {
                let off = (xorshift(&mut x) % blocks) * 4096;
                let n = f.read_at(buf.slice(), off).unwrap_or_else(|e| panic!("pread {file}@{off}: {e}"));
                assert_eq!(n, 4096);
                ops += 1;
            }
        }
        (ops, t.elapsed())
    } else {
        // Each block once per pass, in shuffled order, no readahead, caches dropped between.
        let mut order: Vec<u64> = (0..blocks).collect();
        let mut budget = Budget::new(secs);
        while budget.left() {
            for i in (1..order.len()).rev() {
                order.swap(i, (xorshift(&mut x) % (i as u64 + 1)) as usize);
            }
            drop_caches();
            let f = File::open(file).unwrap_or_else(|e| panic!("open {file}: {e}"));
            // SAFETY: plain syscall on an open fd.
            unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_RANDOM) };
            budget.pass(&order, |&b| {
                let n = f.read_at(buf.slice(), b * 4096).unwrap_or_else(|e| panic!("pread {file}: {e}"));
                assert_eq!(n, 4096);
            });
        }
        (budget.ops, budget.spent)
    };
    let s = spent.as_secs_f64();
    println!("GB rand-4k {:.0} {ops} {s:.3} {mode}", ops as f64 / s);
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.expect("dirent").path())
        .collect();
    v.sort();
    v
}

fn stat(dir: &str, secs: Duration) {
    let mut files = Vec::new();
    for d in entries(Path::new(dir)) {
        if d.is_dir() {
            files.extend(entries(&d));
        }
    }
    assert!(!files.is_empty(), "no files under the subdirectories of {dir}");
    let mut budget = Budget::new(secs);
    while budget.left() {
        drop_caches();
        budget.pass(&files, |p| {
            std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        });
    }
    let (ops, s) = (budget.ops, budget.spent.as_secs_f64());
    println!("GB stat {:.0} {ops} {s:.3}", ops as f64 / s);
}

fn readdir(dir: &str, secs: Duration) {
    let (mut n, mut spent) = (0u64, Duration::ZERO);
    while spent < secs {
        drop_caches();
        let t = Instant::now();
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {dir}: {e}")) {
            let e = e.expect("dirent");
            std::hint::black_box(e.file_name().as_bytes().len());
            n += 1;
        }
        spent += t.elapsed();
    }
    let s = spent.as_secs_f64();
    println!("GB readdir {:.0} {n} {s:.3}", n as f64 / s);
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display())) {
        let e = e.expect("dirent");
        let ft = e.file_type().expect("file type");
        if ft.is_dir() {
            walk(&e.path(), out);
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
}

fn readall(dir: &str, threads: usize) {
    let t = Instant::now();
    let mut files = Vec::new();
    walk(Path::new(dir), &mut files);
    let files = std::sync::Arc::new(files);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hs: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (files, next) = (files.clone(), next.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut bytes = 0u64;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(p) = files.get(i) else { break };
                    let mut f = File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
                    loop {
                        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
                        if n == 0 {
                            break;
                        }
                        bytes += n as u64;
                    }
                }
                bytes
            })
        })
        .collect();
    let bytes: u64 = hs.into_iter().map(|h| h.join().expect("reader")).sum();
    println!("GB readall {} {bytes} {:.3}", files.len(), t.elapsed().as_secs_f64());
}
