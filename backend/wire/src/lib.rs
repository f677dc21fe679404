//! The wire format of virtio-incfs's control channel, defined once for both sides: the host
//! (`incfsd`, which serves the control files) and the guest (`incfs-guest`, which reads and
//! writes them). Specified in docs/pending-reads.md; every number here is that document's.
//!
//! All integers are little-endian. Decoding takes untrusted bytes (the guest decodes what the
//! host sent and the other way round): it returns a [`DecodeError`] and never panics. A
//! `decode` reads one record from the front of its input and does not look past it.

use std::ffi::CStr;
use std::fmt;

/// Size of a data block: the unit of `block` indexes in every record.
pub const BLOCK_SIZE: usize = 4096;

/// A file's incfs id.
pub type FileId = [u8; 16];
/// Length of a file id written as hex (names in `.index/`, `.incomplete/`, `.filled/`, and
/// the `user.incfs.id` xattr).
pub const FILE_ID_HEX_LEN: usize = 32;

/// Xattr of every regular file: its id as 32 lowercase hex digits.
pub const XATTR_FILE_ID: &CStr = c"user.incfs.id";
/// Xattr of every regular file: its size in bytes, le64.
pub const XATTR_FILE_SIZE: &CStr = c"user.incfs.size";

/// Names of the control files at the mount root.
pub mod names {
    pub const PENDING_READS: &str = ".pending_reads";
    pub const LOG: &str = ".log";
    pub const BLOCKS_WRITTEN: &str = ".blocks_written";
    pub const FILL: &str = ".fill";
    pub const STATS: &str = ".stats";
    pub const LAST_READ_ERROR: &str = ".last_read_error";
    /// Directory: one entry per regular file, named by its id; each entry is the file.
    pub const INDEX_DIR: &str = ".index";
    /// Directory: like [`INDEX_DIR`], only files with missing blocks.
    pub const INCOMPLETE_DIR: &str = ".incomplete";
    /// Directory: `.filled/<id>` is the fill state of that file ([`crate::FileState`]).
    pub const FILLED_DIR: &str = ".filled";
    /// Every name at the root, in the order the host has always listed them.
    pub const ALL: [&str; 9] =
        [PENDING_READS, LOG, BLOCKS_WRITTEN, FILL, STATS, LAST_READ_ERROR, INDEX_DIR, INCOMPLETE_DIR, FILLED_DIR];

    /// `.filled/<id>`, relative to the mount root.
    pub fn filled_path(id: &crate::FileId) -> String {
        format!("{FILLED_DIR}/{}", crate::file_id_to_hex(id))
    }
}

