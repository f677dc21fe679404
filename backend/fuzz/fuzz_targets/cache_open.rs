//! A cache directory whose `header`, `slots`, `free` and `log` files hold arbitrary bytes (a
//! corrupt or hostile cache shared by the daemons of a host), opened, then used the way an
//! engine and `incfsd cache status` use it. It must refuse or cope, never panic, hang or
//! allocate without bound. `blocks` holds the fixture's first two blocks in slots 0 and 1.
//! Input: u16 lengths of header, slots and free, those bytes, then the log.
#![no_main]

use std::fs;

use incfs_fuzz::Input;
use incfs_storage::cache::BlockCache;
use incfs_storage::image::{merkle, BLOCK_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let (header_len, slots_len, free_len) = (input.u16(), input.u16(), input.u16());
    let header = input.take(header_len.into());
    let slots = input.take(slots_len.into());
    let free = input.take(free_len.into());
    let log = input.rest();

    let dir = tempfile::tempdir().expect("temp dir");
    let blocks: Vec<u8> = incfs_fuzz::file_a()[..2 * BLOCK_SIZE].to_vec();
    for (name, bytes) in [("header", header), ("slots", slots), ("free", free), ("log", log), ("blocks", &blocks)] {
        fs::write(dir.path().join(name), bytes).expect("write cache file");
    }
    let Ok(cache) = BlockCache::open(dir.path()) else { return };
    let _ = cache.refresh();
    // The hashes the log names and the fixture's own.
    let mut hashes: Vec<[u8; 32]> = log.chunks_exact(40).take(16).map(|r| r[..32].try_into().expect("32")).collect();
    hashes.extend(blocks.chunks(BLOCK_SIZE).map(merkle::leaf_hash));
    let mut out = vec![0u8; BLOCK_SIZE];
    for h in &hashes {
        if let Ok(Some(slot)) = cache.lookup_fresh(h) {
            // The cache trusts its records for integrity (only verified data is ever
            // recorded), so a forged record may serve other bytes: only panics count here.
            let _ = cache.read_run(slot, std::slice::from_ref(h), &mut out);
        }
    }
    let _ = cache.usage();
    let _ = cache.valid_slots();
    let _ = cache.add_stats(1, 1);
    let plain = &incfs_fuzz::file_a()[..BLOCK_SIZE];
    let _ = cache.insert_verified(&[(merkle::leaf_hash(plain), plain)]);
    let _ = cache.refresh();
});
