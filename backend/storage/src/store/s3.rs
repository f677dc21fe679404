//! S3 as a store: `s3://BUCKET/PREFIX` is the HTTP store at the bucket's URL (path- or
//! virtual-host-style), every request signed with AWS Signature Version 4.
//!
//! The signer is ours (HMAC-SHA-256 from `hmac` + `sha2`, checked against AWS's published
//! examples below) rather than `aws-sigv4`, whose dependency tree (the smithy runtime, `time`,
//! `http` 0.2 and 1.x) is larger than all of this: a GET needs four signed headers.
//!
//! Credentials, as the AWS tools find them: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_SESSION_TOKEN` from the environment; else the shared credentials file
//! (`AWS_SHARED_CREDENTIALS_FILE`, default `~/.aws/credentials`), profile `AWS_PROFILE` (default
//! `default`), re-read when the file changes so that rotated keys need no restart. The region:
//! `--s3-region`, else `AWS_REGION`, `AWS_DEFAULT_REGION`, the profile's `region` in the config
//! file (`AWS_CONFIG_FILE`, default `~/.aws/config`), else `us-east-1`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// SHA-256 of the empty body, the payload hash of every GET.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Largest credentials or config file read.
const CREDENTIALS_MAX: u64 = 1 << 20;
/// The credentials file is checked for changes (one stat) at most this often.
pub const CREDENTIALS_RECHECK: Duration = Duration::from_secs(1);

/// How the bucket is named in the URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// `ENDPOINT/BUCKET/KEY`: what S3-protocol servers other than AWS serve without DNS set up.
    Path,
    /// `BUCKET.ENDPOINT-HOST/KEY`: AWS's default.
    Virtual,
}

/// S3 settings beyond the `s3://BUCKET/PREFIX` URL.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    pub region: Option<String>,
    /// `http(s)://host[:port]` of a server that is not AWS (MinIO, Ceph, Garage...).
    pub endpoint: Option<String>,
    /// Default: virtual-host-style for AWS, path-style for a custom endpoint.
    pub addressing: Option<Addressing>,
}

/// An access key, its secret and a session token. Debug shows the key id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("session_token", &self.session_token.as_ref().map(|_| "<hidden>"))
            .finish_non_exhaustive()
    }
}

/// Where the credentials come from.
enum Source {
    Env(Credentials),
    File { path: PathBuf, profile: String, state: Mutex<FileState> },
}

struct FileState {
    creds: Credentials,
    /// (device, inode, size, mtime in ns) of the file they came from.
    stamp: (u64, u64, u64, i128),
    checked: Instant,
}

/// Signs requests to one bucket's region.
pub struct S3Signer {
    region: String,
    source: Source,
}

impl std::fmt::Debug for S3Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = match &self.source {
            Source::Env(c) => format!("environment ({})", c.access_key),
            Source::File { path, profile, .. } => format!("{} [{profile}]", path.display()),
        };
        f.debug_struct("S3Signer").field("region", &self.region).field("credentials", &from).finish()
    }
}

/// The environment variable, if set and not empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn home_file(var: &str, rel: &str) -> Option<PathBuf> {
    env(var).map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(rel)))
}