/// Why bytes did not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record needs.
    Truncated { needed: usize, got: usize },
    /// A run of read records that ends inside a record.
    PartialRecord { len: usize },
    /// `.filled/<id>`: the range count does not match the bytes after the header.
    RangeCountMismatch { count: u32, bytes: usize },
    /// `.fill`: a block's `data_len` is above [`MAX_FILL_DATA`] (the host answers E2BIG).
    DataTooLarge { len: u32 },
    /// `.fill`: reserved header bytes are not zero.
    ReservedNotZero,
    /// `.fill`: flag bits other than [`FILL_FLAG_HASH`].
    UnknownFlags { flags: u8 },
    /// `.fill`: compression other than [`COMPRESSION_NONE`] or [`COMPRESSION_ZSTD`].
    UnsupportedCompression { compression: u8 },
    /// A fixed-size value of the wrong length (the long-poll timeout write).
    WrongLength { expected: usize, got: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::Truncated { needed, got } => write!(f, "{got} bytes where {needed} are needed"),
            DecodeError::PartialRecord { len } => write!(f, "{len} bytes is not a whole number of records"),
            DecodeError::RangeCountMismatch { count, bytes } => write!(f, "{count} ranges in {bytes} bytes"),
            DecodeError::DataTooLarge { len } => write!(f, "block data of {len} bytes (at most {MAX_FILL_DATA})"),
            DecodeError::ReservedNotZero => write!(f, "reserved bytes are not zero"),
            DecodeError::UnknownFlags { flags } => write!(f, "unknown flags {flags:#04x}"),
            DecodeError::UnsupportedCompression { compression } => write!(f, "unsupported compression {compression}"),
            DecodeError::WrongLength { expected, got } => {
                write!(f, "{got} bytes where exactly {expected} are expected")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// The first `N` bytes of `b`, or how many were missing.
fn front<const N: usize>(b: &[u8]) -> Result<&[u8; N], DecodeError> {
    b.get(..N).and_then(|h| h.try_into().ok()).ok_or(DecodeError::Truncated { needed: N, got: b.len() })
}

/// `M` bytes at a fixed offset of a record whose length was already checked.
fn field<const M: usize>(record: &[u8], at: usize) -> [u8; M] {
    let mut out = [0u8; M];
    out.copy_from_slice(&record[at..at + M]);
    out
}

fn le_u32(record: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(field(record, at))
}

fn le_u64(record: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(field(record, at))
}

/// A file id as 32 lowercase hex digits.
pub fn file_id_to_hex(id: &FileId) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(FILE_ID_HEX_LEN);
    for &b in id {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A file id from exactly 32 hex digits (either case); `None` for anything else.
pub fn file_id_from_hex(hex: &[u8]) -> Option<FileId> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if hex.len() != FILE_ID_HEX_LEN {
        return None;
    }
    let mut id = [0u8; 16];
    for (byte, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(id)
}

// ---- `.pending_reads` and `.log` ----

/// Size of one read record (`incfs_pending_read_info2`).
pub const RECORD_SIZE: usize = 40;

/// One read of one block as `.pending_reads` and `.log` carry it: `incfs_pending_read_info2`,
/// `file_id[16]`, timestamp_us u64, block_index u32, serial u32, uid u32, reserved u32 (0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReadRecord {
    pub file_id: FileId,
    /// Host wall clock, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// Data block index.
    pub block: u32,
    /// Low 32 bits of the mount-wide counter of that control file.
    pub serial: u32,
    /// uid of the guest process that read.
    pub uid: u32,
}

impl ReadRecord {
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut out = [0u8; RECORD_SIZE];
        out[..16].copy_from_slice(&self.file_id);
        out[16..24].copy_from_slice(&self.timestamp_us.to_le_bytes());
        out[24..28].copy_from_slice(&self.block.to_le_bytes());
        out[28..32].copy_from_slice(&self.serial.to_le_bytes());
        out[32..36].copy_from_slice(&self.uid.to_le_bytes());
        // 36..40: reserved, zero.
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.encode());
    }

    /// The reserved field is not checked, so that a later host may use it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r = front::<RECORD_SIZE>(bytes)?;
        Ok(ReadRecord {
            file_id: field(r, 0),
            timestamp_us: le_u64(r, 16),
            block: le_u32(r, 24),
            serial: le_u32(r, 28),
            uid: le_u32(r, 32),
        })
    }

    /// The records of one READ: a whole number of them.
    pub fn decode_all(bytes: &[u8]) -> Result<Vec<Self>, DecodeError> {
        if bytes.len() % RECORD_SIZE != 0 {
            return Err(DecodeError::PartialRecord { len: bytes.len() });
        }
        bytes.chunks_exact(RECORD_SIZE).map(Self::decode).collect()
    }
}

// ---- long-poll timeout (a WRITE to `.pending_reads` or `.log`) ----

/// A WRITE to `.pending_reads` or `.log` of exactly this many bytes sets the handle's
/// long-poll timeout; any other length is refused (EINVAL).
pub const POLL_TIMEOUT_SIZE: usize = 4;
/// The host caps one long poll at this: a guest process in a FUSE request the host has
/// started answering cannot be interrupted, and the guest's hung-task detector warns at 120 s.
pub const MAX_POLL_MS: u32 = 60_000;

/// The long-poll timeout write: u32 LE milliseconds.
pub fn encode_poll_timeout(ms: u32) -> [u8; POLL_TIMEOUT_SIZE] {
    ms.to_le_bytes()
}

/// Milliseconds from a long-poll timeout write (not capped: the cap is the host's to apply).
pub fn decode_poll_timeout(bytes: &[u8]) -> Result<u32, DecodeError> {
    <[u8; POLL_TIMEOUT_SIZE]>::try_from(bytes)
        .map(u32::from_le_bytes)
        .map_err(|_| DecodeError::WrongLength { expected: POLL_TIMEOUT_SIZE, got: bytes.len() })
}

