//! Fetching: single flight per block in this process (`inflight`) and across processes (the
//! cache's fetch locks), runs of neighbouring blocks in one range request, retries with
//! backoff, verification against the leaf hash, and storing in the cache. Readers wait on an
//! [`InFlight`]; a fetch hands its waiters the verified plaintext, so a reader never depends
//! on the block surviving in the cache (a cache smaller than a read cannot livelock it). A
//! block stored by another process is read from the cache.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Engine, FillSource};
use crate::cache::BlockCache;
use crate::dict::BlockDictionary;
use crate::error::{Error, Result};
use crate::image::{merkle, BlockKind, BlockRef, FileData, Hash, Image, ImageId, BLOCK_SIZE};
use crate::store::{FetchError, FetchFailure, Remote};

/// How a fetch of a block ended, as its waiters see it.
#[derive(Clone, Debug)]
pub(super) enum Outcome {
    /// Fetched, verified and stored: its plaintext (a whole block).
    Stored(Arc<[u8]>),
    /// Look in the cache again (stored by someone else, or someone else is on it).
    Retry,
    Corrupt,
    /// Nobody waiting on it any more: the reader's deadline passed.
    TimedOut,
    Failed(FetchFailure),
}

pub(super) struct InFlight {
    pub(super) done: watch::Sender<Option<Outcome>>,
    /// The latest deadline of anyone waiting: the fetch keeps retrying until then.
    deadline: Mutex<Instant>,
}

