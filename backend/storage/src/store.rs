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
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::StatusCode;
use tokio::time::Instant;

use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, ImageId, MANIFEST_MAX};
use crate::trace::MAX_TRACE_BYTES;

pub mod mirror;
pub mod oci;
pub mod s3;

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

/// How requests to an HTTP(S) store are made, beyond the URL: trusted roots, a client
/// certificate, headers and a bearer token. Debug shows paths and header names only: the
/// header values and the token are secrets.
#[derive(Clone, Default)]
pub struct HttpOptions {
    /// PEM files of further trusted roots (each may hold several certificates), trusted
    /// besides the built-in (Mozilla) roots and the system's bundle (`system_ca_file`).
    pub ca_files: Vec<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; holds the key too if `client_key` is
    /// not given.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Headers sent on every request, each "Name: value".
    pub headers: Vec<String>,
    /// A file holding a bearer token, sent as `Authorization: Bearer <token>`; re-read when
    /// it changes (checked at most every TOKEN_RECHECK), so a rotated token is picked up.
    pub bearer_token_file: Option<PathBuf>,
    /// Docker-style credentials for an OCI registry (`{"auths": {...}}`); without it,
    /// `~/.docker/config.json` if it exists.
    pub registry_auth: Option<PathBuf>,
    /// Region, endpoint and addressing of an `s3://` store.
    pub s3: s3::S3Options,
    /// Mirrors of the store (URLs of the same layout), tried in order before it.
    pub mirrors: Vec<String>,
    /// First back-off of a failing mirror (default `mirror::DEFAULT_MIRROR_BACKOFF`).
    pub mirror_backoff: Option<Duration>,
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|h| h.split_once(':').map_or("?", |(n, _)| n.trim())).collect();
        f.debug_struct("HttpOptions")
            .field("ca_files", &self.ca_files)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("header_names", &names)
            .field("bearer_token_file", &self.bearer_token_file)
            .field("registry_auth", &self.registry_auth)
            .field("s3", &self.s3)
            .field("mirrors", &self.mirrors.iter().map(|m| redact_store(m)).collect::<Vec<_>>())
            .field("mirror_backoff", &self.mirror_backoff)
            .finish()
    }
}

/// The system's CA bundle: `$SSL_CERT_FILE`, else the first of the distributions' usual
/// places that exists. Its roots are trusted besides the built-in ones.
pub fn system_ca_file() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(f));
    }
    [
        "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Arch, Alpine
        "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
        "/etc/ssl/ca-bundle.pem",             // openSUSE
        "/etc/ssl/cert.pem",                  // Alpine, macOS
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Largest PEM file (CA bundle, certificate, key) read.
const PEM_MAX: u64 = 16 << 20;
/// Largest bearer token file read.
const TOKEN_MAX: u64 = 64 << 10;
/// A bearer token file is checked for changes (one stat) at most this often.
pub const TOKEN_RECHECK: Duration = Duration::from_secs(1);

fn read_small(p: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let ctx = || format!("read {what} {}", p.display());
    let f = File::open(p).ctx(ctx)?;
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out).ctx(ctx)?;
    if out.len() as u64 > limit {
        return Err(Error::Invalid(format!("{what} {} is larger than {limit} bytes", p.display())));
    }
    Ok(out)
}

/// The secret part of a URL (its query): kept for requests, never shown.
#[derive(Clone)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<hidden>")
    }
}

/// `Authorization: Bearer <file contents>`, re-read when the file changes.
pub struct BearerToken {
    path: PathBuf,
    state: Mutex<TokenState>,
}

struct TokenState {
    value: reqwest::header::HeaderValue,
    /// (device, inode, size, mtime in ns) of the file the value came from.
    stamp: (u64, u64, u64, i128),
    checked: Instant,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerToken").field("path", &self.path).finish_non_exhaustive()
    }
}

impl BearerToken {
    pub fn open(path: &Path) -> Result<Self> {
        let (value, stamp) = Self::load(path)?;
        let state = Mutex::new(TokenState { value, stamp, checked: Instant::now() });
        Ok(BearerToken { path: path.to_path_buf(), state })
    }

    fn stamp(path: &Path) -> std::io::Result<(u64, u64, u64, i128)> {
        let m = fs::metadata(path)?;
        Ok((m.dev(), m.ino(), m.size(), m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128))
    }

