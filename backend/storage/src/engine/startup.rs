//! Time to ready: when the daemon started, when it began serving, when it first answered a
//! read, and what it had to fetch before it could serve (the image's manifest).
//!
//! Each instant is set once, by the daemon (start, ready) or a device after it answered a read;
//! the metrics read them. An observer only: nothing here calls back into the data path, and a
//! read that was already answered pays one relaxed load.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Nanoseconds on CLOCK_MONOTONIC: one clock for all processes of a host, so a supervisor can
/// hand its start to the worker it starts.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// The start-up of one daemon (see the module's doc).
#[derive(Debug)]
pub struct Startup {
    /// When the daemon started ([`monotonic_ns`]); the engine's open until the daemon says.
    started_ns: AtomicU64,
    /// When the device began serving; 0 until then.
    ready_ns: AtomicU64,
    /// When the first read was answered with data; 0 until then.
    first_read_ns: AtomicU64,
    /// Bytes fetched from the remote to open the image (the stored manifest; 0 if the cache
    /// had it).
    pub fetched_bytes: u64,
    /// Requests to the remote that those bytes took (failed attempts included).
    pub fetched_requests: u64,
}

impl Startup {
    pub(super) fn new(started_ns: u64, fetched_bytes: u64, fetched_requests: u64) -> Self {
        Startup {
            started_ns: AtomicU64::new(started_ns),
            ready_ns: AtomicU64::new(0),
            first_read_ns: AtomicU64::new(0),
            fetched_bytes,
            fetched_requests,
        }
    }

    /// The daemon started at `ns` ([`monotonic_ns`]), earlier than the engine: its process
    /// start, or its supervisor's. 0 (not known) keeps the engine's open.
    pub fn set_started(&self, ns: u64) {
        if ns != 0 {
            self.started_ns.store(ns, Relaxed);
        }
    }

    /// The device serves from now on.
    pub fn mark_ready(&self) {
        let _ = self.ready_ns.compare_exchange(0, monotonic_ns(), Relaxed, Relaxed);
    }

    /// A device answered a read with data; only the first one counts.
    #[inline]
    pub fn read_answered(&self) {
        if self.first_read_ns.load(Relaxed) == 0 {
            let _ = self.first_read_ns.compare_exchange(0, monotonic_ns(), Relaxed, Relaxed);
        }
    }

    /// Seconds from the start to each instant reached so far: `ready_seconds`,
    /// `first_read_seconds` (absent until reached).
    pub fn seconds(&self) -> Vec<(&'static str, f64)> {
        let start = self.started_ns.load(Relaxed);
        let since = |ns: u64| ns.saturating_sub(start) as f64 / 1e9;
        [("ready_seconds", &self.ready_ns), ("first_read_seconds", &self.first_read_ns)]
            .into_iter()
            .filter_map(|(name, at)| match at.load(Relaxed) {
                0 => None,
                ns => Some((name, since(ns))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_set_once_and_counted_from_the_start() {
        let s = Startup::new(monotonic_ns(), 0, 0);
        assert!(s.seconds().is_empty(), "nothing reached yet");
        s.set_started(monotonic_ns() - 2_000_000_000);
        s.set_started(0);
        s.mark_ready();
        let ready = s.seconds();
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].0, "ready_seconds");
        assert!((2.0..3.0).contains(&ready[0].1), "{ready:?}");
        s.read_answered();
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.read_answered();
        s.mark_ready();
        let all = s.seconds();
        assert_eq!(all[0], ready[0], "ready is kept from its first mark");
        assert_eq!(all[1].0, "first_read_seconds");
        assert!(
            all[1].1 >= all[0].1 && all[1].1 < all[0].1 + 0.015,
            "the first read counts, not the later one: {all:?}"
        );
    }
}
