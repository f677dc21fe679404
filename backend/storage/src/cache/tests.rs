//! The cache's tests that go through several of its parts: insert and read, reopening (as
//! another process would), orphans and gc, eviction.

use std::os::unix::fs::FileExt;

use super::layout::{LOG_RECORD_LEN, RECORD_LEN};
use super::{BlockCache, CacheOptions};
use crate::image::merkle::leaf_hash;
use crate::image::{Hash, BLOCK_SIZE};

/// Where a read of a run can be made to race with other processes (tests only).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum RacePoint {
    BeforeCopy,
    AfterCopy,
}

/// What another process does at a race point.
type RaceHook = Box<dyn FnMut(RacePoint)>;

thread_local! {
    static RACE: std::cell::RefCell<Option<RaceHook>> = const { std::cell::RefCell::new(None) };
}

/// Runs this thread's race hook, if any.
pub(super) fn race_point(at: RacePoint) {
    let hook = RACE.with(|r| r.borrow_mut().take());
    if let Some(mut hook) = hook {
        hook(at);
        RACE.with(|r| *r.borrow_mut() = Some(hook));
    }
}

fn block(v: u32) -> (Hash, Vec<u8>) {
    let mut d = vec![0u8; BLOCK_SIZE];
    d[..4].copy_from_slice(&v.to_le_bytes());
    d[4] = 1;
    (leaf_hash(&d), d)
}

fn insert(c: &BlockCache, vals: std::ops::Range<u32>) -> Vec<Hash> {
    let blocks: Vec<(Hash, Vec<u8>)> = vals.map(block).collect();
    let refs: Vec<(Hash, &[u8])> = blocks.iter().map(|(h, d)| (*h, d.as_slice())).collect();
    c.insert_verified(&refs).expect("insert");
    blocks.iter().map(|(h, _)| *h).collect()
}

fn read(c: &BlockCache, h: &Hash) -> Option<Vec<u8>> {
    let s = c.lookup_fresh(h).expect("lookup")?;
    let mut out = vec![0u8; BLOCK_SIZE];
    c.read_run(s, &[*h], &mut out).expect("read").then_some(out)
}

#[test]
fn insert_read_and_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&c, 1..3);
    let first = c.lookup(&hs[0]).expect("slot");
    assert_eq!(c.lookup(&hs[1]), Some(first + 1));
    let mut out = vec![0u8; 2 * BLOCK_SIZE];
    assert!(c.read_run(first, &hs, &mut out).expect("read"));
    assert_eq!(out[..BLOCK_SIZE], block(1).1[..]);
    // A second handle (another process, in effect) learns of it from the log.
    let c2 = BlockCache::open(dir.path()).expect("open");
    assert_eq!(c2.lookup(&hs[0]), Some(first));
    let h3 = insert(&c2, 3..4);
    assert_eq!(c.lookup(&h3[0]), None);
    assert!(c.lookup_fresh(&h3[0]).expect("fresh").is_some());
}

#[test]
fn wrong_hash_or_slot_is_a_miss() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&c, 1..2);
    let s = c.lookup(&hs[0]).expect("slot");
    let mut out = vec![0u8; BLOCK_SIZE];
    assert!(!c.read_run(s, &[[9; 32]], &mut out).expect("read"));
    assert!(!c.read_run(s + 5, &hs, &mut out).expect("read past end"));
}

#[test]
fn orphans_are_never_served_and_gc_reclaims_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = BlockCache::open(dir.path()).expect("open");
    insert(&c, 1..3);
    // A writer killed after allocating 5 slots and writing data, before its records.
    c.with_header(|h, _| {
        h.next_slot += 5;
        h.log_end += 5 * LOG_RECORD_LEN as u64;
        Ok(())
    })
    .expect("alloc");
    c.blocks.write_all_at(&[7u8; BLOCK_SIZE], 2 * BLOCK_SIZE as u64).expect("data");
    let c2 = BlockCache::open(dir.path()).expect("open");
    assert_eq!(c2.valid_slots().expect("slots").len(), 2);
    assert_eq!(c2.usage().expect("usage").empty, 5);
    let rep = c2.gc(None).expect("gc");
    assert_eq!(rep.orphans_reclaimed, 5);
    assert_eq!(rep.log_records_after, 2);
    // The reclaimed slots are reused; everyone sees the new log epoch.
    let hs = insert(&c2, 10..13);
    for (v, h) in (10..13).zip(&hs) {
        assert!(c2.lookup(h).expect("slot") < 7);
        assert_eq!(read(&c, h).expect("other handle reads it"), block(v).1);
    }
    assert_eq!(c2.usage().expect("usage").valid, 5);
}