impl InFlight {
    pub(super) fn new(deadline: Instant) -> Arc<Self> {
        Arc::new(InFlight { done: watch::channel(None).0, deadline: Mutex::new(deadline) })
    }
    pub(super) fn extend(&self, d: Instant) {
        let mut cur = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        if d > *cur {
            *cur = d;
        }
    }
    pub(super) fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Readahead behind a read shorter than this goes in the read's own request.
const MIN_SPLIT_BLOCKS: usize = 16;

/// What one fetch got: (index, plaintext) of the blocks that verified, and the indexes of
/// those that did not.
type Fetched = (Vec<(usize, Arc<[u8]>)>, Vec<usize>);

impl Engine {
    /// Joins or starts fetches for the missing blocks (located: see `locate`); returns what
    /// to wait on.
    pub(super) fn request(
        self: &Arc<Self>,
        file: u32,
        f: &FileData,
        missing: &[usize],
        read_end: usize,
        deadline: Instant,
    ) -> Vec<(Hash, Arc<InFlight>)> {
        let mut waits = Vec::with_capacity(missing.len());
        let mut runs = Vec::new();
        {
            let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for &b in missing {
                let Some(first) = self.block_ref(file, b) else { continue };
                let h = first.hash;
                if let Some(fl) = map.get(&h) {
                    fl.extend(deadline);
                    waits.push((h, fl.clone()));
                    continue;
                }
                // With a guest supplying blocks, one may have been stored since the caller
                // looked (a supplier stores before it takes this lock to wake waiters) and
                // nobody would wake us. A fetch needs no such look: the fetcher looks again
                // under the cross-process fetch lock.
                if self.cfg.fill == FillSource::Supplied && self.cache.lookup(&h).is_some() {
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
                let mut run = vec![(first, fl)];
                let limit = self.readahead_window(file, b, read_end);
                let (mut cur_file, mut cur, mut next) = (file, f, b + 1);
                while run.len() < limit {
                    if next >= cur.nblocks() {
                        let n = self.image.next_file.get(cur_file as usize).copied().unwrap_or(u32::MAX);
                        match (self.cfg.cross_file_readahead, self.image.file(n)) {
                            (true, Some(nf)) => (cur_file, cur, next) = (n, nf, 0),
                            _ => break,
                        }
                        continue;
                    }
                    // A block whose location is not loaded ends the run.
                    let Some(r) = self.block_ref(cur_file, next) else { break };
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
                let in_file = run.len().min(f.nblocks() - b);
                self.note_fetch(file, b, in_file, limit);
                // The blocks the read waits for in a request of their own, so it does not
                // wait for the readahead behind them too.
                let asked = read_end.saturating_sub(b);
                let rest = (self.cfg.split_fetch && asked > 0 && run.len() >= asked + MIN_SPLIT_BLOCKS)
                    .then(|| run.split_off(asked));
                runs.push(run);
                runs.extend(rest);
            }
        }
        for run in runs {
            let me = self.clone();
            tokio::spawn(async move { me.fetch_run(run).await });
        }
        waits
    }

    pub(super) async fn fetch_run(self: Arc<Self>, run: Vec<(BlockRef, Arc<InFlight>)>) {
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
                Ok((good, bad)) => {
                    for (i, plain) in good {
                        outcome[i] = Some(Outcome::Stored(plain));
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
                        outcome[i] = Some(Outcome::Failed(e.clone()));
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
    /// blocks, verifies them, stores the good ones; returns the good ones' plaintext and the
    /// indexes that failed verification.
    async fn fetch_and_store(&self, blocks: &[BlockRef], idx: &[usize]) -> Result<Fetched, FetchError> {
        let mut bad = Vec::new();
        let needs_dict = |i: &usize| blocks[*i].kind == BlockKind::ZstdDict;
        let dict = match idx.iter().any(needs_dict) {
            true => self.dictionary().await?,
            false => None,
        };
        // Without a good dictionary, its blocks fail as corrupt data does (and are retried).
        let kept: Vec<usize>;
        let idx = match &dict {
            Some(_) => idx,
            None => {
                bad.extend(idx.iter().copied().filter(needs_dict));
                kept = idx.iter().copied().filter(|i| !needs_dict(i)).collect();
                &kept[..]
            }
        };
        let dict = dict.as_deref();
        let mut fetched = Vec::with_capacity(idx.len());
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
            // The remote bounds each attempt itself, with a deadline that grows with `len`.
            // With mirrors, a source whose bytes do not all verify is passed over for the next.
            let check = |data: &bytes::Bytes| {
                let plain: Vec<Option<Vec<u8>>> = idx[s..e]
                    .iter()
                    .map(|&i| {
                        let r = &blocks[i];
                        let at = (r.offset - a.offset) as usize;
                        data.get(at..at + r.len as usize).and_then(|stored| decode_verified(r, stored, dict))
                    })
                    .collect();
                let all = plain.iter().all(Option::is_some);
                (plain, all)
            };
            let (data, plain) = self.remote.range_checked(&blob.id, a.offset, len, check).await?;
            self.counters.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
            let mut good: Vec<(usize, Arc<[u8]>)> = Vec::with_capacity(e - s);
            for (&i, plain) in idx[s..e].iter().zip(plain) {
                let r = &blocks[i];
                match plain {
                    Some(plain) => good.push((i, plain.into())),
                    None => {
                        self.counters.verify_failures.fetch_add(1, Relaxed);
                        tracing::warn!(hash = %hex::encode(r.hash), "block from remote failed verification");
                        bad.push(i);
                    }
                }
            }
            let refs: Vec<(Hash, &[u8])> = good.iter().map(|(i, d)| (blocks[*i].hash, &d[..])).collect();
            self.cache.insert_verified(&refs).map_err(|e| FetchError::Transient(format!("cache: {e}").into()))?;
            // Counted once stored: whoever sees the count finds the blocks in the cache.
            self.counters.blocks_fetched.fetch_add(good.len() as u64, Relaxed);
            self.flush_stats();
            fetched.extend(good);
            s = e;
        }
        Ok((fetched, bad))
    }

    /// The image's dictionary, loaded once (from the cache, else the remote) and verified
    /// against the SHA-256 the manifest names. Ok(None) if it has none, or if what the
    /// remote sent is not it (logged; the blocks that need it then fail verification).
    pub(super) async fn dictionary(&self) -> Result<Option<Arc<BlockDictionary>>, FetchError> {
        let Some(blob) = self.image.dictionary() else { return Ok(None) };
        let load = async {
            if let Some(bytes) = self.cache.load_dictionary(&blob.id) {
                match BlockDictionary::prepare(&bytes, &blob.id) {
                    Ok(d) => return Ok(Some(Arc::new(d))),
                    Err(e) => tracing::warn!("saved dictionary refused, fetching it again: {e}"),
                }
            }
            self.counters.remote_requests.fetch_add(1, Relaxed);
            // With mirrors, a source whose bytes do not hash right is passed over.
            let check = |data: &bytes::Bytes| ((), <sha2::Sha256 as sha2::Digest>::digest(data)[..] == blob.id[..]);
            let (data, ()) = self.remote.range_checked(&blob.id, 0, blob.size, check).await?;
            self.counters.bytes_fetched.fetch_add(data.len() as u64, Relaxed);
            match BlockDictionary::prepare(&data, &blob.id) {
                Ok(d) => {
                    self.counters.dictionaries_fetched.fetch_add(1, Relaxed);
                    if let Err(e) = self.cache.save_dictionary(&blob.id, &data) {
                        tracing::warn!("saving the image dictionary in the cache: {e}");
                    }
                    Ok(Some(Arc::new(d)))
                }
                Err(e) => {
                    self.counters.verify_failures.fetch_add(1, Relaxed);
                    tracing::warn!("image dictionary from the remote refused: {e}");
                    Ok(None)
                }
            }
        };
        // Only a good dictionary is kept: after a failure the next fetch tries again.
        let cell = &self.dictionary;
        let got = cell
            .get_or_try_init(|| async {
                match load.await {
                    Ok(Some(d)) => Ok(d),
                    Ok(None) => Err(None),
                    Err(e) => Err(Some(e)),
                }
            })
            .await;
        match got {
            Ok(d) => Ok(Some(d.clone())),
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    /// With a guest supplying blocks nobody fetches, so nobody else ends a wait: a reader
    /// that gives up removes the entries of `hashes` whose every waiter's deadline has passed.
    pub(super) fn forget_expired_waits(&self, hashes: impl Iterator<Item = Hash>) {
        let now = Instant::now();
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for h in hashes {
            if map.get(&h).is_some_and(|fl| fl.deadline() <= now) {
                map.remove(&h);
            }
        }
    }

    /// Hashes currently being fetched or waited for (for diagnostics).
    pub fn inflight_count(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Decompresses one stored block into a zero-padded 4096-byte buffer and checks its leaf
/// hash. None if it does not decode to at most 4096 bytes or does not match, or needs a
/// dictionary not given.
pub(super) fn decode_verified(r: &BlockRef, stored: &[u8], dict: Option<&BlockDictionary>) -> Option<Vec<u8>> {
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
        BlockKind::ZstdDict => {
            let n = dict?.decompress(stored, &mut plain[..])?;
            plain[n..].fill(0);
        }
        BlockKind::Zero => {}
    }
    (merkle::leaf_hash(&plain) == r.hash).then_some(plain)
}

/// Loads a manifest from the cache, else from the remote (retrying transient failures until
/// `patience` runs out), verifies it against the id, and saves it in the cache.
/// The image `id`, from the cache's saved manifest or else the remote, with the bytes and
/// requests fetched from the remote for it (zero from the cache).
pub(super) async fn load_image(
    remote: &Remote,
    id: &ImageId,
    cache: &BlockCache,
    patience: Duration,
) -> Result<(Image, u64, u64)> {
    if let Some(bytes) = cache.load_manifest(id) {
        return Ok((Image::from_manifest_bytes(*id, &bytes)?, 0, 0));
    }
    let give_up = Instant::now() + patience;
    let mut backoff = Duration::from_millis(100);
    let mut requests = 0u64;
    let bytes = loop {
        requests += 1;
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
    let fetched = bytes.len() as u64;
    let bytes = crate::image::manifest_from_stored(bytes)?;
    let image = Image::from_manifest_bytes(*id, &bytes)?;
    cache.save_manifest(id, &bytes)?;
    Ok((image, fetched, requests))
}
