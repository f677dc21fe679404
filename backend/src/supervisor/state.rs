//! The worker's state region: what a fresh worker needs to serve on and QEMU will not send
//! again (the FUSE session negotiated at INIT, the control channel's open handles). A memfd the supervisor creates once per
//! frontend connection and hands to every worker; the worker writes it whenever the state
//! changes and reads it when it starts.
//!
//! ```text
//! header (16 bytes)   magic u64, version u32, slot size u32
//! slot 0, slot 1      generation u64, len u32, checksum u32, data[len]
//! data (version 1)    session: 0, or 1 then major, minor, flags, max_readahead, max_write
//!                     (u32 each), max_pages u16; next_fh u64, handle count u32, then per
//!                     handle fh u64, ino u64, cursor u64, timeout_ms u32 (little-endian)
//! ```
//!
//! A write goes to the slot not holding the newest record and publishes it by writing its
//! generation last, so a worker killed at any instant leaves the previous record intact: a
//! reader takes the valid slot (checksum right) with the highest generation. A worker that
//! finds a version it does not know refuses to start.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;

use incfs_fuse::InitInfo;

use crate::control::{HandleObserver, SavedHandle, SavedHandles, MAX_HANDLES};

const MAGIC: u64 = u64::from_le_bytes(*b"incfsWST");
/// Version of the layout and of the record format. A worker only reads its own.
pub const VERSION: u32 = 1;
const HEADER: usize = 16;
const SLOT_HEADER: usize = 16;
/// Bytes of one handle's record.
const HANDLE_BYTES: usize = 28;
/// Bytes of one slot, its header included: room for every handle the control channel allows.
const SLOT: usize = (SLOT_HEADER + 64 + MAX_HANDLES * HANDLE_BYTES).next_multiple_of(4096);
/// Bytes of the region.
pub const REGION_SIZE: usize = HEADER + 2 * SLOT;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state region: {0}")]
    Io(#[from] io::Error),
    #[error("state region is not one (bad magic or size)")]
    NotARegion,
    #[error("state region version {0} is not known to this incfsd (it knows {VERSION})")]
    UnknownVersion(u32),
    #[error("device state from a migration is malformed")]
    BadDeviceState,
}

/// The device state a live migration carries (SET_DEVICE_STATE_FD): the record a worker keeps
/// for its successor, framed as `magic u64, version u32, record`. A destination refuses a
/// version it does not know, as a worker does (docs/migration.md).
const DEVICE_STATE_MAGIC: u64 = u64::from_le_bytes(*b"incfsDST");

pub fn encode_device_state(state: &WorkerState) -> Vec<u8> {
    let mut out = DEVICE_STATE_MAGIC.to_le_bytes().to_vec();
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&state.encode());
    out
}

pub fn decode_device_state(bytes: &[u8]) -> Result<WorkerState, StateError> {
    let mut r = Reader(bytes);
    if r.u64() != Some(DEVICE_STATE_MAGIC) {
        return Err(StateError::BadDeviceState);
    }
    match r.u32() {
        Some(VERSION) => WorkerState::decode(r.0).ok_or(StateError::BadDeviceState),
        Some(v) => Err(StateError::UnknownVersion(v)),
        None => Err(StateError::BadDeviceState),
    }
}

/// What a worker keeps for its successor.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkerState {
    /// The FUSE session, once the guest's INIT was answered.
    pub session: Option<InitInfo>,
    /// The control channel's open handles.
    pub handles: SavedHandles,
}

impl WorkerState {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.handles.handles.len() * HANDLE_BYTES);
        match &self.session {
            None => out.push(0),
            Some(s) => {
                out.push(1);
                for v in [s.major, s.minor, s.flags, s.max_readahead, s.max_write] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&s.max_pages.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.handles.next_fh.to_le_bytes());
        let handles = &self.handles.handles[..self.handles.handles.len().min(MAX_HANDLES)];
        out.extend_from_slice(&(handles.len() as u32).to_le_bytes());
        for h in handles {
            for v in [h.fh, h.ino, h.cursor] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&h.timeout_ms.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8]) -> Option<WorkerState> {
        let mut r = Reader(b);
        let session = match r.u8()? {
            0 => None,
            1 => {
                let (major, minor, flags, max_readahead, max_write) =
                    (r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?);
                Some(InitInfo { major, minor, flags, max_readahead, max_write, max_pages: r.u16()? })
            }
            _ => return None,
        };
        let next_fh = r.u64()?;
        let count = r.u32()? as usize;
        if count > MAX_HANDLES {
            return None;
        }
        let mut handles = Vec::with_capacity(count);
        for _ in 0..count {
            handles.push(SavedHandle { fh: r.u64()?, ino: r.u64()?, cursor: r.u64()?, timeout_ms: r.u32()? });
        }
        if !r.0.is_empty() {
            return None;
        }
        Some(WorkerState { session, handles: SavedHandles { next_fh, handles } })
    }
}