#[test]
fn lru_eviction_keeps_the_cache_under_its_limit_and_spares_pinned_and_recent_blocks() {
    let dir = tempfile::tempdir().expect("tmp");
    let limit = 20 * BLOCK_SIZE as u64;
    let c = BlockCache::open_with(dir.path(), CacheOptions { limit_bytes: Some(limit) }).expect("open");
    let old = insert(&c, 0..10);
    assert_eq!(c.pin(&old[..2], true).expect("pin"), 2);
    // Make blocks 2..10 look old, 0..2 too (they are pinned).
    for s in 0..10u64 {
        c.records.file.write_all_at(&1u32.to_le_bytes(), s * RECORD_LEN as u64 + 36).expect("age");
    }
    let newer = insert(&c, 10..25);
    let u = c.usage().expect("usage");
    assert!(u.valid <= 20, "{u:?}");
    assert!(read(&c, &old[0]).is_some() && read(&c, &old[1]).is_some(), "pinned blocks stay");
    assert!(read(&c, &old[5]).is_none(), "old blocks go first");
    for h in &newer {
        assert!(read(&c, h).is_some(), "recent blocks stay");
    }
    // Freed slots are reused: the files do not grow past the limit's worth of slots
    // (plus one batch: eviction runs after each insert).
    for b in 0..10 {
        insert(&c, 100 + b * 4..104 + b * 4);
    }
    let u = c.usage().expect("usage");
    assert!(u.valid <= 20 && u.slots <= 26, "{u:?}");
    let c2 = BlockCache::open(dir.path()).expect("open");
    for (slot, h) in c2.valid_slots().expect("valid") {
        let mut b = [0u8; BLOCK_SIZE];
        c2.raw_block(slot, &mut b).expect("raw");
        assert_eq!(leaf_hash(&b), h);
    }
}

#[test]
fn daemons_opened_before_and_after_a_gc_see_each_others_inserts() {
    let dir = tempfile::tempdir().expect("tmp");
    let before = BlockCache::open(dir.path()).expect("open");
    insert(&before, 1..3);
    BlockCache::open(dir.path()).expect("open").gc(None).expect("gc");
    let after = BlockCache::open(dir.path()).expect("open");
    let from_before = insert(&before, 10..12);
    let from_after = insert(&after, 20..22);
    for (v, h) in (10..12).zip(&from_before) {
        assert_eq!(read(&after, h), Some(block(v).1), "a daemon opened after gc sees older daemons' inserts");
    }
    for (v, h) in (20..22).zip(&from_after) {
        assert_eq!(read(&before, h), Some(block(v).1), "a daemon opened before gc sees newer daemons' inserts");
    }
}

#[test]
fn a_truncated_slots_file_is_a_miss_not_a_sigbus() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&c, 1..3);
    assert_eq!(read(&c, &hs[0]), Some(block(1).1), "read once: the daemon knows the file's size");
    let s = c.lookup(&hs[0]).expect("slot");
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(super::layout::SLOTS_FILE))
        .expect("open slots")
        .set_len(0)
        .expect("truncate");
    assert_eq!(c.lookup(&hs[0]), None, "a lookup checks the record");
    let mut out = vec![0u8; BLOCK_SIZE];
    assert!(!c.read_run(s, &hs[..1], &mut out).expect("read"), "a record cut off the file is a miss");
}

#[test]
fn absurd_header_values_are_reported_not_looped_on_or_allocated() {
    use super::layout::{HEADER_FILE, H_LOG_END, H_NEXT_SLOT, H_NFREE};
    let huge_log = u64::MAX - u64::MAX % LOG_RECORD_LEN as u64;
    for (field, value) in
        [(H_LOG_END, u64::MAX - 7), (H_LOG_END, huge_log), (H_NFREE, 1u64 << 60), (H_NEXT_SLOT, u64::MAX / 2)]
    {
        let dir = tempfile::tempdir().expect("tmp");
        let c = BlockCache::open(dir.path()).expect("open");
        let hs = insert(&c, 1..3);
        let header = std::fs::OpenOptions::new().write(true).open(dir.path().join(HEADER_FILE)).expect("header");
        header.write_all_at(&value.to_le_bytes(), field).expect("corrupt");
        // Whatever each call answers, it answers: no hang, no huge allocation, no panic.
        if let Ok(c2) = BlockCache::open(dir.path()) {
            assert_eq!(read(&c2, &hs[0]), Some(block(1).1), "a block stored before is still served");
            let _ = c2.insert_verified(&[(block(9).0, &block(9).1)]);
            let _ = c2.usage();
            let _ = c2.gc(None);
        }
        let _ = c.refresh();
        let _ = c.insert_verified(&[(block(8).0, &block(8).1)]);
        let _ = c.usage();
    }
}