/// The shared credentials file and the config file, whether they exist or not: what a
/// sandboxed daemon must keep reachable.
pub fn credential_files() -> Vec<PathBuf> {
    [home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"), home_file("AWS_CONFIG_FILE", ".aws/config")]
        .into_iter()
        .flatten()
        .collect()
}

fn profile() -> String {
    env("AWS_PROFILE").unwrap_or_else(|| "default".into())
}

/// The `key = value` pairs of section `[section]` of an INI file as the AWS tools write
/// them. Comments (`#`, `;`) and other sections are skipped.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = name.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

fn read_small(path: &Path) -> Result<String> {
    use std::io::Read;
    let ctx = |e| Error::io(format!("read {}", path.display()), e);
    let mut text = String::new();
    fs::File::open(path).map_err(ctx)?.take(CREDENTIALS_MAX).read_to_string(&mut text).map_err(ctx)?;
    Ok(text)
}

fn stamp(path: &Path) -> std::io::Result<(u64, u64, u64, i128)> {
    let m = fs::metadata(path)?;
    Ok((m.dev(), m.ino(), m.size(), m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128))
}

/// The profile's credentials from a shared credentials file. Messages name the file and
/// the profile, never a value.
fn load_file(path: &Path, profile: &str) -> Result<(Credentials, (u64, u64, u64, i128))> {
    let st = stamp(path).map_err(|e| Error::io(format!("stat S3 credentials file {}", path.display()), e))?;
    let pairs = ini_section(&read_small(path)?, profile);
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
    let missing =
        |k: &str| Error::Invalid(format!("S3 credentials file {}: profile [{profile}] has no {k}", path.display()));
    let creds = Credentials {
        access_key: get("aws_access_key_id").ok_or_else(|| missing("aws_access_key_id"))?,
        secret_key: get("aws_secret_access_key").ok_or_else(|| missing("aws_secret_access_key"))?,
        session_token: get("aws_session_token"),
    };
    Ok((creds, st))
}

/// The region, from the options, the environment or the config file's profile.
fn region(opts: &S3Options) -> String {
    if let Some(r) = opts.region.clone().or_else(|| env("AWS_REGION")).or_else(|| env("AWS_DEFAULT_REGION")) {
        return r;
    }
    let p = profile();
    let section = if p == "default" { p } else { format!("profile {p}") };
    home_file("AWS_CONFIG_FILE", ".aws/config")
        .and_then(|f| read_small(&f).ok())
        .and_then(|text| ini_section(&text, &section).into_iter().find(|(k, _)| k == "region").map(|(_, v)| v))
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "us-east-1".into())
}

impl S3Signer {
    /// Finds the credentials (environment, else the shared credentials file) and the region.
    pub fn from_environment(opts: &S3Options) -> Result<Self> {
        let region = region(opts);
        if let (Some(access_key), Some(secret_key)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            let creds = Credentials { access_key, secret_key, session_token: env("AWS_SESSION_TOKEN") };
            return Ok(S3Signer { region, source: Source::Env(creds) });
        }
        let path = home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials").ok_or_else(|| {
            Error::Invalid("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or HOME".into())
        })?;
        let profile = profile();
        let (creds, stamp) = load_file(&path, &profile).map_err(|e| {
            Error::Invalid(format!(
                "no S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set, and {e}"
            ))
        })?;
        let state = Mutex::new(FileState { creds, stamp, checked: Instant::now() });
        Ok(S3Signer { region, source: Source::File { path, profile, state } })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The current credentials: a credentials file is stat'ed at most every
    /// CREDENTIALS_RECHECK and re-read if it changed. One that cannot be read or lacks a key
    /// (mid-rewrite) keeps the last good credentials until the next check.
    pub fn credentials(&self) -> Credentials {
        let (path, profile, state) = match &self.source {
            Source::Env(c) => return c.clone(),
            Source::File { path, profile, state } => (path, profile, state),
        };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if s.checked.elapsed() >= CREDENTIALS_RECHECK {
            s.checked = Instant::now();
            match stamp(path) {
                Ok(st) if st == s.stamp => {}
                Ok(_) => match load_file(path, profile) {
                    Ok((creds, st)) => {
                        tracing::info!(file = %path.display(), access_key = %creds.access_key, "S3 credentials file changed: reloaded");
                        (s.creds, s.stamp) = (creds, st);
                    }
                    Err(e) => tracing::warn!("keeping the last S3 credentials: {e}"),
                },
                Err(e) => tracing::warn!(file = %path.display(), "keeping the last S3 credentials: stat: {e}"),
            }
        }
        s.creds.clone()
    }

    /// The headers that sign a GET of `url` (with `range`, if any) at `now`: `x-amz-date`,
    /// `x-amz-content-sha256`, `x-amz-security-token` with a session token, and
    /// `authorization`. The values are marked sensitive.
    pub fn sign_get(
        &self,
        url: &reqwest::Url,
        range: Option<&str>,
        now: SystemTime,
    ) -> Vec<(&'static str, reqwest::header::HeaderValue)> {
        self.sign("GET", url, range, EMPTY_SHA256, now)
    }

    /// As `sign_get`, for `method` and a body of SHA-256 `payload_hash` (hex).
    pub fn sign(
        &self,
        method: &str,
        url: &reqwest::Url,
        range: Option<&str>,
        payload_hash: &str,
        now: SystemTime,
    ) -> Vec<(&'static str, reqwest::header::HeaderValue)> {
        let creds = self.credentials();
        let date = amz_date(now);
        let mut headers: Vec<(&'static str, String)> = vec![
            ("host", host_header(url)),
            ("x-amz-content-sha256", payload_hash.into()),
            ("x-amz-date", date.clone()),
        ];
        if let Some(r) = range {
            headers.push(("range", r.into()));
        }
        if let Some(t) = &creds.session_token {
            headers.push(("x-amz-security-token", t.clone()));
        }
        let auth = authorization(&creds, &self.region, "s3", method, url, &headers, payload_hash, &date);
        headers.push(("authorization", auth));
        headers
            .into_iter()
            // reqwest sets Host itself from the URL (the same value), and the caller Range.
            .filter(|(k, _)| *k != "host" && *k != "range")
            .filter_map(|(k, v)| {
                let mut v = reqwest::header::HeaderValue::from_str(&v).ok()?;
                v.set_sensitive(true);
                Some((k, v))
            })
            .collect()
    }
}

