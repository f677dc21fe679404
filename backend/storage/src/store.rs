//! Stores and remotes. A store is a plain directory:
//!
//! ```text
//! STORE/images/<image id>   manifests (SHA-256 of the file = the name)
//! STORE/blobs/<blob id>     blobs of stored blocks (SHA-256 of the file = the name)
//! ```
//!
//! Any HTTP server that serves that directory with single-range GET support is a remote.
//!
//! Everything a remote sends is hostile but for what the image id vouches for: every body is
//! streamed under a cap known before it is read (the range asked for, or a limit), redirects
//! are not followed, and each attempt has a deadline that grows with the bytes it carries.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use tokio::time::Instant;

use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, ImageId, MANIFEST_MAX};
use crate::trace::MAX_TRACE_BYTES;

/// Largest stored manifest fetched. `store_manifest` keeps the smaller of the canonical and
/// the compressed bytes, so a legitimate stored manifest is never larger than the format's
/// limit on the canonical one.
pub const MANIFEST_FETCH_MAX: u64 = MANIFEST_MAX;

/// A server that ignores Range answers 200 with the whole blob: a range that ends within
/// this many bytes is still served, from the front of that body (streamed, and the rest
/// never read); past it, the request fails. 8 MiB is the default blob size.
pub const UNRANGED_PREFIX_MAX: u64 = 8 << 20;

/// Slowest transfer an attempt tolerates: a request for n bytes may take its base allowance
/// (`Remote::open`'s `attempt_timeout`, for the answer to start) plus n / this many seconds,
/// so a big run or a manifest on a slow link can finish while a stalled one is cut.
pub const MIN_TRANSFER_RATE: u64 = 256 << 10;

/// Most bytes reserved up front for a body whose size only the server vouches for; beyond,
/// the buffer grows with what actually arrives.
const PREALLOC_MAX: u64 = 1 << 20;

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
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Transient(FetchFailure),
    #[error("{0}")]
    Permanent(FetchFailure),
}

impl FetchError {
    /// What failed, whichever the kind.
    pub fn failure(&self) -> &FetchFailure {
        match self {
            FetchError::Transient(f) | FetchError::Permanent(f) => f,
        }
    }
}

/// What went wrong with one request to a store, keeping what the server or the OS said.
/// `what` names the request ("GET <url>", "read <path>"). Clone: the engine hands one
/// failure to every reader that waited on the fetch, so sources are shared: `source()` is an
/// `Arc<reqwest::Error>`, `Arc<io::Error>` or `Arc<Error>` to downcast to.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchFailure {
    /// The server answered with a status other than the one asked for.
    #[error("{what}: HTTP {status}")]
    Status { what: String, status: StatusCode },
    /// A redirect: never followed (no store needs one, and it could lead anywhere).
    #[error("{what}: HTTP {status} redirect (to {location:?}) not followed")]
    Redirect { what: String, status: StatusCode, location: String },
    /// The request or its body failed in transit (connect, reset, TLS...).
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// A store directory's file could not be read.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// No complete answer within the attempt's deadline.
    #[error("{what}: no complete answer within {after:?}")]
    TimedOut { what: String, after: Duration },
    /// The body is (or says it is) larger than allowed.
    #[error("{what}: body of {size} bytes, more than the {limit} allowed")]
    TooLarge { what: String, size: u64, limit: u64 },
    /// The body ended before the bytes asked for.
    #[error("{what}: wanted {want} bytes, got {got}")]
    Short { what: String, want: u64, got: u64 },
    /// An answer the protocol does not allow (a wrong Content-Range, an ignored Range...).
    #[error("{what}: {why}")]
    Protocol { what: String, why: String },
    /// A manifest that is not the image's.
    #[error("{what}: {source}")]
    Manifest {
        what: String,
        #[source]
        source: Arc<Error>,
    },
    /// A failure described by its caller (for instance the engine's cache).
    #[error("{0}")]
    Other(String),
}

impl FetchFailure {
    /// The HTTP status of the answer, when there was one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            FetchFailure::Status { status, .. } | FetchFailure::Redirect { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl From<String> for FetchFailure {
    fn from(s: String) -> Self {
        FetchFailure::Other(s)
    }
}

impl From<&str> for FetchFailure {
    fn from(s: &str) -> Self {
        FetchFailure::Other(s.to_string())
    }
}

/// Where images come from: a store directory or an HTTP(S) base URL.
#[derive(Clone, Debug)]
pub enum Remote {
    Dir(PathBuf),
    Http {
        base: String,
        client: reqwest::Client,
        /// Each attempt's base allowance (see MIN_TRANSFER_RATE).
        attempt_base: Duration,
    },
}

