//! Block tables on demand. A version-3 image's manifest holds only each file's root; a file's
//! leaf hashes and block locations come from its index (`image::index`), one segment of 128
//! blocks at a time, when a read first needs them:
//! - hashes from memory, else from the cache, which keeps every verified tree block like a
//!   data block (content-addressed by the hash in the level above): a warm start needs no
//!   network to serve cached data;
//! - locations only from the remote, when a block must be fetched: one range from the
//!   segment's record on, which (as `pack` lays blobs out: each file's index right before its
//!   data) also carries the data after it. Every index and every block that range holds is
//!   verified and kept, so a miss on a small file costs one round trip, as before.
//!
//! Versions 1 and 2 hold every block in the manifest: their tables are filled at open.

use std::collections::VecDeque;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::fetch::decode_verified;
use super::{Engine, FillSource};
use crate::error::{Error, Result};
use crate::image::index::{self, Bounds, Loc, SEGMENT_BLOCKS};
use crate::image::{merkle, BlockKind, BlockRef, BlockTable, FileData, Hash, Image, BLOCK_SIZE};
use crate::store::FetchError;

/// Default of `EngineConfig::index_memory`: what the engine keeps of its loaded segments'
/// tables, at most (as `table_cost` counts them); past it the least recently used are
/// dropped. Their hashes come back from the cache, which keeps every verified tree block,
/// without the network; their locations are needed only to fetch a block again, and come
/// back with the segment's index when one is. 4 MiB holds the tables of about 300 MB of
/// large files' data or 15,000 small files.
pub const DEFAULT_INDEX_MEMORY: usize = 4 << 20;

/// The least `EngineConfig::index_memory` is taken to be: the tables of a read and its
/// readahead (up to 10 segments) must fit.
pub const MIN_INDEX_MEMORY: usize = 64 << 10;

/// A loaded segment: its leaf hashes, verified, and where its blocks are stored if known
/// (bounded, not verified: see `image::index`; forgotten when what they point at keeps
/// failing verification, so a bad answer from a store or a mirror is not kept).
struct Loaded {
    hashes: Arc<[Hash]>,
    locs: Option<Arc<[Loc]>>,
    /// Used since the sweep last passed it (a second chance before it is dropped).
    used: AtomicBool,
}

/// Bytes a segment's tables hold, `hashes` of them and `locs` locations (if known): the
/// tables, their allocations and the segment's place in the map and queue.
const fn table_cost(hashes: usize, locs: Option<usize>) -> usize {
    let locs = match locs {
        Some(n) => 32 + n * std::mem::size_of::<Loc>(),
        None => 0,
    };
    96 + hashes * std::mem::size_of::<Hash>() + locs
}

impl Loaded {
    fn cost(&self) -> usize {
        table_cost(self.hashes.len(), self.locs.as_ref().map(|l| l.len()))
    }
}

/// A segment's leaf hashes and block locations.
type SegmentTable = (Arc<[Hash]>, Arc<[Loc]>);

/// The loaded segments of version-3 files, (inode, segment) -> table, bounded by
/// `max_bytes` (a version-1 or 2 manifest holds every table itself).
#[derive(Default)]
struct LoadedSegments {
    max_bytes: usize,
    map: HashMap<(u32, u32), Loaded>,
    /// Every key of `map` once, oldest first: the sweep's clock.
    order: VecDeque<(u32, u32)>,
    bytes: usize,
}

impl LoadedSegments {
    /// Sets a segment's hashes and, if given, locations (kept if already known).
    fn set(&mut self, key: (u32, u32), hashes: Arc<[Hash]>, locs: Option<Arc<[Loc]>>) {
        match self.map.get_mut(&key) {
            Some(l) => {
                self.bytes -= l.cost();
                if locs.is_some() {
                    l.locs = locs;
                }
                l.used.store(true, Relaxed);
                self.bytes += l.cost();
            }
            None => {
                // Counted as used: it is about to be, and must not be the sweep's first victim.
                let l = Loaded { hashes, locs, used: AtomicBool::new(true) };
                self.bytes += l.cost();
                self.map.insert(key, l);
                self.order.push_back(key);
            }
        }
        self.shrink();
    }

    /// Forgets a segment's locations, keeping its hashes.
    fn forget_locs(&mut self, key: (u32, u32)) {
        if let Some(l) = self.map.get_mut(&key) {
            self.bytes -= l.cost();
            l.locs = None;
            self.bytes += l.cost();
        }
    }

    /// Drops segments, oldest first, passing over (once) those used since, until within
    /// budget.
    fn shrink(&mut self) {
        let mut passes = self.order.len();
        while self.bytes > self.max_bytes && passes > 0 {
            passes -= 1;
            let Some(key) = self.order.pop_front() else { break };
            let Some(l) = self.map.get(&key) else { continue };
            if l.used.swap(false, Relaxed) {
                self.order.push_back(key);
                continue;
            }
            if let Some(l) = self.map.remove(&key) {
                self.bytes -= l.cost();
            }
        }
        // Everything was used since the last pass: drop the oldest anyway.
        while self.bytes > self.max_bytes {
            let Some(key) = self.order.pop_front() else { break };
            if let Some(l) = self.map.remove(&key) {
                self.bytes -= l.cost();
            }
        }
    }
}

