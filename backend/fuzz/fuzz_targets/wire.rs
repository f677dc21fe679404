//! Every decoder of the control channel's wire format (`incfs_wire`, linked by the host and
//! the guest) on arbitrary bytes: refuse or decode, never panic; what decodes encodes back to
//! the bytes it came from (reserved fields aside).
#![no_main]

use incfs_wire::{
    decode_blocks_written, decode_poll_timeout, file_id_from_hex, file_id_to_hex, stats, FileState, FillBlock,
    FillHeader, LastReadError, ReadRecord, FILL_HEADER_SIZE, LAST_READ_ERROR_SIZE, MAX_FILL_DATA, RECORD_SIZE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = ReadRecord::decode(data) {
        assert_eq!(r.encode()[..36], data[..36]);
    }
    if let Ok(all) = ReadRecord::decode_all(data) {
        assert_eq!(all.len() * RECORD_SIZE, data.len());
    }
    if let Ok(h) = FillHeader::decode(data) {
        assert_eq!(h.encode()[..], data[..FILL_HEADER_SIZE]);
        assert!(h.data_len as usize <= MAX_FILL_DATA);
    }
    // A `.fill` write: blocks back to back, as the host walks it.
    let mut at = 0;
    while let Ok(b) = FillBlock::decode(&data[at..]) {
        assert_eq!(b.data.len(), b.header.data_len as usize);
        at += b.encoded_len();
        assert!(at <= data.len());
    }
    if let Ok(s) = FileState::decode(data) {
        let again = s.encode();
        assert_eq!(again.len(), data.len());
        assert_eq!((again[..20].to_vec(), &again[32..]), (data[..20].to_vec(), &data[32..]));
        // missing() walks every block: only for sizes a real file has here.
        if s.total_blocks <= 1 << 16 {
            assert!(s.missing().iter().all(|&b| !s.is_filled(b) && b < s.total_blocks));
        }
    }
    if let Ok(e) = LastReadError::decode(data) {
        assert_eq!(e.encode()[..36], data[..36]);
        assert!(data.len() >= LAST_READ_ERROR_SIZE);
    }
    if let Ok(ms) = decode_poll_timeout(data) {
        assert_eq!(ms.to_le_bytes()[..], data[..]);
    }
    if let Some(n) = decode_blocks_written(data) {
        assert_eq!(decode_blocks_written(n.to_string().as_bytes()), Some(n));
    }
    if let Some(id) = file_id_from_hex(data) {
        assert!(file_id_to_hex(&id).eq_ignore_ascii_case(std::str::from_utf8(data).expect("hex is ASCII")));
    }
    let text = String::from_utf8_lossy(data);
    for (name, value) in stats::decode(&text) {
        let mut line = String::new();
        stats::encode_line(&mut line, name, value);
        assert!(stats::decode(&line).next().is_some_and(|(n, v)| v == value && n == name));
    }
});
