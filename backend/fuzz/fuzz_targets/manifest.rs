//! A stored manifest as a hostile store (or a tampered cache) hands it over: decompressed
//! (bounded by MANIFEST_MAX), checked against an id, decoded and validated, then walked with
//! the lookups the filesystem makes. Input: one flag byte (bit 0: use a wrong id; bit 1: the
//! bytes are an image dictionary instead, as a hostile manifest could name), then the stored
//! bytes.
#![no_main]

use incfs_storage::dict::BlockDictionary;
use incfs_storage::image::{
    manifest_from_stored, BlockKind, Image, ImageId, InodeKind, Manifest, DICT_MAX, MANIFEST_MAX,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stored)) = data.split_first() else { return };
    if flags & 2 != 0 {
        // Any bytes, their hash right: prepared or refused, and decoding with them never
        // gives more than the 4096 bytes asked for.
        if let Ok(d) = BlockDictionary::prepare(stored, &incfs_fuzz::sha256(stored)) {
            let frame = zstd::bulk::compress(&[7u8; 5000], 1).unwrap_or_default();
            let mut out = [0u8; 4096];
            assert!(d.decompress(&frame, &mut out).is_none(), "5000 bytes do not fit in 4096");
            let _ = d.decompress(&stored[..stored.len().min(300)], &mut out);
        }
        return;
    }
    let Ok(canonical) = manifest_from_stored(stored.to_vec()) else { return };
    assert!(canonical.len() as u64 <= MANIFEST_MAX);
    // The engine asks for a manifest by id: mostly the right one, so decoding is reached.
    let mut id = ImageId::of_manifest(&canonical);
    if flags & 1 != 0 {
        id.0[0] ^= 1;
        assert!(Image::from_manifest_bytes(id, &canonical).is_err(), "a wrong id is refused");
        return;
    }
    let Ok(image) = Image::from_manifest_bytes(id, &canonical) else {
        return;
    };
    // What decodes re-encodes to bytes that decode to the same manifest (not always the
    // same bytes: the flags word is read and ignored).
    assert!(Manifest::decode(&image.manifest.encode()).is_ok_and(|m| m == image.manifest));
    // A dictionary is a blob of at most DICT_MAX bytes; only an image with one has blocks
    // that need it.
    match image.dictionary() {
        Some(d) => assert!(d.size > 0 && d.size <= DICT_MAX),
        None => assert!(image.files().all(|(_, f)| f
            .inline()
            .unwrap_or_default()
            .iter()
            .all(|b| b.kind != BlockKind::ZstdDict))),
    }
    let n = image.manifest.inodes.len();
    assert_eq!((image.parent.len(), image.nlink.len(), image.next_file.len()), (n, n, n));
    // Every name resolves to its entry, from the root and through "..".
    for (d, ino) in image.manifest.inodes.iter().enumerate() {
        if let InodeKind::Dir(entries) = &ino.kind {
            for e in entries {
                assert_eq!(image.lookup(d as u32, &e.name), Some(e.ino));
            }
        }
    }
    for (i, f) in image.files() {
        assert!(image.file(i).is_some());
        if let Some(blocks) = f.inline() {
            assert_eq!(blocks.len() as u64, f.size.div_ceil(4096));
        }
    }
    let _ = image.data_size();
    let _ = image.resolve(b"../a/../../b/./c");
});