#[test]
fn gc_reclaims_slots_left_evicted_by_a_killed_evictor_and_recounts_live_blocks() {
    use super::layout::{H_LIVE, H_NFREE, STATE_EVICTED};
    let dir = tempfile::tempdir().expect("tmp");
    let c = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&c, 1..4);
    // An evictor killed after marking slot 1 evicted, before listing it free.
    let victim = c.lookup(&hs[1]).expect("slot");
    c.records.set_state(victim, STATE_EVICTED, true).expect("mark");
    // An insert killed after claiming slot 2, before marking it valid (live counted it).
    let half = c.lookup(&hs[2]).expect("slot");
    c.records.set_state(half, super::layout::STATE_EMPTY, true).expect("claim");
    let rep = c.gc(None).expect("gc");
    assert_eq!(rep.orphans_reclaimed, 2);
    assert_eq!(c.read_header_field(H_NFREE).expect("nfree"), 2);
    assert_eq!(c.read_header_field(H_LIVE).expect("live"), 1, "live does not drift");
    let h = insert(&c, 10..12);
    let mut reused = vec![c.lookup(&h[0]).expect("slot"), c.lookup(&h[1]).expect("slot")];
    reused.sort_unstable();
    assert_eq!(reused, vec![victim, half], "the slots are reused");
    assert_eq!(read(&c, &h[1]), Some(block(11).1));
}

#[test]
fn a_run_with_one_slot_evicted_forgets_that_block_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let reader = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&reader, 1..4);
    let first = reader.lookup(&hs[0]).expect("slot");
    // Another daemon evicts the middle block; this one still indexes all three.
    let other = BlockCache::open(dir.path()).expect("open");
    other.free_slots(&[first + 1]).expect("evict");
    let mut out = vec![0u8; 3 * BLOCK_SIZE];
    assert!(!reader.read_run(first, &hs, &mut out).expect("read"), "the run is a miss");
    assert_eq!(reader.lookup(&hs[1]), None, "the evicted block is forgotten");
    assert_eq!(reader.lookup(&hs[0]), Some(first), "its neighbours are still cached");
    assert_eq!(read(&reader, &hs[2]), Some(block(3).1));
}

#[test]
fn a_block_evicted_and_stored_again_in_its_slot_during_a_read_is_a_miss() {
    let dir = tempfile::tempdir().expect("tmp");
    let reader = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&reader, 1..2);
    let slot = reader.lookup(&hs[0]).expect("slot");
    // Another daemon evicts the block as the copy starts (the reader copies the hole's
    // zeroes) and stores the same block again, in the same slot, before the check.
    let other = BlockCache::open(dir.path()).expect("open");
    let hash = hs[0];
    RACE.with(|r| {
        *r.borrow_mut() = Some(Box::new(move |at| match at {
            RacePoint::BeforeCopy => other.free_slots(&[slot]).expect("evict"),
            RacePoint::AfterCopy => {
                insert(&other, 1..2);
                assert_eq!(other.lookup(&hash), Some(slot), "the freed slot is reused");
            }
        }))
    });
    let mut out = vec![0u8; BLOCK_SIZE];
    let served = reader.read_run(slot, &hs, &mut out).expect("read");
    RACE.with(|r| r.borrow_mut().take());
    assert!(!served || out == block(1).1, "torn bytes served: {:?}", &out[..8]);
    assert!(!served, "a slot that changed during the copy is a miss");
}

#[test]
fn a_cache_of_the_previous_format_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tmp");
    drop(BlockCache::open(dir.path()).expect("open"));
    let header = std::fs::OpenOptions::new().write(true).open(dir.path().join(super::layout::HEADER_FILE)).expect("h");
    header.write_all_at(&2u32.to_le_bytes(), 8).expect("version 2");
    let err = BlockCache::open(dir.path()).err().expect("refused").to_string();
    assert!(err.contains("version 2") && err.contains("delete the directory"), "{err}");
}

#[test]
fn a_cache_others_can_write_or_that_another_user_owns_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let refused = |dir: &std::path::Path, what: &str| {
        let err = BlockCache::open(dir).err().unwrap_or_else(|| panic!("{what}: opened")).to_string();
        println!("{what}: {err}");
        err
    };
    // A new cache is private.
    let t = tempfile::tempdir().expect("tmp");
    let dir = t.path().join("cache");
    drop(BlockCache::open(&dir).expect("open"));
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for name in ["header", "blocks", "slots", "log", "free", "lock"] {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    // A directory anyone can write.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(refused(&dir, "mode 0777 directory").contains("writable by group or others"));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // A file of another user's.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(dir.join("log"), Some(65534), Some(65534)).expect("chown");
        assert!(refused(&dir, "another user's file").contains("owned by uid 65534"));
        std::os::unix::fs::chown(dir.join("log"), Some(0), Some(0)).expect("chown");
    }
    // A symbolic link in place of a file.
    let elsewhere = t.path().join("elsewhere");
    std::fs::rename(dir.join("blocks"), &elsewhere).expect("move");
    std::os::unix::fs::symlink(&elsewhere, dir.join("blocks")).expect("link");
    refused(&dir, "a link in place of blocks");
    std::fs::remove_file(dir.join("blocks")).expect("unlink");
    std::fs::rename(&elsewhere, dir.join("blocks")).expect("move back");
    BlockCache::open(&dir).expect("a private cache opens");
}

