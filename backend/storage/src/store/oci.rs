//! OCI registries (the distribution API) as stores: `oci://HOST[:PORT]/REPO[:TAG]`.
//!
//! An image is an OCI artifact: every blob of the store is an OCI blob whose digest is
//! `sha256:<blob id>` (blob ids are the SHA-256 of the blob's bytes), the manifest is a blob
//! whose digest is the image id (its canonical, uncompressed bytes), and an OCI image manifest
//! of `artifactType` [`ARTIFACT_TYPE`] lists them all as layers (so the registry's GC keeps
//! them) and is tagged. Reads need only blobs: `GET /v2/<repo>/blobs/sha256:<hex>` with a
//! Range, following the registry's redirect to its storage. A tag is resolved through the OCI
//! manifest to an image id once, at start; the id is what is trusted from then on.
//!
//! Everything a registry (or its token service) sends is hostile: JSON bodies, token answers,
//! `WWW-Authenticate` and `Location` headers are bounded, and nothing in them can panic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{attempt_deadline, http_client, read_small, Answer, FetchError, FetchFailure, HttpOptions, Store};
use crate::error::{Error, IoContext, Result};
use crate::image::{Hash, ImageId, Manifest};

/// `artifactType` of an incfs image's OCI manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.incfs.image.v1";
/// Media type of the layer holding the incfs manifest (canonical bytes; digest = image id).
pub const MANIFEST_LAYER_TYPE: &str = "application/vnd.incfs.manifest.v1";
/// Media type of the layers holding the image's blobs.
pub const BLOB_LAYER_TYPE: &str = "application/vnd.incfs.blob.v1";
/// Annotation of the OCI manifest naming the image id.
pub const ANNOTATION_IMAGE_ID: &str = "dev.incfs.image.id";
const OCI_MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty config blob, `{}`, and its digest (OCI image-spec, "Guidance for an Empty Descriptor").
const EMPTY_CONFIG: &[u8] = b"{}";
const EMPTY_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// Largest OCI manifest read (distribution's own limit is 4 MiB).
pub const OCI_MANIFEST_MAX: u64 = 4 << 20;
/// Largest token service answer read.
pub const TOKEN_ANSWER_MAX: u64 = 64 << 10;
/// Longest `WWW-Authenticate` or `Location` header considered.
pub const HEADER_MAX: usize = 8 << 10;
/// Most redirects followed for one blob request.
pub const REDIRECTS_MAX: usize = 5;
/// Largest credentials file (docker's config.json) read.
const CREDENTIALS_MAX: u64 = 1 << 20;
/// Upload chunk (one PATCH).
pub const UPLOAD_CHUNK: u64 = 8 << 20;
/// Blobs uploaded at once.
pub const UPLOAD_PARALLEL: usize = 4;
/// Attempts per chunk (each resuming where the registry says the upload stands), and fresh
/// uploads per blob once a resume is refused.
const CHUNK_ATTEMPTS: u32 = 5;
const UPLOAD_RESTARTS: u32 = 3;
/// A token is renewed once less than this share of its life (at most 30 s) is left.
const RENEW_FRACTION: u32 = 5;

/// `oci://HOST[:PORT]/REPO[:TAG]` (HTTPS) or `oci+http://…` (plain HTTP, only when asked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRef {
    pub plain_http: bool,
    /// `host[:port]`.
    pub host: String,
    pub repo: String,
    pub tag: Option<String>,
}

impl OciRef {
    /// None if `spec` is not an `oci://` or `oci+http://` URL; an error if it is a bad one.
    pub fn parse(spec: &str) -> Result<Option<OciRef>> {
        let (plain_http, rest) = if let Some(r) = spec.strip_prefix("oci://") {
            (false, r)
        } else if let Some(r) = spec.strip_prefix("oci+http://") {
            (true, r)
        } else {
            return Ok(None);
        };
        let bad = |why: &str| Error::Invalid(format!("store {spec:?}: {why} (oci://HOST[:PORT]/REPO[:TAG])"));
        let (host, path) = rest.split_once('/').ok_or_else(|| bad("no repository"))?;
        if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)) {
            return Err(bad("bad host"));
        }
        let path = path.trim_end_matches('/');
        // A tag follows the last component's ':' (a port's ':' is in the host).
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        if !valid_repo(repo) {
            return Err(bad("bad repository name (lower-case letters, digits, '.', '_', '-', '/')"));
        }
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(bad("bad tag"));
            }
        }
        Ok(Some(OciRef { plain_http, host: host.to_string(), repo: repo.to_string(), tag }))
    }

    /// `https://host[:port]` (or `http://`).
    pub fn origin(&self) -> String {
        format!("{}://{}", if self.plain_http { "http" } else { "https" }, self.host)
    }
}

impl std::fmt::Display for OciRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.plain_http { "oci+http" } else { "oci" };
        write!(f, "{scheme}://{}/{}", self.host, self.repo)?;
        match &self.tag {
            Some(t) => write!(f, ":{t}"),
            None => Ok(()),
        }
    }
}