/// Little-endian fields from a record, in order.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

/// FNV-1a over the record: tells a torn or scribbled slot from a written one.
fn checksum(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The region, mapped.
pub struct StateRegion {
    map: memmap2::MmapRaw,
    /// Serializes writers; the newest record and its generation.
    newest: Mutex<(u64, WorkerState)>,
}

impl StateRegion {
    /// A new, empty region (the supervisor, once per frontend connection).
    pub fn create() -> Result<OwnedFd, StateError> {
        // SAFETY: a NUL-terminated name and plain flags; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(c"incfs-worker-state".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(REGION_SIZE as u64)?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(SLOT as u32).to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&file, &header, 0)?;
        Ok(file.into())
    }

    /// Maps the region in `file` (a worker), checking its header.
    pub fn open(file: &File) -> Result<StateRegion, StateError> {
        if file.metadata()?.len() < REGION_SIZE as u64 {
            return Err(StateError::NotARegion);
        }
        let map = memmap2::MmapOptions::new().len(REGION_SIZE).map_raw(file)?;
        let region = StateRegion { map, newest: Mutex::new((0, WorkerState::default())) };
        let mut header = [0u8; HEADER];
        region.read(0, &mut header);
        let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        if header[..8] != MAGIC.to_le_bytes() {
            return Err(StateError::NotARegion);
        }
        if word(8) != VERSION {
            return Err(StateError::UnknownVersion(word(8)));
        }
        if word(12) as usize != SLOT {
            return Err(StateError::NotARegion);
        }
        let generation = (0..2).filter_map(|s| region.slot(s).map(|(g, _)| g)).max().unwrap_or(0);
        let state = region.load();
        *region.newest.lock().unwrap_or_else(|e| e.into_inner()) = (generation, state);
        Ok(region)
    }

    fn generation(&self, slot: usize) -> &AtomicU64 {
        // SAFETY: the slot header is inside the mapping (REGION_SIZE checked at open), 8-byte
        // aligned (page-aligned map, HEADER and SLOT multiples of 8), and lives as long as
        // `self`; an atomic because another process may have written it.
        unsafe { &*(self.map.as_mut_ptr().add(HEADER + slot * SLOT) as *const AtomicU64) }
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        let end = off.saturating_add(buf.len()).min(REGION_SIZE);
        let n = end.saturating_sub(off);
        // SAFETY: [off, off + n) lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), n) }
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= REGION_SIZE, "state region write out of bounds");
        // SAFETY: checked just above to lie inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(off), data.len()) }
    }

    /// Slot `s`'s generation and record, if it holds a valid one.
    fn slot(&self, s: usize) -> Option<(u64, Vec<u8>)> {
        let generation = self.generation(s).load(Ordering::Acquire);
        if generation == 0 {
            return None;
        }
        let base = HEADER + s * SLOT;
        let mut hdr = [0u8; 8];
        self.read(base + 8, &mut hdr);
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let sum = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        if len > SLOT - SLOT_HEADER {
            return None;
        }
        let mut data = vec![0u8; len];
        self.read(base + SLOT_HEADER, &mut data);
        (checksum(&data) == sum).then_some((generation, data))
    }

    /// The newest record, or the empty state if none was written (or none is readable).
    pub fn load(&self) -> WorkerState {
        let newest = (0..2).filter_map(|s| self.slot(s)).max_by_key(|(g, _)| *g);
        newest.and_then(|(_, data)| WorkerState::decode(&data)).unwrap_or_default()
    }

    /// Writes `state` as the newest record.
    pub fn store(&self, state: &WorkerState) {
        self.update(|s| *s = state.clone());
    }

    /// Changes the newest record with `change` and writes it.
    pub fn update(&self, change: impl FnOnce(&mut WorkerState)) {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut newest.1);
        let data = newest.1.encode();
        // The slot not holding the newest record (slot of generation g is g % 2).
        let next = newest.0 + 1;
        let s = (next % 2) as usize;
        let base = HEADER + s * SLOT;
        // Invalidate first, so a torn write is never taken for the old record of this slot.
        self.generation(s).store(0, Ordering::Release);
        fence(Ordering::SeqCst);
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&(data.len() as u32).to_le_bytes());
        hdr[4..].copy_from_slice(&checksum(&data).to_le_bytes());
        self.write(base + 8, &hdr);
        self.write(base + SLOT_HEADER, &data);
        fence(Ordering::SeqCst);
        self.generation(s).store(next, Ordering::Release);
        newest.0 = next;
    }
}

impl incfs_fuse::SessionObserver for StateRegion {
    fn session_changed(&self, session: Option<&InitInfo>) {
        self.update(|s| s.session = session.copied());
    }
}

