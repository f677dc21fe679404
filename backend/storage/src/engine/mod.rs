//! The block engine: serves verified plaintext of an image's files, fetching missing blocks.
//!
//! - [`read`](read.rs): a read maps (file, offset, length) to blocks once and copies what the
//!   cache has straight into the caller's buffer; the rest is a [`Miss`] to await.
//! - `fetch`: single-flight fetches of runs of blocks, verification, storing.
//! - `prefetch`: record and replay of read traces, the whole-image background fetch.
//! - `fill`: blocks supplied by a guest data loader, and what is present of a file.
//! - `intent`: the head of a file fetched in the background when a guest opens it.
//! - `readahead`: per-stream windows (a sequential reader's grows, a random reader's not).
//!
//! A read first copies what the cache has. Missing blocks are fetched by one task per run of
//! neighbouring blocks (single flight in this process through `inflight`, across processes
//! through the cache's fetch locks), coalesced with the blocks after them up to the readahead
//! window, retried with backoff, verified against their leaf hash and stored in the cache; the
//! waiting readers then read them from the cache. A read that cannot finish before its
//! deadline fails with ETIME; data that fails verification is never stored or returned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod fetch;
mod fill;
mod intent;
mod prefetch;
mod read;
mod readahead;
mod startup;
mod table;

pub use intent::{IntentCounters, MAX_INTENT_FETCHES};

pub use read::{Miss, MissData, ReadOutcome};
pub use startup::{monotonic_ns, Startup};
pub use table::{DEFAULT_INDEX_MEMORY, MIN_INDEX_MEMORY};

use fetch::{load_image, InFlight};

use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::image::{FileData, Hash, Image, ImageId, BLOCK_SIZE};
use crate::store::Remote;
use crate::trace::Recorder;

/// Where missing blocks come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillSource {
    /// The engine fetches from the remote.
    Remote,
    /// Only `supply_block` fills (a guest data loader); misses wait for it.
    Supplied,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a read may wait for missing blocks; zero fails at once (as incfs).
    pub read_timeout: Duration,
    /// Bytes of plaintext one fetch may cover, missing blocks of the read included (the
    /// first fetch of a file; see `adaptive_readahead`).
    pub readahead: u64,
    /// Grow the window of a sequential reader (doubling up to `readahead_max`) and fetch only
    /// what a random reader asked for (`readahead.rs`).
    pub adaptive_readahead: bool,
    /// Largest window of a sequential reader.
    pub readahead_max: u64,
    /// Window of a random reader's miss (at most `readahead`; what was asked if smaller).
    pub readahead_random: u64,
    /// On OPEN of a file whose head is not cached, fetch the head in the background
    /// (`intent.rs`).
    pub open_prefetch: bool,
    /// The same on LOOKUP of a regular file (a stat of every file of a directory fetches
    /// their heads: off by default).
    pub lookup_prefetch: bool,
    /// Fetch the blocks a read waits for in a request of their own, its readahead in another
    /// one beside it.
    pub split_fetch: bool,
    /// Limit for one remote request before it counts as a transient failure.
    pub attempt_timeout: Duration,
    /// Fetches of a block that keep failing verification give up after this many.
    pub corrupt_attempts: u32,
    pub fill: FillSource,
    /// Let readahead continue into the files packed after the one being read.
    pub cross_file_readahead: bool,
    /// Bytes that reads waiting for blocks may hold at once; past it they wait for room
    /// before allocating anything (a guest cannot make the daemon allocate without bound).
    pub max_parked_bytes: u64,
    /// Re-hash every cached block on read (for a cache on storage others can write); a
    /// block that no longer matches is a miss and is dropped.
    pub verify_cached: bool,
    /// Bytes the loaded segments of file indexes may hold (version 3), at most; past it the
    /// least recently used are dropped (their hashes come back from the cache). At least
    /// `MIN_INDEX_MEMORY`.
    pub index_memory: usize,
    /// How requests to an HTTP(S) store are made (roots, client certificate, headers).
    pub http: crate::store::HttpOptions,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            read_timeout: Duration::from_secs(10),
            readahead: 512 << 10,
            adaptive_readahead: true,
            readahead_max: 4 << 20,
            readahead_random: 512 << 10,
            open_prefetch: true,
            lookup_prefetch: false,
            split_fetch: true,
            attempt_timeout: Duration::from_secs(5),
            corrupt_attempts: 3,
            fill: FillSource::Remote,
            cross_file_readahead: true,
            max_parked_bytes: DEFAULT_MAX_PARKED_BYTES,
            verify_cached: false,
            index_memory: table::DEFAULT_INDEX_MEMORY,
            http: crate::store::HttpOptions::default(),
        }
    }
}

