//! The block engine: serves verified plaintext of an image's files, fetching missing blocks.
//!
//! A read first copies what the cache has. Missing blocks are fetched by one task per run of
//! neighbouring blocks (single flight in this process through `inflight`, across processes
//! through the cache's fetch locks), coalesced with the blocks after them up to the readahead
//! window, retried with backoff, verified against their leaf hash and stored in the cache; the
//! waiting readers then read them from the cache. A read that cannot finish before its
//! deadline fails with ETIME; data that fails verification is never stored or returned.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use incfs_buf::ScatterBuf;

use crate::cache::BlockCache;
use crate::error::{Error, Result};
use crate::image::{merkle, BlockKind, BlockRef, FileData, Hash, Image, ImageId, BLOCK_SIZE};
use crate::store::{FetchError, Remote};
use crate::trace::{self, Recorder};

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
    /// Bytes of plaintext one fetch may cover, missing blocks of the read included.
    pub readahead: u64,
    /// Limit for one remote request before it counts as a transient failure.
    pub attempt_timeout: Duration,
    /// Fetches of a block that keep failing verification give up after this many.
    pub corrupt_attempts: u32,
    pub fill: FillSource,
    /// Let readahead continue into the files packed after the one being read.
    pub cross_file_readahead: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            read_timeout: Duration::from_secs(10),
            readahead: 512 << 10,
            attempt_timeout: Duration::from_secs(5),
            corrupt_attempts: 3,
            fill: FillSource::Remote,
            cross_file_readahead: true,
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
    pub timeouts: AtomicU64,
    pub blocks_supplied: AtomicU64,
    pub waits_on_other_process: AtomicU64,
    /// Blocks requested by trace replay (fetched unless already cached or in flight).
    pub prefetch_blocks: AtomicU64,
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
            ("timeouts", c(&self.timeouts)),
            ("blocks_supplied", c(&self.blocks_supplied)),
            ("waits_on_other_process", c(&self.waits_on_other_process)),
            ("prefetch_blocks", c(&self.prefetch_blocks)),
        ]
    }
}

/// How a fetch of a block ended, as its waiters see it.
#[derive(Clone, Debug)]
enum Outcome {
    /// Look in the cache again (stored, or someone else is on it).
    Retry,
    Corrupt,
    /// Nobody waiting on it any more: the reader's deadline passed.
    TimedOut,
    Failed(String),
}

struct InFlight {
    done: watch::Sender<Option<Outcome>>,
    /// The latest deadline of anyone waiting: the fetch keeps retrying until then.
    deadline: Mutex<Instant>,
}

