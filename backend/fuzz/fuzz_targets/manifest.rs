//! A stored manifest as a hostile store (or a tampered cache) hands it over: decompressed
//! (bounded by MANIFEST_MAX), checked against an id, decoded and validated, then walked with
//! the lookups the filesystem makes. Input: one flag byte (bit 0: use a wrong id), then the
//! stored bytes.
#![no_main]

use incfs_storage::image::{manifest_from_stored, Image, ImageId, InodeKind, Manifest, MANIFEST_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stored)) = data.split_first() else { return };
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
        assert_eq!(f.blocks.len() as u64, f.size.div_ceil(4096));
    }
    let _ = image.data_size();
    let _ = image.resolve(b"../a/../../b/./c");
});