/// The distribution spec's repository name grammar, components of `[a-z0-9]` runs joined by
/// `.`, `_`, `__` or dashes, separated by `/`.
fn valid_repo(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b.iter().all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && !c.contains("..")
                && !c.contains("___")
                && !c.contains("._")
                && !c.contains("_.")
        })
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|&x| x.is_ascii_alphanumeric() || b"._-".contains(&x))
}

/// A user name and password for a registry. Debug shows the user only.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

impl Credentials {
    fn basic(&self) -> HeaderValue {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.user, self.password));
        let mut v = HeaderValue::from_str(&format!("Basic {b64}")).unwrap_or_else(|_| HeaderValue::from_static(""));
        v.set_sensitive(true);
        v
    }
}

/// The credentials for `host` in a docker-style config (`{"auths": {"<host>": {"auth":
/// "<base64 user:pass>"}}}`): `file` if given (it must exist), else `$DOCKER_CONFIG/config.json`
/// or `~/.docker/config.json` if there is one. Credential helpers (`credsStore`,
/// `credHelpers`) are not run.
pub fn load_credentials(file: Option<&Path>, host: &str) -> Result<Option<Credentials>> {
    let Some(path) = file.map(Path::to_path_buf).or_else(default_credentials_file) else {
        return Ok(None);
    };
    let bytes = read_small(&path, CREDENTIALS_MAX, "registry credentials")?;
    let bad = |why: &str| Error::Invalid(format!("registry credentials {}: {why}", path.display()));
    let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| bad("not JSON"))?;
    let auths = json.get("auths").and_then(|a| a.as_object());
    let entry = auths.and_then(|a| a.iter().find(|(k, _)| auth_key_host(k) == host).map(|(_, v)| v));
    let Some(entry) = entry else {
        if file.is_some() {
            tracing::warn!(file = %path.display(), "no auths entry for {host}: no credentials sent");
        }
        if json.get("credsStore").is_some() || json.get("credHelpers").is_some() {
            tracing::warn!(
                file = %path.display(),
                "no auths entry for {host}: credential helpers are not supported, use --registry-auth"
            );
        }
        return Ok(None);
    };
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad(&format!("the auth of {host} is not base64")))?;
        let text = String::from_utf8(raw).map_err(|_| bad(&format!("the auth of {host} is not UTF-8")))?;
        let (user, password) =
            text.split_once(':').ok_or_else(|| bad(&format!("the auth of {host} is not user:password")))?;
        return Ok(Some(Credentials { user: user.to_string(), password: password.to_string() }));
    }
    match (entry.get("username").and_then(|u| u.as_str()), entry.get("password").and_then(|p| p.as_str())) {
        (Some(u), Some(p)) => Ok(Some(Credentials { user: u.to_string(), password: p.to_string() })),
        _ => Err(bad(&format!("the entry of {host} has no auth (identity tokens are not supported)"))),
    }
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`, if it exists.
pub fn default_credentials_file() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
    dir.map(|d| d.join("config.json")).filter(|p| p.is_file())
}

/// The host of a docker config `auths` key: `host[:port]`, `https://host[:port]/v1/`...
fn auth_key_host(key: &str) -> &str {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// What a 401's `WWW-Authenticate` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

/// Parses `Basic realm="…"` or `Bearer realm="…",service="…",scope="…"`: auth-params of
/// tokens or quoted strings (with `\` escapes). Anything else is refused.
fn parse_challenge(header: &str) -> Option<Challenge> {
    if header.len() > HEADER_MAX {
        return None;
    }
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params = Vec::new();
    let mut it = rest.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| *c == ' ' || *c == ',') {
            it.next();
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            it.next();
        }
        if key.trim().is_empty() {
            break;
        }
        it.next()?; // '='
        let mut value = String::new();
        if it.peek() == Some(&'"') {
            it.next();
            loop {
                match it.next()? {
                    '"' => break,
                    '\\' => value.push(it.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c == ',' || c == ' ' {
                    break;
                }
                value.push(c);
                it.next();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), value));
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer { realm: get("realm")?, service: get("service"), scope: get("scope") })
    } else {
        None
    }
}

/// The Authorization sent, shared by every request to one registry.
#[derive(Default)]
struct AuthState {
    header: Option<HeaderValue>,
    /// Bumped at each change of `header`: a 401 for an older one needs no new token.
    generation: u64,
    /// When a bearer token should be renewed (before it expires).
    renew_at: Option<Instant>,
    challenge: Option<Challenge>,
}

/// Token flow and basic auth for one registry and one scope (pull, or pull and push).
struct Auth {
    creds: Option<Credentials>,
    actions: &'static str,
    state: Mutex<AuthState>,
    /// One renewal at a time; the others wait and use its token.
    renewing: tokio::sync::Mutex<()>,
    tokens_fetched: AtomicU64,
}

/// A registry repository, as a store to read or to push to.
pub struct Registry {
    pub reference: OciRef,
    origin: Url,
    client: reqwest::Client,
    attempt_base: Duration,
    auth: Auth,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("reference", &self.reference.to_string())
            .field("credentials", &self.auth.creds)
            .finish_non_exhaustive()
    }
}