#[test]
fn verify_repair_drops_blocks_whose_data_went_bad_and_verified_reads_miss_them() {
    use super::VerifyReport;
    let dir = tempfile::tempdir().expect("tmp");
    let c = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&c, 1..4);
    let bad = c.lookup(&hs[1]).expect("slot");
    // Storage other hosts can write (or a power loss) changed a block under its record.
    c.blocks.write_all_at(&[0xee; 100], bad * BLOCK_SIZE as u64).expect("corrupt");
    assert!(read(&c, &hs[1]).is_some(), "plain reads trust the cache");
    c.set_verify_reads(true);
    assert_eq!(read(&c, &hs[1]), None, "a verified read misses a bad block");
    assert_eq!(read(&c, &hs[0]), Some(block(1).1), "and serves good ones");
    // The verified read dropped it already; make it bad again in a new slot for verify.
    c.set_verify_reads(false);
    assert_eq!(c.verify_blocks(false).expect("verify"), VerifyReport { good: 2, bad: 0, dropped: 0 });
    let h = insert(&c, 2..3);
    let bad = c.lookup(&h[0]).expect("slot");
    c.blocks.write_all_at(&[0xee; 100], bad * BLOCK_SIZE as u64).expect("corrupt");
    assert_eq!(c.verify_blocks(false).expect("verify"), VerifyReport { good: 2, bad: 1, dropped: 0 });
    assert_eq!(c.verify_blocks(true).expect("repair"), VerifyReport { good: 2, bad: 1, dropped: 1 });
    assert_eq!(c.verify_blocks(false).expect("verify"), VerifyReport { good: 2, bad: 0, dropped: 0 });
    let u = c.usage().expect("usage");
    assert_eq!((u.valid, u.free_listed), (2, 1), "the slot was reused, then dropped again: {u:?}");
    assert_eq!(read(&BlockCache::open(dir.path()).expect("open"), &hs[1]), None, "no daemon serves it");
}

#[test]
fn blocks_sharing_an_index_key_are_a_miss_never_each_others_bytes() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = BlockCache::open(dir.path()).expect("open");
    let (h1, d1) = block(1);
    // Another block whose hash shares the index's 96-bit key (made here; 2^48 work to find).
    let mut h2 = h1;
    h2[31] ^= 0xff;
    let d2 = vec![7u8; BLOCK_SIZE];
    c.insert_verified(&[(h1, &d1[..])]).expect("insert");
    c.insert_verified(&[(h2, &d2[..])]).expect("insert");
    assert_eq!(read(&c, &h2), Some(d2.clone()), "the later entry is found");
    assert_eq!(c.lookup(&h1), None, "the earlier one is a miss, not the other's slot");
    assert_eq!(read(&c, &h1), None);
    // Stored again, it is found again, and the other is the miss.
    c.insert_verified(&[(h1, &d1[..])]).expect("insert");
    assert_eq!(read(&c, &h1), Some(d1));
    assert_eq!(read(&c, &h2), None);
    let other = BlockCache::open(dir.path()).expect("reopen");
    assert_ne!(
        read(&other, &h1),
        Some(d2),
        "a process learning both from the log serves neither's bytes for the other"
    );
}

/// Resident kB of this process's mappings of `path`, from /proc/self/smaps.
fn mapped_rss_kb(path: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let name = path.to_str().expect("utf8");
    let mut ours = false;
    let mut kb = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            ours = line.ends_with(name);
        } else if ours && first == "Rss:" {
            kb += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    kb
}

#[test]
fn released_record_pages_leave_resident_memory_and_reads_go_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let slots = dir.path().join("slots");
    let c = BlockCache::open(dir.path()).expect("open");
    let hs = insert(&c, 0..2000);
    for h in &hs {
        assert!(read(&c, h).is_some());
    }
    // 2000 records of 48 bytes: 24 pages read through the mapping.
    assert!(mapped_rss_kb(&slots) >= 64, "records read are mapped: {} kB", mapped_rss_kb(&slots));
    c.release_record_pages().expect("release");
    assert_eq!(mapped_rss_kb(&slots), 0, "nothing of the records stays resident in this process");
    // The records are intact (the page cache kept them): reads go on and map them again.
    for (v, h) in (0..2000).zip(&hs) {
        assert_eq!(read(&c, h), Some(block(v).1));
    }
    assert!(mapped_rss_kb(&slots) > 0);
}
