//! The image's zstd dictionary (format version 2): trained by the packer on a sample of the
//! image's blocks, stored as a blob, and used to compress and decompress single 4 KiB blocks,
//! which alone have too little context to compress well.

use sha2::{Digest, Sha256};
use zstd::zstd_safe::{CParameter, DCtx, DDict};

use crate::error::{Error, Result};
use crate::image::{Hash, BLOCK_SIZE, DICT_MAX};

/// Default dictionary size (`incfsd pack --dict-size`): chosen by measurement on a Debian
/// root filesystem (docs/benchmarks.md).
pub const DEFAULT_DICT_SIZE: usize = 112 << 10;
/// zstd wants about 100 times the dictionary's size in samples.
const SAMPLES_PER_DICT_BYTE: usize = 100;

/// A verified dictionary, prepared for decompression (its entropy tables built once), shared
/// by every reader of an image.
pub struct BlockDictionary {
    ddict: DDict<'static>,
    len: usize,
}

impl std::fmt::Debug for BlockDictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockDictionary({} bytes)", self.len)
    }
}

impl BlockDictionary {
    /// Checks `bytes` against the SHA-256 the manifest names and prepares them. Bytes from a
    /// store are hostile until this passed.
    pub fn prepare(bytes: &[u8], id: &Hash) -> Result<Self> {
        if bytes.len() as u64 > DICT_MAX {
            return Err(Error::Corrupt(format!("dictionary of {} bytes, more than {DICT_MAX}", bytes.len())));
        }
        let actual: Hash = Sha256::digest(bytes).into();
        if actual != *id {
            return Err(Error::Corrupt(format!("dictionary {} hashes to {}", hex::encode(id), hex::encode(actual))));
        }
        let ddict = DDict::try_create(bytes)
            .ok_or_else(|| Error::Corrupt(format!("dictionary {} is not a zstd dictionary", hex::encode(id))))?;
        Ok(BlockDictionary { ddict, len: bytes.len() })
    }

    /// Decompresses one stored block into `out` (4096 bytes: never more comes out); returns
    /// how many bytes it gave, None if the frame is bad.
    pub fn decompress(&self, stored: &[u8], out: &mut [u8]) -> Option<usize> {
        DECODER.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = DCtx::try_create();
            }
            let dctx = d.as_mut()?;
            let r = dctx.decompress_using_ddict(out, stored, &self.ddict);
            if r.is_err() {
                // A failed frame may leave the context mid-frame: start the next one clean.
                *d = None;
            }
            r.ok()
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

thread_local! {
    /// One decompression context per thread: creating one costs more than decoding a block.
    static DECODER: std::cell::RefCell<Option<DCtx<'static>>> = const { std::cell::RefCell::new(None) };
}

/// A sample of an image's blocks, for training and for judging a dictionary.
#[derive(Default)]
pub struct Samples {
    pub data: Vec<u8>,
    pub sizes: Vec<usize>,
}

impl Samples {
    pub fn push(&mut self, block: &[u8]) {
        self.data.extend_from_slice(block);
        self.sizes.push(block.len());
    }

    fn blocks(&self) -> impl Iterator<Item = &[u8]> {
        self.sizes.iter().scan(0usize, move |at, &n| {
            let b = &self.data[*at..*at + n];
            *at += n;
            Some(b)
        })
    }
}

/// How many bytes of samples to train a dictionary of `dict_size` bytes on.
pub fn sample_bytes(dict_size: usize) -> usize {
    dict_size.saturating_mul(SAMPLES_PER_DICT_BYTE)
}

/// Trains a dictionary of at most `dict_size` bytes on `train` and keeps it only if it pays:
/// compressing `judge` (other blocks of the same image) with it, scaled by `scale` (how many
/// blocks of the image each judged block stands for), must save more than twice its size.
/// None when it does not pay or zstd cannot train one (too few samples).
pub fn train(train: &Samples, judge: &Samples, scale: f64, dict_size: usize, level: i32) -> Option<Vec<u8>> {
    if train.sizes.len() < 8 || dict_size < 256 {
        return None;
    }
    let dict = match zstd::dict::from_continuous(&train.data, &train.sizes, dict_size.min(DICT_MAX as usize)) {
        Ok(d) => d,
        Err(e) => {
            tracing::info!("no dictionary: zstd could not train one: {e}");
            return None;
        }
    };
    let (mut without, mut with) = (0u64, 0u64);
    {
        let mut enc = BlockEncoder::new(level, Some(&dict)).ok()?;
        for b in judge.blocks() {
            let (plain, best) = enc.sizes(b);
            without += plain as u64;
            with += best as u64;
        }
    }
    let saved = without.saturating_sub(with) as f64 * scale;
    tracing::info!(saved, dict = dict.len(), "dictionary trial");
    (saved > 2.0 * dict.len() as f64).then_some(dict)
}

/// How the packer stores one block.
pub enum Stored {
    Raw,
    Zstd(Vec<u8>),
    ZstdDict(Vec<u8>),
}

/// Compresses blocks for the packer: the smallest of raw, plain zstd and zstd with the
/// image's dictionary.
pub struct BlockEncoder<'d> {
    plain: zstd::bulk::Compressor<'static>,
    dict: Option<zstd::bulk::Compressor<'d>>,
}