/// Monotonic counters, exported as metrics.
#[derive(Default, Debug)]
pub struct Counters {
    pub reads: AtomicU64,
    pub read_errors: AtomicU64,
    pub reads_delayed: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub remote_requests: AtomicU64,
    pub blocks_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub retries: AtomicU64,
    pub verify_failures: AtomicU64,
    /// Image dictionaries fetched from the remote (not found in the cache).
    pub dictionaries_fetched: AtomicU64,
    pub timeouts: AtomicU64,
    pub blocks_supplied: AtomicU64,
    pub waits_on_other_process: AtomicU64,
    /// Blocks requested by trace replay (fetched unless already cached or in flight).
    pub prefetch_blocks: AtomicU64,
    /// Blocks that reads looked up in the cache's index (blocks with a slot hint are not).
    pub cache_lookups: AtomicU64,
    /// Waiting reads that had to wait for room for their data (`max_parked_bytes`).
    pub parked_waits: AtomicU64,
    /// Microseconds reads spent waiting for missing blocks (what round trips cost readers).
    pub read_wait_us: AtomicU64,
    /// Fetches started by a guest's OPEN or LOOKUP (`intent.rs`).
    pub intents: IntentCounters,
    /// Requests for file indexes (version 3; `table.rs`), and the files whose index (or part
    /// of it) they brought.
    pub index_requests: AtomicU64,
    pub indexes_loaded: AtomicU64,
    /// Bytes of file indexes those requests asked for (the rest of `bytes_fetched` is data).
    pub index_bytes: AtomicU64,
    /// Blocks that came with an index request, not asked for by a fetch of their own.
    pub blocks_harvested: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let c = |a: &AtomicU64| a.load(Relaxed);
        vec![
            ("reads", c(&self.reads)),
            ("read_errors", c(&self.read_errors)),
            ("reads_delayed", c(&self.reads_delayed)),
            ("cache_hits", c(&self.cache_hits)),
            ("cache_misses", c(&self.cache_misses)),
            ("remote_requests", c(&self.remote_requests)),
            ("blocks_fetched", c(&self.blocks_fetched)),
            ("bytes_fetched", c(&self.bytes_fetched)),
            ("retries", c(&self.retries)),
            ("verify_failures", c(&self.verify_failures)),
            ("dictionaries_fetched", c(&self.dictionaries_fetched)),
            ("timeouts", c(&self.timeouts)),
            ("blocks_supplied", c(&self.blocks_supplied)),
            ("waits_on_other_process", c(&self.waits_on_other_process)),
            ("prefetch_blocks", c(&self.prefetch_blocks)),
            ("cache_lookups", c(&self.cache_lookups)),
            ("parked_waits", c(&self.parked_waits)),
            ("read_wait_us", c(&self.read_wait_us)),
            ("index_requests", c(&self.index_requests)),
            ("indexes_loaded", c(&self.indexes_loaded)),
            ("index_bytes", c(&self.index_bytes)),
            ("blocks_harvested", c(&self.blocks_harvested)),
        ]
        .into_iter()
        .chain(self.intents.snapshot())
        .collect()
    }
}