/// How long an attempt carrying `len` bytes may take: `base`, plus the time `len` bytes take
/// at MIN_TRANSFER_RATE.
pub fn attempt_deadline(base: Duration, len: u64) -> Duration {
    base + Duration::from_millis(len.saturating_mul(1000) / MIN_TRANSFER_RATE)
}

impl Remote {
    /// `http://…` or `https://…` is a remote server; anything else a local store directory.
    /// `attempt_timeout` is each request's base allowance, to which its size adds (see
    /// `attempt_deadline`).
    pub fn open(spec: &str, attempt_timeout: Duration) -> Result<Self> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(16)
                .connect_timeout(Duration::from_secs(5).min(attempt_timeout))
                .redirect(reqwest::redirect::Policy::none())
                .tcp_nodelay(true)
                .build()
                .map_err(Error::HttpClient)?;
            Ok(Remote::Http { base: spec.trim_end_matches('/').to_string(), client, attempt_base: attempt_timeout })
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

    /// A manifest as stored (see `image::manifest_from_stored`), checked against `id` before
    /// it is returned: what comes back is the image's, whatever the store sent.
    pub async fn manifest(&self, id: &ImageId) -> Result<Vec<u8>, FetchError> {
        let rel = format!("images/{id}");
        let (what, bytes) = match self {
            Remote::Dir(root) => {
                let p = root.join(&rel);
                let what = format!("read {}", p.display());
                match read_capped(p, MANIFEST_FETCH_MAX).await {
                    Err(FetchError::Permanent(FetchFailure::Io { source, .. }))
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        return Err(FetchError::Permanent(FetchFailure::Io {
                            what: format!("no image {id} in {}", root.display()),
                            source,
                        }))
                    }
                    r => (what, r?),
                }
            }
            Remote::Http { .. } => {
                let resp = self.get(&rel, None).await?;
                let what = resp.what.clone();
                let status = resp.inner.status();
                if status != StatusCode::OK {
                    return Err(resp.unexpected());
                }
                (what, Vec::from(resp.body(MANIFEST_FETCH_MAX, None).await?))
            }
        };
        let want = *id;
        let (bytes, checked) = tokio::task::spawn_blocking(move || {
            let r = crate::image::verify_stored_manifest(&bytes, &want);
            (bytes, r)
        })
        .await
        .map_err(|e| FetchError::Transient(format!("manifest check task: {e}").into()))?;
        checked.map_err(|e| FetchError::Permanent(FetchFailure::Manifest { what, source: Arc::new(e) }))?;
        Ok(bytes)
    }

    /// The prefetch trace published beside an image, if any. Only a hint (the image id does
    /// not cover it): at most MAX_TRACE_BYTES (plus one, so that `trace::parse` sees it was
    /// cut) are read, and bytes that are not UTF-8 are replaced, never refused.
    pub async fn trace(&self, id: &ImageId) -> Result<Option<String>, FetchError> {
        let rel = format!("traces/{id}");
        let cap = MAX_TRACE_BYTES as u64 + 1;
        let bytes = match self {
            Remote::Dir(root) => match read_prefix(root.join(&rel), cap).await {
                Err(FetchError::Permanent(FetchFailure::Io { source, .. }))
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(None)
                }
                r => r?,
            },
            Remote::Http { .. } => {
                let resp = self.get(&rel, None).await?;
                match resp.inner.status() {
                    StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => return Ok(None),
                    StatusCode::OK => Vec::from(resp.prefix(cap).await?),
                    _ => return Err(resp.unexpected()),
                }
            }
        };
        Ok(Some(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())))
    }

    /// Bytes [offset, offset+len) of a blob.
    pub async fn range(&self, blob: &Hash, offset: u64, len: u64) -> Result<Bytes, FetchError> {
        let rel = format!("blobs/{}", hex::encode(blob));
        let bad_len =
            || FetchError::Permanent(format!("blobs/{}: empty or overflowing range", hex::encode(blob)).into());
        let end = offset.checked_add(len).filter(|_| len > 0).ok_or_else(bad_len)?;
        match self {
            Remote::Dir(root) => {
                let p = root.join(&rel);
                tokio::task::spawn_blocking(move || {
                    let what = || format!("read {} at {offset}", p.display());
                    let io = |e: std::io::Error| {
                        FetchError::Permanent(FetchFailure::Io { what: what(), source: Arc::new(e) })
                    };
                    let f = File::open(&p).map_err(io)?;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, offset).map_err(io)?;
                    Ok(Bytes::from(buf))
                })
                .await
                .map_err(|e| FetchError::Transient(format!("reader task: {e}").into()))?
            }
            Remote::Http { .. } => {
                let resp = self.get(&rel, Some((offset, len))).await?;
                match resp.inner.status() {
                    StatusCode::PARTIAL_CONTENT => {
                        resp.check_content_range(offset, len)?;
                        resp.body(len, Some(len)).await
                    }
                    // The server ignored Range: the range is the front of the whole blob.
                    StatusCode::OK if end <= UNRANGED_PREFIX_MAX => {
                        let what = resp.what.clone();
                        let all = resp.prefix(end).await?;
                        if (all.len() as u64) < end {
                            return Err(FetchError::Transient(FetchFailure::Short {
                                what,
                                want: end,
                                got: all.len() as u64,
                            }));
                        }
                        Ok(all.slice(offset as usize..end as usize))
                    }
                    StatusCode::OK => Err(FetchError::Permanent(FetchFailure::Protocol {
                        what: resp.what.clone(),
                        why: format!(
                            "server ignored the Range header (answered 200, not 206) and the range ends past the \
                             {UNRANGED_PREFIX_MAX} bytes read from the front of a whole blob"
                        ),
                    })),
                    _ => Err(resp.unexpected()),
                }
            }
        }
    }

    /// Sends a GET for `rel` (of `range` = (offset, len) if given) and waits for the answer's
    /// head within the attempt's base allowance.
    async fn get(&self, rel: &str, range: Option<(u64, u64)>) -> Result<Answer, FetchError> {
        let Remote::Http { base, client, attempt_base } = self else {
            return Err(FetchError::Permanent("not an HTTP remote".into()));
        };
        let url = format!("{base}/{rel}");
        let what = match range {
            Some((offset, len)) => format!("GET {url} [{offset}, +{len})"),
            None => format!("GET {url}"),
        };
        let mut req = client.get(&url);
        if let Some((offset, len)) = range {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-{}", offset + len - 1));
        }
        let start = Instant::now();
        let inner = match tokio::time::timeout(*attempt_base, req.send()).await {
            Err(_) => return Err(FetchError::Transient(FetchFailure::TimedOut { what, after: *attempt_base })),
            Ok(Err(e)) => return Err(FetchError::Transient(FetchFailure::Http { what, source: Arc::new(e) })),
            Ok(Ok(r)) => r,
        };
        Ok(Answer { inner, what, start, base: *attempt_base })
    }
}

