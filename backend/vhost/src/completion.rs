//! Completing a chain: writing into its writable descriptors and putting it on the used ring.
//!
//! Every completion happens under the vring's lock and only if the queue is still the one
//! the chain came from (same generation, still ready): GET_VRING_BASE marks the queue not
//! ready under the same lock, and a device reset or a disconnect bumps the generation, so a
//! stale completion is dropped instead of being written into buffers the guest may have
//! reused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use incfs_buf::ScatterBuf;
use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::chain::{guest_buf, Region};
use crate::inflight::QueueInflight;
use crate::queue::QueueState;
use crate::Mem;

/// Completes one popped chain. The device gets one per chain in
/// [`Device::process`](crate::Device::process), on the queue's worker thread: completions
/// made there are signalled to the guest once for the whole batch. To complete later (from a
/// tokio task), [`detach`](Completer::detach) it first; a detached completer signals the
/// guest itself (as EVENT_IDX allows).
pub struct Completer<'batch> {
    vring: VringRwLock,
    mem: Mem,
    queue: Arc<QueueState>,
    generation: u64,
    event_idx: bool,
    head: u16,
    /// Set when a completion of the batch added a used entry; None once detached.
    batch: Option<&'batch AtomicBool>,
    /// The queue's inflight tracking, if the frontend set it up.
    inflight: Option<Arc<QueueInflight>>,
}

impl<'batch> Completer<'batch> {
    pub(crate) fn new(
        vring: VringRwLock,
        mem: Mem,
        queue: Arc<QueueState>,
        generation: u64,
        event_idx: bool,
        head: u16,
        batch: &'batch AtomicBool,
    ) -> Self {
        let inflight = queue.inflight();
        Completer { vring, mem, queue, generation, event_idx, head, batch: Some(batch), inflight }
    }

    /// The chain's head descriptor index.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Whether the queue is still the one the chain came from: false once it was stopped or
    /// reset. A device that has not yet acted on a chain of a stopped queue should not: with
    /// inflight tracking the chain is resubmitted when the queue starts again.
    pub fn is_current(&self) -> bool {
        self.queue.generation.load(Ordering::Acquire) == self.generation
    }

    /// A completer that may outlive the queue thread's batch (be moved into a task), and
    /// signals the guest itself when it completes.
    pub fn detach(self) -> Completer<'static> {
        Completer {
            vring: self.vring,
            mem: self.mem,
            queue: self.queue,
            generation: self.generation,
            event_idx: self.event_idx,
            head: self.head,
            batch: None,
            inflight: self.inflight,
        }
    }

    /// Hands `regions` (writable descriptors of the chain) to `fill` as host memory and puts
    /// the chain on the used ring with the length `fill` returns, all under the vring lock.
    /// Returns whether the chain went on the used ring: not if the queue was stopped
    /// meanwhile (the chain is dropped for good) or `fill` returned None (the chain stays
    /// with the device, which completes it later). A region that is no longer guest memory
    /// returns the chain empty.
    pub fn fill(&self, regions: &[Region], fill: impl FnOnce(&mut ScatterBuf<'_>) -> Option<u32>) -> bool {
        self.finish(|mem| {
            // SAFETY: the chain is popped and not yet used, so the device owns `regions`
            // (checked against guest memory by the walk, and again by guest_buf); `mem`
            // keeps them mapped until `buf` is dropped, whatever the frontend does to the
            // memory table meanwhile.
            let Some(mut buf) = (unsafe { guest_buf(mem, regions) }) else {
                // Not guest memory any more: the chain goes back empty rather than never.
                return Some(0);
            };
            fill(&mut buf)
        })
    }

    /// Copies `parts`, one after the other, into `regions` and puts the chain on the used
    /// ring with the bytes written. If they do not fit (or a region is no longer guest
    /// memory), nothing is written and the used length is 0. Returns whether the chain went
    /// on the used ring (not if the queue was stopped).
    pub fn write(&self, regions: &[Region], parts: &[&[u8]]) -> bool {
        self.finish(|mem| {
            let total: usize = parts.iter().map(|p| p.len()).sum();
            // SAFETY: as in `fill`.
            let written = unsafe { guest_buf(mem, regions) }.and_then(|mut buf| {
                if total > buf.len() {
                    // Devices size their replies to fit: not reachable unless one has a bug.
                    warn!(head = self.head, total, room = buf.len(), "reply did not fit the writable descriptors");
                    return None;
                }
                let mut at = 0;
                for p in parts {
                    buf.write(at, p).ok()?;
                    at += p.len();
                }
                u32::try_from(at).ok()
            });
            Some(written.unwrap_or(0))
        })
    }

    /// Puts the chain on the used ring with nothing written. Returns whether it did (not if
    /// the queue was stopped).
    pub fn complete_empty(&self) -> bool {
        self.finish(|_| Some(0))
    }

    /// Under the vring lock: if the queue is still current, runs `write` and, if it returns a
    /// length, adds the used entry and signals (detached) or marks the batch.
    fn finish(&self, write: impl FnOnce(&GuestMemoryMmap) -> Option<u32>) -> bool {
        // Hold the vring lock across check, write and add_used, so GET_VRING_BASE (which
        // marks the queue not ready under the same lock) cannot interleave.
        let mut state = self.vring.get_mut();
        if self.queue.generation.load(Ordering::Acquire) != self.generation || !state.get_queue().ready() {
            debug!(head = self.head, "dropping completion for a stopped queue");
            return false;
        }
        let mem = self.mem.memory();
        let Some(len) = write(&mem) else {
            return false;
        };
        // With inflight tracking: the area names this chain before its used entry is
        // published and unmarks it after, so a backend restarted in between knows which.
        if let Some(inflight) = &self.inflight {
            inflight.using(self.head);
        }
        if let Err(e) = state.add_used(self.head, len) {
            warn!(head = self.head, error = %e, "add_used failed");
            return false;
        }
        if let Some(inflight) = &self.inflight {
            inflight.used(self.head, state.get_queue().next_used());
        }
        let _ = self.queue.drain.outstanding.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        match self.batch {
            Some(batch) => batch.store(true, Ordering::Relaxed),
            None => {
                let needed = !self.event_idx || state.needs_notification().unwrap_or(true);
                if needed {
                    if let Err(e) = state.signal_used_queue() {
                        warn!(error = %e, "cannot signal used queue");
                    }
                }
            }
        }
        true
    }
}
