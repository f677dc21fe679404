//! Pending reads and the read log: the control channel as a [`ReadObserver`] of image-file
//! reads, and the long-polled `.pending_reads` and `.log` files that show them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use incfs_fuse::Errno;
use tokio::time::Instant;

use super::{lock, now_us, Control, LastError, LOG_CAPACITY};
use crate::fs::ReadObserver;

/// One read of one block, as `.pending_reads` and `.log` show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRecord {
    pub file_id: [u8; 16],
    pub timestamp_us: u64,
    pub block: u32,
    /// Internally 64-bit (never wraps); the record carries the low 32 bits, as incfs.
    pub serial: u64,
    pub uid: u32,
}

impl ReadRecord {
    pub fn encode(&self, out: &mut Vec<u8>) {
        incfs_wire::ReadRecord {
            file_id: self.file_id,
            timestamp_us: self.timestamp_us,
            block: self.block,
            serial: self.serial as u32,
            uid: self.uid,
        }
        .encode_into(out);
    }
}

#[derive(Default)]
pub(super) struct PendingTable {
    pub(super) records: BTreeMap<u64, ReadRecord>,
    pub(super) next_serial: u64,
}

#[derive(Default)]
pub(super) struct ReadLog {
    pub(super) ring: VecDeque<ReadRecord>,
    pub(super) next_serial: u64,
}

impl Control {
    /// Records a failed read of an image file (the last read error and the counters).
    fn note_failure(&self, file_id: [u8; 16], block: u32, errno: Errno, uid: u32) {
        let c = match errno {
            libc::ETIME => &self.counters.reads_failed_timed_out,
            libc::EBADMSG => &self.counters.reads_failed_hash_verification,
            _ => &self.counters.reads_failed_other,
        };
        c.fetch_add(1, Relaxed);
        *lock(&self.last_error) = Some(LastError { file_id, time_us: now_us(), block, errno: errno as u32, uid });
    }

    /// Currently pending reads (for tests and diagnostics).
    pub fn pending_now(&self) -> Vec<ReadRecord> {
        lock(&self.pending).records.values().copied().collect()
    }

    pub fn last_error(&self) -> Option<LastError> {
        *lock(&self.last_error)
    }

    /// Records with serial above the handle's cursor, at most `max`; advances the cursor.
    pub(super) fn take_records(&self, fh: u64, log: bool, max: usize) -> Vec<u8> {
        let mut handles = lock(&self.handles);
        let Some(h) = handles.get_mut(&fh) else { return Vec::new() };
        let mut out = Vec::new();
        let mut last = h.cursor;
        if log {
            let l = lock(&self.log);
            // The ring is in serial order: skip what this handle has seen.
            let oldest = l.ring.front().map(|r| r.serial).unwrap_or(l.next_serial);
            let skip = h.cursor.saturating_add(1).saturating_sub(oldest);
            for r in l.ring.iter().skip(usize::try_from(skip).unwrap_or(usize::MAX)).take(max) {
                r.encode(&mut out);
                last = r.serial;
            }
        } else {
            let p = lock(&self.pending);
            for r in p.records.range(h.cursor.saturating_add(1)..).map(|(_, r)| r).take(max) {
                r.encode(&mut out);
                last = r.serial;
            }
        }
        let moved = h.cursor != last;
        h.cursor = last;
        if moved {
            self.handles_changed(&handles);
        }
        out
    }

    pub(super) async fn long_poll(self: Arc<Self>, fh: u64, log: bool, max: usize, deadline: Instant) -> Vec<u8> {
        let mut rx = if log { self.log_tx.subscribe() } else { self.pending_tx.subscribe() };
        loop {
            // Mark the current value seen before looking, so a record registered after the
            // look wakes the wait below.
            rx.borrow_and_update();
            let out = self.take_records(fh, log, max);
            if !out.is_empty() || Instant::now() >= deadline {
                return out;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Vec::new(),
            }
        }
    }
}

/// The control channel watches reads of image files: every read goes to `.log`, a read that
/// waits puts one record per missing block in `.pending_reads` until it ends, a failure
/// becomes `.last_read_error`.
impl ReadObserver for Control {
    fn read_started(&self, file: u32, first: u32, last: u32, uid: u32) {
        let Some(id) = self.id_of(file) else { return };
        let ts = now_us();
        let serial = {
            let mut log = lock(&self.log);
            for block in first..last {
                if log.ring.len() >= LOG_CAPACITY {
                    log.ring.pop_front();
                    self.counters.log_records_dropped.fetch_add(1, Relaxed);
                }
                let serial = log.next_serial;
                log.next_serial += 1;
                log.ring.push_back(ReadRecord { file_id: id, timestamp_us: ts, block, serial, uid });
            }
            log.next_serial
        };
        self.log_tx.send_replace(serial);
    }

    fn read_parked(&self, file: u32, missing: &[u32], uid: u32) -> Vec<u64> {
        let id = self.id_of(file).unwrap_or_default();
        let ts = now_us();
        let serials: Vec<u64> = {
            let mut p = lock(&self.pending);
            missing
                .iter()
                .map(|&block| {
                    let serial = p.next_serial;
                    p.next_serial += 1;
                    p.records.insert(serial, ReadRecord { file_id: id, timestamp_us: ts, block, serial, uid });
                    serial
                })
                .collect()
        };
        if let Some(&last) = serials.last() {
            self.pending_tx.send_replace(last);
        }
        serials
    }

    fn read_ended(&self, parked: Vec<u64>, waited: Duration) {
        {
            let mut p = lock(&self.pending);
            for s in &parked {
                p.records.remove(s);
            }
        }
        self.counters.reads_delayed_pending.fetch_add(1, Relaxed);
        self.counters.reads_delayed_pending_us.fetch_add(waited.as_micros() as u64, Relaxed);
    }

    fn read_failed(&self, file: u32, block: u32, errno: Errno, uid: u32) {
        self.note_failure(self.id_of(file).unwrap_or_default(), block, errno, uid);
    }
}
