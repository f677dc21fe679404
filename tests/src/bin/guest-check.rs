//! Guest-side helper for the end-to-end tests, built static and copied into the VM. It reads
//! files in the ways the tests care about and prints one result line per check, starting
//! with "GC "; the host computes the expected values from the source tree and compares.
//!
//! ```text
//! guest-check seq SPEC...                     GC SEQ <spec> <len> <sha256>       (sequential reads)
//! guest-check par SPEC...                     GC PAR <spec> <len> <sha256>       (one thread per spec, concurrently)
//! guest-check pread FILE SEED COUNT MAXLEN    GC PREAD <file> <count> <digest>   (random preads, see check::pread_plan)
//! guest-check mmap FILE SEED                  GC MMAP <file> <pages> <digest>    (page faults in random page order)
//! guest-check readdir DIR                     GC READDIR <dir> <count> <names digest>
//! guest-check stat PATH...                    GC STAT <path> <ino> <nlink> <kind> <size>   (lstat)
//! guest-check readlink PATH...                GC LINK <path> <target>
//! guest-check mutate FILE DIR EMPTYDIR        GC MUTATE <op> <errno, 0 if it succeeded>
//! guest-check stall DEV SECS                  GC GAP <at s> <ms> per read over 200 ms, then GC STALL <max ms> <reads>
//! ```
//! `stall` reads the first 4 KiB of DEV with O_DIRECT every 20 ms for SECS seconds and
//! reports the reads that waited: how long the guest saw the device stand still.
//! SPEC is `PATH` or `PATH@OFFSET+LEN`. A failed read prints `GC ERR <what> <path> <errno>`
//! and makes the exit status 1. Paths must not contain spaces.

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::ExitCode;

use incfs_e2e::check::{self, PieceDigest, Spec};
use sha2::{Digest, Sha256};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: guest-check seq|par|pread|mmap|readdir|stat|readlink|mutate|stall ARGS (see source)");
        return ExitCode::from(2);
    };
    let ok = match (cmd.as_str(), rest) {
        ("seq", specs) => specs.iter().map(|s| report("SEQ", s, hash_spec(&Spec::parse(s)))).fold(true, |a, b| a & b),
        ("par", specs) => {
            let handles: Vec<_> = specs
                .iter()
                .map(|s| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        let r = hash_spec(&Spec::parse(&s));
                        (s, r)
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("reader thread panicked")).collect();
            results.into_iter().map(|(s, r)| report("PAR", &s, r)).fold(true, |a, b| a & b)
        }
        ("pread", [file, seed, count, max_len]) => pread(file, num(seed), num(count) as usize, num(max_len)),
        ("mmap", [file, seed]) => mmap(file, num(seed)),
        ("readdir", [dir]) => readdir(dir),
        ("stat", paths) => paths.iter().map(|p| stat(p)).fold(true, |a, b| a & b),
        ("readlink", paths) => paths.iter().map(|p| readlink(p)).fold(true, |a, b| a & b),
        ("stall", [dev, secs]) => stall(dev, num(secs)),
        ("mutate", [file, dir, empty]) => {
            mutate(file, dir, empty);
            true
        }
        _ => {
            eprintln!("guest-check: bad arguments: {args:?}");
            return ExitCode::from(2);
        }
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn num(s: &str) -> u64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s}"))
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn fail(what: &str, path: &str, e: &std::io::Error) -> bool {
    println!("GC ERR {what} {path} {}", errno(e));
    eprintln!("guest-check: {what} {path}: {e}");
    false
}

fn report(kind: &str, spec: &str, r: std::io::Result<(u64, String)>) -> bool {
    match r {
        Ok((len, sha)) => {
            println!("GC {kind} {spec} {len} {sha}");
            true
        }
        Err(e) => fail(kind, spec, &e),
    }
}

/// Sequential read(2)s of 1 MiB (the whole file, or one range via pread).
fn hash_spec(spec: &Spec) -> std::io::Result<(u64, String)> {
    let mut f = File::open(&spec.path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    match spec.range {
        None => loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            total += n as u64;
        },
        Some((off, len)) => {
            while total < len {
                let want = ((len - total) as usize).min(buf.len());
                let n = f.read_at(&mut buf[..want], off + total)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
            }
        }
    }
    Ok((total, check::hex(&h.finalize())))
}

/// Reads exactly `len` bytes at `off` unless EOF comes first.
fn read_full_at(f: &File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
    Ok(buf)
}

fn pread(path: &str, seed: u64, count: usize, max_len: u64) -> bool {
    let run = || -> std::io::Result<String> {
        let f = File::open(path)?;
        let size = f.metadata()?.len();
        let mut d = PieceDigest::default();
        for (off, len) in check::pread_plan(size, seed, count, max_len) {
            d.add(off, &read_full_at(&f, off, len)?);
        }
        Ok(d.hex())
    };
    match run() {
        Ok(digest) => {
            println!("GC PREAD {path} {count} {digest}");
            true
        }
        Err(e) => fail("PREAD", path, &e),
    }
}

