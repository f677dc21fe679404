//! Mirrors: the same store's objects at other URLs (a regional cache, a P2P layer, a second
//! copy), each tried in order before the origin. Blocks and manifests verify against the image
//! id whoever serves them, so a mirror is trusted for nothing: a wrong answer is a failure
//! like a refused connection, and the next source is asked.
//!
//! Health: a mirror that fails (transport error, server error, bytes that do not verify) is
//! skipped for a back-off period that doubles with each failure in a row (from `backoff`, at
//! most 64 times it); when the period ends the next request probes it again, and a success
//! makes it healthy. A mirror that lacks an object (404, 403) is passed over for that request
//! only. The origin is always asked last and never skipped: its answer, good or bad, is what
//! the caller sees (so the engine's own retries and corruption handling apply to it).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{FetchError, Remote};
use crate::image::{Hash, ImageId};

/// Default for the first back-off of a failing mirror.
pub const DEFAULT_MIRROR_BACKOFF: Duration = Duration::from_secs(10);

/// Counters of one source, exported as metrics.
#[derive(Default, Debug)]
pub struct SourceCounters {
    /// Requests sent to it.
    pub requests: AtomicU64,
    /// Requests that failed (any error, or bytes that failed verification).
    pub failures: AtomicU64,
    /// Answers that failed verification.
    pub verify_failures: AtomicU64,
    /// Requests that passed it over while it was backing off.
    pub skipped: AtomicU64,
    /// Body bytes received from it.
    pub bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct Health {
    /// Failures in a row.
    failures: u32,
    /// Skipped until then.
    until: Option<Instant>,
}

#[derive(Debug)]
pub struct Source {
    pub remote: Remote,
    pub counters: SourceCounters,
    health: Mutex<Health>,
}

/// Mirrors in order, then the origin.
#[derive(Debug)]
pub struct Mirrors {
    sources: Vec<Source>,
    backoff: Duration,
}

impl Mirrors {
    /// `mirrors` (tried first, in order), then `origin`.
    pub fn new(origin: Remote, mirrors: Vec<Remote>, backoff: Duration) -> Self {
        let sources = mirrors
            .into_iter()
            .chain(std::iter::once(origin))
            .map(|remote| Source { remote, counters: SourceCounters::default(), health: Mutex::default() })
            .collect();
        Mirrors { sources, backoff: backoff.max(Duration::from_millis(1)) }
    }

    /// Mirrors then the origin (last).
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    pub fn origin(&self) -> &Remote {
        &self.sources[self.sources.len() - 1].remote
    }

    /// How long a mirror that failed `failures` times in a row is skipped.
    fn wait(&self, failures: u32) -> Duration {
        self.backoff * (1u32 << failures.saturating_sub(1).min(6))
    }

    /// Whether mirror `i` is asked now: not while backing off. The first request after a
    /// back-off is the probe: the others keep skipping the mirror until it has answered.
    fn usable(&self, i: usize) -> bool {
        let s = &self.sources[i];
        let mut h = s.health.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match h.until {
            Some(t) if now < t => {
                s.counters.skipped.fetch_add(1, Relaxed);
                false
            }
            Some(_) => {
                h.until = Some(now + self.wait(h.failures));
                true
            }
            None => true,
        }
    }

    fn succeeded(&self, i: usize, bytes: u64) {
        let s = &self.sources[i];
        s.counters.bytes.fetch_add(bytes, Relaxed);
        let mut h = s.health.lock().unwrap_or_else(|e| e.into_inner());
        if h.failures > 0 {
            tracing::info!(source = %s.remote.describe(), "mirror answers again");
        }
        *h = Health::default();
    }

    /// Counts a failure of source `i`; a mirror that failed in transit or sent bad bytes
    /// backs off, one that lacks the object does not.
    fn failed(&self, i: usize, why: &str, back_off: bool) {
        let s = &self.sources[i];
        s.counters.failures.fetch_add(1, Relaxed);
        if i + 1 == self.sources.len() {
            return;
        }
        if !back_off {
            tracing::debug!(source = %s.remote.describe(), "mirror lacks the object, next source: {why}");
            return;
        }
        let mut h = s.health.lock().unwrap_or_else(|e| e.into_inner());
        h.failures = h.failures.saturating_add(1);
        let wait = self.wait(h.failures);
        h.until = Some(Instant::now() + wait);
        tracing::warn!(source = %s.remote.describe(), failures = h.failures, "mirror failed, skipped for {wait:?}: {why}");
    }

    /// Whether an error means the source is unwell (back off) rather than without the object.
    fn backs_off(e: &FetchError) -> bool {
        let lacks = e.failure().status().is_some_and(|s| s.as_u16() == 404 || s.as_u16() == 403 || s.as_u16() == 410);
        !lacks
    }

