//! Saved image manifests (`manifests/<id>`), so a restarted daemon needs no remote to start.

use std::fs;
use std::path::PathBuf;

use super::layout::MANIFESTS_DIR;
use super::BlockCache;
use crate::error::{IoContext, Result};
use crate::image::ImageId;

impl BlockCache {
    fn manifest_path(&self, id: &ImageId) -> PathBuf {
        self.dir.join(MANIFESTS_DIR).join(id.to_string())
    }

    /// A manifest saved earlier, if present and still hashing to its id.
    pub fn load_manifest(&self, id: &ImageId) -> Option<Vec<u8>> {
        let bytes = fs::read(self.manifest_path(id)).ok()?;
        (ImageId::of_manifest(&bytes) == *id).then_some(bytes)
    }

    pub fn save_manifest(&self, id: &ImageId, bytes: &[u8]) -> Result<()> {
        let dst = self.manifest_path(id);
        let tmp = dst.with_extension(format!("tmp.{}", std::process::id()));
        fs::write(&tmp, bytes).ctx(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &dst).ctx(|| format!("rename {}", dst.display()))
    }
}