/// The head of an HTTP answer, its body still unread.
struct Answer {
    inner: reqwest::Response,
    what: String,
    start: Instant,
    base: Duration,
}

impl Answer {
    /// The error for a status the caller did not expect: a server error, 408 or 429 may pass;
    /// anything else will not.
    fn unexpected(&self) -> FetchError {
        let (what, status) = (self.what.clone(), self.inner.status());
        if status.is_redirection() {
            let location = self
                .inner
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).chars().take(200).collect())
                .unwrap_or_default();
            return FetchError::Permanent(FetchFailure::Redirect { what, status, location });
        }
        let failure = FetchFailure::Status { what, status };
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
        {
            FetchError::Transient(failure)
        } else {
            FetchError::Permanent(failure)
        }
    }

    /// A 206 must be for the range asked for (when it says which).
    fn check_content_range(&self, offset: u64, len: u64) -> Result<(), FetchError> {
        let Some(v) = self.inner.headers().get(reqwest::header::CONTENT_RANGE) else {
            return Ok(());
        };
        let want = (offset, offset + len - 1);
        let got = v
            .to_str()
            .ok()
            .and_then(|s| s.strip_prefix("bytes "))
            .and_then(|s| s.split_once('/'))
            .and_then(|(r, _)| r.split_once('-'))
            .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
        if got != Some(want) {
            return Err(FetchError::Transient(FetchFailure::Protocol {
                what: self.what.clone(),
                why: format!("answered Content-Range {:?} for bytes {}-{}", v, want.0, want.1),
            }));
        }
        Ok(())
    }

    /// The whole body: exactly `exact` bytes if given, else at most `limit`. Refused before a
    /// byte is read if Content-Length says more; cut off as soon as it sends more.
    async fn body(self, limit: u64, exact: Option<u64>) -> Result<Bytes, FetchError> {
        let what = self.what.clone();
        let announced = self.inner.content_length();
        if let Some(n) = announced {
            if n > limit {
                return Err(too_large(what, n, limit, exact.is_some()));
            }
            if let Some(want) = exact.filter(|&w| w != n) {
                return Err(FetchError::Transient(FetchFailure::Short { what, want, got: n }));
            }
        }
        let expected = exact.or(announced).unwrap_or(limit);
        let overflow = if exact.is_some() { Overflow::FailTransient } else { Overflow::Fail };
        let data = self.read(limit, expected, overflow).await?;
        if let Some(want) = exact.filter(|&w| w != data.len() as u64) {
            return Err(FetchError::Transient(FetchFailure::Short { what, want, got: data.len() as u64 }));
        }
        Ok(data)
    }

    /// The first `n` bytes of the body (fewer if it is shorter); the rest is never read.
    async fn prefix(self, n: u64) -> Result<Bytes, FetchError> {
        let expected = self.inner.content_length().map_or(n, |c| c.min(n));
        self.read(n, expected, Overflow::Truncate).await
    }

    /// Streams the body under the attempt's deadline for `expected` bytes, keeping at most
    /// `limit`; past it, as `overflow` says.
    async fn read(mut self, limit: u64, expected: u64, overflow: Overflow) -> Result<Bytes, FetchError> {
        let after = attempt_deadline(self.base, expected);
        let deadline = self.start + after;
        let mut buf = Vec::with_capacity(expected.min(limit).min(PREALLOC_MAX) as usize);
        loop {
            let chunk = match tokio::time::timeout_at(deadline, self.inner.chunk()).await {
                Err(_) => return Err(FetchError::Transient(FetchFailure::TimedOut { what: self.what, after })),
                Ok(Err(e)) => {
                    return Err(FetchError::Transient(FetchFailure::Http { what: self.what, source: Arc::new(e) }))
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(c))) => c,
            };
            let room = (limit - buf.len() as u64) as usize;
            if chunk.len() > room {
                let size = buf.len() as u64 + chunk.len() as u64;
                match overflow {
                    Overflow::Truncate => {
                        buf.extend_from_slice(&chunk[..room]);
                        break;
                    }
                    Overflow::Fail => return Err(too_large(self.what, size, limit, false)),
                    Overflow::FailTransient => return Err(too_large(self.what, size, limit, true)),
                }
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    }
}

