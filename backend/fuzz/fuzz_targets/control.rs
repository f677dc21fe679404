//! The control channel as a hostile guest drives it, on a real engine over the fixture image
//! (blocks come only from `.fill`, as with a guest data loader): `.fill` writes, long-poll
//! timeouts and reads of `.pending_reads` / `.log`, reads of the generated files, lookups.
//! Time is paused, so a long poll's timeout passes at once and its length can be checked.
//! The host's `.fill` parser is checked against `incfs_wire`'s, and what the host generates
//! must decode with `incfs_wire`.
//!
//! Input: operations, each an opcode byte and its fields (see the match below).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use incfs::control::{
    Control, INO_BLOCKS_WRITTEN, INO_FILL, INO_FILLED, INO_FILLED_BASE, INO_INCOMPLETE, INO_INDEX, INO_LAST_READ_ERROR,
    INO_LOG, INO_PENDING_READS, INO_STATS, MAX_POLL,
};
use incfs::fs::ReadObserver;
use incfs_fuse::{Context, Reply};
use incfs_fuzz::Input;
use incfs_storage::engine::Engine;
use incfs_storage::image::ImageId;
use incfs_wire::{FileState, FillBlock, LastReadError, ReadRecord, RECORD_SIZE};
use libfuzzer_sys::fuzz_target;
use tempfile::TempDir;
use tokio::runtime::Runtime;

struct World {
    rt: Runtime,
    store: TempDir,
    id: ImageId,
    /// The engine and its cache, replaced once a `.fill` stored a block, so that every
    /// input starts from an empty cache.
    engine: Option<(Arc<Engine>, TempDir)>,
}

fn world() -> &'static Mutex<World> {
    static WORLD: OnceLock<Mutex<World>> = OnceLock::new();
    WORLD.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("rt");
        let store = tempfile::tempdir().expect("temp dir");
        let id = incfs_fuzz::write_store(store.path());
        Mutex::new(World { rt, store, id, engine: None })
    })
}