/// Maps the file and copies its pages out in a random order: every first touch is a page
/// fault that the guest kernel turns into a FUSE read.
fn mmap(path: &str, seed: u64) -> bool {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) => return fail("MMAP", path, &e),
    };
    let size = f.metadata().map(|m| m.len() as usize).unwrap_or(0);
    if size == 0 {
        println!("GC ERR MMAP {path} empty");
        return false;
    }
    const PAGE: usize = 4096;
    // SAFETY: a fresh private read-only mapping of a file nobody writes (the mount is read-only).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return fail("MMAP", path, &std::io::Error::last_os_error());
    }
    // SAFETY: the mapping is `size` bytes long and stays mapped until the munmap below.
    let data = unsafe { std::slice::from_raw_parts(p as *const u8, size) };
    let pages = size.div_ceil(PAGE);
    let mut d = PieceDigest::default();
    for i in check::page_order(pages, seed) {
        d.add(i as u64, &data[i * PAGE..((i + 1) * PAGE).min(size)]);
    }
    // SAFETY: unmapping what we mapped; `data` is not used afterwards.
    unsafe { libc::munmap(p, size) };
    println!("GC MMAP {path} {pages} {}", d.hex());
    true
}

fn readdir(dir: &str) -> bool {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => return fail("READDIR", dir, &e),
    };
    let mut names = Vec::new();
    for e in rd {
        match e {
            Ok(e) => names.push(String::from_utf8_lossy(e.file_name().as_bytes()).into_owned()),
            Err(e) => return fail("READDIR", dir, &e),
        }
    }
    println!("GC READDIR {dir} {} {}", names.len(), check::names_digest(&mut names));
    true
}

fn stall(dev: &str, secs: u64) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    use std::time::{Duration, Instant};
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev) {
        Ok(f) => f,
        Err(e) => return fail("OPEN", dev, &e),
    };
    // O_DIRECT wants an aligned buffer: 4 KiB inside an 8 KiB one.
    let mut raw = vec![0u8; 8192];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + 4096];
    let start = Instant::now();
    let (mut max_ms, mut reads) = (0u128, 0u64);
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        if let Err(e) = f.read_exact_at(buf, 0) {
            return fail("STALL", dev, &e);
        }
        let ms = t.elapsed().as_millis();
        reads += 1;
        max_ms = max_ms.max(ms);
        if ms > 200 {
            println!("GC GAP {:.1} {ms}", t.duration_since(start).as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("GC STALL {max_ms} {reads}");
    true
}

fn stat(path: &str) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            let t = m.file_type();
            let kind = if t.is_file() {
                "file"
            } else if t.is_dir() {
                "dir"
            } else if t.is_symlink() {
                "symlink"
            } else {
                "other"
            };
            println!("GC STAT {path} {} {} {kind} {}", m.ino(), m.nlink(), m.len());
            true
        }
        Err(e) => fail("STAT", path, &e),
    }
}

fn readlink(path: &str) -> bool {
    match std::fs::read_link(path) {
        Ok(t) => {
            println!("GC LINK {path} {}", t.display());
            true
        }
        Err(e) => fail("LINK", path, &e),
    }
}

/// Every kind of change to the read-only mount; each must fail (the host expects EROFS).
fn mutate(file: &str, dir: &str, empty: &str) {
    use std::fs;
    let new = format!("{dir}/guest-check-new");
    let ops: Vec<(&str, std::io::Result<()>)> = vec![
        ("open-write", fs::OpenOptions::new().write(true).open(file).map(drop)),
        ("append", fs::OpenOptions::new().append(true).open(file).map(drop)),
        ("create", fs::OpenOptions::new().write(true).create_new(true).open(&new).map(drop)),
        ("mkdir", fs::create_dir(&new)),
        ("unlink", fs::remove_file(file)),
        ("rmdir", fs::remove_dir(empty)),
        ("rename", fs::rename(file, &new)),
        ("truncate", cvt(unsafe_truncate(file))),
        ("symlink", std::os::unix::fs::symlink("x", &new)),
        ("link", fs::hard_link(file, &new)),
        ("chmod", fs::set_permissions(file, std::os::unix::fs::PermissionsExt::from_mode(0o600))),
    ];
    for (op, r) in ops {
        println!("GC MUTATE {op} {}", r.err().map(|e| errno(&e)).unwrap_or(0));
    }
}

fn unsafe_truncate(path: &str) -> i32 {
    let c = std::ffi::CString::new(path).expect("path without NUL");
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::truncate(c.as_ptr(), 0) }
}

fn cvt(rc: i32) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
