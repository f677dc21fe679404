//! A read trace as a hostile store serves it, parsed against a small real image: lines may be
//! refused or skipped, never panic; what is accepted lies inside the image's files, and
//! formats back to a trace that parses to the same ranges.
#![no_main]

use std::sync::OnceLock;

use incfs_storage::image::Image;
use incfs_storage::trace;
use libfuzzer_sys::fuzz_target;

fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(incfs_fuzz::image)
}

fuzz_target!(|data: &[u8]| {
    let image = image();
    let text = String::from_utf8_lossy(data);
    let Ok((ranges, skipped)) = trace::parse(image, &text) else { return };
    assert!(ranges.len() + skipped <= text.lines().count());
    for &(ino, first, count) in &ranges {
        let f = image.file(ino).expect("a range names a regular file");
        assert!(count > 0 && first as u64 + count as u64 <= f.nblocks() as u64, "range inside the file");
    }
    let again = trace::parse(image, &trace::format(image, &ranges)).expect("a formatted trace parses");
    assert_eq!(again, (ranges, 0));
});