pub(super) struct Tables {
    /// Per version-3 file of more than one segment: the hash of each segment's level-0 tree
    /// block (level 1 of its tree), verified against the root. 32 bytes per 128 blocks.
    level1: RwLock<HashMap<u32, Arc<[Hash]>>>,
    loaded: RwLock<LoadedSegments>,
    /// Version-3 file indexes by place, (blob, offset, inode), sorted: the indexes a fetched
    /// range holds.
    by_place: Box<[(u32, u64, u32)]>,
    /// Segments being fetched, (inode, segment): one fetch each in this process.
    loading: Mutex<HashMap<(u32, u32), watch::Sender<bool>>>,
    /// Stored bytes per byte of file data over the whole image: what a readahead window of
    /// plaintext takes in a blob.
    stored_ratio: f64,
    /// Segments `locate` loads at once (see LOCATE_PART_MAX).
    locate_part: usize,
}

impl Tables {
    pub(super) fn new(image: &Image, index_memory: usize) -> Tables {
        let index_memory = index_memory.max(MIN_INDEX_MEMORY);
        let mut by_place: Vec<(u32, u64, u32)> = image
            .files()
            .filter_map(|(ino, f)| match f.table {
                BlockTable::Index { blob, offset } => Some((blob, offset, ino)),
                BlockTable::Inline(_) => None,
            })
            .collect();
        by_place.sort_unstable();
        let stored: u64 = image.manifest.blobs.iter().map(|b| b.size).sum();
        let stored_ratio = (stored as f64 / image.data_size().max(1) as f64).clamp(0.05, 1.1);
        Tables {
            level1: RwLock::default(),
            loaded: RwLock::new(LoadedSegments { max_bytes: index_memory, ..LoadedSegments::default() }),
            locate_part: (index_memory / (4 * SEGMENT_COST)).clamp(1, LOCATE_PART_MAX),
            by_place: by_place.into_boxed_slice(),
            loading: Mutex::new(HashMap::new()),
            stored_ratio,
        }
    }

    fn loaded(&self) -> std::sync::RwLockReadGuard<'_, LoadedSegments> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner())
    }

    fn loaded_mut(&self) -> std::sync::RwLockWriteGuard<'_, LoadedSegments> {
        self.loaded.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Segment `s` of `file`'s hashes, if loaded (noted as used).
    fn hashes(&self, file: u32, s: usize) -> Option<Arc<[Hash]>> {
        let loaded = self.loaded();
        let l = loaded.map.get(&(file, s as u32))?;
        l.used.store(true, Relaxed);
        Some(l.hashes.clone())
    }

    /// Segment `s` of `file`'s hashes and locations, if both are loaded.
    fn table(&self, file: u32, s: usize) -> Option<SegmentTable> {
        let loaded = self.loaded();
        let l = loaded.map.get(&(file, s as u32))?;
        l.used.store(true, Relaxed);
        Some((l.hashes.clone(), l.locs.clone()?))
    }

    fn has_locs(&self, file: u32, s: usize) -> bool {
        self.loaded().map.get(&(file, s as u32)).is_some_and(|l| l.locs.is_some())
    }

    fn level1(&self, file: u32) -> Option<Arc<[Hash]>> {
        self.level1.read().unwrap_or_else(|e| e.into_inner()).get(&file).cloned()
    }

    fn set_level1(&self, file: u32, l1: Arc<[Hash]>) {
        self.level1.write().unwrap_or_else(|e| e.into_inner()).entry(file).or_insert(l1);
    }

    /// Bytes the loaded segments hold now (estimated), and how many there are.
    pub(super) fn loaded_usage(&self) -> (usize, usize) {
        let loaded = self.loaded();
        (loaded.bytes, loaded.map.len())
    }
}

/// A file index up to this long is loaded whole at the first read (files up to about 5 MiB):
/// one range brings it and the data after it.
const WHOLE_INDEX_MAX: u64 = 64 << 10;

/// Segments `locate` loads at once, at most (about 460 KB of tables), and never more than a
/// quarter of the loaded segments' budget holds: what it loads must stay loaded until used.
const LOCATE_PART_MAX: usize = 64;

/// What a whole segment's tables cost in the budget.
const SEGMENT_COST: usize = table_cost(SEGMENT_BLOCKS, Some(SEGMENT_BLOCKS));

/// Longest wait for another process's fetch of a range holding a file's index before
/// fetching it (and the data after it) here.
const RANGE_WAIT: Duration = Duration::from_secs(2);

/// Fetches of a segment that keep failing verification give up after this many.
const INDEX_ATTEMPTS: u32 = 3;