fn permanent(what: &str, why: impl Into<String>) -> FetchError {
    FetchError::Permanent(FetchFailure::Protocol { what: what.to_string(), why: why.into() })
}

fn transport(what: &str, e: reqwest::Error) -> FetchError {
    let refused = super::tls_refused(&e);
    let f = FetchFailure::Http { what: what.to_string(), source: Arc::new(e.without_url()) };
    if refused {
        FetchError::Permanent(f)
    } else {
        FetchError::Transient(f)
    }
}

/// A header's value as text, if it is short enough to consider.
fn header_text(h: &HeaderMap, name: reqwest::header::HeaderName) -> Option<String> {
    let v = h.get(name)?;
    (v.len() <= HEADER_MAX).then(|| v.to_str().ok().map(str::to_string))?
}

impl Registry {
    /// A registry store; `push` asks for push rights besides pull.
    pub fn open(reference: OciRef, attempt_timeout: Duration, http: &HttpOptions, push: bool) -> Result<Registry> {
        let origin =
            Url::parse(&reference.origin()).map_err(|e| Error::Invalid(format!("registry {}: {e}", reference.host)))?;
        let creds = load_credentials(http.registry_auth.as_deref(), &reference.host)?;
        let client = http_client(attempt_timeout, http)?;
        let auth = Auth {
            creds,
            actions: if push { "pull,push" } else { "pull" },
            state: Mutex::new(AuthState::default()),
            renewing: tokio::sync::Mutex::new(()),
            tokens_fetched: AtomicU64::new(0),
        };
        Ok(Registry { reference, origin, client, attempt_base: attempt_timeout, auth })
    }

    /// Tokens fetched from the token service so far.
    pub fn tokens_fetched(&self) -> u64 {
        self.auth.tokens_fetched.load(Ordering::Relaxed)
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/v2/{}/{rest}", self.reference.origin(), self.reference.repo)
    }

    fn blob_url(digest: &str, r: &Registry) -> String {
        r.url(&format!("blobs/{digest}"))
    }

    /// The Authorization to send now (and its generation), renewing a token about to expire.
    async fn authorization(&self) -> Result<(Option<HeaderValue>, u64), FetchError> {
        let (header, generation, renew) = {
            let s = self.auth.state.lock().unwrap_or_else(|e| e.into_inner());
            (s.header.clone(), s.generation, s.renew_at.is_some_and(|t| Instant::now() >= t))
        };
        if renew {
            // The token may still be good for a while: a failed renewal keeps it (a 401
            // will tell).
            if let Err(e) = self.renew(generation, None).await {
                tracing::warn!(registry = %self.reference.host, "renewing the registry token failed: {e}");
                return Ok((header, generation));
            }
            let s = self.auth.state.lock().unwrap_or_else(|e| e.into_inner());
            return Ok((s.header.clone(), s.generation));
        }
        Ok((header, generation))
    }

    /// After a 401 for the header of `generation` (or to renew it): a new Authorization, from
    /// `challenge` (the 401's) or the last one seen. Concurrent callers share one renewal.
    async fn renew(&self, generation: u64, challenge: Option<Challenge>) -> Result<(), FetchError> {
        let _one = self.auth.renewing.lock().await;
        let (current, old) = {
            let mut s = self.auth.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = challenge {
                s.challenge = Some(c);
            }
            (s.generation, s.challenge.clone())
        };
        if current != generation {
            return Ok(()); // someone renewed meanwhile
        }
        let what = format!("authenticate to {}", self.reference.host);
        let (header, renew_at) = match old {
            None => return Err(permanent(&what, "registry answered 401 without a usable WWW-Authenticate")),
            Some(Challenge::Basic) => match &self.auth.creds {
                Some(c) => (c.basic(), None),
                None => return Err(permanent(
                    &what,
                    "the registry asks for credentials: give --registry-auth FILE or log in (~/.docker/config.json)",
                )),
            },
            Some(Challenge::Bearer { realm, service, scope }) => {
                self.fetch_token(&what, &realm, service.as_deref(), scope.as_deref()).await?
            }
        };
        let mut s = self.auth.state.lock().unwrap_or_else(|e| e.into_inner());
        s.header = Some(header);
        s.generation += 1;
        s.renew_at = renew_at;
        Ok(())
    }