/// `host[:port]` as reqwest sends it in the Host header (the port only if not the scheme's).
fn host_header(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// `YYYYMMDDTHHMMSSZ` (UTC) of `t`.
pub fn amz_date(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss) = civil_utc(t);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// The UTC calendar date and time of `t` (year, month, day, hour, minute, second), for the
/// date formats stores want.
pub(crate) fn civil_utc(t: SystemTime) -> (i64, i64, i64, u64, u64, u64) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem / 3600, rem / 60 % 60, rem % 60)
}

/// RFC 3986 percent-encoding as SigV4 wants it: all but unreserved characters (and `/`
/// when `keep_slash`).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    m.update(data);
    m.finalize().into_bytes().into()
}

/// The canonical request of SigV4 and its signed header list. `headers`: (lower-case
/// name, value); the path is taken as the URL has it (already encoded, as S3 wants: not
/// encoded twice), the query re-encoded and sorted.
fn canonical_request(
    method: &str,
    url: &reqwest::Url,
    headers: &[(&str, String)],
    payload_hash: &str,
) -> (String, String) {
    let mut query: Vec<(String, String)> =
        url.query_pairs().map(|(k, v)| (uri_encode(&k, false), uri_encode(&v, false))).collect();
    query.sort();
    let query: Vec<String> = query.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut hs: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    hs.sort();
    let signed: Vec<&str> = hs.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canon_headers: String = hs.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let path = if url.path().is_empty() { "/" } else { url.path() };
    (format!("{method}\n{path}\n{}\n{canon_headers}\n{signed}\n{payload_hash}", query.join("&")), signed)
}

/// The `Authorization` header value of SigV4 for a request at `date` (`YYYYMMDDTHHMMSSZ`).
#[allow(clippy::too_many_arguments)]
fn authorization(
    creds: &Credentials,
    region: &str,
    service: &str,
    method: &str,
    url: &reqwest::Url,
    headers: &[(&str, String)],
    payload_hash: &str,
    date: &str,
) -> String {
    let (canonical, signed) = canonical_request(method, url, headers, payload_hash);
    let day = &date[..8.min(date.len())];
    let scope = format!("{day}/{region}/{service}/aws4_request");
    let to_sign = format!("AWS4-HMAC-SHA256\n{date}\n{scope}\n{}", sha256_hex(canonical.as_bytes()));
    let mut key = hmac(format!("AWS4{}", creds.secret_key).as_bytes(), day.as_bytes());
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}", creds.access_key)
}

/// `s3://BUCKET/PREFIX` → the store's base URL (no trailing slash) and its signer.
pub fn open(spec: &str, opts: &S3Options) -> Result<(String, Arc<S3Signer>)> {
    let rest = spec.strip_prefix("s3://").ok_or_else(|| Error::Invalid(format!("{spec} is not s3://BUCKET/PREFIX")))?;
    if rest.contains(['?', '#']) {
        return Err(Error::Invalid(format!("{spec}: an s3:// store takes no query or fragment")));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // Bucket names: 3-63 of lower-case letters, digits, '-' and '.' (S3's rules).
    if bucket.len() < 3
        || bucket.len() > 63
        || !bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(Error::Invalid(format!("{spec}: {bucket:?} is not an S3 bucket name")));
    }
    let signer = S3Signer::from_environment(opts)?;
    let base = base_url(bucket, prefix, opts, &signer.region)?;
    Ok((base, Arc::new(signer)))
}

