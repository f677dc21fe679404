//! Reads: (file, offset, length) is mapped to blocks once; the blocks the cache has go
//! straight into the caller's buffer (one `preadv` per run of consecutive slots), zero blocks
//! are zeroed, and what is missing comes back as a [`Miss`]. Awaiting [`Miss::wait`] fetches
//! the missing blocks and returns only their bytes, which [`MissData::write_into`] puts where
//! they belong in the same buffer.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use incfs_buf::ScatterBuf;
use tokio::time::Instant;

use super::fetch::Outcome;
use super::{Engine, FillSource, ParkedBytes};
use crate::error::{Error, Result};
use crate::image::{merkle, FileData, Hash, BLOCK_SIZE};

const BS: u64 = BLOCK_SIZE as u64;

/// How [`Engine::read_into`] ended.
pub enum ReadOutcome {
    /// Every block was there: this many bytes are in the buffer (fewer than asked only at the
    /// end of the file).
    Done(u32),
    /// Some blocks must be fetched first; the others are in the buffer already.
    Miss(Miss),
}

/// The blocks of a read that the cache did not have. Nothing is counted or fetched until it
/// is awaited; dropping it abandons the read.
pub struct Miss {
    engine: Arc<Engine>,
    file: u32,
    offset: u64,
    /// Bytes the whole read returns.
    len: u32,
    /// Block past the read's last one (readahead is measured from there).
    read_end: usize,
    /// Blocks of the file that are missing, ascending.
    missing: Vec<u32>,
    /// Blocks of the read that were copied from the cache.
    cached: u64,
}

/// The bytes of a miss's blocks once they arrived.
pub struct MissData {
    offset: u64,
    len: u32,
    /// (block of the file, its plaintext).
    blocks: Vec<(u32, Arc<[u8]>)>,
    /// The room these bytes take in the daemon's parked-bytes budget (None when the caller
    /// reserved it).
    _room: Option<ParkedBytes>,
}

impl MissData {
    /// Bytes the whole read returns.
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the blocks into the read's buffer (the one given to `read_into`, or one laid out
    /// the same way) and returns the read's length.
    pub fn write_into(&self, out: &mut ScatterBuf<'_>) -> io::Result<u32> {
        let end = self.offset + u64::from(self.len);
        for (b, data) in &self.blocks {
            let start = u64::from(*b) * BS;
            let (s, e) = (start.max(self.offset), (start + BS).min(end));
            if s < e {
                let skip = (s - start) as usize;
                out.write((s - self.offset) as usize, &data[skip..skip + (e - s) as usize])?;
            }
        }
        Ok(self.len)
    }
}

impl Miss {
    /// The missing blocks of the file, ascending.
    pub fn missing_blocks(&self) -> &[u32] {
        &self.missing
    }

    pub fn file(&self) -> u32 {
        self.file
    }

    /// Waits for the missing blocks (fetching them unless a guest supplies them) until the
    /// engine's read timeout; ETIME past it, EBADMSG if the remote keeps sending bad data.
    /// First it waits for room for their bytes in the daemon's parked-bytes budget.
    pub async fn wait(self) -> Result<MissData> {
        let room = self.engine.reserve_parked(self.missing.len() * BLOCK_SIZE).await;
        let mut data = self.wait_within(&room).await?;
        data._room = Some(room);
        Ok(data)
    }

    /// As [`Miss::wait`], for a caller that reserved room for the whole read already.
    pub async fn wait_within(self, _room: &ParkedBytes) -> Result<MissData> {
        let c = &self.engine.counters;
        c.cache_hits.fetch_add(self.cached, Relaxed);
        c.cache_misses.fetch_add(self.missing.len() as u64, Relaxed);
        c.reads_delayed.fetch_add(1, Relaxed);
        let t = Instant::now();
        let res = self.fetch().await;
        c.read_wait_us.fetch_add(t.elapsed().as_micros() as u64, Relaxed);
        if matches!(res, Err(Error::Timeout)) && self.engine.cfg.fill == FillSource::Supplied {
            if let Ok(f) = self.engine.file(self.file) {
                let e = &self.engine;
                let hashes = self
                    .missing
                    .iter()
                    .filter_map(|&b| e.block_hashes(self.file, f, b as usize, b as usize + 1)?.pop());
                e.forget_expired_waits(hashes);
            }
        }
        c.reads.fetch_add(1, Relaxed);
        if let Err(e) = &res {
            if matches!(e, Error::Timeout) {
                c.timeouts.fetch_add(1, Relaxed);
            }
            c.read_errors.fetch_add(1, Relaxed);
        }
        res
    }