impl Engine {
    /// The level-1 hashes of a file of more than one segment: from memory, else assembled from
    /// the tree blocks in the cache (None if one is missing).
    fn level1(&self, file: u32, f: &FileData) -> Option<Arc<[Hash]>> {
        if let Some(l) = self.tables.level1(file) {
            return Some(l);
        }
        let n = f.nblocks() as u64;
        let mut expected = vec![f.root];
        let mut block = vec![0u8; BLOCK_SIZE];
        for count in index::upper_levels(n) {
            let mut next = Vec::with_capacity(count as usize * SEGMENT_BLOCKS);
            for want in expected.iter().take(count as usize) {
                let slot = self.cache.lookup(want)?;
                if !self.cache.read_run(slot, std::slice::from_ref(want), &mut block).ok()? {
                    return None;
                }
                next.extend_from_slice(&index::hashes_of_level0(&block, SEGMENT_BLOCKS));
            }
            expected = next;
        }
        expected.truncate(index::segments(n) as usize);
        let l1: Arc<[Hash]> = expected.into();
        self.tables.set_level1(file, l1.clone());
        Some(l1)
    }

    /// What segment `s`'s level-0 block must hash to (for a one-block file: its leaf).
    fn segment_expected(&self, file: u32, f: &FileData, s: usize) -> Option<Hash> {
        if f.nblocks() <= SEGMENT_BLOCKS {
            return Some(f.root);
        }
        self.level1(file, f)?.get(s).copied()
    }

    /// The leaf hashes of segment `s` of a version-3 file: from memory, else from its tree
    /// block in the cache.
    fn segment_hashes(&self, file: u32, f: &FileData, s: usize) -> Option<Arc<[Hash]>> {
        if let Some(h) = self.tables.hashes(file, s) {
            return Some(h);
        }
        let n = f.nblocks() as u64;
        if s as u64 >= index::segments(n) {
            return None;
        }
        let count = index::segment_len(n, s as u64);
        // A one-block file's leaf is its root: nothing to keep.
        if n == 1 {
            return Some(Arc::new([f.root]));
        }
        let hashes: Arc<[Hash]> = {
            let want = self.segment_expected(file, f, s)?;
            let slot = self.cache.lookup(&want)?;
            let mut block = vec![0u8; BLOCK_SIZE];
            if !self.cache.read_run(slot, &[want], &mut block).ok()? {
                return None;
            }
            index::hashes_of_level0(&block, count).into()
        };
        self.tables.loaded_mut().set((file, s as u32), hashes.clone(), None);
        Some(hashes)
    }

    /// Leaf hashes of blocks [first, last) of `file`, from memory or the cache; None when some
    /// must be fetched first (`locate`).
    pub(super) fn block_hashes(&self, file: u32, f: &FileData, first: usize, last: usize) -> Option<Vec<Hash>> {
        if let Some(blocks) = f.inline() {
            return blocks.get(first..last.max(first)).map(|b| b.iter().map(|r| r.hash).collect());
        }
        let mut out = Vec::with_capacity(last.saturating_sub(first));
        let mut b = first;
        while b < last {
            let s = b / SEGMENT_BLOCKS;
            let hashes = self.segment_hashes(file, f, s)?;
            let base = s * SEGMENT_BLOCKS;
            let end = last.min(base + hashes.len());
            out.extend_from_slice(hashes.get(b - base..end - base)?);
            b = end.max(b + 1);
        }
        Some(out)
    }

    /// Block `b` of `file` with its location, if its segment's are loaded.
    pub(super) fn block_ref(&self, file: u32, b: usize) -> Option<BlockRef> {
        let (hash, loc) = match self.file(file).ok()?.inline() {
            Some(blocks) => blocks.get(b).map(|r| (r.hash, Loc::of(r)))?,
            None => {
                let (hashes, locs) = self.tables.table(file, b / SEGMENT_BLOCKS)?;
                let i = b % SEGMENT_BLOCKS;
                (*hashes.get(i)?, *locs.get(i)?)
            }
        };
        Some(if merkle::is_zero_leaf(&hash) { Loc::ZERO.with_hash(hash) } else { loc.with_hash(hash) })
    }

    /// Forgets the locations of the segments holding `blocks` of `file` (fetches through them
    /// keep failing verification): the next read fetches the index again. A manifest's
    /// (versions 1 and 2) are verified with it and kept.
    pub(super) fn forget_locations(&self, file: u32, blocks: &[usize]) {
        if self.file(file).map_or(true, |f| f.inline().is_some()) {
            return;
        }
        let mut loaded = self.tables.loaded_mut();
        for &b in blocks {
            loaded.forget_locs((file, (b / SEGMENT_BLOCKS) as u32));
        }
    }

    /// Whether every segment covering blocks [first, last) has its locations.
    pub(super) fn located(&self, file: u32, first: usize, last: usize) -> bool {
        let Ok(f) = self.file(file) else { return true };
        if f.inline().is_some() {
            return true;
        }
        let nseg = index::segments(f.nblocks() as u64) as usize;
        (first / SEGMENT_BLOCKS..last.div_ceil(SEGMENT_BLOCKS).min(nseg)).all(|s| self.tables.has_locs(file, s))
    }