// ---- `.fill` ----

/// Size of the header before each block's data in a `.fill` write.
pub const FILL_HEADER_SIZE: usize = 32;
/// incfs's limit for one block's data (E2BIG above it).
pub const MAX_FILL_DATA: usize = 2 * BLOCK_SIZE;
/// Keep one `.fill` WRITE within this: the guest kernel then forwards it as one FUSE WRITE
/// whatever the buffer's alignment (16 pages + 1 is below every max_pages).
pub const MAX_FILL_WRITE: usize = 64 << 10;

/// Data is the block's plaintext (the last block of a file may be short).
pub const COMPRESSION_NONE: u8 = 0;
/// incfs's LZ4: not supported, refused (EINVAL). Named for the C ABI's enum.
pub const COMPRESSION_LZ4: u8 = 1;
/// Data is one zstd frame decoding to at most [`BLOCK_SIZE`] bytes.
pub const COMPRESSION_ZSTD: u8 = 2;
/// A hash-tree block (accepted and ignored: the host has the whole tree).
pub const FILL_FLAG_HASH: u8 = 1;

/// The header of one block in a `.fill` write: `id[16]`, block_index u32, data_len u32,
/// compression u8, flags u8, 6 reserved zero bytes; `data_len` bytes of data follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FillHeader {
    pub file_id: FileId,
    pub block: u32,
    pub data_len: u32,
    /// [`COMPRESSION_NONE`] or [`COMPRESSION_ZSTD`]; any value encodes (the host refuses
    /// others), only those two decode.
    pub compression: u8,
    /// [`FILL_FLAG_HASH`] or 0.
    pub flags: u8,
}

impl FillHeader {
    pub fn is_hash(&self) -> bool {
        self.flags & FILL_FLAG_HASH != 0
    }

    pub fn encode(&self) -> [u8; FILL_HEADER_SIZE] {
        let mut out = [0u8; FILL_HEADER_SIZE];
        out[..16].copy_from_slice(&self.file_id);
        out[16..20].copy_from_slice(&self.block.to_le_bytes());
        out[20..24].copy_from_slice(&self.data_len.to_le_bytes());
        out[24] = self.compression;
        out[25] = self.flags;
        // 26..32: reserved, zero.
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.encode());
    }

    /// Decodes and checks a header, in the order the host has always checked (so the first
    /// problem found decides the errno): too short, [`DecodeError::DataTooLarge`] (E2BIG),
    /// reserved bytes or unknown flags, compression (all EINVAL).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let h = front::<FILL_HEADER_SIZE>(bytes)?;
        let header = FillHeader {
            file_id: field(h, 0),
            block: le_u32(h, 16),
            data_len: le_u32(h, 20),
            compression: h[24],
            flags: h[25],
        };
        if header.data_len as usize > MAX_FILL_DATA {
            return Err(DecodeError::DataTooLarge { len: header.data_len });
        }
        if h[26..].iter().any(|&b| b != 0) {
            return Err(DecodeError::ReservedNotZero);
        }
        if header.flags & !FILL_FLAG_HASH != 0 {
            return Err(DecodeError::UnknownFlags { flags: header.flags });
        }
        if !matches!(header.compression, COMPRESSION_NONE | COMPRESSION_ZSTD) {
            return Err(DecodeError::UnsupportedCompression { compression: header.compression });
        }
        Ok(header)
    }
}

/// One block of a `.fill` write: its header and the data that follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillBlock<'a> {
    pub header: FillHeader,
    /// Exactly `header.data_len` bytes.
    pub data: &'a [u8],
}

impl<'a> FillBlock<'a> {
    /// The block at the front of `bytes` (a `.fill` write holds blocks back to back, no
    /// padding): the header's checks, then data running past the end is
    /// [`DecodeError::Truncated`].
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let header = FillHeader::decode(bytes)?;
        let end = FILL_HEADER_SIZE + header.data_len as usize;
        let data = bytes.get(FILL_HEADER_SIZE..end).ok_or(DecodeError::Truncated { needed: end, got: bytes.len() })?;
        Ok(FillBlock { header, data })
    }

    /// Bytes this block takes in the write; the next block starts there.
    pub fn encoded_len(&self) -> usize {
        FILL_HEADER_SIZE + self.data.len()
    }
}