/// What to do with a body that runs past its limit.
#[derive(Clone, Copy)]
enum Overflow {
    /// Keep the front, drop the rest unread.
    Truncate,
    /// Refuse it, for good.
    Fail,
    /// Refuse it, but a retry may do better (a range: the server misbehaved this once).
    FailTransient,
}

/// A body larger than asked for: for a range, the server misbehaved this once, perhaps;
/// for anything else, the limit will not change.
fn too_large(what: String, size: u64, limit: u64, transient: bool) -> FetchError {
    let f = FetchFailure::TooLarge { what, size, limit };
    if transient {
        FetchError::Transient(f)
    } else {
        FetchError::Permanent(f)
    }
}

/// A store directory's file, refused if larger than `limit` (by its size, before a byte is
/// read; by what it yields, if it grows meanwhile).
async fn read_capped(p: PathBuf, limit: u64) -> Result<Vec<u8>, FetchError> {
    let what = format!("read {}", p.display());
    let data = read_file(p, limit + 1, Some(limit)).await?;
    if data.len() as u64 > limit {
        return Err(FetchError::Permanent(FetchFailure::TooLarge { what, size: data.len() as u64, limit }));
    }
    Ok(data)
}

/// The first `n` bytes of a store directory's file (all of it if shorter).
async fn read_prefix(p: PathBuf, n: u64) -> Result<Vec<u8>, FetchError> {
    read_file(p, n, None).await
}

/// At most `n` bytes from the front of a file; none if it is larger than `refuse_above`.
async fn read_file(p: PathBuf, n: u64, refuse_above: Option<u64>) -> Result<Vec<u8>, FetchError> {
    tokio::task::spawn_blocking(move || {
        let what = || format!("read {}", p.display());
        let io = |e: std::io::Error| {
            let missing = e.kind() == std::io::ErrorKind::NotFound;
            let f = FetchFailure::Io { what: what(), source: Arc::new(e) };
            if missing {
                FetchError::Permanent(f)
            } else {
                FetchError::Transient(f)
            }
        };
        let f = File::open(&p).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        if let Some(limit) = refuse_above.filter(|&l| size > l) {
            return Err(FetchError::Permanent(FetchFailure::TooLarge { what: what(), size, limit }));
        }
        let mut out = Vec::with_capacity(size.min(n) as usize);
        f.take(n).read_to_end(&mut out).map_err(io)?;
        Ok(out)
    })
    .await
    .map_err(|e| FetchError::Transient(format!("reader task: {e}").into()))?
}