/// Default for [`EngineConfig::max_parked_bytes`]: room for 16 blk requests of 8 MiB, or
/// 128 virtio-fs reads of 1 MiB that miss every block.
pub const DEFAULT_MAX_PARKED_BYTES: u64 = 128 << 20;

/// Room reserved for a waiting read's data; given back when dropped.
pub struct ParkedBytes {
    /// None only if the semaphore were closed, which it never is.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub struct Engine {
    image: Arc<Image>,
    remote: Remote,
    cache: Arc<BlockCache>,
    cfg: EngineConfig,
    inflight: Mutex<HashMap<Hash, Arc<InFlight>>>,
    pub counters: Counters,
    /// Time to ready and what opening the image fetched.
    pub startup: Startup,
    /// Hits and misses already added to the cache-wide totals.
    flushed: Mutex<(u64, u64)>,
    /// Set by `start_recording`: first touches of blocks, for `--record-trace`.
    recorder: std::sync::OnceLock<Recorder>,
    /// Per block of the image (indexed from `block_base`), the cache slot it was last found
    /// in, plus one (0: unknown; slots are below 2^32). Spares the warm path a hash lookup
    /// per block; only a hint, since the cache checks every slot's record on read.
    slot_hints: Box<[AtomicU32]>,
    block_base: Vec<u64>,
    /// Room for parked reads' data, in blocks (see `EngineConfig::max_parked_bytes`).
    parked: Arc<tokio::sync::Semaphore>,
    parked_blocks: u32,
    /// Per-stream readahead windows.
    streams: readahead::Streams,
    /// Background fetches of opened files' heads.
    intents: intent::Intents,
    /// Each file's block hashes and locations, loaded on demand (version 3).
    tables: table::Tables,
    /// The image's zstd dictionary, prepared: loaded at the first block that needs it (from
    /// the cache, else the remote), verified against its hash. Unset after a failure, so the
    /// next block that needs it tries again.
    dictionary: tokio::sync::OnceCell<Arc<crate::dict::BlockDictionary>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.flush_stats();
    }
}

impl Engine {
    /// Loads the image (from the cache's saved manifest, else the remote) and verifies it
    /// against its id.
    pub async fn open(remote: Remote, id: ImageId, cache: Arc<BlockCache>, cfg: EngineConfig) -> Result<Arc<Self>> {
        if cfg.verify_cached {
            cache.set_verify_reads(true);
        }
        let opened_ns = monotonic_ns();
        let patience = cfg.read_timeout.max(Duration::from_secs(30));
        let (image, fetched_bytes, fetched_requests) = load_image(&remote, &id, &cache, patience).await?;
        let image = Arc::new(image);
        let mut block_base = vec![u64::MAX; image.manifest.inodes.len()];
        let mut total = 0u64;
        for (i, f) in image.files() {
            block_base[i as usize] = total;
            total += f.nblocks() as u64;
        }
        let slot_hints = (0..total).map(|_| AtomicU32::new(0)).collect();
        let parked_blocks =
            u32::try_from(cfg.max_parked_bytes / BLOCK_SIZE as u64).unwrap_or(u32::MAX).clamp(1, 1 << 28);
        let tables = table::Tables::new(&image, cfg.index_memory);
        let supplied = cfg.fill == FillSource::Supplied;
        let engine = Arc::new(Engine {
            tables,
            slot_hints,
            block_base,
            image,
            remote,
            cache,
            cfg,
            inflight: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            startup: Startup::new(opened_ns, fetched_bytes, fetched_requests),
            flushed: Mutex::new((0, 0)),
            recorder: std::sync::OnceLock::new(),
            parked: Arc::new(tokio::sync::Semaphore::new(parked_blocks as usize)),
            parked_blocks,
            streams: readahead::Streams::new(),
            intents: intent::Intents::new(),
            dictionary: tokio::sync::OnceCell::new(),
        });
        // A guest data loader may supply any block at any time, and each is checked against
        // its hash at once: every file's index is loaded up front (as the manifest of
        // versions 1 and 2 held them).
        if supplied {
            engine.locate_all(tokio::time::Instant::now() + patience).await?;
        }
        Ok(engine)
    }