impl HandleObserver for StateRegion {
    fn handles_changed(&self, handles: SavedHandles) {
        self.update(|s| s.handles = handles);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region() -> (File, StateRegion) {
        let file = File::from(StateRegion::create().expect("create"));
        let region = StateRegion::open(&file).expect("open");
        (file, region)
    }

    fn session(minor: u32) -> WorkerState {
        WorkerState {
            handles: SavedHandles {
                next_fh: 9,
                handles: vec![SavedHandle { fh: 3, ino: 1 << 62 | 1, cursor: 17, timeout_ms: 500 }],
            },
            session: Some(InitInfo {
                major: 7,
                minor,
                flags: 0x1234,
                max_readahead: 1 << 20,
                max_write: 1 << 20,
                max_pages: 256,
            }),
        }
    }

    /// A migration's device state: what was saved loads back; another version, garbage, a
    /// truncated or padded record, or too many handles are refused, never trusted.
    #[test]
    fn device_state_round_trip_and_hostile_bytes() {
        let state = session(31);
        let bytes = encode_device_state(&state);
        assert_eq!(decode_device_state(&bytes).expect("decode"), state);
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert!(matches!(decode_device_state(&other), Err(StateError::UnknownVersion(v)) if v == VERSION + 1));
        for bad in [&bytes[..bytes.len() - 1], &[&bytes[..], &[0]].concat()[..], b"incfsDST", b"junk", &[][..]] {
            assert!(matches!(decode_device_state(bad), Err(StateError::BadDeviceState)), "{bad:?}");
        }
        let mut many = bytes[..12].to_vec();
        many.push(0);
        many.extend_from_slice(&1u64.to_le_bytes());
        many.extend_from_slice(&(MAX_HANDLES as u32 + 1).to_le_bytes());
        assert!(matches!(decode_device_state(&many), Err(StateError::BadDeviceState)));
    }

    #[test]
    fn empty_then_the_newest_record_across_processes() {
        let (file, region) = region();
        assert_eq!(region.load(), WorkerState::default());
        for minor in 30..35 {
            region.store(&session(minor));
            // A successor maps the same memfd.
            let successor = StateRegion::open(&file).expect("reopen");
            assert_eq!(successor.load(), session(minor));
        }
        region.update(|s| s.session = None);
        let reopened = StateRegion::open(&file).expect("reopen").load();
        assert_eq!((reopened.session, reopened.handles), (None, session(0).handles), "one field changed");
        region.store(&WorkerState::default());
        assert_eq!(StateRegion::open(&file).expect("reopen").load(), WorkerState::default());
    }

    #[test]
    fn a_write_torn_by_a_kill_leaves_the_previous_record() {
        let (file, region) = region();
        region.store(&session(31));
        region.store(&session(32));
        // Killed in the middle of the third write: slot 1 (generation 3's) invalidated and
        // half written.
        region.generation(1).store(0, Ordering::Release);
        region.write(HEADER + SLOT + SLOT_HEADER, &[0xff; 7]);
        assert_eq!(StateRegion::open(&file).expect("reopen").load(), session(32));
        // Killed after the data but with a checksum that does not match (scribbled).
        region.generation(1).store(3, Ordering::Release);
        assert_eq!(StateRegion::open(&file).expect("reopen").load(), session(32));
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let (file, _region) = region();
        std::os::unix::fs::FileExt::write_all_at(&file, &2u32.to_le_bytes(), 8).expect("write");
        assert!(matches!(StateRegion::open(&file), Err(StateError::UnknownVersion(2))));
        std::os::unix::fs::FileExt::write_all_at(&file, b"notmagic", 0).expect("write");
        assert!(matches!(StateRegion::open(&file), Err(StateError::NotARegion)));
    }

    #[test]
    fn garbage_records_decode_to_nothing() {
        assert_eq!(WorkerState::decode(&[]), None);
        assert_eq!(WorkerState::decode(&[1, 2, 3]), None);
        assert_eq!(WorkerState::decode(&[7]), None);
        let s = session(38);
        let bytes = s.encode();
        assert_eq!(WorkerState::decode(&bytes), Some(s));
        assert_eq!(WorkerState::decode(&bytes[..bytes.len() - 1]), None, "truncated");
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(WorkerState::decode(&longer), None, "trailing bytes");
        let mut many = vec![0u8];
        many.extend_from_slice(&1u64.to_le_bytes());
        many.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(WorkerState::decode(&many), None, "a count over the bound");
        let full = WorkerState {
            session: None,
            handles: SavedHandles {
                next_fh: 1,
                handles: (0..MAX_HANDLES as u64)
                    .map(|fh| SavedHandle { fh, ino: 1, cursor: u64::MAX, timeout_ms: 1 })
                    .collect(),
            },
        };
        assert!(full.encode().len() <= SLOT - SLOT_HEADER, "every handle fits a slot");
    }
}