    /// GET realm?service=…&scope=… (with basic credentials if any): the token and when to
    /// renew it.
    async fn fetch_token(
        &self,
        what: &str,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<(HeaderValue, Option<Instant>), FetchError> {
        let mut url = Url::parse(realm).map_err(|_| permanent(what, "token realm is not a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" if self.reference.plain_http => {}
            s => return Err(permanent(what, format!("token realm scheme {s:?} refused (https only)"))),
        }
        // The scope asked for: ours (pull or pull,push on this repository), whatever the
        // challenge named (it names the one request that failed).
        let ours = format!("repository:{}:{}", self.reference.repo, self.auth.actions);
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &ours);
            if let Some(s) =
                scope.filter(|s| *s != ours && !s.starts_with(&format!("repository:{}:", self.reference.repo)))
            {
                q.append_pair("scope", s);
            }
        }
        let shown = format!("GET token from {}", url.origin().ascii_serialization());
        let mut req = self.client.get(url);
        if let Some(c) = &self.auth.creds {
            req = req.header(AUTHORIZATION, c.basic());
        }
        let start = Instant::now();
        let inner = match tokio::time::timeout(self.attempt_base, req.send()).await {
            Err(_) => {
                return Err(FetchError::Transient(FetchFailure::TimedOut { what: shown, after: self.attempt_base }))
            }
            Ok(Err(e)) => return Err(transport(&shown, e)),
            Ok(Ok(r)) => r,
        };
        let answer = Answer { inner, what: shown.clone(), start, base: self.attempt_base };
        match answer.inner.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(FetchError::Permanent(FetchFailure::Status {
                    what: format!("{shown} (credentials refused by the token service)"),
                    status: answer.inner.status(),
                }))
            }
            _ => return Err(answer.unexpected()),
        }
        let body = answer.body(TOKEN_ANSWER_MAX, None).await?;
        let json: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| permanent(&shown, "token answer is not JSON"))?;
        let token = json
            .get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| permanent(&shown, "token answer has no token"))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| permanent(&shown, "token is not a valid header value"))?;
        header.set_sensitive(true);
        // The spec's default is 60 s; a token for less than a second or more than a day is
        // renewed as if it were for that long.
        let life = json.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(60).clamp(1, 86_400);
        let life = Duration::from_secs(life);
        let margin = (life / RENEW_FRACTION).min(Duration::from_secs(30));
        self.auth.tokens_fetched.fetch_add(1, Ordering::Relaxed);
        tracing::info!(registry = %self.reference.host, expires_in = life.as_secs(), "registry token fetched");
        Ok((header, Some(start + life - margin)))
    }

    /// Sends a request to the registry with its Authorization; on a 401, renews it (as the
    /// 401's challenge says) and tries once more. `build` makes the request each time.
    async fn send(
        &self,
        what: &str,
        timeout: Duration,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer, FetchError> {
        for retry in [false, true] {
            let (header, generation) = self.authorization().await?;
            let mut req = build();
            if let Some(h) = &header {
                req = req.header(AUTHORIZATION, h.clone());
            }
            let start = Instant::now();
            let inner = match tokio::time::timeout(timeout, req.send()).await {
                Err(_) => {
                    return Err(FetchError::Transient(FetchFailure::TimedOut { what: what.into(), after: timeout }))
                }
                Ok(Err(e)) => return Err(transport(what, e)),
                Ok(Ok(r)) => r,
            };
            if inner.status() == StatusCode::UNAUTHORIZED && !retry {
                let challenge = header_text(inner.headers(), WWW_AUTHENTICATE).and_then(|h| parse_challenge(&h));
                let basic_refused = header.is_some() && challenge == Some(Challenge::Basic);
                if !basic_refused {
                    self.renew(generation, challenge).await?;
                    continue;
                }
            }
            if inner.status() == StatusCode::UNAUTHORIZED {
                return Err(FetchError::Permanent(FetchFailure::Status {
                    what: format!("{what} (credentials refused by the registry)"),
                    status: inner.status(),
                }));
            }
            return Ok(Answer { inner, what: what.to_string(), start, base: self.attempt_base });
        }
        Err(permanent(what, "unauthorized"))
    }

    /// GET of a blob (of `range` = (offset, len) if given), following redirects to the
    /// registry's storage: at most REDIRECTS_MAX, never from https to http, and the
    /// Authorization only to the registry's own origin.
    pub(super) async fn get_blob(&self, digest: &str, range: Option<(u64, u64)>) -> Result<Answer, FetchError> {
        let mut url = Self::blob_url(digest, self);
        let what = match range {
            Some((offset, len)) => format!("GET {url} [{offset}, +{len})"),
            None => format!("GET {url}"),
        };
        let with_range = |mut req: reqwest::RequestBuilder| {
            if let Some((offset, len)) = range {
                req = req.header(reqwest::header::RANGE, format!("bytes={offset}-{}", offset + len - 1));
            }
            req
        };
        let mut answer = self.send(&what, self.attempt_base, || with_range(self.client.get(&url))).await?;
        for hop in 0.. {
            if !answer.inner.status().is_redirection() {
                return Ok(answer);
            }
            if hop == REDIRECTS_MAX {
                return Err(permanent(&what, format!("more than {REDIRECTS_MAX} redirects")));
            }
            let location = header_text(answer.inner.headers(), LOCATION)
                .ok_or_else(|| permanent(&what, "redirect without a usable Location"))?;
            let current = Url::parse(&url).map_err(|_| permanent(&what, "bad URL"))?;
            let next = current.join(&location).map_err(|_| permanent(&what, "redirect to a bad URL"))?;
            match (current.scheme(), next.scheme()) {
                ("https", "https") | ("http", "http" | "https") => {}
                (_, s) => return Err(permanent(&what, format!("redirect to a {s} URL refused"))),
            }
            url = next.to_string();
            if next.origin() == self.origin.origin() {
                answer = self.send(&what, self.attempt_base, || with_range(self.client.get(&url))).await?;
            } else {
                tracing::debug!(to = %next.origin().ascii_serialization(), "following the registry's redirect");
                let start = Instant::now();
                let req = with_range(self.client.get(next));
                let inner = match tokio::time::timeout(self.attempt_base, req.send()).await {
                    Err(_) => {
                        return Err(FetchError::Transient(FetchFailure::TimedOut { what, after: self.attempt_base }))
                    }
                    Ok(Err(e)) => return Err(transport(&what, e)),
                    Ok(Ok(r)) => r,
                };
                answer = Answer { inner, what: what.clone(), start, base: self.attempt_base };
            }
        }
        Err(permanent(&what, "redirect loop"))
    }

    /// The OCI manifest of `tag`, then the image id it names (its incfs manifest layer, which
    /// the `dev.incfs.image.id` annotation, if any, must agree with).
    pub async fn resolve_tag(&self, tag: &str) -> Result<ImageId, FetchError> {
        if !valid_tag(tag) {
            return Err(permanent(tag, "not a valid tag"));
        }
        let url = self.url(&format!("manifests/{tag}"));
        let what = format!("GET {url}");
        let answer = self
            .send(&what, self.attempt_base, || self.client.get(&url).header(reqwest::header::ACCEPT, OCI_MANIFEST_TYPE))
            .await?;
        if answer.inner.status() != StatusCode::OK {
            return Err(answer.unexpected());
        }
        let body = answer.body(OCI_MANIFEST_MAX, None).await?;
        image_id_of_oci_manifest(&body).map_err(|why| permanent(&what, why))
    }

    // ---- push ----

    /// Pushes the image `id` of the staging store `staging`: its blobs, its manifest, the OCI
    /// manifest, then the tag. Blobs the registry has are skipped.
    pub async fn push(self: &Arc<Self>, staging: &Store, id: &ImageId, tag: &str, progress: bool) -> Result<PushStats> {
        if !valid_tag(tag) {
            return Err(Error::Invalid(format!("{tag:?} is not a valid tag")));
        }
        let stored = std::fs::read(staging.root.join("images").join(id.to_string())).ctx(|| "read manifest".into())?;
        let canonical = crate::image::manifest_from_stored(stored)?;
        if ImageId::of_manifest(&canonical) != *id {
            return Err(Error::Invalid(format!("staged manifest is not image {id}")));
        }
        let manifest = Manifest::decode(&canonical)?;
        let manifest_path = staging.root.join("tmp").join(format!("manifest.{id}"));
        std::fs::write(&manifest_path, &canonical).ctx(|| format!("write {}", manifest_path.display()))?;
        let config_path = staging.root.join("tmp").join("empty-config");
        std::fs::write(&config_path, EMPTY_CONFIG).ctx(|| format!("write {}", config_path.display()))?;

        // (path, digest hex, size, media type): the image's blobs, its manifest, the config.
        let mut items: Vec<(PathBuf, Hash, u64, &str)> = manifest
            .blobs
            .iter()
            .map(|b| (staging.root.join("blobs").join(hex::encode(b.id)), b.id, b.size, BLOB_LAYER_TYPE))
            .collect();
        items.push((manifest_path, id.0, canonical.len() as u64, MANIFEST_LAYER_TYPE));
        let mut empty = [0u8; 32];
        hex::decode_to_slice(&EMPTY_DIGEST[7..], &mut empty).map_err(|_| Error::Invalid("empty digest".into()))?;
        let total: u64 = items.iter().map(|i| i.2).sum::<u64>() + EMPTY_CONFIG.len() as u64;
        let bar = progress.then(|| crate::pack::progress_bar(true, total)).flatten();
        let stats = Arc::new(PushProgress { bar, ..PushProgress::default() });

        let mut uploads: Vec<(PathBuf, Hash, u64)> = items.iter().map(|i| (i.0.clone(), i.1, i.2)).collect();
        uploads.push((config_path, empty, EMPTY_CONFIG.len() as u64));
        let queue = Arc::new(Mutex::new(uploads));
        let mut workers = tokio::task::JoinSet::<Result<()>>::new();
        for _ in 0..UPLOAD_PARALLEL {
            let (reg, queue, stats) = (self.clone(), queue.clone(), stats.clone());
            workers.spawn(async move {
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((path, digest, size)) = next else { return Ok(()) };
                    reg.push_blob(&path, &digest, size, &stats).await?;
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.map_err(|e| Error::Invalid(format!("upload task: {e}")))??;
        }

        let layers: Vec<serde_json::Value> = std::iter::once(&items[items.len() - 1])
            .chain(&items[..items.len() - 1])
            .map(|(_, d, size, media)| {
                serde_json::json!({"mediaType": media, "digest": format!("sha256:{}", hex::encode(d)), "size": size})
            })
            .collect();
        let created = httpdate_rfc3339(std::time::SystemTime::now());
        let oci = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": EMPTY_CONFIG.len()},
            "layers": layers,
            "annotations": {
                ANNOTATION_IMAGE_ID: id.to_string(),
                "org.opencontainers.image.created": created,
            },
        });
        let body = Bytes::from(serde_json::to_vec(&oci).map_err(|e| Error::Invalid(format!("OCI manifest: {e}")))?);
        let url = self.url(&format!("manifests/{tag}"));
        let what = format!("PUT {url}");
        let answer = self
            .send(&what, attempt_deadline(self.attempt_base, body.len() as u64), || {
                self.client.put(&url).header(CONTENT_TYPE, OCI_MANIFEST_TYPE).body(body.clone())
            })
            .await
            .map_err(|e| Error::Fetch(e.failure().clone()))?;
        if answer.inner.status() != StatusCode::CREATED {
            return Err(Error::Fetch(self.explain(answer).await));
        }
        if let Some(b) = &stats.bar {
            b.finish_and_clear();
        }
        Ok(PushStats {
            blobs: items.len() as u64 + 1,
            uploaded: stats.uploaded.load(Ordering::Relaxed),
            skipped: stats.skipped.load(Ordering::Relaxed),
            bytes: stats.bytes.load(Ordering::Relaxed),
            manifest_digest: format!("sha256:{}", hex::encode(Sha256::digest(&body))),
        })
    }

    /// A failed answer's status with the start of its body (the registry's error JSON).
    async fn explain(&self, answer: Answer) -> FetchFailure {
        let status = answer.inner.status();
        let what = answer.what.clone();
        let text = answer.prefix(512).await.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let text: String = text.chars().filter(|c| !c.is_control()).collect();
        FetchFailure::Protocol { what, why: format!("HTTP {status}: {text}") }
    }

    /// One blob: skipped if the registry has it (HEAD), else uploaded in chunks.
    async fn push_blob(&self, path: &Path, digest: &Hash, size: u64, stats: &PushProgress) -> Result<()> {
        let d = format!("sha256:{}", hex::encode(digest));
        let url = Self::blob_url(&d, self);
        let what = format!("HEAD {url}");
        let head = self.send(&what, self.attempt_base, || self.client.head(&url)).await;
        if let Ok(a) = &head {
            if a.inner.status() == StatusCode::OK {
                stats.skipped.fetch_add(1, Ordering::Relaxed);
                stats.advance(size, &format!("blob {d} is in the registry already"));
                return Ok(());
            }
        }
        let data = tokio::fs::read(path).await.ctx(|| format!("read {}", path.display()))?;
        if data.len() as u64 != size || Sha256::digest(&data).as_slice() != digest {
            return Err(Error::Invalid(format!("{} is not blob {d}", path.display())));
        }
        let data = Bytes::from(data);
        let mut last: Option<FetchFailure> = None;
        for _ in 0..UPLOAD_RESTARTS {
            match self.upload(&d, &data, stats).await {
                Ok(()) => {
                    stats.uploaded.fetch_add(1, Ordering::Relaxed);
                    stats.advance(0, &format!("pushed blob {d} ({size} bytes)"));
                    return Ok(());
                }
                Err(FetchError::Permanent(f)) => return Err(Error::Fetch(f)),
                Err(FetchError::Transient(f)) => {
                    tracing::warn!("upload of {d} failed, starting it again: {f}");
                    last = Some(f);
                }
            }
        }
        Err(Error::Fetch(last.unwrap_or_else(|| "upload failed".into())))
    }

    /// One upload session: POST, PATCH chunks (a failed one resumes where the registry's
    /// `Range` says the upload stands), PUT with the digest.
    async fn upload(&self, digest: &str, data: &Bytes, stats: &PushProgress) -> Result<(), FetchError> {
        let start_url = self.url("blobs/uploads/");
        let what = format!("POST {start_url}");
        let a = self
            .send(&what, self.attempt_base, || self.client.post(&start_url).header(reqwest::header::CONTENT_LENGTH, 0))
            .await?;
        if a.inner.status() != StatusCode::ACCEPTED {
            return Err(FetchError::Permanent(self.explain(a).await));
        }
        let mut location = self.upload_location(&a, &start_url)?;
        let mut offset = 0u64;
        let mut failures = 0;
        while offset < data.len() as u64 {
            let end = (offset + UPLOAD_CHUNK).min(data.len() as u64);
            let chunk = data.slice(offset as usize..end as usize);
            let what = format!("PATCH {} [{offset}, {end})", strip_query(&location));
            let loc = location.clone();
            let sent = self
                .send(&what, attempt_deadline(self.attempt_base, end - offset), || {
                    self.client
                        .patch(&loc)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(reqwest::header::CONTENT_RANGE, format!("{offset}-{}", end - 1))
                        .body(chunk.clone())
                })
                .await;
            let failure = match sent {
                Ok(a) if a.inner.status() == StatusCode::ACCEPTED => {
                    let next = self.upload_location(&a, &location)?;
                    match upload_range_end(a.inner.headers()) {
                        Some(n) if n == end => {
                            location = next;
                            stats.advance(end - offset, "");
                            offset = end;
                            continue;
                        }
                        other => FetchFailure::Protocol {
                            what,
                            why: format!("registry says the upload stands at {other:?}, not {end}"),
                        },
                    }
                }
                Ok(a) if a.inner.status().is_client_error() && a.inner.status() != StatusCode::REQUEST_TIMEOUT => {
                    return Err(FetchError::Transient(self.explain(a).await));
                }
                Ok(a) => self.explain(a).await,
                Err(FetchError::Permanent(f)) => return Err(FetchError::Permanent(f)),
                Err(FetchError::Transient(f)) => f,
            };
            failures += 1;
            if failures >= CHUNK_ATTEMPTS {
                return Err(FetchError::Transient(failure));
            }
            tracing::warn!("upload chunk failed, resuming: {failure}");
            tokio::time::sleep(Duration::from_millis(200 << failures.min(5))).await;
            // Where does the upload stand?
            let what = format!("GET {}", strip_query(&location));
            let loc = location.clone();
            let a = self.send(&what, self.attempt_base, || self.client.get(&loc)).await?;
            if a.inner.status() != StatusCode::NO_CONTENT {
                return Err(FetchError::Transient(self.explain(a).await));
            }
            let stands = upload_range_end(a.inner.headers()).unwrap_or(0);
            if stands > data.len() as u64 {
                return Err(permanent(&what, format!("upload stands at {stands}, past the blob's end")));
            }
            location = self.upload_location(&a, &location)?;
            tracing::info!("upload of {digest} resumes at {stands}");
            offset = stands;
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = format!("{location}{sep}digest={digest}");
        let what = format!("PUT {}", strip_query(&location));
        let a = self
            .send(&what, self.attempt_base, || self.client.put(&put).header(reqwest::header::CONTENT_LENGTH, 0))
            .await?;
        if a.inner.status() != StatusCode::CREATED {
            return Err(FetchError::Transient(self.explain(a).await));
        }
        Ok(())
    }

    /// An upload answer's Location, resolved against `base`; only on the registry's origin.
    fn upload_location(&self, a: &Answer, base: &str) -> Result<String, FetchError> {
        let loc = header_text(a.inner.headers(), LOCATION)
            .ok_or_else(|| permanent(&a.what, "upload answer has no Location"))?;
        let base = Url::parse(base).map_err(|_| permanent(&a.what, "bad URL"))?;
        let url = base.join(&loc).map_err(|_| permanent(&a.what, "upload Location is not a URL"))?;
        if url.origin() != self.origin.origin() {
            return Err(permanent(&a.what, "upload Location leaves the registry"));
        }
        Ok(url.to_string())
    }
}

/// The image id an OCI manifest of ours names.
pub fn image_id_of_oci_manifest(body: &[u8]) -> Result<ImageId, String> {
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|_| "OCI manifest is not JSON".to_string())?;
    let layers = json.get("layers").and_then(|l| l.as_array()).ok_or("OCI manifest has no layers")?;
    let mut found = layers
        .iter()
        .filter(|l| l.get("mediaType").and_then(|m| m.as_str()) == Some(MANIFEST_LAYER_TYPE))
        .filter_map(|l| l.get("digest").and_then(|d| d.as_str()));
    let digest = found.next().ok_or("not an incfs image: no layer of type application/vnd.incfs.manifest.v1")?;
    if found.next().is_some() {
        return Err("more than one incfs manifest layer".into());
    }
    let hex = digest.strip_prefix("sha256:").ok_or("incfs manifest digest is not sha256")?;
    let id: ImageId = hex.parse().map_err(|_| "incfs manifest digest is not 64 hex digits".to_string())?;
    if let Some(a) = json.get("annotations").and_then(|a| a.get(ANNOTATION_IMAGE_ID)) {
        if a.as_str() != Some(&id.to_string()) {
            return Err(format!("annotation {ANNOTATION_IMAGE_ID} disagrees with the manifest layer"));
        }
    }
    Ok(id)
}