    /// The header value and the stamp of the file it was read from. The token is the
    /// file's contents less surrounding white space; an empty one is refused.
    fn load(path: &Path) -> Result<(reqwest::header::HeaderValue, (u64, u64, u64, i128))> {
        let stamp = Self::stamp(path).ctx(|| format!("stat bearer token file {}", path.display()))?;
        let bytes = read_small(path, TOKEN_MAX, "bearer token file")?;
        let token = String::from_utf8(bytes)
            .map_err(|_| Error::Invalid(format!("bearer token file {} is not UTF-8", path.display())))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Invalid(format!("bearer token file {} is empty", path.display())));
        }
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Error::Invalid(format!("bearer token file {}: not a valid header value", path.display())))?;
        value.set_sensitive(true);
        Ok((value, stamp))
    }

    /// The current value: the file is stat'ed at most every TOKEN_RECHECK, and re-read
    /// if it changed. A file that cannot be read (mid-rewrite, empty) keeps the last good
    /// token, and is tried again at the next check.
    pub fn value(&self) -> reqwest::header::HeaderValue {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() >= TOKEN_RECHECK {
            s.checked = Instant::now();
            match Self::stamp(&self.path) {
                Ok(stamp) if stamp == s.stamp => {}
                Ok(_) => match Self::load(&self.path) {
                    Ok((value, stamp)) => {
                        tracing::info!(file = %self.path.display(), "bearer token file changed: token reloaded");
                        (s.value, s.stamp) = (value, stamp);
                    }
                    Err(e) => tracing::warn!("keeping the last bearer token: {e}"),
                },
                Err(e) => tracing::warn!(file = %self.path.display(), "keeping the last bearer token: stat: {e}"),
            }
        }
        s.value.clone()
    }
}

/// Where images come from: a store directory or an HTTP(S) base URL.
#[derive(Clone, Debug)]
pub enum Remote {
    Dir(PathBuf),
    Http {
        /// The URL without its query and trailing slashes: object paths go after it.
        base: String,
        /// The base URL's query (a signed URL's), appended to every request's URL.
        query: Option<Secret>,
        client: reqwest::Client,
        /// Each attempt's base allowance (see MIN_TRANSFER_RATE).
        attempt_base: Duration,
        bearer: Option<Arc<BearerToken>>,
        /// Signs every request (an `s3://` store).
        s3: Option<Arc<s3::S3Signer>>,
    },
    /// An OCI registry repository (`oci://HOST/REPO`).
    Oci(Arc<oci::Registry>),
    /// Mirrors tried before the origin (see `mirror`).
    Mirrored(Arc<mirror::Mirrors>),
}

/// `spec` without its query (a signed URL's secret), for messages and logs.
pub fn redact_store(spec: &str) -> String {
    match spec.split_once('?') {
        Some((base, _)) => format!("{base}?<query hidden>"),
        None => spec.to_string(),
    }
}