    /// Makes sure the hashes and locations of blocks [first, last) of `file` are loaded,
    /// fetching what is not (one range per run of segments); when that range reaches the end
    /// of the file's index it goes on for `extra` bytes, and every index and block those
    /// bytes hold is verified and kept (`harvest`).
    pub(super) async fn locate(
        self: &Arc<Self>,
        file: u32,
        first: usize,
        last: usize,
        extra: impl Into<Speculation>,
        deadline: Instant,
    ) -> Result<()> {
        let extra = extra.into();
        let f = self.file(file)?;
        let last = last.min(f.nblocks());
        if first >= last {
            return Ok(());
        }
        // A small index is loaded whole: one range, which then goes on into the file's data.
        let small = index::index_len(f.nblocks() as u64) <= WHOLE_INDEX_MAX;
        let (s0, s1) = match small {
            true => (0, index::segments(f.nblocks() as u64) as usize),
            false => (first / SEGMENT_BLOCKS, last.div_ceil(SEGMENT_BLOCKS)),
        };
        let (first, last) = match small {
            true => (0, f.nblocks()),
            false => (first, last),
        };
        // A whole large file (tools, a guest data loader) in parts that fit the loaded
        // segments' budget many times over: a read's range is one part.
        let step = self.tables.locate_part;
        for c0 in (s0..s1).step_by(step) {
            let c1 = (c0 + step).min(s1);
            let part = ((c0 * SEGMENT_BLOCKS).max(first), (c1 * SEGMENT_BLOCKS).min(last));
            self.locate_segments(file, f, (c0, c1), part, &extra, deadline).await?;
        }
        Ok(())
    }

    /// `locate` of segments [s0, s1), covering blocks [first, last).
    async fn locate_segments(
        self: &Arc<Self>,
        file: u32,
        f: &FileData,
        (s0, s1): (usize, usize),
        (first, last): (usize, usize),
        extra: &Speculation,
        deadline: Instant,
    ) -> Result<()> {
        loop {
            if self.located(file, first, last) {
                return Ok(());
            }
            // Claim the segments nobody fetches; wait for the others.
            let mut claimed = Vec::new();
            let mut others = Vec::new();
            {
                let mut loading = self.tables.loading.lock().unwrap_or_else(|e| e.into_inner());
                let nseg = index::segments(f.nblocks() as u64) as usize;
                for s in s0..s1.min(nseg) {
                    if self.tables.has_locs(file, s) {
                        continue;
                    }
                    match loading.get(&(file, s as u32)) {
                        Some(tx) => others.push(tx.subscribe()),
                        None => {
                            loading.insert((file, s as u32), watch::channel(false).0);
                            claimed.push(s);
                        }
                    }
                }
            }
            let res = match (claimed.first(), claimed.last()) {
                (Some(&a), Some(&b)) => self.load_segments(file, f, a, b + 1, extra, deadline).await,
                _ => Ok(()),
            };
            {
                let mut loading = self.tables.loading.lock().unwrap_or_else(|e| e.into_inner());
                for s in &claimed {
                    if let Some(tx) = loading.remove(&(file, *s as u32)) {
                        tx.send_replace(true);
                    }
                }
            }
            res?;
            let waited = !others.is_empty();
            for mut rx in others {
                if tokio::time::timeout_at(deadline, rx.wait_for(|&done| done)).await.is_err() {
                    return Err(Error::Timeout);
                }
            }
            // Loaded here, and by no one else: done, even if the budget of loaded segments
            // (smaller than this part) let some go again.
            if !claimed.is_empty() && !waited {
                return Ok(());
            }
            if Instant::now() >= deadline && !self.located(file, first, last) {
                return Err(Error::Timeout);
            }
        }
    }