    /// Adds this engine's hits and misses since the last call to the cache-wide totals
    /// (shown by `incfsd cache status`).
    pub fn flush_stats(&self) {
        let mut f = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        let (h, m) = (self.counters.cache_hits.load(Relaxed), self.counters.cache_misses.load(Relaxed));
        if self.cache.add_stats(h - f.0, m - f.1).is_ok() {
            *f = (h, m);
        }
    }

    /// Opens `store` (a directory or an http(s) URL) and the cache directory `cache` (with an
    /// optional size limit), then the image: what every command and daemon does first.
    pub async fn connect(
        store: &str,
        id: ImageId,
        cache: &std::path::Path,
        cache_size: Option<u64>,
        cfg: EngineConfig,
    ) -> Result<Arc<Self>> {
        let remote = Remote::open_with(store, cfg.attempt_timeout, &cfg.http)?;
        let cache = Arc::new(BlockCache::open_with(cache, crate::cache::CacheOptions { limit_bytes: cache_size })?);
        Self::open(remote, id, cache, cfg).await
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    pub fn cache(&self) -> &Arc<BlockCache> {
        &self.cache
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Reserves room for `bytes` of a read that waits (all of the daemon's room if it asks
    /// for more), waiting while other parked reads hold it.
    pub async fn reserve_parked(&self, bytes: usize) -> ParkedBytes {
        let blocks = u32::try_from(bytes.div_ceil(BLOCK_SIZE)).unwrap_or(u32::MAX).clamp(1, self.parked_blocks);
        let t = Instant::now();
        let permit = self.parked.clone().acquire_many_owned(blocks).await;
        if t.elapsed() > Duration::from_millis(1) {
            self.counters.parked_waits.fetch_add(1, Relaxed);
        }
        ParkedBytes { _permit: permit.ok() }
    }

    fn file(&self, file: u32) -> Result<&FileData> {
        self.image.file(file).ok_or_else(|| Error::Invalid(format!("inode {file} is not a regular file")))
    }

    /// Bytes the loaded segments of file indexes hold (estimated; at most
    /// `EngineConfig::index_memory`), and how many segments that is.
    pub fn loaded_index_usage(&self) -> (usize, usize) {
        self.tables.loaded_usage()
    }

    /// Bytes of a read and the block range [first, last) covering it, clamped to the file.
    fn span(f: &FileData, offset: u64, len: u32) -> (u64, usize, usize) {
        if offset >= f.size || len == 0 {
            return (0, 0, 0);
        }
        let end = (offset + len as u64).min(f.size);
        let first = (offset / BLOCK_SIZE as u64) as usize;
        let last = end.div_ceil(BLOCK_SIZE as u64) as usize;
        (end - offset, first, last)
    }

    /// The slot hint of block `block` of file `file`, if the image has one.
    fn hint(&self, file: u32, block: usize) -> Option<&AtomicU32> {
        let base = *self.block_base.get(file as usize)?;
        self.slot_hints.get(usize::try_from(base).ok()?.checked_add(block)?)
    }

    /// Notes that block `block` of `file` was found in `slot`.
    fn set_hint(&self, file: u32, block: usize, slot: u64) {
        if let (Some(h), Ok(v)) = (self.hint(file, block), u32::try_from(slot + 1)) {
            h.store(v, Relaxed);
        }
    }

    /// Clears the slot hints of blocks `blocks` of file `file` (found stale).
    fn forget_hints(&self, file: u32, blocks: std::ops::Range<usize>) {
        for b in blocks {
            if let Some(h) = self.hint(file, b) {
                h.store(0, Relaxed);
            }
        }
    }
}
