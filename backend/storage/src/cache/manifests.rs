//! Saved image manifests (`manifests/<id>`), so a restarted daemon needs no remote to start.

use std::path::PathBuf;

use super::layout::{DICTIONARIES_DIR, MANIFESTS_DIR};
use super::{files, BlockCache};
use crate::error::{IoContext, Result};
use crate::image::{Hash, ImageId, DICT_MAX};

impl BlockCache {
    fn manifest_path(&self, id: &ImageId) -> PathBuf {
        self.dir.join(MANIFESTS_DIR).join(id.to_string())
    }

    /// A manifest saved earlier, if present and still hashing to its id.
    pub fn load_manifest(&self, id: &ImageId) -> Option<Vec<u8>> {
        let bytes = match files::read_private_file(&self.manifest_path(id)) {
            Ok(b) => b,
            // Not saved yet: the usual first start.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("saved manifest {id}: {e}");
                return None;
            }
        };
        (ImageId::of_manifest(&bytes) == *id).then_some(bytes)
    }

    pub fn save_manifest(&self, id: &ImageId, bytes: &[u8]) -> Result<()> {
        self.save_file(MANIFESTS_DIR, &id.to_string(), bytes)
    }

    /// Writes `bytes` to `DIR/NAME` in the cache whole or not at all: a private temporary
    /// file beside it, renamed over it.
    fn save_file(&self, dir: &str, name: &str, bytes: &[u8]) -> Result<()> {
        let dir = self.dir.join(dir);
        let dst = dir.join(name);
        let tmp = self.new_temp_file(&dir, &format!("{name}.tmp."), bytes)?;
        tmp.persist(&dst).map_err(|e| e.error).ctx(|| format!("rename {}", dst.display()))?;
        Ok(())
    }

    fn dictionary_path(&self, id: &Hash) -> PathBuf {
        self.dir.join(DICTIONARIES_DIR).join(hex::encode(id))
    }

    /// A dictionary saved earlier, if present and at most DICT_MAX bytes. Not verified here:
    /// the caller checks it against `id` before use (`dict::BlockDictionary::prepare`).
    pub fn load_dictionary(&self, id: &Hash) -> Option<Vec<u8>> {
        let path = self.dictionary_path(id);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.len() <= DICT_MAX => {}
            Ok(_) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!("saved dictionary {}: {e}", hex::encode(id));
                return None;
            }
        }
        match files::read_private_file(&path) {
            Ok(b) if b.len() as u64 <= DICT_MAX => Some(b),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!("saved dictionary {}: {e}", hex::encode(id));
                None
            }
        }
    }

    /// Saves a verified dictionary under its SHA-256.
    pub fn save_dictionary(&self, id: &Hash, bytes: &[u8]) -> Result<()> {
        self.save_file(DICTIONARIES_DIR, &hex::encode(id), bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn saved_manifests_load_back_private_and_no_planted_link_is_followed() {
        let dir = tempfile::tempdir().expect("tmp");
        let cache = BlockCache::open(dir.path()).expect("open");
        let bytes = b"a manifest".to_vec();
        let id = ImageId::of_manifest(&bytes);
        // The name the temporary file had when it was predictable.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"untouched").expect("victim");
        let planted = cache.manifest_path(&id).with_extension(format!("tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).expect("plant");
        cache.save_manifest(&id, &bytes).expect("save");
        assert_eq!(fs::read(&victim).expect("victim"), b"untouched");
        assert_eq!(cache.load_manifest(&id), Some(bytes));
        assert_eq!(cache.load_manifest(&ImageId::of_manifest(b"another")), None);
        let mode = |p: &std::path::Path| fs::metadata(p).expect("stat").permissions().mode();
        assert_eq!(mode(&cache.manifest_path(&id)) & 0o777, files::FILE_MODE);
        // The manifest and the planted link: no temporary file is left.
        assert_eq!(fs::read_dir(dir.path().join(MANIFESTS_DIR)).expect("ls").count(), 2);
    }
}