    /// Fetches segments [a, b) of `file`'s index (and its upper tree levels if need be),
    /// retrying until `deadline`.
    async fn load_segments(
        self: &Arc<Self>,
        file: u32,
        f: &FileData,
        a: usize,
        b: usize,
        spec: &Speculation,
        deadline: Instant,
    ) -> Result<()> {
        let BlockTable::Index { blob, offset } = f.table else { return Ok(()) };
        let n = f.nblocks() as u64;
        let nseg = index::segments(n) as usize;
        let b = b.min(nseg);
        let (blob_id, blob_size) =
            self.image.manifest.blobs.get(blob as usize).map_or((None, 0), |b| (Some(b.id), b.size));
        // A guest supplies the data: fetch only the index.
        let mut extra = if self.cfg.fill == FillSource::Supplied { 0 } else { spec.bytes };
        // Another process on this cache loading the same index brings the data after it:
        // wait for it, then fetch only the index (locations are not kept in the cache).
        let lock = match self.lock_index(&f.root, deadline).await {
            Some(waited) => {
                if waited {
                    extra = 0;
                }
                Some(f.root)
            }
            None => None,
        };
        let _unlock = lock.map(|h| IndexLock { cache: &self.cache, hash: h });
        // Nor what another process is bringing in a range of its own (its speculation covers
        // this file) or has brought: wait a little for it, then fetch only the index.
        if let Some(id) = blob_id {
            let until = deadline.min(Instant::now() + RANGE_WAIT);
            while self.cache.range_in_flight(&id, offset, index::index_len(n)) && Instant::now() < until {
                self.counters.waits_on_other_process.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
        let _ = self.cache.refresh();
        if self.first_block_cached(file) {
            extra = 0;
        }
        let mut backoff = Duration::from_millis(50);
        let mut corrupt = 0;
        loop {
            // The upper levels come with the records when they are next to them (segment 0)
            // and not known yet; otherwise in a range of their own first.
            let need_upper = n > SEGMENT_BLOCKS as u64 && self.level1(file, f).is_none();
            let res = if need_upper && a > 0 {
                self.fetch_index_range(file, blob, offset, index::upper_len(n), 0).await
            } else {
                let start = if need_upper { offset } else { offset + index::segment_offset(n, a as u64) };
                let end = offset + index::segment_offset(n, b as u64).min(index::index_len(n));
                // Only a whole index read at once (a file's first touch) goes on into its
                // data: a later segment's range would race other readers' fetches of blocks.
                let more = match a == 0 && b == nseg {
                    true => {
                        let index_end = offset + index::index_len(n);
                        self.speculation(blob, index_end, end, extra, blob_size, &spec.files)
                    }
                    false => 0,
                };
                self.fetch_index_range(file, blob, start, end - start, more).await
            };
            let upper_only = need_upper && a > 0;
            match res {
                // Every segment asked for verified (and was kept, until the budget of loaded
                // segments lets it go).
                Ok(true) if !upper_only => return Ok(()),
                Ok(_) if self.located(file, a * SEGMENT_BLOCKS, b * SEGMENT_BLOCKS) => return Ok(()),
                // The upper levels came first.
                Ok(_) if upper_only && self.level1(file, f).is_some() => continue,
                Ok(_) => {
                    corrupt += 1;
                    if corrupt >= INDEX_ATTEMPTS {
                        return Err(Error::Corrupt(
                            "the remote keeps sending a file index that does not verify".into(),
                        ));
                    }
                }
                Err(FetchError::Permanent(e)) => return Err(Error::Fetch(e)),
                Err(FetchError::Transient(e)) => tracing::debug!("transient index fetch failure, retrying: {e}"),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout);
            }
            self.counters.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// How many bytes past `end` (where a range for the index ending at `index_end` ends) to
    /// fetch: up to `extra`, cut where a later file's index starts so no index is fetched in
    /// part (the data before it is the files' before it, whole, as `pack` lays blobs out);
    /// only up to the next file's index without cross-file readahead.
    fn speculation(
        &self,
        blob: u32,
        index_end: u64,
        end: u64,
        extra: u64,
        blob_size: u64,
        only: &Option<Arc<HashSet<u32>>>,
    ) -> u64 {
        if extra == 0 {
            return 0;
        }
        let limit = end.saturating_add(self.stored_estimate(extra)).min(blob_size);
        let blob_id = self.image.manifest.blobs.get(blob as usize).map(|b| b.id);
        let by_place = &self.tables.by_place;
        let from = by_place.partition_point(|&(b, o, _)| (b, o) < (blob, index_end));
        // Up to the limit, unless the index of a file not to be fetched starts before it.
        let mut cut = limit;
        for &(b, o, ino) in &by_place[from..] {
            if b != blob || o > limit {
                break;
            }
            // A file read before (its index is loaded): what follows was fetched then. A
            // prefetch goes on only over the files it is after; a read, over files whose
            // index is loaded whole (a large one is read on its own, its index in parts).
            let loaded = self.tables.has_locs(ino, 0);
            let unwanted = match only {
                Some(set) => !set.contains(&ino),
                None => self.file(ino).is_ok_and(|f| index::index_len(f.nblocks() as u64) > WHOLE_INDEX_MAX),
            };
            // A file whose first block is cached (another daemon on the cache read it, or
            // is reading it), or that another daemon's range is bringing: what follows is,
            // or is on its way.
            let elsewhere =
                || self.first_block_cached(ino) || blob_id.is_some_and(|id| self.cache.range_in_flight(&id, o, 1));
            if loaded || unwanted || !self.cfg.cross_file_readahead || elsewhere() {
                cut = o;
                break;
            }
        }
        cut.max(end) - end
    }

    /// Whether the first block of `ino` is cached (or all zeros), as far as the hashes in
    /// memory and the cache tell.
    fn first_block_cached(&self, ino: u32) -> bool {
        let Ok(f) = self.file(ino) else { return false };
        self.block_hashes(ino, f, 0, 1)
            .and_then(|h| h.first().copied())
            .is_some_and(|h| merkle::is_zero_leaf(&h) || self.cache.lookup(&h).is_some())
    }

    /// Bytes of blob that `plain` bytes of file data take, as the image stores them on
    /// average, with the indexes of the files in between (49 bytes a block, and some).
    pub(super) fn stored_estimate(&self, plain: u64) -> u64 {
        let stored = (plain as f64 * self.tables.stored_ratio) as u64;
        stored + stored / 32
    }

    /// Takes the cross-process lock on loading the index of the file with `root` (Some(true)
    /// if another process held it first), waiting until `deadline`; None if it cannot.
    async fn lock_index(&self, root: &Hash, deadline: Instant) -> Option<bool> {
        let mut waited = false;
        loop {
            match self.cache.try_lock_fetch(root) {
                Ok(true) => return Some(waited),
                Ok(false) if Instant::now() < deadline => {
                    waited = true;
                    self.counters.waits_on_other_process.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                _ => return None,
            }
        }
    }

    /// Fetches `len` bytes of `blob` at `start` (plus `more` speculative bytes) and keeps
    /// every index part and block in them that verifies: whether `file`'s parts in them
    /// did. A mirror whose bytes hold no good part of `file`'s index is passed over for the
    /// next.
    async fn fetch_index_range(
        self: &Arc<Self>,
        file: u32,
        blob: u32,
        start: u64,
        len: u64,
        more: u64,
    ) -> Result<bool, FetchError> {
        let id = self
            .image
            .manifest
            .blobs
            .get(blob as usize)
            .map(|b| b.id)
            .ok_or_else(|| FetchError::Permanent("file index in an unknown blob".into()))?;
        let _announced = self.cache.announce_range(&id, start, len + more);
        self.counters.remote_requests.fetch_add(1, Relaxed);
        self.counters.index_requests.fetch_add(1, Relaxed);
        let check = |data: &bytes::Bytes| {
            let ok = self.install_indexes(file, blob, start, data);
            (ok, ok)
        };
        let (data, file_ok) = self.remote.range_checked(&id, start, len + more, check).await?;
        self.counters.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
        self.counters.index_bytes.fetch_add(len.min(data.len() as u64), Relaxed);
        if self.cfg.fill == FillSource::Remote {
            self.harvest_blocks(file, blob, start, &data).await;
        }
        Ok(file_ok)
    }

    /// The version-3 files whose index may have parts in [start, end) of `blob`: `file`, and
    /// those whose index starts there or one segment record before.
    fn files_near(&self, file: u32, blob: u32, start: u64, end: u64) -> Vec<u32> {
        let by_place = &self.tables.by_place;
        let from = by_place.partition_point(|&(b, o, _)| (b, o) < (blob, start.saturating_sub(index_span_max())));
        let mut out = vec![file];
        out.extend(
            by_place[from..]
                .iter()
                .take_while(|&&(b, o, _)| b == blob && o < end)
                .map(|&(_, _, i)| i)
                .filter(|&i| i != file),
        );
        out
    }

    /// Verifies and installs every part of a file index that `data` (bytes of `blob` from
    /// `start` on) holds whole: upper levels, then segment records, and stores their tree
    /// blocks in the cache. True if `file`'s parts in it verified (or were there already).
    fn install_indexes(&self, file: u32, blob: u32, start: u64, data: &[u8]) -> bool {
        let end = start + data.len() as u64;
        let mut tree_blocks: Vec<(Hash, Vec<u8>)> = Vec::new();
        let mut file_ok = false;
        for ino in self.files_near(file, blob, start, end) {
            let (new, ok, bad) = self.install_file(ino, blob, start, data, &mut tree_blocks);
            if bad {
                self.counters.verify_failures.fetch_add(1, Relaxed);
            }
            if new {
                self.counters.indexes_loaded.fetch_add(1, Relaxed);
            }
            if ino == file {
                file_ok = ok && !bad;
            }
        }
        if !tree_blocks.is_empty() {
            let refs: Vec<(Hash, &[u8])> = tree_blocks.iter().map(|(h, b)| (*h, &b[..])).collect();
            if let Err(e) = self.cache.insert_verified(&refs) {
                tracing::warn!("storing tree blocks in the cache: {e}");
            }
        }
        file_ok
    }

    /// Installs the parts of `ino`'s index that `data` holds whole: (any new, any there, any
    /// refused).
    fn install_file(
        &self,
        ino: u32,
        blob: u32,
        start: u64,
        data: &[u8],
        tree_blocks: &mut Vec<(Hash, Vec<u8>)>,
    ) -> (bool, bool, bool) {
        let Ok(f) = self.file(ino) else { return (false, false, false) };
        let BlockTable::Index { blob: b, offset } = f.table else { return (false, false, false) };
        if b != blob {
            return (false, false, false);
        }
        let bounds = Bounds { blobs: &self.image.manifest.blobs, dictionary: self.image.manifest.dictionary };
        let part = |at: u64, len: u64| -> Option<&[u8]> {
            let s = usize::try_from(at.checked_sub(start)?).ok()?;
            data.get(s..s.checked_add(usize::try_from(len).ok()?)?)
        };
        let n = f.nblocks() as u64;
        let (mut new, mut ok, mut bad) = (false, false, false);
        if n > SEGMENT_BLOCKS as u64 {
            match (self.tables.level1(ino), part(offset, index::upper_len(n))) {
                (Some(_), Some(_)) => ok = true,
                (None, Some(upper)) => match index::verify_upper(upper, &f.root, n) {
                    Ok(l1) => {
                        self.tables.set_level1(ino, l1.into());
                        tree_blocks.extend(upper.chunks_exact(BLOCK_SIZE).map(|b| (sha256(b), b.to_vec())));
                        (new, ok) = (true, true);
                    }
                    Err(e) => {
                        bad = true;
                        tracing::warn!(inode = ino, "file index from remote refused: {e}");
                    }
                },
                _ => {}
            }
        }
        for s in 0..index::segments(n) {
            let count = index::segment_len(n, s);
            let Some(rec) = part(offset + index::segment_offset(n, s), (count * index::RECORD_BYTES) as u64) else {
                continue;
            };
            if self.tables.has_locs(ino, s as usize) {
                ok = true;
                continue;
            }
            let expected = match n > SEGMENT_BLOCKS as u64 {
                true => match self.tables.level1(ino).and_then(|l| l.get(s as usize).copied()) {
                    Some(h) => h,
                    None => continue,
                },
                false => f.root,
            };
            match index::decode_segment(rec, count, &expected, n, &bounds) {
                Ok((hashes, locs)) => {
                    if n > 1 {
                        tree_blocks.push((expected, index::level0_block(&hashes).to_vec()));
                    }
                    self.tables.loaded_mut().set((ino, s as u32), hashes.into(), Some(locs.into()));
                    (new, ok) = (true, true);
                }
                Err(e) => {
                    bad = true;
                    tracing::warn!(inode = ino, segment = s, "file index from remote refused: {e}");
                }
            }
        }
        (new, ok, bad)
    }

    /// Verifies and stores every block of a located segment that lies whole in `data` (bytes
    /// of `blob` from `start` on) and is not cached: the data a speculative index range
    /// carried.
    async fn harvest_blocks(&self, file: u32, blob: u32, start: u64, data: &[u8]) {
        let end = start + data.len() as u64;
        let mut found: Vec<BlockRef> = Vec::new();
        for ino in self.files_near(file, blob, start, end) {
            let Ok(f) = self.file(ino) else { continue };
            for s in 0..index::segments(f.nblocks() as u64) as usize {
                let Some((hashes, locs)) = self.tables.table(ino, s) else { continue };
                for (h, l) in hashes.iter().zip(locs.iter()) {
                    if l.kind != BlockKind::Zero
                        && !merkle::is_zero_leaf(h)
                        && l.blob == blob
                        && l.offset >= start
                        && l.offset + l.len as u64 <= end
                    {
                        found.push(l.with_hash(*h));
                    }
                }
            }
        }
        found.retain(|r| self.cache.lookup(&r.hash).is_none());
        if found.is_empty() {
            return;
        }
        let dict = match found.iter().any(|r| r.kind == BlockKind::ZstdDict) {
            true => self.dictionary().await.ok().flatten(),
            false => None,
        };
        let mut good: Vec<(Hash, Vec<u8>)> = Vec::new();
        for r in &found {
            let at = (r.offset - start) as usize;
            let Some(stored) = data.get(at..at + r.len as usize) else { continue };
            match decode_verified(r, stored, dict.as_deref()) {
                Some(plain) => good.push((r.hash, plain)),
                None if r.kind == BlockKind::ZstdDict && dict.is_none() => {}
                None => {
                    self.counters.verify_failures.fetch_add(1, Relaxed);
                    tracing::warn!(hash = %hex::encode(r.hash), "block from remote failed verification");
                }
            }
        }
        good.sort_unstable_by_key(|g| g.0);
        good.dedup_by(|a, b| a.0 == b.0);
        let refs: Vec<(Hash, &[u8])> = good.iter().map(|(h, d)| (*h, &d[..])).collect();
        match self.cache.insert_verified(&refs) {
            Ok(()) => {
                self.counters.blocks_fetched.fetch_add(refs.len() as u64, Relaxed);
                self.counters.blocks_harvested.fetch_add(refs.len() as u64, Relaxed);
            }
            Err(e) => tracing::warn!("storing fetched blocks in the cache: {e}"),
        }
    }

    /// Starts loading block `b`'s segment of `file` in the background (for a caller that
    /// cannot wait: a guest supplying blocks).
    pub(super) fn locate_in_background(self: &Arc<Self>, file: u32, b: usize) {
        let Some(rt) = self.intents.runtime() else { return };
        let me = self.clone();
        rt.spawn(async move {
            let deadline = Instant::now() + me.cfg.read_timeout.max(Duration::from_secs(1));
            if let Err(e) = me.locate(file, b, b + 1, 0, deadline).await {
                tracing::debug!(inode = file, "loading the file's index: {e}");
            }
        });
    }

    /// Every block of `file` with its place, fetching the file's index if need be (for tools
    /// and tests: reads never need all of it).
    pub async fn file_blocks(self: &Arc<Self>, file: u32) -> Result<Vec<BlockRef>> {
        let n = self.file(file)?.nblocks();
        let deadline = Instant::now() + self.cfg.read_timeout.max(Duration::from_secs(10));
        let mut out = Vec::with_capacity(n);
        // Part by part: the whole of a large file's tables may not stay loaded at once.
        while out.len() < n {
            let (a, b) = (out.len(), self.part_end(out.len(), n));
            self.locate(file, a, b, 0, deadline).await?;
            let part: Option<Vec<BlockRef>> = (a..b).map(|i| self.block_ref(file, i)).collect();
            match part {
                Some(p) => out.extend(p),
                // Dropped meanwhile for other segments: located again.
                None if Instant::now() < deadline => continue,
                None => return Err(Error::NotFound(format!("blocks {a} to {b} of inode {file}"))),
            }
        }
        Ok(out)
    }

    /// Where the part of a whole-file load that starts at block `a` of `n` ends.
    fn part_end(&self, a: usize, n: usize) -> usize {
        a.saturating_add(self.tables.locate_part * SEGMENT_BLOCKS).min(n)
    }

    /// The leaf hashes of every block of `file`, fetching what neither memory nor the cache
    /// holds, part by part as `file_blocks`.
    pub(super) async fn file_hashes(self: &Arc<Self>, file: u32, deadline: Instant) -> Result<Vec<Hash>> {
        let f = self.file(file)?;
        let n = f.nblocks();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let (a, b) = (out.len(), self.part_end(out.len(), n));
            match self.block_hashes(file, f, a, b) {
                Some(h) => out.extend(h),
                None if Instant::now() < deadline => self.locate(file, a, b, 0, deadline).await?,
                None => return Err(Error::NotFound(format!("the index of inode {file}"))),
            }
        }
        Ok(out)
    }

    /// Loads the hashes of every block of the image (for `unique_blocks` and whole-image
    /// work): what is not cached is fetched.
    pub(super) async fn locate_all(self: &Arc<Self>, deadline: Instant) -> Result<()> {
        for (ino, f) in self.image.files() {
            if f.inline().is_none() {
                self.locate(ino, 0, f.nblocks(), 0, deadline).await?;
            }
        }
        Ok(())
    }
}

/// How far a range that brings a file's whole index goes on past it (see `locate`).
#[derive(Clone, Default)]
pub(super) struct Speculation {
    pub(super) bytes: u64,
    /// Only over these files' indexes and data (a prefetch's), if given.
    pub(super) files: Option<Arc<HashSet<u32>>>,
}

impl From<u64> for Speculation {
    fn from(bytes: u64) -> Self {
        Speculation { bytes, files: None }
    }
}

/// Releases a cross-process index lock however loading ends.
struct IndexLock<'a> {
    cache: &'a crate::cache::BlockCache,
    hash: Hash,
}

impl Drop for IndexLock<'_> {
    fn drop(&mut self) {
        self.cache.unlock_fetch(&self.hash);
    }
}

/// How far before a range a file index whose data lies in it may start: a one-segment
/// index is at most this long.
fn index_span_max() -> u64 {
    (SEGMENT_BLOCKS * index::RECORD_BYTES) as u64
}

fn sha256(data: &[u8]) -> Hash {
    <sha2::Sha256 as sha2::Digest>::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(n: usize, with_locs: bool) -> (Arc<[Hash]>, Option<Arc<[Loc]>>) {
        (vec![[1u8; 32]; n].into(), with_locs.then(|| vec![Loc::ZERO; n].into()))
    }

    /// The running count is what the kept segments cost, through sets, updates, forgotten
    /// locations and sweeps, and never above the budget after a set.
    #[test]
    fn loaded_segments_count_what_they_keep_and_stay_within_budget() {
        let mut l = LoadedSegments { max_bytes: 6 * SEGMENT_COST, ..LoadedSegments::default() };
        let check = |l: &LoadedSegments| {
            assert_eq!(l.bytes, l.map.values().map(Loaded::cost).sum::<usize>());
            assert_eq!(l.order.len(), l.map.len());
            assert!(l.bytes <= l.max_bytes);
        };
        for i in 0..40u32 {
            let (h, locs) = seg(1 + (i as usize * 37) % SEGMENT_BLOCKS, i % 3 != 0);
            l.set((i, 0), h, locs);
            check(&l);
            if i % 5 == 0 {
                let (h, locs) = seg(SEGMENT_BLOCKS, true);
                l.set((i / 2, 0), h, locs);
                check(&l);
            }
            l.forget_locs((i.saturating_sub(1), 0));
            check(&l);
        }
        // The newest is kept; the oldest went first.
        assert!(l.map.contains_key(&(39, 0)));
        assert!(!l.map.contains_key(&(1, 0)));
    }
}