impl InFlight {
    fn new(deadline: Instant) -> Arc<Self> {
        Arc::new(InFlight { done: watch::channel(None).0, deadline: Mutex::new(deadline) })
    }
    fn extend(&self, d: Instant) {
        let mut cur = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        if d > *cur {
            *cur = d;
        }
    }
    fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Engine {
    image: Arc<Image>,
    remote: Remote,
    cache: Arc<BlockCache>,
    cfg: EngineConfig,
    inflight: Mutex<HashMap<Hash, Arc<InFlight>>>,
    pub counters: Counters,
    /// Hits and misses already added to the cache-wide totals.
    flushed: Mutex<(u64, u64)>,
    /// Set by `start_recording`: first touches of blocks, for `--record-trace`.
    recorder: std::sync::OnceLock<Recorder>,
    /// Per block of the image (indexed from `block_base`), the cache slot it was last found
    /// in, plus one (0: unknown). Spares the warm path a hash lookup per block; only a hint,
    /// since the cache checks every slot's record on read.
    slot_hints: Box<[AtomicU64]>,
    block_base: Vec<u64>,
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
        let image = Arc::new(load_image(&remote, &id, &cache, cfg.read_timeout.max(Duration::from_secs(30))).await?);
        let mut block_base = vec![u64::MAX; image.manifest.inodes.len()];
        let mut total = 0u64;
        for (i, f) in image.files() {
            block_base[i as usize] = total;
            total += f.blocks.len() as u64;
        }
        let slot_hints = (0..total).map(|_| AtomicU64::new(0)).collect();
        Ok(Arc::new(Engine {
            slot_hints,
            block_base,
            image,
            remote,
            cache,
            cfg,
            inflight: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            flushed: Mutex::new((0, 0)),
            recorder: std::sync::OnceLock::new(),
        }))
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
        let remote = Remote::open(store, cfg.attempt_timeout)?;
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

    fn file(&self, ino: u32) -> Result<&FileData> {
        self.image.file(ino).ok_or_else(|| Error::Invalid(format!("inode {ino} is not a regular file")))
    }

    /// Block range [first, end) covering a read, clamped to the file.
    fn span(f: &FileData, offset: u64, len: u32) -> (u64, usize, usize) {
        if offset >= f.size || len == 0 {
            return (0, 0, 0);
        }
        let end = (offset + len as u64).min(f.size);
        let first = (offset / BLOCK_SIZE as u64) as usize;
        let last = end.div_ceil(BLOCK_SIZE as u64) as usize;
        (end - offset, first, last)
    }

    /// The slot hint of block `block` of file `ino`, if the image has one.
    fn hint(&self, ino: u32, block: usize) -> Option<&AtomicU64> {
        let base = *self.block_base.get(ino as usize)?;
        self.slot_hints.get(usize::try_from(base).ok()?.checked_add(block)?)
    }

    /// Clears the slot hints of blocks `blocks` of file `ino` (found stale).
    fn forget_hints(&self, ino: u32, blocks: std::ops::Range<usize>) {
        for b in blocks {
            if let Some(h) = self.hint(ino, b) {
                h.store(0, Relaxed);
            }
        }
    }

    /// Where the cache holds blocks [first, last) of `f` (None: missing, or a zero block).
    /// Hinted slots first; the index only for blocks without a hint.
    fn cached_slots(&self, ino: u32, f: &FileData, first: usize, last: usize) -> Vec<Option<u64>> {
        let blocks = &f.blocks[first..last];
        let mut slots: Vec<Option<u64>> = (first..last)
            .map(|b| self.hint(ino, b).map(|h| h.load(Relaxed)).filter(|&v| v != 0).map(|v| v - 1))
            .collect();
        let unhinted: Vec<usize> =
            (0..blocks.len()).filter(|&i| slots[i].is_none() && blocks[i].kind != BlockKind::Zero).collect();
        if !unhinted.is_empty() {
            let mut found = Vec::with_capacity(unhinted.len());
            self.cache.lookup_many(unhinted.iter().map(|&i| &blocks[i].hash), &mut found);
            for (&i, s) in unhinted.iter().zip(found) {
                slots[i] = s;
                if let (Some(h), Some(s)) = (self.hint(ino, first + i), s) {
                    h.store(s + 1, Relaxed);
                }
            }
        }
        slots
    }

    /// How many blocks from `i` on are stored in consecutive slots (one copy for them all).
    fn slot_run(blocks: &[BlockRef], slots: &[Option<u64>], i: usize, slot: u64) -> usize {
        let mut n = 1;
        while i + n < blocks.len() && blocks[i + n].kind != BlockKind::Zero && slots[i + n] == Some(slot + n as u64) {
            n += 1;
        }
        n
    }

    /// Copies the cached blocks [first, last) of `f` into `buf` (whole blocks); returns the
    /// indexes of the blocks that are missing.
    fn copy_cached(&self, ino: u32, f: &FileData, first: usize, last: usize, buf: &mut [u8]) -> Result<Vec<usize>> {
        let mut missing = Vec::new();
        let blocks = &f.blocks[first..last];
        let slots = self.cached_slots(ino, f, first, last);
        let mut i = 0;
        while i < blocks.len() {
            let at = i * BLOCK_SIZE;
            if blocks[i].kind == BlockKind::Zero {
                buf[at..at + BLOCK_SIZE].fill(0);
                i += 1;
                continue;
            }
            let Some(slot) = slots[i] else {
                missing.push(first + i);
                i += 1;
                continue;
            };
            let n = Self::slot_run(blocks, &slots, i, slot);
            let hashes: Vec<Hash> = blocks[i..i + n].iter().map(|r| r.hash).collect();
            if !self.cache.read_run(slot, &hashes, &mut buf[at..at + n * BLOCK_SIZE])? {
                // A stale hint, or evicted meanwhile: forget the hints, ask the index block by
                // block, and count the rest missing.
                self.forget_hints(ino, first + i..first + i + n);
                for k in 0..n {
                    let h = hashes[k];
                    let dst = &mut buf[at + k * BLOCK_SIZE..at + (k + 1) * BLOCK_SIZE];
                    let ok = match self.cache.lookup(&h) {
                        Some(s) => self.cache.read_run(s, &[h], dst)?,
                        None => false,
                    };
                    if !ok {
                        missing.push(first + i + k);
                    }
                }
            }
            i += n;
        }
        Ok(missing)
    }

    /// Reads from the cache only: None when any block is missing. Never waits.
    pub fn read_cached(&self, ino: u32, offset: u64, len: u32) -> Result<Option<Vec<u8>>> {
        let f = self.file(ino)?;
        let (n, first, last) = Self::span(f, offset, len);
        if let Some(r) = self.recorder.get() {
            r.note(ino, first, last);
        }
        let mut buf = vec![0u8; (last - first) * BLOCK_SIZE];
        if !self.copy_cached(ino, f, first, last, &mut buf)?.is_empty() {
            return Ok(None);
        }
        self.count_hit(last - first);
        Ok(Some(trim(buf, offset, n)))
    }

    /// Reads from the cache only, straight into a guest's buffer: Some(bytes) when the read
    /// starts on a block boundary and every block is cached, None otherwise (then nothing
    /// is counted and the caller reads the ordinary way). Never waits.
    pub fn read_cached_into(&self, ino: u32, offset: u64, len: u32, out: &mut ScatterBuf<'_>) -> Result<Option<u32>> {
        let f = self.file(ino)?;
        if offset % BLOCK_SIZE as u64 != 0 {
            return Ok(None);
        }
        let (n, first, last) = Self::span(f, offset, len);
        let n = n as usize;
        let blocks = &f.blocks[first..last];
        let slots = self.cached_slots(ino, f, first, last);
        let io = |e| Error::io("read into guest buffer", e);
        let mut i = 0;
        while i < blocks.len() {
            let at = i * BLOCK_SIZE;
            if blocks[i].kind == BlockKind::Zero {
                out.zero(at, BLOCK_SIZE.min(n - at)).map_err(io)?;
                i += 1;
                continue;
            }
            let Some(slot) = slots[i] else { return Ok(None) };
            let k = Self::slot_run(blocks, &slots, i, slot);
            let bytes = (k * BLOCK_SIZE).min(n - at);
            if !self.cache.read_run_into(slot, blocks[i..i + k].iter().map(|r| &r.hash), out, at, bytes)? {
                self.forget_hints(ino, first + i..first + i + k);
                return Ok(None);
            }
            i += k;
        }
        if let Some(r) = self.recorder.get() {
            r.note(ino, first, last);
        }
        self.count_hit(last - first);
        Ok(Some(n as u32))
    }

    fn count_hit(&self, blocks: usize) {
        // A daemon that only hits still shows up in the cache-wide ratio now and then.
        if self.counters.reads.fetch_add(1, Relaxed) % 8192 == 8191 {
            self.flush_stats();
        }
        self.counters.cache_hits.fetch_add(blocks as u64, Relaxed);
    }

    /// Reads verified plaintext, waiting for missing blocks until the read timeout.
    pub async fn read(self: &Arc<Self>, ino: u32, offset: u64, len: u32) -> Result<Vec<u8>> {
        let res = self.read_inner(ino, offset, len).await;
        self.counters.reads.fetch_add(1, Relaxed);
        match &res {
            Err(Error::Timeout) => {
                self.counters.timeouts.fetch_add(1, Relaxed);
                self.counters.read_errors.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.counters.read_errors.fetch_add(1, Relaxed);
            }
            Ok(_) => {}
        }
        res
    }

    async fn read_inner(self: &Arc<Self>, ino: u32, offset: u64, len: u32) -> Result<Vec<u8>> {
        let f = self.file(ino)?;
        let (n, first, last) = Self::span(f, offset, len);
        if let Some(r) = self.recorder.get() {
            r.note(ino, first, last);
        }
        let mut buf = vec![0u8; (last - first) * BLOCK_SIZE];
        let deadline = Instant::now() + self.cfg.read_timeout;
        let mut missing = self.copy_cached(ino, f, first, last, &mut buf)?;
        self.counters.cache_hits.fetch_add((last - first - missing.len()) as u64, Relaxed);
        self.counters.cache_misses.fetch_add(missing.len() as u64, Relaxed);
        if missing.is_empty() {
            return Ok(trim(buf, offset, n));
        }
        self.counters.reads_delayed.fetch_add(1, Relaxed);
        if self.cfg.read_timeout.is_zero() {
            return Err(Error::Timeout);
        }
        loop {
            let waits = self.request(ino, f, &missing, last, deadline);
            for (hash, w) in waits {
                let mut rx = w.done.subscribe();
                let outcome = loop {
                    // Blocks supplied by a guest may come through another daemon on this
                    // cache: look again now and then rather than only when woken.
                    let slice = match self.cfg.fill {
                        FillSource::Supplied => deadline.min(Instant::now() + Duration::from_millis(200)),
                        FillSource::Remote => deadline,
                    };
                    match tokio::time::timeout_at(slice, rx.wait_for(|o| o.is_some())).await {
                        Err(_) if Instant::now() >= deadline => return Err(Error::Timeout),
                        Err(_) if matches!(self.cache.lookup_fresh(&hash), Ok(Some(_))) => break Outcome::Retry,
                        Err(_) => continue,
                        Ok(Err(_)) => break Outcome::Retry, // sender dropped: look again
                        Ok(Ok(o)) => break o.clone().unwrap_or(Outcome::Retry),
                    }
                };
                match outcome {
                    Outcome::Retry => {}
                    Outcome::Corrupt => {
                        return Err(Error::Corrupt("the remote keeps sending data that does not match its hash".into()))
                    }
                    Outcome::TimedOut => return Err(Error::Timeout),
                    Outcome::Failed(e) => return Err(Error::Remote(e)),
                }
            }
            // Re-read only what was missing.
            let mut still = Vec::new();
            for &b in &missing {
                let at = (b - first) * BLOCK_SIZE;
                if !self.copy_cached(ino, f, b, b + 1, &mut buf[at..at + BLOCK_SIZE])?.is_empty() {
                    still.push(b);
                }
            }
            if still.is_empty() {
                return Ok(trim(buf, offset, n));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            missing = still;
            // Someone else's fetch ended without our block (lost to eviction, or their run
            // was cut short): go round again, without spinning.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Joins or starts fetches for the missing blocks; returns what to wait on.
    fn request(
        self: &Arc<Self>,
        ino: u32,
        f: &FileData,
        missing: &[usize],
        read_end: usize,
        deadline: Instant,
    ) -> Vec<(Hash, Arc<InFlight>)> {
        let mut waits = Vec::with_capacity(missing.len());
        let mut runs = Vec::new();
        let window = (self.cfg.readahead as usize / BLOCK_SIZE).max(1);
        {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for &b in missing {
                let h = f.blocks[b].hash;
                if let Some(fl) = map.get(&h) {
                    fl.extend(deadline);
                    waits.push((h, fl.clone()));
                    continue;
                }
                // Stored since the caller looked (a supplier stores before it takes this
                // lock to wake waiters): nothing to wait for.
                if self.cache.lookup(&h).is_some() {
                    continue;
                }
                let fl = InFlight::new(deadline);
                map.insert(h, fl.clone());
                waits.push((h, fl.clone()));
                if self.cfg.fill == FillSource::Supplied {
                    continue;
                }
                // A run: this block, then neighbours stored right after it that nobody has,
                // past the end of the file into the files packed after it (small files of a
                // directory are read together: one round trip instead of one per file).
                let mut run = vec![(f.blocks[b], fl)];
                let limit = window.max(read_end.saturating_sub(b));
                let (mut cur_ino, mut cur, mut next) = (ino, f, b + 1);
                while run.len() < limit {
                    if next >= cur.blocks.len() {
                        let n = self.image.next_file.get(cur_ino as usize).copied().unwrap_or(u32::MAX);
                        match (self.cfg.cross_file_readahead, self.image.file(n)) {
                            (true, Some(nf)) => (cur_ino, cur, next) = (n, nf, 0),
                            _ => break,
                        }
                        continue;
                    }
                    let r = cur.blocks[next];
                    if !run[run.len() - 1].0.adjoins(&r)
                        || map.contains_key(&r.hash)
                        || self.cache.lookup(&r.hash).is_some()
                    {
                        break;
                    }
                    let nf = InFlight::new(deadline);
                    map.insert(r.hash, nf.clone());
                    run.push((r, nf));
                    next += 1;
                }
                runs.push(run);
            }
        }
        for run in runs {
            let me = self.clone();
            tokio::spawn(async move { me.fetch_run(run).await });
        }
        waits
    }

    async fn fetch_run(self: Arc<Self>, run: Vec<(BlockRef, Arc<InFlight>)>) {
        let blocks: Vec<BlockRef> = run.iter().map(|(r, _)| *r).collect();
        let flights: Vec<Arc<InFlight>> = run.iter().map(|(_, f)| f.clone()).collect();
        let outcomes = self.fetch_blocks(blocks.clone(), &flights).await;
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for ((r, fl), o) in blocks.iter().zip(&flights).zip(outcomes) {
            if map.get(&r.hash).is_some_and(|m| Arc::ptr_eq(m, fl)) {
                map.remove(&r.hash);
            }
            fl.done.send_replace(Some(o));
        }
    }

    /// Fetches a run of adjoining blocks; one outcome per block.
    async fn fetch_blocks(&self, blocks: Vec<BlockRef>, flights: &[Arc<InFlight>]) -> Vec<Outcome> {
        let n = blocks.len();
        let mut outcome: Vec<Option<Outcome>> = vec![None; n];
        let deadline = || flights.iter().map(|f| f.deadline()).max().unwrap_or_else(Instant::now);
        let mut backoff = Duration::from_millis(50);
        let mut corrupt_tries = 0;
        loop {
            let todo: Vec<usize> = (0..n).filter(|&i| outcome[i].is_none()).collect();
            if todo.is_empty() {
                break;
            }
            // Cross-process single flight: lock the first block (waiting while another daemon
            // fetches it), then as many following ones as are free.
            let mut held = Vec::new();
            for (k, &i) in todo.iter().enumerate() {
                match self.cache.try_lock_fetch(&blocks[i].hash) {
                    Ok(true) => held.push(i),
                    Ok(false) if k == 0 => break,
                    _ => break,
                }
            }
            if held.is_empty() {
                self.counters.waits_on_other_process.fetch_add(1, Relaxed);
                let i = todo[0];
                if Instant::now() >= deadline() {
                    outcome[i] = Some(Outcome::TimedOut);
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
                if matches!(self.cache.lookup_fresh(&blocks[i].hash), Ok(Some(_))) {
                    outcome[i] = Some(Outcome::Retry);
                }
                continue;
            }
            // Another process may have stored some while we waited.
            let _ = self.cache.refresh();
            let mut fetch = Vec::new();
            for &i in &held {
                if self.cache.lookup(&blocks[i].hash).is_some() {
                    outcome[i] = Some(Outcome::Retry);
                } else {
                    fetch.push(i);
                }
            }
            let res = self.fetch_and_store(&blocks, &fetch).await;
            for &i in &held {
                self.cache.unlock_fetch(&blocks[i].hash);
            }
            // Blocks after the held prefix belong to someone else's fetch: let readers retry.
            if let Some(&last_held) = held.last() {
                for &i in todo.iter().filter(|&&i| i > last_held) {
                    outcome[i].get_or_insert(Outcome::Retry);
                }
            }
            match res {
                Ok(bad) => {
                    for &i in &fetch {
                        if !bad.contains(&i) {
                            outcome[i] = Some(Outcome::Retry);
                        }
                    }
                    if bad.is_empty() {
                        continue;
                    }
                    corrupt_tries += 1;
                    if corrupt_tries >= self.cfg.corrupt_attempts {
                        for i in bad {
                            outcome[i] = Some(Outcome::Corrupt);
                        }
                        continue;
                    }
                }
                Err(FetchError::Permanent(e)) => {
                    tracing::warn!("fetch failed: {e}");
                    for &i in &fetch {
                        outcome[i] = Some(Outcome::Failed(e.to_string()));
                    }
                    continue;
                }
                Err(FetchError::Transient(e)) => {
                    tracing::debug!("transient fetch failure, retrying: {e}");
                }
            }
            // Keep trying until the last waiter gives up; a late reader extends the deadline.
            let now = Instant::now();
            let until = deadline();
            if now >= until {
                for o in outcome.iter_mut().filter(|o| o.is_none()) {
                    *o = Some(Outcome::TimedOut);
                }
                break;
            }
            self.counters.retries.fetch_add(1, Relaxed);
            tokio::time::sleep(backoff.min(until - now)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        outcome.into_iter().map(|o| o.unwrap_or(Outcome::Retry)).collect()
    }

    /// Fetches blocks `idx` (in order) with one range request per stretch of adjoining
    /// blocks, verifies them, stores the good ones; returns the indexes that failed
    /// verification.
    async fn fetch_and_store(&self, blocks: &[BlockRef], idx: &[usize]) -> Result<Vec<usize>, FetchError> {
        let mut bad = Vec::new();
        let mut s = 0;
        while s < idx.len() {
            let mut e = s + 1;
            while e < idx.len() && idx[e] == idx[e - 1] + 1 && blocks[idx[e - 1]].adjoins(&blocks[idx[e]]) {
                e += 1;
            }
            let (a, z) = (&blocks[idx[s]], &blocks[idx[e - 1]]);
            let blob = self
                .image
                .manifest
                .blobs
                .get(a.blob as usize)
                .ok_or_else(|| FetchError::Permanent("block in unknown blob".into()))?;
            let len = z.offset + z.len as u64 - a.offset;
            self.counters.remote_requests.fetch_add(1, Relaxed);
            let data = tokio::time::timeout(self.cfg.attempt_timeout, self.remote.range(&blob.id, a.offset, len))
                .await
                .map_err(|_| FetchError::Transient("remote request timed out".into()))??;
            self.counters.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
            let mut good: Vec<(Hash, Vec<u8>)> = Vec::with_capacity(e - s);
            for &i in &idx[s..e] {
                let r = &blocks[i];
                let at = (r.offset - a.offset) as usize;
                match decode_verified(r, &data[at..at + r.len as usize]) {
                    Some(plain) => good.push((r.hash, plain)),
                    None => {
                        self.counters.verify_failures.fetch_add(1, Relaxed);
                        tracing::warn!(hash = %hex::encode(r.hash), "block from remote failed verification");
                        bad.push(i);
                    }
                }
            }
            self.counters.blocks_fetched.fetch_add(good.len() as u64, Relaxed);
            let refs: Vec<(Hash, &[u8])> = good.iter().map(|(h, d)| (*h, d.as_slice())).collect();
            self.cache.insert_verified(&refs).map_err(|e| FetchError::Transient(format!("cache: {e}").into()))?;
            self.flush_stats();
            s = e;
        }
        Ok(bad)
    }

    /// A block supplied by someone other than the remote (a guest data loader): verified,
    /// stored, and any reads waiting on it are woken. Ok(false) if it was already present.
    pub fn supply_block(&self, ino: u32, index: u32, kind: BlockKind, data: &[u8]) -> Result<bool> {
        let f = self.file(ino)?;
        let r = f
            .blocks
            .get(index as usize)
            .ok_or_else(|| Error::Invalid(format!("block {index} is past the end of the file")))?;
        if r.kind == BlockKind::Zero || self.cache.lookup(&r.hash).is_some() {
            return Ok(false);
        }
        let probe = BlockRef { kind, len: data.len() as u32, ..*r };
        let Some(plain) = (data.len() <= 2 * BLOCK_SIZE).then(|| decode_verified(&probe, data)).flatten() else {
            self.counters.verify_failures.fetch_add(1, Relaxed);
            return Err(Error::Corrupt(format!("block {index} does not match its hash")));
        };
        self.cache.insert_verified(&[(r.hash, &plain)])?;
        self.counters.blocks_supplied.fetch_add(1, Relaxed);
        if let Some(fl) = self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.hash) {
            fl.done.send_replace(Some(Outcome::Retry));
        }
        Ok(true)
    }

    /// Blocks of a file that are present (zero blocks always are), and its block count.
    pub fn fill_state(&self, ino: u32) -> Result<(u64, u64)> {
        let f = self.file(ino)?;
        let filled =
            f.blocks.iter().filter(|r| r.kind == BlockKind::Zero || self.cache.lookup(&r.hash).is_some()).count();
        Ok((filled as u64, f.blocks.len() as u64))
    }

    /// Ranges [begin, end) of present blocks.
    pub fn filled_ranges(&self, ino: u32) -> Result<Vec<(u32, u32)>> {
        let f = self.file(ino)?;
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (i, r) in f.blocks.iter().enumerate() {
            if r.kind == BlockKind::Zero || self.cache.lookup(&r.hash).is_some() {
                match out.last_mut() {
                    Some(l) if l.1 == i as u32 => l.1 += 1,
                    _ => out.push((i as u32, i as u32 + 1)),
                }
            }
        }
        Ok(out)
    }

    /// Hashes currently being fetched or waited for (for diagnostics).
    pub fn inflight_count(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The distinct blocks of the image that must come from a remote (zero blocks excluded).
    pub fn unique_blocks(&self) -> HashSet<Hash> {
        self.image
            .files()
            .flat_map(|(_, f)| f.blocks.iter())
            .filter(|r| r.kind != BlockKind::Zero)
            .map(|r| r.hash)
            .collect()
    }
}

// --- Record and replay: traces of first reads, prefetched in order by later runs. ---
impl Engine {
    /// From now on, note the first read of every block (see `recorded`).
    pub fn start_recording(&self) {
        let _ = self.recorder.set(Recorder::new(self.block_base.clone(), self.slot_hints.len() as u64));
    }

    /// The trace so far, in the text format of `trace`, or None when not recording.
    pub fn recorded_trace(&self) -> Option<(usize, String)> {
        let r = self.recorder.get()?;
        Some((r.len(), trace::format(&self.image, &r.ranges())))
    }

    /// Fetches every block of the image that is not cached, file by file in pack order (so
    /// neighbouring blocks go in one request), in the background of demand reads and under
    /// `rate` as `prefetch`. Returns the blocks it asked for.
    pub async fn fetch_all(self: &Arc<Self>, rate: Option<u64>) -> u64 {
        let ranges = (0..self.image.manifest.inodes.len() as u32)
            .filter_map(|ino| Some((ino, 0, u32::try_from(self.image.file(ino)?.blocks.len()).ok()?)))
            .filter(|r| r.2 > 0)
            .collect();
        self.prefetch(ranges, rate).await
    }

    /// Fetches the blocks of `ranges` in order, in the background of demand reads: at most
    /// `PREFETCH_RUNS` fetches of its own in flight, while a demand miss starts its fetch at
    /// once (or joins the prefetch of its block). With `rate` (bytes per second), it starts
    /// a fetch only while this daemon's downloads since the call, demand reads included,
    /// stay under that rate. Returns the blocks it asked for.
    pub async fn prefetch(self: &Arc<Self>, ranges: Vec<trace::Range>, rate: Option<u64>) -> u64 {
        const PREFETCH_RUNS: usize = 2;
        let window = (self.cfg.readahead as usize / BLOCK_SIZE).max(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(PREFETCH_RUNS));
        let mut asked = 0u64;
        let (start, fetched_before) = (Instant::now(), self.counters.bytes_fetched.load(Relaxed));
        // Within the cap, give or take the fetches in flight (a window each).
        let under_cap = |rate: u64| async move {
            loop {
                let sent = self.counters.bytes_fetched.load(Relaxed).saturating_sub(fetched_before);
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if start.elapsed() >= due {
                    return;
                }
                tokio::time::sleep_until(start + due).await;
            }
        };
        for (ino, first, count) in ranges {
            let Ok(f) = self.file(ino) else { continue };
            let end = (first as usize + count as usize).min(f.blocks.len());
            let mut at = first as usize;
            while at < end {
                let piece_end = (at + window).min(end);
                let missing: Vec<usize> = (at..piece_end)
                    .filter(|&b| f.blocks[b].kind != BlockKind::Zero && self.cache.lookup(&f.blocks[b].hash).is_none())
                    .collect();
                at = piece_end;
                if missing.is_empty() {
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else { break };
                if let Some(rate) = rate.filter(|&r| r > 0) {
                    under_cap(rate).await;
                }
                asked += missing.len() as u64;
                self.counters.prefetch_blocks.fetch_add(missing.len() as u64, Relaxed);
                let waits = self.request(ino, f, &missing, piece_end, Instant::now() + Duration::from_secs(60));
                tokio::spawn(async move {
                    for (_, w) in waits {
                        let mut rx = w.done.subscribe();
                        let _ = rx.wait_for(|o| o.is_some()).await;
                    }
                    drop(permit);
                });
            }
        }
        asked
    }
}

fn trim(mut buf: Vec<u8>, offset: u64, n: u64) -> Vec<u8> {
    if n == 0 {
        return Vec::new();
    }
    let skip = (offset % BLOCK_SIZE as u64) as usize;
    buf.drain(..skip);
    buf.truncate(n as usize);
    buf
}

/// Decompresses one stored block into a zero-padded 4096-byte buffer and checks its leaf
/// hash. None if it does not decode to at most 4096 bytes or does not match.
fn decode_verified(r: &BlockRef, stored: &[u8]) -> Option<Vec<u8>> {
    let mut plain = vec![0u8; BLOCK_SIZE];
    match r.kind {
        BlockKind::Raw => {
            if stored.len() > BLOCK_SIZE {
                return None;
            }
            plain[..stored.len()].copy_from_slice(stored);
        }
        BlockKind::Zstd => {
            // The decoder may scribble past what it returns: pad explicitly.
            let n = zstd::bulk::decompress_to_buffer(stored, &mut plain[..]).ok()?;
            plain[n..].fill(0);
        }
        BlockKind::Zero => {}
    }
    (merkle::leaf_hash(&plain) == r.hash).then_some(plain)
}

/// Loads a manifest from the cache, else from the remote (retrying transient failures until
/// `patience` runs out), verifies it against the id, and saves it in the cache.
async fn load_image(remote: &Remote, id: &ImageId, cache: &BlockCache, patience: Duration) -> Result<Image> {
    if let Some(bytes) = cache.load_manifest(id) {
        return Image::from_manifest_bytes(*id, &bytes);
    }
    let give_up = Instant::now() + patience;
    let mut backoff = Duration::from_millis(100);
    let bytes = loop {
        match remote.manifest(id).await {
            Ok(b) => break b,
            Err(FetchError::Permanent(e)) => return Err(Error::Fetch(e)),
            Err(FetchError::Transient(e)) if Instant::now() + backoff >= give_up => return Err(Error::Fetch(e)),
            Err(FetchError::Transient(e)) => {
                tracing::warn!("fetching manifest: {e}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let bytes = crate::image::manifest_from_stored(bytes)?;
    let image = Image::from_manifest_bytes(*id, &bytes)?;
    cache.save_manifest(id, &bytes)?;
    Ok(image)
}

// --- Pending-read support for the guest control channel (backend/src/control.rs). ---
// Kept in its own block at the end of the file so it stays apart from the fetch machinery.
impl Engine {
    /// Indexes of the blocks of a read of `len` bytes at `offset` that are not in the cache
    /// (zero blocks are never missing). Never waits; a read past the end has none.
    pub fn missing_blocks(&self, ino: u32, offset: u64, len: u32) -> Result<Vec<u32>> {
        let f = self.file(ino)?;
        let (_, first, last) = Self::span(f, offset, len);
        Ok((first..last)
            .filter(|&b| f.blocks[b].kind != BlockKind::Zero && self.cache.lookup(&f.blocks[b].hash).is_none())
            .map(|b| b as u32)
            .collect())
    }

    /// Block range [first, last) a read of `len` bytes at `offset` covers, clamped to the file.
    pub fn block_span(&self, ino: u32, offset: u64, len: u32) -> Result<(u32, u32)> {
        let f = self.file(ino)?;
        let (_, first, last) = Self::span(f, offset, len);
        Ok((first as u32, last as u32))
    }
}