/// The URL of `prefix` in `bucket`, as `opts` address it.
fn base_url(bucket: &str, prefix: &str, opts: &S3Options, region: &str) -> Result<String> {
    let (endpoint, custom) = match &opts.endpoint {
        Some(e) => (e.trim_end_matches('/').to_string(), true),
        None => (format!("https://s3.{region}.amazonaws.com"), false),
    };
    let url = reqwest::Url::parse(&endpoint).map_err(|e| Error::Invalid(format!("S3 endpoint {endpoint}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() || url.query().is_some() {
        return Err(Error::Invalid(format!("S3 endpoint {endpoint} is not http(s)://HOST[:PORT][/PATH]")));
    }
    let addressing = opts.addressing.unwrap_or(if custom { Addressing::Path } else { Addressing::Virtual });
    let prefix = uri_encode(prefix.trim_matches('/'), true);
    let host = host_header(&url);
    let path = url.path().trim_end_matches('/');
    let mut base = match addressing {
        Addressing::Path => format!("{}://{host}{path}/{bucket}", url.scheme()),
        Addressing::Virtual => format!("{}://{bucket}.{host}{path}", url.scheme()),
    };
    if !prefix.is_empty() {
        base = format!("{base}/{prefix}");
    }
    Ok(base)
}

/// What `upload_store` did.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub uploaded: u64,
    pub bytes: u64,
    /// Objects already in the bucket with the same size (content-addressed: the same bytes).
    pub present: u64,
}

/// Largest object uploaded (one PUT; S3 takes up to 5 GiB, a blob is about `--blob-size-mb`).
const UPLOAD_MAX: u64 = 1 << 30;

/// Uploads a store directory (as `incfsd pack` writes it) to `spec` (`s3://BUCKET/PREFIX`)
/// with signed PUTs: blobs, then traces, then manifests, so that an image is visible only
/// once everything it names is there. An object already present with the same size is
/// skipped (names are content hashes: the same name is the same bytes). Transient failures
/// (transport, 5xx, 429) are retried 3 times.
pub async fn upload_store(
    dir: &Path,
    spec: &str,
    opts: &S3Options,
    http: &super::HttpOptions,
    timeout: Duration,
) -> Result<UploadStats> {
    let (base, signer) = open(spec, opts)?;
    let client = super::http_client(timeout, http)?;
    let mut stats = UploadStats::default();
    for sub in ["blobs", "traces", "images"] {
        let d = dir.join(sub);
        if !d.is_dir() {
            continue;
        }
        let mut names: Vec<String> = fs::read_dir(&d)
            .map_err(|e| Error::io(format!("list {}", d.display()), e))?
            .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
            .collect();
        names.sort();
        for name in names {
            let path = d.join(&name);
            let url = format!("{base}/{sub}/{name}");
            let url = reqwest::Url::parse(&url).map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
            let size = fs::metadata(&path).map_err(|e| Error::io(format!("stat {}", path.display()), e))?.len();
            if size > UPLOAD_MAX {
                return Err(Error::Invalid(format!("{} is larger than {UPLOAD_MAX} bytes", path.display())));
            }
            if head_size(&client, &signer, &url, timeout).await? == Some(size) {
                stats.present += 1;
                continue;
            }
            let body = fs::read(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
            put(&client, &signer, &url, body, timeout).await?;
            stats.uploaded += 1;
            stats.bytes += size;
        }
    }
    Ok(stats)
}

/// The object's size if it exists (HEAD), None if not.
async fn head_size(
    client: &reqwest::Client,
    signer: &S3Signer,
    url: &reqwest::Url,
    timeout: Duration,
) -> Result<Option<u64>> {
    let what = format!("HEAD {url}");
    for attempt in 0..4 {
        let mut req = client.head(url.clone());
        for (k, v) in signer.sign("HEAD", url, None, EMPTY_SHA256, SystemTime::now()) {
            req = req.header(k, v);
        }
        match tokio::time::timeout(timeout, req.send()).await {
            Ok(Ok(r)) if r.status().is_success() => {
                return Ok(r.headers().get(reqwest::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()))
            }
            Ok(Ok(r)) if r.status() == reqwest::StatusCode::NOT_FOUND => return Ok(None),
            Ok(Ok(r)) if !transient(r.status()) || attempt == 3 => {
                // A HEAD answer has no body to say why.
                return Err(Error::Invalid(format!(
                    "{what}: S3 refused: HTTP {} (check the credentials and region)",
                    r.status()
                )));
            }
            Ok(Err(e)) if attempt == 3 => return Err(Error::Invalid(format!("{what}: {}", e.without_url()))),
            Err(_) if attempt == 3 => return Err(Error::Invalid(format!("{what}: no answer within {timeout:?}"))),
            _ => tokio::time::sleep(Duration::from_millis(200 << attempt)).await,
        }
    }
    unreachable!("the last attempt returns")
}

fn transient(s: reqwest::StatusCode) -> bool {
    s.is_server_error() || s == reqwest::StatusCode::TOO_MANY_REQUESTS || s == reqwest::StatusCode::REQUEST_TIMEOUT
}

/// A signed PUT of `body`, its SHA-256 signed too.
async fn put(
    client: &reqwest::Client,
    signer: &S3Signer,
    url: &reqwest::Url,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<()> {
    let what = format!("PUT {url}");
    let hash = sha256_hex(&body);
    let body = bytes::Bytes::from(body);
    let deadline = super::attempt_deadline(timeout, body.len() as u64);
    for attempt in 0..4 {
        let mut req = client.put(url.clone()).body(body.clone());
        for (k, v) in signer.sign("PUT", url, None, &hash, SystemTime::now()) {
            req = req.header(k, v);
        }
        let r = match tokio::time::timeout(deadline, req.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if attempt == 3 => return Err(Error::Invalid(format!("{what}: {}", e.without_url()))),
            Err(_) if attempt == 3 => return Err(Error::Invalid(format!("{what}: no answer within {deadline:?}"))),
            _ => {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                continue;
            }
        };
        let status = r.status();
        if status.is_success() {
            return Ok(());
        }
        if transient(status) && attempt < 3 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            continue;
        }
        // The error body, its first 4 KiB only.
        let mut text = Vec::new();
        let mut r = r;
        while text.len() < 4096 {
            match tokio::time::timeout(timeout, r.chunk()).await {
                Ok(Ok(Some(c))) => text.extend_from_slice(&c[..c.len().min(4096 - text.len())]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        let code = text
            .split_once("<Code>")
            .and_then(|(_, r)| r.split_once("</Code>"))
            .map(|(c, _)| c.chars().filter(|c| !c.is_control()).take(100).collect::<String>())
            .unwrap_or_else(|| "no error code".into());
        return Err(Error::Invalid(format!("{what}: S3 refused the upload: HTTP {status} {code}")));
    }
    unreachable!("the last attempt returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).expect("url")
    }

    const SUITE_DATE: &str = "20150830T123600Z";

    fn suite_creds() -> Credentials {
        Credentials {
            access_key: "AKIDEXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    /// AWS's SigV4 test suite: get-vanilla and get-vanilla-query-order-key-case.
    #[test]
    fn aws_test_suite_vectors() {
        for (u, sig) in [
            ("https://example.amazonaws.com/", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
            (
                "https://example.amazonaws.com/?Param2=value2&Param1=value1",
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
        ] {
            let u = url(u);
            let h = [("host", "example.amazonaws.com".to_string()), ("x-amz-date", SUITE_DATE.to_string())];
            let a = authorization(&suite_creds(), "us-east-1", "service", "GET", &u, &h, EMPTY_SHA256, SUITE_DATE);
            assert_eq!(
                a,
                format!(
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                     SignedHeaders=host;x-amz-date, Signature={sig}"
                )
            );
        }
    }

    fn doc_creds() -> Credentials {
        Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    /// The S3 documentation's examples ("Signature Calculations for the Authorization
    /// Header"): GET Object with a Range, PUT Object with an escaped key, list with a query.
    #[test]
    fn s3_documentation_vectors() {
        let date = "20130524T000000Z";
        let host = ("host", "examplebucket.s3.amazonaws.com".to_string());
        let get = [
            host.clone(),
            ("range", "bytes=0-9".to_string()),
            ("x-amz-content-sha256", EMPTY_SHA256.to_string()),
            ("x-amz-date", date.to_string()),
        ];
        let a = authorization(
            &doc_creds(),
            "us-east-1",
            "s3",
            "GET",
            &url("https://examplebucket.s3.amazonaws.com/test.txt"),
            &get,
            EMPTY_SHA256,
            date,
        );
        assert!(a.ends_with("Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"), "{a}");
        assert!(a.contains("SignedHeaders=host;range;x-amz-content-sha256;x-amz-date"), "{a}");

        let body = sha256_hex(b"Welcome to Amazon S3.");
        let put = [
            ("date", "Fri, 24 May 2013 00:00:00 GMT".to_string()),
            host.clone(),
            ("x-amz-content-sha256", body.clone()),
            ("x-amz-date", date.to_string()),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY".to_string()),
        ];
        let key = uri_encode("test$file.text", true);
        let u = url(&format!("https://examplebucket.s3.amazonaws.com/{key}"));
        let a = authorization(&doc_creds(), "us-east-1", "s3", "PUT", &u, &put, &body, date);
        assert!(a.ends_with("Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"), "{a}");

        let list = [host, ("x-amz-content-sha256", EMPTY_SHA256.to_string()), ("x-amz-date", date.to_string())];
        let u = url("https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J");
        let a = authorization(&doc_creds(), "us-east-1", "s3", "GET", &u, &list, EMPTY_SHA256, date);
        assert!(a.ends_with("Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"), "{a}");
    }

    #[test]
    fn path_and_virtual_host_addressing() {
        let o = |endpoint: Option<&str>, addressing| S3Options {
            region: None,
            endpoint: endpoint.map(String::from),
            addressing,
        };
        let b = |opts: &S3Options, prefix| base_url("bkt", prefix, opts, "eu-west-1").expect("url");
        assert_eq!(b(&o(None, None), "images/v1"), "https://bkt.s3.eu-west-1.amazonaws.com/images/v1");
        assert_eq!(b(&o(None, Some(Addressing::Path)), ""), "https://s3.eu-west-1.amazonaws.com/bkt");
        let local = o(Some("http://127.0.0.1:9000/"), None);
        assert_eq!(b(&local, "/a b/c/"), "http://127.0.0.1:9000/bkt/a%20b/c");
        let virt = o(Some("http://s3.test:9000"), Some(Addressing::Virtual));
        assert_eq!(b(&virt, "p"), "http://bkt.s3.test:9000/p");
        assert!(base_url("bkt", "", &o(Some("ftp://h"), None), "r").is_err());
    }

    #[test]
    fn amz_dates() {
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(1_440_938_160)), SUITE_DATE);
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(1_369_353_600)), "20130524T000000Z");
        // 2024-02-29 (a leap day) 23:59:59.
        assert_eq!(amz_date(UNIX_EPOCH + Duration::from_secs(1_709_251_199)), "20240229T235959Z");
    }

    #[test]
    fn profiles_of_an_ini_file() {
        let text = "# c\n[default]\naws_access_key_id = A\n aws_secret_access_key=B \n[other]\naws_access_key_id=C\n";
        assert_eq!(
            ini_section(text, "default"),
            [("aws_access_key_id".into(), "A".into()), ("aws_secret_access_key".into(), "B".into())]
        );
        assert_eq!(ini_section(text, "other"), [("aws_access_key_id".to_string(), "C".to_string())]);
        assert!(ini_section(text, "none").is_empty());
    }

    /// A session token is sent and signed: a server that checks the signature sees it.
    #[test]
    fn a_session_token_is_signed() {
        let creds =
            Credentials { access_key: "AKID".into(), secret_key: "s".into(), session_token: Some("tok".into()) };
        let signer = S3Signer { region: "us-east-1".into(), source: Source::Env(creds) };
        let h = signer.sign_get(&url("http://127.0.0.1:9000/b/k"), Some("bytes=0-9"), UNIX_EPOCH);
        let get = |n: &str| h.iter().find(|(k, _)| *k == n).and_then(|(_, v)| v.to_str().ok()).unwrap_or_default();
        assert_eq!(get("x-amz-security-token"), "tok");
        assert_eq!(get("x-amz-date"), "19700101T000000Z");
        assert!(
            get("authorization")
                .contains("SignedHeaders=host;range;x-amz-content-sha256;x-amz-date;x-amz-security-token,"),
            "{}",
            get("authorization")
        );
        assert!(h.iter().all(|(_, v)| v.is_sensitive()));
    }

    #[test]
    fn secrets_are_never_shown() {
        let c =
            Credentials { access_key: "AKID".into(), secret_key: "s3cret".into(), session_token: Some("t0ken".into()) };
        let s = format!("{c:?}");
        assert!(s.contains("AKID") && !s.contains("s3cret") && !s.contains("t0ken"), "{s}");
    }
}