impl<'d> BlockEncoder<'d> {
    pub fn new(level: i32, dict: Option<&'d [u8]>) -> Result<Self> {
        let zerr = |e: std::io::Error| Error::Invalid(format!("zstd: {e}"));
        let plain = zstd::bulk::Compressor::new(level).map_err(zerr)?;
        let dict = match dict {
            Some(d) => {
                let mut c = zstd::bulk::Compressor::with_dictionary(level, d).map_err(zerr)?;
                // The reader knows the dictionary from the manifest: 4 bytes a block saved.
                c.set_parameter(CParameter::DictIdFlag(false)).map_err(zerr)?;
                Some(c)
            }
            None => None,
        };
        Ok(BlockEncoder { plain, dict })
    }

    /// The smallest way to store `data` (at most 4096 bytes).
    pub fn encode(&mut self, data: &[u8]) -> Stored {
        debug_assert!(data.len() <= BLOCK_SIZE);
        let mut best = Stored::Raw;
        let mut best_len = data.len();
        if let Ok(c) = self.plain.compress(data) {
            if c.len() < best_len {
                best_len = c.len();
                best = Stored::Zstd(c);
            }
        }
        if let Some(Ok(c)) = self.dict.as_mut().map(|z| z.compress(data)) {
            if c.len() < best_len {
                best = Stored::ZstdDict(c);
            }
        }
        best
    }

    /// (stored size without the dictionary, stored size with it).
    fn sizes(&mut self, data: &[u8]) -> (usize, usize) {
        let plain = self.plain.compress(data).map_or(data.len(), |c| c.len().min(data.len()));
        let dict = self.dict.as_mut().and_then(|z| z.compress(data).ok()).map_or(plain, |c| c.len().min(plain));
        (plain, dict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of text drawn from a shared vocabulary: what a dictionary is for.
    pub(crate) fn wordy_block(seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut out = Vec::with_capacity(BLOCK_SIZE);
        while out.len() < BLOCK_SIZE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = x % 500;
            out.extend_from_slice(
                format!("word{w}_{}{} ", w * 7919 % 1000, ["alpha", "beta", "gamma"][(w % 3) as usize]).as_bytes(),
            );
        }
        out.truncate(BLOCK_SIZE);
        out
    }

    fn samples(range: std::ops::Range<u64>) -> Samples {
        let mut s = Samples::default();
        for i in range {
            s.push(&wordy_block(i));
        }
        s
    }

    #[test]
    fn a_trained_dictionary_shrinks_blocks_and_decodes_them_back() {
        let dict = train(&samples(0..400), &samples(1000..1100), 10.0, 16 << 10, 3).expect("a dictionary that pays");
        let id: Hash = Sha256::digest(&dict).into();
        let prepared = BlockDictionary::prepare(&dict, &id).expect("prepare");
        let mut enc = BlockEncoder::new(3, Some(&dict)).expect("encoder");
        let block = wordy_block(5000);
        let Stored::ZstdDict(c) = enc.encode(&block) else { panic!("the dictionary should win") };
        let plain = zstd::bulk::compress(&block, 3).expect("zstd");
        assert!(c.len() < plain.len(), "{} >= {}", c.len(), plain.len());
        let mut out = [0u8; BLOCK_SIZE];
        assert_eq!(prepared.decompress(&c, &mut out), Some(BLOCK_SIZE));
        assert_eq!(&out[..], &block[..]);
        // Without the dictionary the frame does not decode.
        assert!(zstd::bulk::decompress_to_buffer(&c, &mut out[..]).is_err());
        // A bomb never writes past the 4096 bytes given.
        let bomb = zstd::bulk::compress(&vec![1u8; 1 << 20], 3).expect("bomb");
        assert_eq!(prepared.decompress(&bomb, &mut out), None);
        assert_eq!(prepared.decompress(b"garbage", &mut out), None);
        assert_eq!(prepared.decompress(&c, &mut out), Some(BLOCK_SIZE), "a context is fine after a failure");
    }

    #[test]
    fn a_dictionary_that_does_not_match_its_hash_is_refused() {
        let dict = train(&samples(0..400), &samples(1000..1100), 10.0, 16 << 10, 3).expect("dictionary");
        let id: Hash = Sha256::digest(&dict).into();
        let mut bad = dict.clone();
        bad[100] ^= 1;
        assert!(matches!(BlockDictionary::prepare(&bad, &id), Err(Error::Corrupt(_))));
        assert!(matches!(BlockDictionary::prepare(&vec![0; (DICT_MAX + 1) as usize], &id), Err(Error::Corrupt(_))));
        // Bytes that hash right but are a broken dictionary (the dictionary magic, then junk):
        // an error, not a panic.
        let mut junk = vec![0x37, 0xa4, 0x30, 0xec];
        junk.extend_from_slice(&[0xff; 64]);
        let junk_id: Hash = Sha256::digest(&junk).into();
        assert!(matches!(BlockDictionary::prepare(&junk, &junk_id), Err(Error::Corrupt(_))));
    }

    #[test]
    fn a_dictionary_that_does_not_pay_is_not_kept() {
        // Random bytes: nothing to learn, nothing saved.
        let mut s = Samples::default();
        let mut x = 88172645463325252u64;
        for _ in 0..200 {
            let b: Vec<u8> = (0..BLOCK_SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            s.push(&b);
        }
        assert!(train(&s, &s, 1.0, 16 << 10, 3).is_none());
    }
}