    /// The manifest from the first source whose answer verifies against `id`.
    pub async fn manifest(&self, id: &ImageId) -> Result<Vec<u8>, FetchError> {
        let last = self.sources.len() - 1;
        for i in 0..=last {
            if i < last && !self.usable(i) {
                continue;
            }
            let s = &self.sources[i];
            s.counters.requests.fetch_add(1, Relaxed);
            match Box::pin(s.remote.manifest(id)).await {
                Ok(m) => {
                    self.succeeded(i, m.len() as u64);
                    return Ok(m);
                }
                Err(e) if i == last => {
                    self.failed(i, &e.to_string(), true);
                    return Err(e);
                }
                Err(e) => self.failed(i, &e.to_string(), Self::backs_off(&e)),
            }
        }
        Err(FetchError::Permanent("no source answered".into()))
    }

    /// Bytes [offset, offset+len) of a blob from the first source whose answer `check`
    /// accepts (its second value), with what `check` made of it. The origin's answer is
    /// returned whatever `check` says.
    pub async fn range_checked<T>(
        &self,
        blob: &Hash,
        offset: u64,
        len: u64,
        check: impl Fn(&Bytes) -> (T, bool),
    ) -> Result<(Bytes, T), FetchError> {
        let last = self.sources.len() - 1;
        for i in 0..=last {
            if i < last && !self.usable(i) {
                continue;
            }
            let s = &self.sources[i];
            s.counters.requests.fetch_add(1, Relaxed);
            match Box::pin(s.remote.range(blob, offset, len)).await {
                Ok(data) => {
                    let (t, ok) = check(&data);
                    if ok || i == last {
                        self.succeeded(i, data.len() as u64);
                        if !ok {
                            s.counters.verify_failures.fetch_add(1, Relaxed);
                        }
                        return Ok((data, t));
                    }
                    s.counters.verify_failures.fetch_add(1, Relaxed);
                    let why = format!("blob {} [{offset}, +{len}) failed verification", hex::encode(blob));
                    self.failed(i, &why, true);
                }
                Err(e) if i == last => {
                    self.failed(i, &e.to_string(), true);
                    return Err(e);
                }
                Err(e) => self.failed(i, &e.to_string(), Self::backs_off(&e)),
            }
        }
        Err(FetchError::Permanent("no source answered".into()))
    }

    /// Per source (`mirror0`, `mirror1`..., `origin`): requests, failures, verify failures,
    /// skips and bytes, as metric names and values.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (i, s) in self.sources.iter().enumerate() {
            let name = if i + 1 == self.sources.len() { "origin".to_string() } else { format!("mirror{i}") };
            let c = &s.counters;
            for (what, v) in [
                ("requests", &c.requests),
                ("failures", &c.failures),
                ("verify_failures", &c.verify_failures),
                ("skipped", &c.skipped),
                ("bytes", &c.bytes),
            ] {
                out.push((format!("source_{name}_{what}"), v.load(Relaxed)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_dirs() -> (tempfile::TempDir, Mirrors) {
        let d = tempfile::tempdir().expect("tmp");
        for s in ["origin", "mirror"] {
            std::fs::create_dir_all(d.path().join(s).join("images")).expect("mkdir");
        }
        let open = |s: &str| Remote::open(&d.path().join(s).to_string_lossy(), Duration::from_secs(1)).expect("store");
        let m = Mirrors::new(open("origin"), vec![open("mirror")], Duration::from_millis(100));
        (d, m)
    }

    #[test]
    fn back_off_doubles_to_64_times_and_one_probe_goes_at_a_time() {
        let (_d, m) = two_dirs();
        assert_eq!(m.wait(1), Duration::from_millis(100));
        assert_eq!(m.wait(2), Duration::from_millis(200));
        assert_eq!(m.wait(7), Duration::from_millis(6400));
        assert_eq!(m.wait(u32::MAX), Duration::from_millis(6400));

        assert!(m.usable(0));
        m.failed(0, "refused", true);
        assert!(!m.usable(0), "backing off");
        std::thread::sleep(Duration::from_millis(110));
        assert!(m.usable(0), "probed once the period is over");
        assert!(!m.usable(0), "while one probe is out, the others skip it");
        m.failed(0, "refused again", true);
        std::thread::sleep(Duration::from_millis(110));
        assert!(!m.usable(0), "the second period is twice as long");
        std::thread::sleep(Duration::from_millis(100));
        assert!(m.usable(0));
        m.succeeded(0, 1);
        assert!(m.usable(0) && m.usable(0), "healthy again");
        // A mirror without the object is passed over without backing off.
        m.failed(0, "404", false);
        assert!(m.usable(0));
        let c = m.counters();
        assert!(c.contains(&("source_mirror0_failures".to_string(), 3)), "{c:?}");
        assert!(c.contains(&("source_mirror0_skipped".to_string(), 3)), "{c:?}");
        assert!(c.iter().any(|(n, _)| n == "source_origin_requests"));
    }
}