/// The end (exclusive) of an upload's `Range: 0-<last>` header.
fn upload_range_end(h: &HeaderMap) -> Option<u64> {
    let r = header_text(h, reqwest::header::RANGE)?;
    let (_, last) = r.trim().trim_start_matches("bytes=").split_once('-')?;
    last.trim().parse::<u64>().ok()?.checked_add(1)
}

/// A URL without its query (an upload's `_state`), for messages.
fn strip_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(u, _)| u)
}

/// `2026-11-30T09:49:39Z`.
fn httpdate_rfc3339(t: std::time::SystemTime) -> String {
    let (y, m, d, hh, mm, ss) = super::s3::civil_utc(t);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// What a push did.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Blobs of the image (its manifest and the empty config included).
    pub blobs: u64,
    pub uploaded: u64,
    pub skipped: u64,
    pub bytes: u64,
    /// Digest of the OCI manifest tagged.
    pub manifest_digest: String,
}

#[derive(Default)]
struct PushProgress {
    bar: Option<indicatif::ProgressBar>,
    uploaded: AtomicU64,
    skipped: AtomicU64,
    bytes: AtomicU64,
}

impl PushProgress {
    /// `n` more bytes done; `line` printed (above the bar, or alone without one).
    fn advance(&self, n: u64, line: &str) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        match &self.bar {
            Some(b) => {
                b.inc(n);
                if !line.is_empty() {
                    b.println(line);
                }
            }
            None if !line.is_empty() => eprintln!("{line}"),
            None => {}
        }
    }
}