// ---- `.filled/<id>` ----

/// Size of the `.filled/<id>` header before the ranges.
pub const FILLED_HEADER_SIZE: usize = 32;
/// Size of one `incfs_filled_range` (begin u32, end u32).
pub const FILLED_RANGE_SIZE: usize = 8;
/// `.filled/<id>` flags: every data block is present.
pub const FILLED_FLAG_FULLY_LOADED: u32 = 1;

/// `.filled/<id>`: size u64, total_blocks u32, filled_blocks u32, range_count u32, flags u32
/// ([`FILLED_FLAG_FULLY_LOADED`]), reserved u64 (0), then `range_count` `incfs_filled_range`
/// records (begin u32, end u32 exclusive, ascending).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FileState {
    /// File size in bytes.
    pub size: u64,
    pub total_blocks: u32,
    /// All-zero blocks always count as filled.
    pub filled_blocks: u32,
    pub fully_loaded: bool,
    /// [begin, end) block ranges present.
    pub ranges: Vec<(u32, u32)>,
}

impl FileState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FILLED_HEADER_SIZE + self.ranges.len() * FILLED_RANGE_SIZE);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.total_blocks.to_le_bytes());
        out.extend_from_slice(&self.filled_blocks.to_le_bytes());
        out.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        let flags = if self.fully_loaded { FILLED_FLAG_FULLY_LOADED } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        for &(begin, end) in &self.ranges {
            out.extend_from_slice(&begin.to_le_bytes());
            out.extend_from_slice(&end.to_le_bytes());
        }
        out
    }

    /// The whole file: the range count must match the bytes after the header exactly.
    /// Reserved bytes and unknown flags are not checked, so that a later host may use them.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let h = front::<FILLED_HEADER_SIZE>(bytes)?;
        let count = le_u32(h, 16);
        let body = &bytes[FILLED_HEADER_SIZE..];
        if body.len() != (count as usize).saturating_mul(FILLED_RANGE_SIZE) {
            return Err(DecodeError::RangeCountMismatch { count, bytes: body.len() });
        }
        Ok(FileState {
            size: le_u64(h, 0),
            total_blocks: le_u32(h, 8),
            filled_blocks: le_u32(h, 12),
            fully_loaded: le_u32(h, 20) & FILLED_FLAG_FULLY_LOADED != 0,
            ranges: body.chunks_exact(FILLED_RANGE_SIZE).map(|r| (le_u32(r, 0), le_u32(r, 4))).collect(),
        })
    }

    pub fn is_filled(&self, block: u32) -> bool {
        self.ranges.iter().any(|&(b, e)| block >= b && block < e)
    }

    /// Data blocks not present, ascending.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.total_blocks).filter(|&b| !self.is_filled(b)).collect()
    }
}

// ---- `.last_read_error` ----

/// `.last_read_error` is one record of this size.
pub const LAST_READ_ERROR_SIZE: usize = 40;

/// The last failed read, `.last_read_error`: `file_id[16]`, time_us u64, block u32, errno u32,
/// uid u32, reserved u32 (0). All zero (the default) when no read has failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LastReadError {
    pub file_id: FileId,
    /// Host wall clock, microseconds since the Unix epoch.
    pub time_us: u64,
    /// First missing block of the failed read.
    pub block: u32,
    /// Positive errno (62 ETIME, 74 EBADMSG, ...); 0 when no read has failed.
    pub errno: u32,
    pub uid: u32,
}

impl LastReadError {
    pub fn encode(&self) -> [u8; LAST_READ_ERROR_SIZE] {
        let mut out = [0u8; LAST_READ_ERROR_SIZE];
        out[..16].copy_from_slice(&self.file_id);
        out[16..24].copy_from_slice(&self.time_us.to_le_bytes());
        out[24..28].copy_from_slice(&self.block.to_le_bytes());
        out[28..32].copy_from_slice(&self.errno.to_le_bytes());
        out[32..36].copy_from_slice(&self.uid.to_le_bytes());
        // 36..40: reserved, zero.
        out
    }