/// A reply the control channel gave, awaited (in paused time) if it was parked; also how long
/// it was parked.
fn settle<T: Send + 'static>(rt: &Runtime, reply: Reply<T>) -> (Result<T, i32>, Duration) {
    match reply {
        Reply::Ready(r) => (r, Duration::ZERO),
        Reply::Pending(fut) => rt.block_on(async {
            let start = tokio::time::Instant::now();
            let r = fut.await;
            (r, start.elapsed())
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut w = world().lock().unwrap_or_else(|e| e.into_inner());
    if w.engine.as_ref().is_none_or(|(e, _)| e.counters.blocks_supplied.load(std::sync::atomic::Ordering::Relaxed) > 0)
    {
        let cache = tempfile::tempdir().expect("temp dir");
        let engine = incfs_fuzz::supplied_engine(&w.rt, w.store.path(), w.id, cache.path());
        w.engine = Some((engine, cache));
    }
    let w = &*w;
    // Deadlines are taken in the runtime's paused clock.
    let _rt = w.rt.enter();
    let engine = w.engine.as_ref().expect("engine").0.clone();
    let control = Control::new(engine);
    let ctx = Context { uid: 1000, gid: 1000, pid: 1 };
    let open = |ino: u64| control.open(ino, libc_flags(ino)).expect("a control file opens").0;
    let fill = open(INO_FILL);
    let polled = [open(INO_PENDING_READS), open(INO_LOG)];
    let mut timeouts = [Duration::ZERO; 2];

    let mut input = Input::new(data);
    for _ in 0..32 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            // A `.fill` write: u16 length, then the bytes.
            0 => {
                let len = input.u16() as usize;
                let bytes = input.take(len);
                let (r, _) = settle(&w.rt, control.write(INO_FILL, fill, bytes, &ctx));
                check_fill(bytes, r);
            }
            // A long-poll timeout write (length byte, bytes), then a READ (u16 size) of
            // `.pending_reads` (even opcode field) or `.log`.
            1 => {
                let which = (input.u8() & 1) as usize;
                let ino = [INO_PENDING_READS, INO_LOG][which];
                let len = (input.u8() % 8) as usize;
                let bytes = input.take(len);
                let len = bytes.len();
                match settle(&w.rt, control.write(ino, polled[which], bytes, &ctx)).0 {
                    Ok(n) => {
                        assert!(len == 4 && n == 4, "only a 4-byte timeout is taken");
                        let ms = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
                        timeouts[which] = Duration::from_millis(ms.into()).min(MAX_POLL);
                    }
                    Err(e) => assert!(len != 4 && e == libc::EINVAL),
                }
                let size = input.u16() as u32;
                let (r, parked) = settle(&w.rt, control.read(ino, polled[which], 0, size, &ctx));
                assert!(parked <= timeouts[which] + Duration::from_millis(1), "a long poll ends by its timeout");
                match r {
                    Ok(records) => {
                        assert!(records.len() <= size as usize && records.len() % RECORD_SIZE == 0);
                        ReadRecord::decode_all(&records).expect("records decode");
                    }
                    Err(e) => assert!(e == libc::EINVAL && (size as usize) < RECORD_SIZE),
                }
            }
            // A generated file (u8 which, u32 offset, u16 size), read with a handle of its own.
            2 => {
                let which = input.u8();
                let ino = match which % 4 {
                    0 => INO_BLOCKS_WRITTEN,
                    1 => INO_STATS,
                    2 => INO_LAST_READ_ERROR,
                    _ => INO_FILLED_BASE + u64::from(which / 4 % 8),
                };
                let (offset, size) = (u64::from(input.u32()), input.u16() as u32);
                let Ok((fh, _)) = control.open(ino, libc_flags(ino)) else { continue };
                let (r, _) = settle(&w.rt, control.read(ino, fh, offset, size, &ctx));
                let (whole, _) = settle(&w.rt, control.read(ino, fh, 0, u32::MAX, &ctx));
                control.release(fh);
                let (Ok(part), Ok(whole)) = (r, whole) else { continue };
                assert!(part.len() <= size as usize);
                match ino {
                    INO_BLOCKS_WRITTEN => assert!(incfs_wire::decode_blocks_written(&whole).is_some()),
                    INO_STATS => {
                        let text = String::from_utf8(whole).expect("stats are text");
                        assert!(incfs_wire::stats::decode(&text).count() >= 13);
                    }
                    INO_LAST_READ_ERROR => {
                        LastReadError::decode(&whole).expect("last read error decodes");
                    }
                    _ => {
                        let s = FileState::decode(&whole).expect(".filled decodes");
                        assert!(
                            s.filled_blocks <= s.total_blocks && s.fully_loaded == (s.filled_blocks == s.total_blocks)
                        );
                    }
                }
            }
            // A lookup in a control directory (u8 which, u8 length, the name).
            3 => {
                let parent = [INO_INDEX, INO_INCOMPLETE, INO_FILLED, INO_STATS][(input.u8() % 4) as usize];
                let len = input.u8() as usize % 40;
                let _ = control.lookup(parent, input.take(len));
            }
            // Reads of image files as the filesystem reports them (u8 file, u8 first, u8 count).
            4 => {
                let file = u32::from(input.u8() % 7);
                let (first, count) = (u32::from(input.u8() % 4), u32::from(input.u8() % 4));
                control.read_started(file, first, first + count, 1000);
                let missing: Vec<u32> = (first..first + count).collect();
                let parked = control.read_parked(file, &missing, 1000);
                if input.u8() & 1 == 0 {
                    control.read_ended(parked, Duration::from_micros(5));
                } else {
                    control.read_failed(file, first, libc::ETIME, 1000);
                }
            }
            // A write to a file that takes none, or with a handle of another file.
            _ => {
                let (r, _) = settle(&w.rt, control.write(INO_STATS, fill, b"x", &ctx));
                assert_eq!(r, Err(libc::EBADF));
            }
        }
    }
    control.drop_handles();
});

/// Opens writable what can be written.
fn libc_flags(ino: u64) -> u32 {
    match ino {
        INO_FILL | INO_PENDING_READS | INO_LOG => libc::O_RDWR as u32,
        _ => libc::O_RDONLY as u32,
    }
}

/// The host's answer to a `.fill` write agrees with `incfs_wire`'s parse of it: the bytes
/// taken are whole blocks, and a first block that does not parse is refused with the errno
/// the wire format names.
fn check_fill(bytes: &[u8], r: Result<u32, i32>) {
    match r {
        Ok(n) => {
            let mut at = 0;
            while at < n as usize {
                let b = FillBlock::decode(&bytes[at..]).expect("a block the host took parses");
                at += b.encoded_len();
            }
            assert_eq!(at, n as usize, "the host took whole blocks");
            assert!(n > 0 || bytes.is_empty());
        }
        Err(e) => match FillBlock::decode(bytes) {
            Err(incfs_wire::DecodeError::DataTooLarge { .. }) => assert_eq!(e, libc::E2BIG),
            Err(_) => assert_eq!(e, libc::EINVAL),
            Ok(_) => assert!([libc::ENOENT, libc::ERANGE, libc::EBADMSG].contains(&e), "{e}"),
        },
    }
}
