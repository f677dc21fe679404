//! Stores and remotes. A store is a plain directory:
//!
//! ```text
//! STORE/images/<image id>   manifests (SHA-256 of the file = the name)
//! STORE/blobs/<blob id>     blobs of stored blocks (SHA-256 of the file = the name)
//! ```
//!
//! Any HTTP server that serves that directory with single-range GET support is a remote.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, ImageId};

/// A store directory being written (by the packer).
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store { root: root.into() }
    }

    pub fn create_dirs(&self) -> Result<()> {
        for d in ["images", "blobs", "tmp"] {
            let p = self.root.join(d);
            fs::create_dir_all(&p).ctx(|| format!("create {}", p.display()))?;
        }
        Ok(())
    }

    /// A fresh temporary file inside the store, renamed into place when complete.
    pub fn temp_file(&self, what: &str) -> Result<(File, PathBuf)> {
        let dir = self.root.join("tmp");
        for n in 0u32.. {
            let p = dir.join(format!("{what}.{}.{n}", std::process::id()));
            match fs::OpenOptions::new().write(true).create_new(true).open(&p) {
                Ok(f) => return Ok((f, p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(format!("create {}", p.display()), e)),
            }
        }
        Err(Error::Invalid("no temporary name left".into()))
    }

    pub fn commit_blob(&self, tmp: &Path, id: &Hash) -> Result<()> {
        let dst = self.root.join("blobs").join(hex::encode(id));
        fs::rename(tmp, &dst).ctx(|| format!("rename to {}", dst.display()))
    }

    /// A prefetch trace for an image, served beside it (advisory: not part of the image id).
    pub fn write_trace(&self, id: &ImageId, text: &str) -> Result<()> {
        let dir = self.root.join("traces");
        fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        let (f, tmp) = self.temp_file("trace")?;
        f.write_all_at(text.as_bytes(), 0).ctx(|| format!("write {}", tmp.display()))?;
        let dst = dir.join(id.to_string());
        fs::rename(&tmp, &dst).ctx(|| format!("rename to {}", dst.display()))
    }

    /// Stores a manifest (compressed; its id stays the SHA-256 of the canonical bytes).
    pub fn write_manifest(&self, id: &ImageId, bytes: &[u8]) -> Result<()> {
        let (f, tmp) = self.temp_file("image")?;
        f.write_all_at(&crate::image::store_manifest(bytes), 0).ctx(|| format!("write {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("sync {}", tmp.display()))?;
        let dst = self.root.join("images").join(id.to_string());
        fs::rename(&tmp, &dst).ctx(|| format!("rename to {}", dst.display()))
    }
}

/// Why a remote read failed: transient failures are retried, permanent ones are not.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

/// Where images come from: a store directory or an HTTP(S) base URL.
#[derive(Clone, Debug)]
pub enum Remote {
    Dir(PathBuf),
    Http { base: String, client: reqwest::Client },
}

impl Remote {
    /// `http://…` or `https://…` is a remote server; anything else a local store directory.
    pub fn open(spec: &str, attempt_timeout: Duration) -> Result<Self> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(16)
                .connect_timeout(Duration::from_secs(5).min(attempt_timeout))
                .timeout(attempt_timeout)
                .tcp_nodelay(true)
                .build()
                .map_err(|e| Error::Remote(format!("HTTP client: {e}")))?;
            Ok(Remote::Http { base: spec.trim_end_matches('/').to_string(), client })
        } else {
            let p = PathBuf::from(spec);
            if !p.join("images").is_dir() {
                return Err(Error::NotFound(format!("{spec} is not a store directory (no images/)")));
            }
            Ok(Remote::Dir(p))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Remote::Dir(p) => p.display().to_string(),
            Remote::Http { base, .. } => base.clone(),
        }
    }

    /// A manifest as stored (see `image::manifest_from_stored`).
    pub async fn manifest(&self, id: &ImageId) -> Result<Vec<u8>, FetchError> {
        let rel = format!("images/{id}");
        match self {
            Remote::Dir(root) => {
                let p = root.join(&rel);
                tokio::fs::read(&p).await.map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        FetchError::Permanent(format!("no image {id} in {}", root.display()))
                    }
                    _ => FetchError::Transient(format!("read {}: {e}", p.display())),
                })
            }
            Remote::Http { base, client } => {
                let url = format!("{base}/{rel}");
                let resp =
                    client.get(&url).send().await.map_err(|e| FetchError::Transient(format!("GET {url}: {e}")))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(classify(status, &url));
                }
                let body = resp.bytes().await.map_err(|e| FetchError::Transient(format!("GET {url}: {e}")))?;
                Ok(body.to_vec())
            }
        }
    }

    /// The prefetch trace published beside an image, if any.
    pub async fn trace(&self, id: &ImageId) -> Result<Option<String>, FetchError> {
        let rel = format!("traces/{id}");
        let bytes = match self {
            Remote::Dir(root) => match tokio::fs::read(root.join(&rel)).await {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(FetchError::Transient(format!("read {rel}: {e}"))),
            },
            Remote::Http { base, client } => {
                let url = format!("{base}/{rel}");
                let resp =
                    client.get(&url).send().await.map_err(|e| FetchError::Transient(format!("GET {url}: {e}")))?;
                match resp.status() {
                    reqwest::StatusCode::NOT_FOUND | reqwest::StatusCode::FORBIDDEN => return Ok(None),
                    s if !s.is_success() => return Err(classify(s, &url)),
                    _ => resp.bytes().await.map_err(|e| FetchError::Transient(format!("GET {url}: {e}")))?.to_vec(),
                }
            }
        };
        String::from_utf8(bytes).map(Some).map_err(|_| FetchError::Permanent(format!("{rel} is not text")))
    }

    /// Bytes [offset, offset+len) of a blob.
    pub async fn range(&self, blob: &Hash, offset: u64, len: u64) -> Result<Bytes, FetchError> {
        let rel = format!("blobs/{}", hex::encode(blob));
        match self {
            Remote::Dir(root) => {
                let p = root.join(&rel);
                tokio::task::spawn_blocking(move || {
                    let f = File::open(&p).map_err(|e| FetchError::Permanent(format!("open {}: {e}", p.display())))?;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, offset)
                        .map_err(|e| FetchError::Permanent(format!("read {} at {offset}: {e}", p.display())))?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| FetchError::Transient(format!("reader task: {e}")))?
            }
            Remote::Http { base, client } => {
                let url = format!("{base}/{rel}");
                let end = offset + len - 1;
                let resp = client
                    .get(&url)
                    .header(reqwest::header::RANGE, format!("bytes={offset}-{end}"))
                    .send()
                    .await
                    .map_err(|e| FetchError::Transient(format!("GET {url}: {e}")))?;
                let status = resp.status();
                if status == reqwest::StatusCode::OK {
                    // A server that ignores Range would send the whole blob for every block.
                    return Err(FetchError::Permanent(format!(
                        "{url}: server ignored the Range header (answered 200, not 206)"
                    )));
                }
                if status != reqwest::StatusCode::PARTIAL_CONTENT {
                    return Err(classify(status, &url));
                }
                let body = resp.bytes().await.map_err(|e| FetchError::Transient(format!("GET {url}: body: {e}")))?;
                if body.len() as u64 != len {
                    return Err(FetchError::Transient(format!("GET {url}: wanted {len} bytes, got {}", body.len())));
                }
                Ok(body)
            }
        }
    }
}

fn classify(status: reqwest::StatusCode, url: &str) -> FetchError {
    let msg = format!("GET {url}: HTTP {status}");
    if status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
    {
        FetchError::Transient(msg)
    } else {
        FetchError::Permanent(msg)
    }
}