    /// The reserved field is not checked, so that a later host may use it.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r = front::<LAST_READ_ERROR_SIZE>(bytes)?;
        Ok(LastReadError {
            file_id: field(r, 0),
            time_us: le_u64(r, 16),
            block: le_u32(r, 24),
            errno: le_u32(r, 28),
            uid: le_u32(r, 32),
        })
    }
}

// ---- `.blocks_written` ----

/// `.blocks_written`: decimal ASCII, no newline.
pub fn encode_blocks_written(blocks: u64) -> String {
    blocks.to_string()
}

/// Surrounding ASCII whitespace is tolerated; anything else that is not a decimal u64 is
/// `None`.
pub fn decode_blocks_written(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

// ---- `.stats` ----

/// `.stats`: `name value\n` lines. incfs's metric names first, then the host's own; readers
/// must ignore names they do not know.
pub mod stats {
    /// Always 0: no per-uid minimum delays.
    pub const READS_DELAYED_MIN: &str = "reads_delayed_min";
    /// Always 0: no per-uid minimum delays.
    pub const READS_DELAYED_MIN_US: &str = "reads_delayed_min_us";
    /// Reads that waited for blocks.
    pub const READS_DELAYED_PENDING: &str = "reads_delayed_pending";
    /// Total wait of those reads.
    pub const READS_DELAYED_PENDING_US: &str = "reads_delayed_pending_us";
    pub const READS_FAILED_TIMED_OUT: &str = "reads_failed_timed_out";
    pub const READS_FAILED_HASH_VERIFICATION: &str = "reads_failed_hash_verification";
    pub const READS_FAILED_OTHER: &str = "reads_failed_other";
    pub const FILL_BLOCKS_WRITTEN: &str = "fill_blocks_written";
    pub const FILL_BLOCKS_PRESENT: &str = "fill_blocks_present";
    /// Guest-supplied blocks refused (EBADMSG).
    pub const FILL_BLOCKS_REJECTED: &str = "fill_blocks_rejected";
    pub const LOG_RECORDS_DROPPED: &str = "log_records_dropped";
    /// Reads pending now.
    pub const PENDING_READS: &str = "pending_reads";
    pub const BLOCKS_WRITTEN: &str = "blocks_written";
    /// The host engine's counters follow as `engine_<name>`.
    pub const ENGINE_PREFIX: &str = "engine_";

    /// Appends one `name value\n` line.
    pub fn encode_line(out: &mut String, name: &str, value: u64) {
        out.push_str(name);
        out.push(' ');
        out.push_str(&value.to_string());
        out.push('\n');
    }

    /// The (name, value) pairs of `.stats`; lines that are not `name value` with a decimal
    /// u64 value are skipped.
    pub fn decode(text: &str) -> impl Iterator<Item = (&str, u64)> {
        text.lines().filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name, value.trim().parse().ok()?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Feeds every decoder every prefix of `bytes`; they may refuse, never panic.
    fn decode_everything(bytes: &[u8]) {
        for n in 0..=bytes.len() {
            let b = &bytes[..n];
            let _ = ReadRecord::decode(b);
            let _ = ReadRecord::decode_all(b);
            let _ = FillHeader::decode(b);
            let _ = FillBlock::decode(b);
            let _ = FileState::decode(b);
            let _ = LastReadError::decode(b);
            let _ = decode_poll_timeout(b);
            let _ = decode_blocks_written(b);
            let _ = file_id_from_hex(b);
            let _ = stats::decode(&String::from_utf8_lossy(b)).count();
        }
    }

    #[test]
    fn read_record_layout_and_round_trip() {
        let r = ReadRecord { file_id: [7; 16], timestamp_us: 55, block: 9, serial: 2, uid: 1000 };
        let b = r.encode();
        assert_eq!(&b[..16], &[7; 16]);
        assert_eq!(&b[16..24], &55u64.to_le_bytes());
        assert_eq!(&b[24..28], &9u32.to_le_bytes());
        assert_eq!(&b[28..32], &2u32.to_le_bytes());
        assert_eq!(&b[32..36], &1000u32.to_le_bytes());
        assert_eq!(&b[36..40], &[0; 4]);
        assert_eq!(ReadRecord::decode(&b), Ok(r));

        let mut two = Vec::new();
        r.encode_into(&mut two);
        ReadRecord { serial: 3, ..r }.encode_into(&mut two);
        assert_eq!(ReadRecord::decode_all(&two).map(|v| v.len()), Ok(2));
        assert_eq!(ReadRecord::decode_all(&[]), Ok(vec![]));
        assert_eq!(ReadRecord::decode_all(&two[..41]), Err(DecodeError::PartialRecord { len: 41 }));
        assert_eq!(ReadRecord::decode(&b[..39]), Err(DecodeError::Truncated { needed: 40, got: 39 }));
    }

    #[test]
    fn fill_header_layout_round_trip_and_checks_in_the_hosts_order() {
        let h = FillHeader { file_id: [1; 16], block: 5, data_len: 3, compression: COMPRESSION_ZSTD, flags: 1 };
        let b = h.encode();
        assert_eq!(&b[16..20], &5u32.to_le_bytes());
        assert_eq!(&b[20..24], &3u32.to_le_bytes());
        assert_eq!((b[24], b[25]), (2, 1));
        assert_eq!(&b[26..32], &[0u8; 6]);
        assert_eq!(FillHeader::decode(&b), Ok(h));
        assert!(h.is_hash());

        let mut block = b.to_vec();
        block.extend_from_slice(b"xyz and the next block");
        let fb = FillBlock::decode(&block).expect("decode");
        assert_eq!((fb.header, fb.data, fb.encoded_len()), (h, &b"xyz"[..], FILL_HEADER_SIZE + 3));
        assert_eq!(FillBlock::decode(&block[..34]), Err(DecodeError::Truncated { needed: 35, got: 34 }));

        let with = |f: &dyn Fn(&mut [u8; FILL_HEADER_SIZE])| {
            let mut b = h.encode();
            f(&mut b);
            FillHeader::decode(&b)
        };
        assert_eq!(
            with(&|b| b[20..24].copy_from_slice(&(MAX_FILL_DATA as u32).to_le_bytes())).map(|h| h.data_len),
            Ok(8192)
        );
        assert_eq!(
            with(&|b| b[20..24].copy_from_slice(&8193u32.to_le_bytes())),
            Err(DecodeError::DataTooLarge { len: 8193 })
        );
        // Too large wins over every EINVAL problem (E2BIG before EINVAL, as the host does).
        assert_eq!(
            with(&|b| {
                b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
                b[31] = 1;
                b[25] = 0x80;
                b[24] = 9;
            }),
            Err(DecodeError::DataTooLarge { len: u32::MAX })
        );
        assert_eq!(with(&|b| b[31] = 1), Err(DecodeError::ReservedNotZero));
        assert_eq!(with(&|b| b[25] = 2), Err(DecodeError::UnknownFlags { flags: 2 }));
        assert_eq!(with(&|b| b[24] = COMPRESSION_LZ4), Err(DecodeError::UnsupportedCompression { compression: 1 }));
        assert_eq!(with(&|b| b[24] = COMPRESSION_NONE).map(|h| h.compression), Ok(0));
        assert_eq!(FillHeader::decode(&b[..31]), Err(DecodeError::Truncated { needed: 32, got: 31 }));
    }

    #[test]
    fn file_state_layout_round_trip_and_range_count_check() {
        let s = FileState {
            size: 20580,
            total_blocks: 6,
            filled_blocks: 3,
            fully_loaded: false,
            ranges: vec![(0, 2), (5, 6)],
        };
        let mut b = s.encode();
        assert_eq!(b.len(), FILLED_HEADER_SIZE + 2 * FILLED_RANGE_SIZE);
        assert_eq!(&b[..8], &20580u64.to_le_bytes());
        assert_eq!(&b[16..20], &2u32.to_le_bytes());
        assert_eq!(&b[20..32], &[0; 12]);
        assert_eq!(&b[32..40], &[0, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(FileState::decode(&b), Ok(s.clone()));
        assert_eq!(s.missing(), vec![2, 3, 4]);

        let full = FileState { fully_loaded: true, ..FileState::default() };
        assert_eq!(&full.encode()[20..24], &1u32.to_le_bytes());
        assert_eq!(FileState::decode(&full.encode()), Ok(full));

        // A range count that does not match the bytes is refused, not trusted.
        b[16] = 200;
        assert_eq!(FileState::decode(&b), Err(DecodeError::RangeCountMismatch { count: 200, bytes: 16 }));
        b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(FileState::decode(&b).is_err());
        assert_eq!(FileState::decode(&b[..10]), Err(DecodeError::Truncated { needed: 32, got: 10 }));
    }

    #[test]
    fn last_read_error_layout_and_round_trip() {
        let e = LastReadError { file_id: [3; 16], time_us: 1 << 40, block: 17, errno: 62, uid: 2000 };
        let b = e.encode();
        assert_eq!(&b[24..28], &17u32.to_le_bytes());
        assert_eq!(&b[28..32], &62u32.to_le_bytes());
        assert_eq!(&b[36..], &[0; 4]);
        assert_eq!(LastReadError::decode(&b), Ok(e));
        assert_eq!(LastReadError::default().encode(), [0; LAST_READ_ERROR_SIZE]);
        assert!(LastReadError::decode(&b[..39]).is_err());
    }

    #[test]
    fn small_values_round_trip() {
        assert_eq!(decode_poll_timeout(&encode_poll_timeout(1500)), Ok(1500));
        assert_eq!(encode_poll_timeout(MAX_POLL_MS), 60_000u32.to_le_bytes());
        assert_eq!(decode_poll_timeout(&[1, 2, 3]), Err(DecodeError::WrongLength { expected: 4, got: 3 }));
        assert!(decode_poll_timeout(&[0; 8]).is_err());

        assert_eq!(decode_blocks_written(encode_blocks_written(12345).as_bytes()), Some(12345));
        assert_eq!(decode_blocks_written(b" 7\n"), Some(7));
        assert_eq!(decode_blocks_written(b"-1"), None);

        let mut text = String::new();
        stats::encode_line(&mut text, stats::READS_FAILED_TIMED_OUT, 4);
        stats::encode_line(&mut text, "engine_timeouts", 9);
        text.push_str("garbage\nname notanumber\n");
        assert_eq!(text.lines().next(), Some("reads_failed_timed_out 4"));
        assert_eq!(
            stats::decode(&text).collect::<Vec<_>>(),
            vec![("reads_failed_timed_out", 4), ("engine_timeouts", 9)]
        );
    }

    #[test]
    fn file_ids_round_trip_through_hex_and_names() {
        let id: FileId = *b"0123456789abcdef";
        let hex = file_id_to_hex(&id);
        assert_eq!(hex, "30313233343536373839616263646566");
        assert_eq!(file_id_from_hex(hex.as_bytes()), Some(id));
        assert_eq!(file_id_from_hex(hex.to_uppercase().as_bytes()), Some(id));
        assert_eq!(file_id_from_hex(&hex.as_bytes()[..31]), None);
        assert_eq!(file_id_from_hex(b"zz3456789abcdef0123456789abcdef0"), None);
        assert_eq!(names::filled_path(&id), format!(".filled/{hex}"));
        assert_eq!(names::ALL.len(), 9);
        assert_eq!(XATTR_FILE_ID.to_bytes(), b"user.incfs.id");
        assert_eq!(XATTR_FILE_SIZE.to_bytes(), b"user.incfs.size");
    }

    #[test]
    fn decoding_truncated_and_random_bytes_never_panics() {
        // Valid encodings cut short anywhere.
        let mut valid = ReadRecord { file_id: [9; 16], ..Default::default() }.encode().to_vec();
        valid.extend_from_slice(
            &FileState { total_blocks: 3, ranges: vec![(0, 1), (2, 3)], ..Default::default() }.encode(),
        );
        decode_everything(&valid);
        let fill = FillHeader { data_len: 100, ..Default::default() }.encode();
        decode_everything(&fill);
        // Garbage of every length up to a few records, many seeds.
        for seed in 0..300u64 {
            decode_everything(&noise(seed, (seed as usize * 7) % 131));
        }
        // Garbage with plausible headers: huge counts and lengths.
        let mut huge = vec![0xffu8; 64];
        huge[24] = 0;
        huge[25] = 0;
        decode_everything(&huge);
    }
}