/// A client for an HTTP(S) store: no redirects, `opts`' roots, identity and headers.
/// Proxies come from HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY (reqwest's default).
pub(crate) fn http_client(attempt_timeout: Duration, opts: &HttpOptions) -> Result<reqwest::Client> {
    let setup = |what: String| move |source| Error::HttpSetup { what, source };
    let mut b = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .connect_timeout(Duration::from_secs(5).min(attempt_timeout))
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true);
    if let Some(sys) = system_ca_file() {
        // Not the user's choice: a bundle that cannot be used leaves the built-in roots.
        match read_small(&sys, PEM_MAX, "system CA bundle")
            .and_then(|pem| reqwest::Certificate::from_pem_bundle(&pem).map_err(setup(sys.display().to_string())))
        {
            Ok(certs) => b = certs.into_iter().fold(b, |b, c| b.add_root_certificate(c)),
            Err(e) => tracing::warn!("system CA bundle not used: {e}"),
        }
    }
    for f in &opts.ca_files {
        let certs = reqwest::Certificate::from_pem_bundle(&read_small(f, PEM_MAX, "CA file")?)
            .map_err(setup(format!("CA file {}", f.display())))?;
        if certs.is_empty() {
            return Err(Error::Invalid(format!("CA file {} holds no PEM certificate", f.display())));
        }
        b = certs.into_iter().fold(b, |b, c| b.add_root_certificate(c));
    }
    if let Some(cert) = &opts.client_cert {
        let mut pem = read_small(cert, PEM_MAX, "client certificate")?;
        if let Some(key) = &opts.client_key {
            pem.push(b'\n');
            pem.extend(read_small(key, PEM_MAX, "client key")?);
        }
        let id = reqwest::Identity::from_pem(&pem)
            .map_err(setup(format!("client certificate {} and its key", cert.display())))?;
        b = b.identity(id);
    }
    let mut headers = reqwest::header::HeaderMap::new();
    for h in &opts.headers {
        // The value may be a secret: messages name the header only.
        let (name, value) =
            h.split_once(':').ok_or_else(|| Error::Invalid("a --header is not \"Name: value\"".to_string()))?;
        let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| Error::Invalid(format!("header name {:?} is not valid", name.trim())))?;
        let mut value = reqwest::header::HeaderValue::from_str(value.trim())
            .map_err(|_| Error::Invalid(format!("the value of header {name} is not valid")))?;
        value.set_sensitive(true);
        headers.append(name, value);
    }
    b.default_headers(headers).build().map_err(Error::HttpClient)
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
        Self::open_with(spec, attempt_timeout, &HttpOptions::default())
    }

    /// As `open`, an HTTP(S) store's requests made as `http` says. A query in the URL
    /// (`https://host/prefix?X-Amz-Signature=…`) is kept on every request, after the
    /// object's path.
    pub fn open_with(spec: &str, attempt_timeout: Duration, http: &HttpOptions) -> Result<Self> {
        if !http.mirrors.is_empty() {
            let origin = Self::open_one(spec, attempt_timeout, http)?;
            // A mirror gets the TLS settings, never the origin's credentials (headers, token).
            let to_mirrors = HttpOptions { headers: Vec::new(), bearer_token_file: None, ..http.clone() };
            let mirrors = http
                .mirrors
                .iter()
                .map(|m| Self::open_one(m, attempt_timeout, &to_mirrors))
                .collect::<Result<Vec<_>>>()?;
            let backoff = http.mirror_backoff.unwrap_or(mirror::DEFAULT_MIRROR_BACKOFF);
            return Ok(Remote::Mirrored(Arc::new(mirror::Mirrors::new(origin, mirrors, backoff))));
        }
        Self::open_one(spec, attempt_timeout, http)
    }

    /// One source: an OCI registry repository, an `s3://` bucket, an HTTP(S) server or a
    /// store directory.
    fn open_one(spec: &str, attempt_timeout: Duration, http: &HttpOptions) -> Result<Self> {
        if let Some(reference) = oci::OciRef::parse(spec)? {
            return Ok(Remote::Oci(Arc::new(oci::Registry::open(reference, attempt_timeout, http, false)?)));
        }
        if spec.starts_with("s3://") {
            let (base, signer) = s3::open(spec, &http.s3)?;
            let Remote::Http { base: _, query, client, attempt_base, bearer, s3: _ } =
                Self::open_one(&base, attempt_timeout, http)?
            else {
                return Err(Error::Invalid(format!("{spec}: not an HTTP remote")));
            };
            return Ok(Remote::Http { base, query, client, attempt_base, bearer, s3: Some(signer) });
        }
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let spec = spec.split_once('#').map_or(spec, |(s, _)| s);
            let (base, query) = match spec.split_once('?') {
                Some((b, q)) if !q.is_empty() => (b, Some(Secret(q.to_string()))),
                Some((b, _)) => (b, None),
                None => (spec, None),
            };
            let client = http_client(attempt_timeout, http)?;
            let bearer = http.bearer_token_file.as_deref().map(BearerToken::open).transpose()?.map(Arc::new);
            Ok(Remote::Http {
                base: base.trim_end_matches('/').to_string(),
                query,
                client,
                attempt_base: attempt_timeout,
                bearer,
                s3: None,
            })
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
            Remote::Oci(r) => r.reference.to_string(),
            Remote::Mirrored(m) => {
                format!("{} (after {} mirrors)", m.origin().describe(), m.sources().len() - 1)
            }
        }
    }

    /// A manifest as stored (see `image::manifest_from_stored`), checked against `id` before
    /// it is returned: what comes back is the image's, whatever the store sent.
    pub async fn manifest(&self, id: &ImageId) -> Result<Vec<u8>, FetchError> {
        let rel = format!("images/{id}");
        let (what, bytes) = match self {
            Remote::Mirrored(m) => return m.manifest(id).await,
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
            Remote::Http { s3, .. } => {
                let resp = self.get(&rel, None).await?;
                let what = resp.what.clone();
                let status = resp.inner.status();
                if status != StatusCode::OK && s3.is_some() {
                    return Err(resp.s3_refusal().await);
                }
                if status != StatusCode::OK {
                    return Err(resp.unexpected());
                }
                (what, Vec::from(resp.body(MANIFEST_FETCH_MAX, None).await?))
            }
            Remote::Oci(r) => {
                let resp = r.get_blob(&format!("sha256:{id}"), None).await?;
                let what = resp.what.clone();
                if resp.inner.status() != StatusCode::OK {
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
            // A hint: the origin's only.
            Remote::Mirrored(m) => return Box::pin(m.origin().trace(id)).await,
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
            // Traces are not pushed to registries.
            Remote::Oci(_) => return Ok(None),
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
            Remote::Mirrored(m) => m.range_checked(blob, offset, len, |_| ((), true)).await.map(|(d, ())| d),
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
            Remote::Http { .. } => ranged(self.get(&rel, Some((offset, len))).await?, offset, len, end).await,
            Remote::Oci(r) => {
                let digest = format!("sha256:{}", hex::encode(blob));
                ranged(r.get_blob(&digest, Some((offset, len))).await?, offset, len, end).await
            }
        }
    }

    /// Bytes [offset, offset+len) of a blob and what `check` made of them. With mirrors,
    /// the first source whose bytes `check` accepts (its second value) answers; else the
    /// origin, whatever `check` says.
    pub async fn range_checked<T>(
        &self,
        blob: &Hash,
        offset: u64,
        len: u64,
        check: impl Fn(&Bytes) -> (T, bool),
    ) -> Result<(Bytes, T), FetchError> {
        if let Remote::Mirrored(m) = self {
            return m.range_checked(blob, offset, len, check).await;
        }
        let data = self.range(blob, offset, len).await?;
        let (t, _) = check(&data);
        Ok((data, t))
    }

    /// Per-source counters with mirrors (see `Mirrors::counters`); none without.
    pub fn source_counters(&self) -> Vec<(String, u64)> {
        match self {
            Remote::Mirrored(m) => m.counters(),
            _ => Vec::new(),
        }
    }

    /// Sends a GET for `rel` (of `range` = (offset, len) if given) and waits for the answer's
    /// head within the attempt's base allowance.
    async fn get(&self, rel: &str, range: Option<(u64, u64)>) -> Result<Answer, FetchError> {
        let Remote::Http { base, query, client, attempt_base, bearer, s3 } = self else {
            return Err(FetchError::Permanent("not an HTTP remote".into()));
        };
        let (url, shown) = match query {
            Some(Secret(q)) => (format!("{base}/{rel}?{q}"), format!("{base}/{rel}?<query hidden>")),
            None => (format!("{base}/{rel}"), format!("{base}/{rel}")),
        };
        let what = match range {
            Some((offset, len)) => format!("GET {shown} [{offset}, +{len})"),
            None => format!("GET {shown}"),
        };
        let mut req = client.get(&url);
        if let Some(b) = bearer {
            req = req.header(reqwest::header::AUTHORIZATION, b.value());
        }
        let range = range.map(|(offset, len)| format!("bytes={offset}-{}", offset + len - 1));
        if let Some(r) = &range {
            req = req.header(reqwest::header::RANGE, r);
        }
        if let Some(signer) = s3 {
            let parsed = reqwest::Url::parse(&url)
                .map_err(|e| FetchError::Permanent(format!("{what}: not a URL: {e}").into()))?;
            for (name, value) in signer.sign_get(&parsed, range.as_deref(), std::time::SystemTime::now()) {
                req = req.header(name, value);
            }
        }
        let start = Instant::now();
        let inner = match tokio::time::timeout(*attempt_base, req.send()).await {
            Err(_) => return Err(FetchError::Transient(FetchFailure::TimedOut { what, after: *attempt_base })),
            Ok(Err(e)) => {
                let refused = tls_refused(&e);
                let f = FetchFailure::Http { what, source: Arc::new(e.without_url()) };
                return Err(if refused { FetchError::Permanent(f) } else { FetchError::Transient(f) });
            }
            Ok(Ok(r)) => r,
        };
        Ok(Answer { inner, what, start, base: *attempt_base })
    }
}

/// The bytes [offset, offset+len) (ending at `end`) of a blob from a ranged GET's answer.
async fn ranged(resp: Answer, offset: u64, len: u64, end: u64) -> Result<Bytes, FetchError> {
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
                return Err(FetchError::Transient(FetchFailure::Short { what, want: end, got: all.len() as u64 }));
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

/// Whether TLS refused the connection for good: a certificate that does not verify (an
/// unknown issuer, a wrong name, expired), no protocol both sides speak, or the server's
/// alert (ours refused). Retrying cannot help; anything else in transit may pass.
fn tls_refused(e: &reqwest::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(mut err) = cur {
        // io::Errors (nested: hyper's around tokio-rustls') hold the rustls error, and their
        // source() skips what they hold.
        while let Some(inner) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            err = inner;
        }
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return matches!(
                t,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::PeerIncompatible(_)
                    | rustls::Error::AlertReceived(_)
                    | rustls::Error::NoCertificatesPresented
            );
        }
        cur = err.source();
    }
    false
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

    /// S3's refusal, with the error code from its XML body (`SignatureDoesNotMatch`,
    /// `InvalidAccessKeyId`, `ExpiredToken`, `NoSuchKey`...), which says what to fix.
    async fn s3_refusal(self) -> FetchError {
        let status = self.inner.status();
        if !status.is_client_error() {
            return self.unexpected();
        }
        let what = self.what.clone();
        let body = self.prefix(4096).await.unwrap_or_default();
        let body = String::from_utf8_lossy(&body);
        let tag = |t: &str| -> Option<String> {
            let start = body.find(&format!("<{t}>"))? + t.len() + 2;
            let len = body[start..].find(&format!("</{t}>"))?;
            // What the server says is shown: bounded, and printable characters only.
            Some(body[start..start + len].chars().filter(|c| !c.is_control()).take(200).collect())
        };
        let code = tag("Code").unwrap_or_else(|| "no error code".into());
        let hint = match code.as_str() {
            "SignatureDoesNotMatch" => " (wrong secret key?)",
            // NotSignedUp: what s3s (and older S3 servers) say of a key they do not know.
            "InvalidAccessKeyId" | "NotSignedUp" => " (unknown access key id?)",
            "ExpiredToken" | "InvalidToken" => " (session token expired or invalid)",
            "RequestTimeTooSkewed" => " (the clock is off)",
            "AuthorizationHeaderMalformed" => " (wrong --s3-region?)",
            _ => "",
        };
        let message = tag("Message").map(|m| format!(": {m}")).unwrap_or_default();
        let why = format!("S3 refused the request: HTTP {status} {code}{hint}{message}");
        let f = FetchFailure::Protocol { what, why };
        if matches!(code.as_str(), "ExpiredToken" | "RequestTimeout" | "SlowDown") {
            FetchError::Transient(f)
        } else {
            FetchError::Permanent(f)
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
                    let source = Arc::new(e.without_url());
                    return Err(FetchError::Transient(FetchFailure::Http { what: self.what, source }));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_query_goes_after_every_path_and_is_never_shown() {
        let r = Remote::open("https://h.example/p/?sig=s3cret&x=1", Duration::from_secs(1)).expect("remote");
        let Remote::Http { base, query, .. } = &r else { panic!("not http") };
        assert_eq!(base, "https://h.example/p");
        assert_eq!(query.as_ref().map(|q| q.0.as_str()), Some("sig=s3cret&x=1"));
        assert!(!format!("{r:?}").contains("s3cret"));
        assert!(!r.describe().contains("s3cret"));
        assert_eq!(redact_store("https://h/p?sig=s3cret"), "https://h/p?<query hidden>");
        assert_eq!(redact_store("https://h/p"), "https://h/p");
        let Remote::Http { query, .. } = Remote::open("https://h/p?", Duration::from_secs(1)).expect("remote") else {
            panic!("not http")
        };
        assert!(query.is_none());
    }

    #[test]
    fn header_values_are_never_shown() {
        let opts = HttpOptions { headers: vec!["X-Token: s3cret".into()], ..HttpOptions::default() };
        assert!(format!("{opts:?}").contains("X-Token") && !format!("{opts:?}").contains("s3cret"));
        let r = Remote::open_with("https://h/p", Duration::from_secs(1), &opts).expect("remote");
        assert!(!format!("{r:?}").contains("s3cret"));
        let bad = HttpOptions { headers: vec!["X-Token s3cret".into()], ..HttpOptions::default() };
        let e = Remote::open_with("https://h/p", Duration::from_secs(1), &bad).expect_err("no colon");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn bearer_token_reread_when_its_file_changes() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("token");
        fs::write(&f, "one\n").expect("write");
        let t = BearerToken::open(&f).expect("token");
        assert_eq!(t.value().to_str().ok(), Some("Bearer one"));
        assert!(t.value().is_sensitive() && !format!("{t:?}").contains("one"));
        let tmp = d.path().join("token.new");
        fs::write(&tmp, "two").expect("write");
        fs::rename(&tmp, &f).expect("rename");
        std::thread::sleep(TOKEN_RECHECK);
        assert_eq!(t.value().to_str().ok(), Some("Bearer two"));
        // An empty file keeps the last good token.
        fs::write(&f, "").expect("write");
        std::thread::sleep(TOKEN_RECHECK);
        assert_eq!(t.value().to_str().ok(), Some("Bearer two"));
        fs::write(&f, "").expect("write");
        assert!(BearerToken::open(&f).is_err(), "an empty token file is refused at start");
    }
}