/// The image id for `image` (an id, or a tag) of `store`; a tag (or, without `image`, the
/// store URL's tag) is resolved through the registry, and the id logged. Blocking: not
/// from within a tokio runtime (an error there).
pub fn resolve_image(store: &str, image: Option<&str>, http: &HttpOptions) -> Result<ImageId> {
    if let Some(id) = image.and_then(|i| i.parse::<ImageId>().ok()) {
        return Ok(id);
    }
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Invalid("a tag is resolved before the runtime starts, not within it".into()));
    }
    let reference = OciRef::parse(store)?;
    let (Some(reference), tag) = (reference.clone(), image.map(str::to_string).or(reference.and_then(|r| r.tag)))
    else {
        return Err(Error::Invalid(match image {
            Some(i) => format!("--image {i:?} is not a 64-digit image id (tags are for oci:// stores)"),
            None => "--image ID is required".into(),
        }));
    };
    let Some(tag) = tag else {
        return Err(Error::Invalid(format!("give --image ID or TAG (or a tag in the store URL, {reference}:TAG)")));
    };
    let registry = Registry::open(reference, Duration::from_secs(30), http, false)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("start runtime", e))?;
    let id = rt.block_on(registry.resolve_tag(&tag)).map_err(|e| Error::Fetch(e.failure().clone()))?;
    tracing::info!(tag = %tag, image = %id, "resolved the tag (a tag is only as trustworthy as the registry: pin the id)");
    eprintln!("incfsd: {}:{tag} is image {id}", registry.reference.repo);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = OciRef::parse("oci://reg.example:5000/a/b-c:v1.2").expect("ok").expect("oci");
        assert_eq!((r.host.as_str(), r.repo.as_str(), r.tag.as_deref()), ("reg.example:5000", "a/b-c", Some("v1.2")));
        assert_eq!(r.origin(), "https://reg.example:5000");
        let r = OciRef::parse("oci+http://127.0.0.1:5000/img").expect("ok").expect("oci");
        assert!(r.plain_http && r.tag.is_none());
        assert!(OciRef::parse("https://h/x").expect("ok").is_none());
        for bad in
            ["oci://h", "oci:///r", "oci://h/UPPER", "oci://h/r:bad/tag", "oci://h/r:", "oci://h/-r", "oci://h/a//b"]
        {
            assert!(OciRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into())
            })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        for bad in ["Bearer service=\"x\"", "Bearer realm=\"unterminated", "Negotiate", "Bearer realm", ""] {
            assert_eq!(parse_challenge(bad), None, "{bad}");
        }
        let huge = format!("Bearer realm=\"{}\"", "a".repeat(HEADER_MAX));
        assert_eq!(parse_challenge(&huge), None);
    }

    #[test]
    fn docker_config_credentials_and_no_secret_in_debug() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret:x");
        std::fs::write(&f, format!(r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{auth}"}}}}}}"#))
            .expect("write");
        let c = load_credentials(Some(&f), "reg.example:5000").expect("load").expect("found");
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "s3cret:x"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(load_credentials(Some(&f), "other").expect("load").is_none());
        std::fs::write(&f, "{not json").expect("write");
        assert!(load_credentials(Some(&f), "reg.example:5000").is_err());
    }

    #[test]
    fn oci_manifest_image_id() {
        let id = "ab".repeat(32);
        let m = format!(
            r#"{{"layers":[{{"mediaType":"{MANIFEST_LAYER_TYPE}","digest":"sha256:{id}","size":1}}],"annotations":{{"{ANNOTATION_IMAGE_ID}":"{id}"}}}}"#
        );
        assert_eq!(image_id_of_oci_manifest(m.as_bytes()).map(|i| i.to_string()), Ok(id.clone()));
        let lying = m.replace(&format!("\"{id}\"}}"), &format!("\"{}\"}}", "cd".repeat(32)));
        assert!(image_id_of_oci_manifest(lying.as_bytes()).is_err());
        for bad in ["", "[]", "{\"layers\":3}", "{\"layers\":[{\"mediaType\":\"x\"}]}"] {
            assert!(image_id_of_oci_manifest(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_796_032_179);
        assert_eq!(httpdate_rfc3339(t), "2026-11-30T09:49:39Z");
    }
}