    async fn fetch(&self) -> Result<MissData> {
        let e = &self.engine;
        if e.cfg.read_timeout.is_zero() {
            return Err(Error::Timeout);
        }
        let deadline = Instant::now() + e.cfg.read_timeout;
        let f = e.file(self.file)?;
        let mut blocks = Vec::with_capacity(self.missing.len());
        let mut missing: Vec<usize> = self.missing.iter().map(|&b| b as usize).collect();
        let Some(&first) = missing.first() else {
            return Ok(MissData { offset: self.offset, len: self.len, blocks, _room: None });
        };
        // The blocks' hashes and locations first, with those of the readahead after them; a
        // range that brings a file's index also brings the data stored after it.
        // Unless another daemon on this cache stored them since this read looked (and the
        // tree block with their hashes): then nothing is fetched.
        // The hashes of blocks [first, last missing] (missing is ascending), looked up once.
        let last = missing.last().copied().unwrap_or(first);
        let absent = |h: &Hash| !merkle::is_zero_leaf(h) && e.cache.lookup(h).is_none();
        let _ = e.cache.refresh();
        let known = e.block_hashes(self.file, f, first, last + 1);
        let stored_meanwhile =
            known.as_ref().is_some_and(|span| missing.iter().all(|&b| span.get(b - first).is_some_and(|h| !absent(h))));
        if !stored_meanwhile {
            let window = e.readahead_window(self.file, first, self.read_end);
            let extra = (window as u64).saturating_mul(BS);
            e.locate(self.file, first, self.read_end.saturating_add(window), extra, deadline).await?;
        }
        // Verified hashes never change: only those not known before are looked up again.
        let span = match known {
            Some(span) => span,
            None => e
                .block_hashes(self.file, f, first, last + 1)
                .ok_or_else(|| Error::Corrupt(format!("no hashes for blocks {first} to {last}")))?,
        };
        let hash_of = |b: usize| span.get(b - first);
        loop {
            // What this process's fetches handed over: no need for the cache to still have it.
            let mut fetched: HashMap<Hash, Arc<[u8]>> = HashMap::new();
            // Zero blocks are never fetched; blocks an index range brought are cached.
            let to_fetch: Vec<usize> = missing.iter().copied().filter(|&b| hash_of(b).is_some_and(&absent)).collect();
            // Found stored meanwhile, then evicted before it was read: fetched after all.
            if let (Some(&a), Some(&b)) = (to_fetch.first(), to_fetch.last()) {
                if !e.located(self.file, a, b + 1) {
                    e.locate(self.file, a, b + 1, 0, deadline).await?;
                }
            }
            for (hash, w) in e.request(self.file, f, &to_fetch, self.read_end, deadline) {
                let mut rx = w.done.subscribe();
                let outcome = loop {
                    // Blocks supplied by a guest may come through another daemon on this
                    // cache: look again now and then rather than only when woken.
                    let slice = match e.cfg.fill {
                        FillSource::Supplied => deadline.min(Instant::now() + Duration::from_millis(200)),
                        FillSource::Remote => deadline,
                    };
                    match tokio::time::timeout_at(slice, rx.wait_for(|o| o.is_some())).await {
                        Err(_) if Instant::now() >= deadline => return Err(Error::Timeout),
                        Err(_) if matches!(e.cache.lookup_fresh(&hash), Ok(Some(_))) => break Outcome::Retry,
                        Err(_) => continue,
                        Ok(Err(_)) => break Outcome::Retry, // sender dropped: look again
                        Ok(Ok(o)) => break o.clone().unwrap_or(Outcome::Retry),
                    }
                };
                match outcome {
                    Outcome::Stored(data) => {
                        fetched.insert(hash, data);
                    }
                    Outcome::Retry => {}
                    Outcome::Corrupt => {
                        // Perhaps through a wrong location: the index is fetched again next time.
                        e.forget_locations(self.file, &to_fetch);
                        return Err(Error::Corrupt(
                            "the remote keeps sending data that does not match its hash".into(),
                        ));
                    }
                    Outcome::TimedOut => return Err(Error::Timeout),
                    Outcome::Failed(e) => return Err(Error::Fetch(e)),
                }
            }
            // Only what was missing: handed over, else stored by someone else.
            let mut still = Vec::new();
            for b in missing {
                if let Some(data) = hash_of(b).and_then(|h| fetched.get(h)) {
                    blocks.push((b as u32, data.clone()));
                    continue;
                }
                let mut data = vec![0u8; BLOCK_SIZE];
                if e.read_block(self.file, f, b, &mut data)? {
                    blocks.push((b as u32, data.into()));
                } else {
                    still.push(b);
                }
            }
            if still.is_empty() {
                return Ok(MissData { offset: self.offset, len: self.len, blocks, _room: None });
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
}

impl Engine {
    /// Reads `len` bytes at `offset` of file `file` into `out` (at least that long, the data
    /// starting at its base): what the cache has is copied now, never waiting; the rest is a
    /// [`Miss`]. Each block of the read is looked up in the cache once.
    pub fn read_into(
        self: &Arc<Self>,
        file: u32,
        offset: u64,
        len: u32,
        out: &mut ScatterBuf<'_>,
    ) -> Result<ReadOutcome> {
        let f = self.file(file)?;
        let (n, first, last) = Self::span(f, offset, len);
        if n as usize > out.len() {
            return Err(Error::Invalid(format!("a read of {n} bytes into a buffer of {}", out.len())));
        }
        if let Some(r) = self.recorder.get() {
            r.note(file, first, last);
        }
        let Some(hashes) = self.block_hashes(file, f, first, last) else {
            // The file's index is not loaded: the whole read waits for it.
            return Ok(ReadOutcome::Miss(Miss {
                engine: self.clone(),
                file,
                offset,
                len: n as u32,
                read_end: last,
                cached: 0,
                missing: (first as u32..last as u32).collect(),
            }));
        };
        let missing = self.copy_cached(file, &hashes, offset, offset + n, first, last, out)?;
        if missing.is_empty() {
            self.count_hit(last - first);
            return Ok(ReadOutcome::Done(n as u32));
        }
        Ok(ReadOutcome::Miss(Miss {
            engine: self.clone(),
            file,
            offset,
            len: n as u32,
            read_end: last,
            cached: (last - first - missing.len()) as u64,
            missing,
        }))
    }

    /// Reads verified plaintext, waiting for missing blocks until the read timeout. It first
    /// waits for room in the parked-bytes budget for the read and its missing blocks.
    pub async fn read(self: &Arc<Self>, file: u32, offset: u64, len: u32) -> Result<Vec<u8>> {
        let n = Self::span(self.file(file)?, offset, len).0 as usize;
        let room = self.reserve_parked(Self::room_for(n)).await;
        let mut buf = vec![0u8; n];
        self.read_within(&room, file, offset, &mut buf).await?;
        Ok(buf)
    }

    /// Room a waiting read of `n` bytes needs: its buffer, and as much again (plus the partial
    /// blocks at either end) for the blocks it waits for.
    pub fn room_for(n: usize) -> usize {
        2 * n + 2 * BLOCK_SIZE
    }

    /// Reads `out.len()` bytes at `offset` (zeroes past the end of the file) into `out`,
    /// waiting for missing blocks until the read timeout, for a caller that reserved
    /// [`Engine::room_for`] bytes; returns the bytes that are file data.
    pub async fn read_within(
        self: &Arc<Self>,
        room: &ParkedBytes,
        file: u32,
        offset: u64,
        out: &mut [u8],
    ) -> Result<usize> {
        let len = u32::try_from(out.len()).map_err(|_| Error::Invalid(format!("a read of {} bytes", out.len())))?;
        let outcome = self.read_into(file, offset, len, &mut ScatterBuf::from_slice(out))?;
        let n = match outcome {
            ReadOutcome::Done(n) => n,
            ReadOutcome::Miss(miss) => {
                let data = miss.wait_within(room).await?;
                data.write_into(&mut ScatterBuf::from_slice(out)).map_err(|e| Error::io("copy fetched blocks", e))?
            }
        };
        out[n as usize..].fill(0);
        Ok(n as usize)
    }

    /// Reads from the cache only: None when any block is missing. Never waits.
    pub fn read_cached(self: &Arc<Self>, file: u32, offset: u64, len: u32) -> Result<Option<Vec<u8>>> {
        let f = self.file(file)?;
        let mut buf = vec![0u8; Self::span(f, offset, len).0 as usize];
        Ok(self.read_cached_into(file, offset, len, &mut ScatterBuf::from_slice(&mut buf))?.map(|_| buf))
    }

    /// Reads from the cache only, into `out`: Some(bytes) when every block is cached, None
    /// otherwise (nothing counted). Never waits.
    pub fn read_cached_into(
        self: &Arc<Self>,
        file: u32,
        offset: u64,
        len: u32,
        out: &mut ScatterBuf<'_>,
    ) -> Result<Option<u32>> {
        match self.read_into(file, offset, len, out)? {
            ReadOutcome::Done(n) => Ok(Some(n)),
            ReadOutcome::Miss(_) => Ok(None),
        }
    }

    fn count_hit(&self, blocks: usize) {
        // A daemon that only hits still shows up in the cache-wide ratio now and then.
        if self.counters.reads.fetch_add(1, Relaxed) % 8192 == 8191 {
            self.flush_stats();
        }
        self.counters.cache_hits.fetch_add(blocks as u64, Relaxed);
    }

    /// Where the cache holds the blocks with `hashes` from block `first` of `file` on (None:
    /// missing, or a zero block). Hinted slots first; the index only for blocks without a hint.
    fn cached_slots(&self, file: u32, hashes: &[Hash], first: usize) -> Vec<Option<u64>> {
        let mut slots: Vec<Option<u64>> = (first..first + hashes.len())
            .map(|b| self.hint(file, b).map(|h| h.load(Relaxed)).filter(|&v| v != 0).map(|v| u64::from(v) - 1))
            .collect();
        let unhinted: Vec<usize> =
            (0..hashes.len()).filter(|&i| slots[i].is_none() && !merkle::is_zero_leaf(&hashes[i])).collect();
        if !unhinted.is_empty() {
            self.counters.cache_lookups.fetch_add(unhinted.len() as u64, Relaxed);
            let mut found = Vec::with_capacity(unhinted.len());
            self.cache.lookup_many(unhinted.iter().map(|&i| &hashes[i]), &mut found);
            for (&i, s) in unhinted.iter().zip(found) {
                slots[i] = s;
                if let Some(s) = s {
                    self.set_hint(file, first + i, s);
                }
            }
        }
        slots
    }

    /// How many blocks from `i` on are stored in consecutive slots (one copy for them all).
    fn slot_run(hashes: &[Hash], slots: &[Option<u64>], i: usize, slot: u64) -> usize {
        let mut n = 1;
        while i + n < hashes.len() && !merkle::is_zero_leaf(&hashes[i + n]) && slots[i + n] == Some(slot + n as u64) {
            n += 1;
        }
        n
    }

    /// Copies the bytes [offset, end) of blocks [first, last) of `file` (with leaf `hashes`)
    /// that the cache has into `out` (file byte `offset` at the buffer's start), zeroes zero
    /// blocks, and returns the blocks that are missing.
    #[allow(clippy::too_many_arguments)]
    fn copy_cached(
        &self,
        file: u32,
        hashes: &[Hash],
        offset: u64,
        end: u64,
        first: usize,
        last: usize,
        out: &mut ScatterBuf<'_>,
    ) -> Result<Vec<u32>> {
        let io = |e| Error::io("copy cached blocks", e);
        let mut missing = Vec::new();
        let blocks = &hashes[..last - first];
        let slots = self.cached_slots(file, blocks, first);
        let mut i = 0;
        while i < blocks.len() {
            let b = first + i;
            let start = b as u64 * BS;
            let s = start.max(offset);
            let at = (s - offset) as usize;
            if merkle::is_zero_leaf(&blocks[i]) {
                out.zero(at, ((start + BS).min(end) - s) as usize).map_err(io)?;
                i += 1;
                continue;
            }
            let Some(slot) = slots[i] else {
                missing.push(b as u32);
                i += 1;
                continue;
            };
            // A read that starts inside a block goes through a bounce buffer for that block;
            // every later block starts on a block boundary in the file and in `out`.
            let k = if s == start { Self::slot_run(blocks, &slots, i, slot) } else { 1 };
            let e = ((b + k) as u64 * BS).min(end);
            let copied = if s == start {
                self.cache.read_run_into(slot, blocks[i..i + k].iter(), out, at, (e - s) as usize)?
            } else {
                self.copy_bounced(slot, &blocks[i], (s - start) as usize, out, at, (e - s) as usize)?
            };
            if !copied {
                // Evicted or moved since the hint or the index said so. What the copy left in
                // `out` may be another block's bytes: never let the guest keep them.
                out.zero(at, (e - s) as usize).map_err(io)?;
                self.forget_hints(file, b..b + k);
                for j in b..b + k {
                    if !self.copy_one(file, &blocks[j - first], j, offset, end, out)? {
                        missing.push(j as u32);
                    }
                }
            }
            i += k;
        }
        Ok(missing)
    }

    /// Copies bytes [skip, skip + len) of the block in `slot` to [at, at + len) of `out`.
    fn copy_bounced(
        &self,
        slot: u64,
        hash: &Hash,
        skip: usize,
        out: &mut ScatterBuf<'_>,
        at: usize,
        len: usize,
    ) -> Result<bool> {
        let mut tmp = [0u8; BLOCK_SIZE];
        if !self.cache.read_run(slot, std::slice::from_ref(hash), &mut tmp)? {
            return Ok(false);
        }
        out.write(at, &tmp[skip..skip + len]).map_err(|e| Error::io("copy cached block", e))?;
        Ok(true)
    }

    /// Copies block `b` (leaf `hash`) of the read [offset, end) from wherever the cache index
    /// now says it is (after a stale slot); false if it is not cached.
    fn copy_one(
        &self,
        file: u32,
        hash: &Hash,
        b: usize,
        offset: u64,
        end: u64,
        out: &mut ScatterBuf<'_>,
    ) -> Result<bool> {
        self.counters.cache_lookups.fetch_add(1, Relaxed);
        let Some(slot) = self.cache.lookup(hash) else { return Ok(false) };
        let start = b as u64 * BS;
        let (s, e) = (start.max(offset), (start + BS).min(end));
        let ok = self.copy_bounced(slot, hash, (s - start) as usize, out, (s - offset) as usize, (e - s) as usize)?;
        if ok {
            self.set_hint(file, b, slot);
        }
        Ok(ok)
    }

    /// The plaintext of block `b` of `f` from the cache into `out` (a whole block); false if
    /// it is not cached (or its hash is not known).
    fn read_block(&self, file: u32, f: &FileData, b: usize, out: &mut [u8]) -> Result<bool> {
        let Some(hash) = self.block_hashes(file, f, b, b + 1).and_then(|mut h| h.pop()) else { return Ok(false) };
        if merkle::is_zero_leaf(&hash) {
            out.fill(0);
            return Ok(true);
        }
        let Some(slot) = self.cached_slots(file, &[hash], b)[0] else { return Ok(false) };
        if self.cache.read_run(slot, &[hash], out)? {
            return Ok(true);
        }
        self.forget_hints(file, b..b + 1);
        Ok(false)
    }
}
