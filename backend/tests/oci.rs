//! OCI registries as stores, against Debian's `docker-registry` (distribution 2.8) over TLS
//! (a CA and certificates made here by the `openssl` CLI): `incfsd pack --store oci://…`
//! pushes, `incfsd cat` and the engine read back by id and by tag, with htpasswd basic auth
//! and with token auth from a token issuer here (JWTs signed by `openssl`, behind nginx's
//! TLS) whose tokens expire while the reads go on. A registry that answers garbage, oversized
//! JSON or redirects gets an error, never a panic, and the Authorization never leaves the
//! registry's origin.
//!
//! Needs `docker-registry`, `htpasswd` (apache2-utils), `openssl` and nginx: `.ci/run`
//! installs them; without `docker-registry`, the registry tests say so and pass.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use incfs::cache::BlockCache;
use incfs::engine::{Engine, EngineConfig};
use incfs::image::ImageId;
use incfs::store::{FetchError, HttpOptions, Remote};
use support::*;

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const USER: &str = "alice";
const PASSWORD: &str = "s3cret-pw";
const REPO: &str = "test/img";

fn have_registry() -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    eprintln!(
        "skipped: {REGISTRY_BIN} is not installed (`apt-get install docker-registry apache2-utils`, as .ci/run does)"
    );
    false
}

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and a self-signed RSA certificate
/// for signing tokens (the registry's `rootcertbundle`).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        fs::create_dir_all(dir).expect("mkdir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(
            dir,
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=incfs test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").expect("ext");
        openssl(
            dir,
            &[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=incfs server"]]
                .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                "server.pem",
                "-extfile",
                "server.ext",
            ],
        );
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "token.key",
                "-out",
                "token.pem",
                "-days",
                "2",
                "-subj",
                "/CN=incfs token issuer",
            ],
        );
        Pki { dir: dir.to_path_buf() }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

/// `docker-registry serve` on a free port over TLS, with `auth` (YAML under `auth:`); killed
/// on drop.
struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(pki: &Pki, auth: &str) -> Registry {
        let dir = tempfile::tempdir().expect("tmp");
        let port = free_port();
        let config = format!(
            "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: incfs-test-secret
  tls:
    certificate: {cert}
    key: {key}
auth:
{auth}
",
            root = dir.path().join("root").display(),
            cert = pki.path("server.pem"),
            key = pki.path("server.key"),
        );
        fs::write(dir.path().join("config.yml"), config).expect("config");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("registry.log")).expect("log"))
            .spawn()
            .expect("start docker-registry");
        wait_for_port(port);
        Registry { child, port, _dir: dir }
    }

    fn store(&self, rest: &str) -> String {
        format!("oci://127.0.0.1:{}/{rest}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn b64(data: &[u8], url: bool) -> String {
    let abc: &[u8] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(abc[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        if !url {
            out.extend(std::iter::repeat_n('=', 3 - c.len()));
        }
    }
    out
}

/// A docker config with `user:password` for `host`.
fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    let p = dir.join(format!("auth-{user}-{}.json", password.len()));
    let auth = b64(format!("{user}:{password}").as_bytes(), false);
    fs::write(&p, format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#)).expect("write");
    p
}

/// A tree of a few files of varied bytes (one of several blobs at 1 MiB blobs).
fn tree(root: &Path) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let src = root.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let files: Vec<(String, Vec<u8>)> = [("big", 3_000_000u32), ("mid", 200_000), ("small", 10)]
        .iter()
        .enumerate()
        .map(|(k, (name, n))| {
            // xorshift: bytes that neither repeat nor compress.
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ k as u64;
            let data = (0..*n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (name.to_string(), data)
        })
        .collect();
    for (n, d) in &files {
        fs::write(src.join(n), d).expect("write");
    }
    (src, files)
}

fn incfsd(args: &[&str]) -> Output {
    Command::new(INCFSD).args(args).env_remove("SSL_CERT_FILE").env("HOME", "/nonexistent").output().expect("incfsd")
}

fn cat(store: &str, image: Option<&str>, path: &str, extra: &[&str]) -> Output {
    let cache = tempfile::tempdir().expect("tmp");
    let c = cache.path().to_string_lossy().into_owned();
    let mut args = vec!["cat", "--store", store, "--cache", &c];
    if let Some(i) = image {
        args.extend(["--image", i]);
    }
    args.extend(extra);
    args.push(path);
    incfsd(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn push(src: &Path, store: &str, extra: &[&str]) -> Output {
    let s = src.to_string_lossy().into_owned();
    incfsd(&[&["pack", &s, "--store", store, "--blob-size-mb", "1"][..], extra].concat())
}

fn pushed_id(out: &Output) -> ImageId {
    assert!(out.status.success(), "push failed: {}", stderr(out));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("image id printed")
}

#[test]
fn basic_auth_over_tls_push_then_read_by_id_and_by_tag() {
    if !have_registry() {
        return;
    }
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let htpasswd = t.path().join("htpasswd");
    let out = Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]).output().expect("htpasswd (apache2-utils)");
    assert!(out.status.success());
    fs::write(&htpasswd, out.stdout).expect("write");
    let reg = Registry::start(&pki, &format!("  htpasswd:\n    realm: incfs-test\n    path: {}\n", htpasswd.display()));
    let host = format!("127.0.0.1:{}", reg.port);
    let good = docker_config(t.path(), &format!("https://{host}"), USER, PASSWORD);
    let bad = docker_config(t.path(), &host, USER, "wrong-password");
    let (src, files) = tree(t.path());
    let ca = pki.path("ca.pem");
    let auth = |f: &Path| vec!["--ca-file".to_string(), ca.clone(), "--registry-auth".into(), f.display().to_string()];
    let good_args = auth(&good);
    let good_args: Vec<&str> = good_args.iter().map(String::as_str).collect();

    let start = Instant::now();
    let first = push(&src, &reg.store(&format!("{REPO}:v1")), &good_args);
    let id = pushed_id(&first);
    eprintln!("pushed in {:?}: {}", start.elapsed(), stderr(&first));
    assert!(stderr(&first).contains("0 already there"), "{}", stderr(&first));
    // Again: every blob is in the registry already, and the tag is the same image.
    let again = push(&src, &reg.store(&format!("{REPO}:v2")), &good_args);
    assert_eq!(pushed_id(&again), id);
    assert!(stderr(&again).contains("0 uploaded"), "{}", stderr(&again));

    let id_s = id.to_string();
    for (name, data) in &files {
        let o = cat(&reg.store(REPO), Some(&id_s), name, &good_args);
        assert!(o.status.success() && &o.stdout == data, "cat {name} by id: {}", stderr(&o));
    }
    // By tag, in --image or in the URL: the id resolved is printed.
    let o = cat(&reg.store(REPO), Some("v1"), "big", &good_args);
    assert!(o.status.success() && o.stdout == files[0].1, "cat by tag: {}", stderr(&o));
    assert!(stderr(&o).contains(&id_s), "resolved id not shown: {}", stderr(&o));
    let o = cat(&reg.store(&format!("{REPO}:v2")), None, "mid", &good_args);
    assert!(o.status.success() && o.stdout == files[1].1, "cat by the URL's tag: {}", stderr(&o));

    // Wrong credentials, none, an unknown tag: clear errors, and no password shown.
    let bad_args = auth(&bad);
    let bad_args: Vec<&str> = bad_args.iter().map(String::as_str).collect();
    let o = cat(&reg.store(REPO), Some(&id_s), "big", &bad_args);
    assert!(!o.status.success() && o.stdout.is_empty());
    assert!(stderr(&o).contains("credentials refused by the registry"), "{}", stderr(&o));
    let o = push(&src, &reg.store(&format!("{REPO}:v3")), &bad_args);
    assert!(!o.status.success() && stderr(&o).contains("credentials refused"), "{}", stderr(&o));
    let o = cat(&reg.store(REPO), Some(&id_s), "big", &["--ca-file", &ca]);
    assert!(!o.status.success() && stderr(&o).contains("asks for credentials"), "{}", stderr(&o));
    let o = cat(&reg.store(REPO), Some("nosuchtag"), "big", &good_args);
    assert!(!o.status.success() && stderr(&o).contains("404"), "{}", stderr(&o));
    // Without the CA, TLS refuses the registry.
    let o = cat(&reg.store(REPO), Some(&id_s), "big", &["--registry-auth", &good.display().to_string()]);
    assert!(!o.status.success(), "served without trusting the registry's CA");
}

/// A token issuer: GET /token?service=…&scope=… with basic credentials answers a JWT signed
/// (RS256, by `openssl`) with the token certificate, valid for the registry about
/// `real_life` seconds (distribution accepts tokens 60 s past `exp`) while it claims
/// `expires_in` (a lie, so that the registry's 401 is what makes the client renew).
struct Issuer {
    pki_dir: PathBuf,
    real_life: u64,
    claimed_life: u64,
    issued: AtomicU64,
    refused: AtomicU64,
}

async fn issue(State(iss): State<Arc<Issuer>>, req: Request) -> Response {
    let want = format!("Basic {}", b64(format!("{USER}:{PASSWORD}").as_bytes(), false));
    if req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        iss.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let actions =
        if query.contains("pull%2Cpush") || query.contains("pull,push") { r#"["pull","push"]"# } else { r#"["pull"]"# };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let n = iss.issued.fetch_add(1, Ordering::Relaxed);
    let dir = iss.pki_dir.clone();
    let (real, claimed) = (iss.real_life, iss.claimed_life);
    let token = tokio::task::spawn_blocking(move || {
        let der = openssl(&dir, &["x509", "-in", "token.pem", "-outform", "DER"]);
        let header = format!(r#"{{"typ":"JWT","alg":"RS256","x5c":["{}"]}}"#, b64(&der, false));
        let claims = format!(
            r#"{{"iss":"incfs-test-issuer","sub":"{USER}","aud":"incfs-test-registry","exp":{},"nbf":{},"iat":{},"jti":"t{n}","access":[{{"type":"repository","name":"{REPO}","actions":{actions}}}]}}"#,
            (now + real).saturating_sub(60),
            now.saturating_sub(1),
            now
        );
        let input = format!("{}.{}", b64(header.as_bytes(), true), b64(claims.as_bytes(), true));
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign", "token.key"])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl dgst");
        use std::io::Write;
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("sign input");
        let sig = child.wait_with_output().expect("signature").stdout;
        format!("{input}.{}", b64(&sig, true))
    })
    .await
    .expect("sign");
    let body = format!(r#"{{"token":"{token}","expires_in":{claimed}}}"#);
    ([("content-type", "application/json")], body).into_response()
}

/// Serves `app` on a free loopback port from a thread of its own; returns the port.
fn serve(app: axum::Router) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(l, app).await.expect("serve");
        })
    });
    port
}

#[test]
fn token_auth_with_tokens_that_expire_while_reading() {
    if !have_registry() {
        return;
    }
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let issuer = Arc::new(Issuer {
        pki_dir: pki.dir.clone(),
        real_life: 4,
        claimed_life: 300,
        issued: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let issuer_port = serve(axum::Router::new().route("/token", axum::routing::get(issue)).with_state(issuer.clone()));
    // The realm is HTTPS: nginx's TLS in front of the issuer.
    let ssl = format!("ssl_certificate {}; ssl_certificate_key {};", pki.path("server.pem"), pki.path("server.key"));
    let www = t.path().join("www");
    fs::create_dir_all(&www).expect("mkdir");
    let nginx =
        Nginx::start_with(&www, &ssl, &format!("location /token {{ proxy_pass http://127.0.0.1:{issuer_port}; }}"));
    let reg = Registry::start(
        &pki,
        &format!(
            "  token:\n    realm: {}/token\n    service: incfs-test-registry\n    issuer: incfs-test-issuer\n    rootcertbundle: {}\n",
            nginx.url,
            pki.path("token.pem")
        ),
    );
    let host = format!("127.0.0.1:{}", reg.port);
    let creds = docker_config(t.path(), &host, USER, PASSWORD);
    let (src, files) = tree(t.path());
    let ca = pki.path("ca.pem");
    let creds_s = creds.display().to_string();
    let id =
        pushed_id(&push(&src, &reg.store(&format!("{REPO}:v1")), &["--ca-file", &ca, "--registry-auth", &creds_s]));
    assert!(issuer.issued.load(Ordering::Relaxed) >= 1);

    // Wrong credentials at the token service: a clear error.
    let bad = docker_config(t.path(), &host, USER, "nope");
    let o =
        cat(&reg.store(REPO), Some("v1"), "small", &["--ca-file", &ca, "--registry-auth", &bad.display().to_string()]);
    assert!(!o.status.success() && stderr(&o).contains("credentials refused by the token service"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("nope"));

    // Reads spread over three token lives: each expired token gets a 401 and a new one,
    // and no read fails.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    rt.block_on(async {
        let cache_dir = tempfile::tempdir().expect("tmp");
        let cache = Arc::new(BlockCache::open(cache_dir.path()).expect("cache"));
        let http =
            HttpOptions { ca_files: vec![ca.clone().into()], registry_auth: Some(creds.clone()), ..Default::default() };
        let remote = Remote::open_with(&reg.store(REPO), Duration::from_secs(5), &http).expect("remote");
        assert!(!format!("{remote:?}").contains(PASSWORD));
        let cfg = EngineConfig { readahead: 64 << 10, ..EngineConfig::default() };
        let engine = Engine::open(remote, id, cache, cfg).await.expect("engine");
        let before = issuer.issued.load(Ordering::Relaxed);
        let (big, data) = (&files[0].0, &files[0].1);
        let ino = engine.image().resolve(big.as_bytes()).expect("big");
        let chunk = data.len().div_ceil(12);
        let start = Instant::now();
        for (i, want) in data.chunks(chunk).enumerate() {
            let got = engine.read(ino, (i * chunk) as u64, chunk as u32).await.expect("read across token expiry");
            assert!(got[..] == want[..], "bytes at chunk {i}");
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let renewed = issuer.issued.load(Ordering::Relaxed) - before;
        eprintln!("{} reads over {:?}: {renewed} tokens", data.len().div_ceil(chunk), start.elapsed());
        // Tokens live 4 s at most: over 12 s, at least two expire.
        assert!(start.elapsed() >= Duration::from_secs(12));
        assert!(renewed >= 2, "tokens were not renewed on expiry: {renewed} fetched");
    });
}

/// The error of what should have failed.
fn why<T>(r: Result<T, FetchError>) -> String {
    match r {
        Ok(_) => panic!("hostile answer accepted"),
        Err(e) => e.to_string(),
    }
}

/// A registry that misbehaves, as `Mode` says; it also sends the Authorization it saw to
/// `saw_auth` (for redirects that leave it).
#[derive(Default)]
struct Hostile {
    mode: std::sync::Mutex<String>,
    storage_saw_auth: AtomicBool,
    storage_hits: AtomicU64,
    storage_port: AtomicU64,
    unauthorized: AtomicU64,
}

async fn hostile(State(h): State<Arc<Hostile>>, headers: HeaderMap, req: Request) -> Response {
    let mode = h.mode.lock().expect("mode").clone();
    let path = req.uri().path().to_string();
    let authed = headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer good-token");
    if path == "/token" {
        return match mode.as_str() {
            "huge-token" => {
                ([("content-type", "application/json")], "{\"token\":\"".to_string() + &"a".repeat(1 << 20) + "\"}")
                    .into_response()
            }
            "no-token" => ([("content-type", "application/json")], "{\"tokn\":1}").into_response(),
            "short-token" => {
                ([("content-type", "application/json")], "{\"token\":\"good-token\",\"expires_in\":1}").into_response()
            }
            _ => ([("content-type", "application/json")], "{\"token\":\"good-token\",\"expires_in\":600}")
                .into_response(),
        };
    }
    if path.starts_with("/storage/") {
        h.storage_hits.fetch_add(1, Ordering::Relaxed);
        if headers.contains_key("authorization") {
            h.storage_saw_auth.store(true, Ordering::Relaxed);
        }
        return (StatusCode::PARTIAL_CONTENT, [("content-range", "bytes 0-9/100")], vec![7u8; 10]).into_response();
    }
    if mode == "huge-challenge" {
        let v = format!("Bearer realm=\"http://{}/token\",service=\"{}\"", "x".repeat(10), "s".repeat(20_000));
        return (StatusCode::UNAUTHORIZED, [("www-authenticate", v)]).into_response();
    }
    if !authed {
        h.unauthorized.fetch_add(1, Ordering::Relaxed);
        let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let v = format!("Bearer realm=\"http://{host}/token\",service=\"hostile\",scope=\"repository:x:pull\"");
        return (StatusCode::UNAUTHORIZED, [("www-authenticate", v)]).into_response();
    }
    match (mode.as_str(), path.contains("/manifests/")) {
        ("garbage", _) => (StatusCode::OK, "\u{0}{{{not json").into_response(),
        ("oversized", true) => (StatusCode::OK, format!("{{\"layers\":[{}]}}", "{},".repeat(2 << 20))).into_response(),
        ("oversized", false) => (StatusCode::OK, vec![0u8; 3 << 20]).into_response(),
        ("short-token", _) => {
            (StatusCode::PARTIAL_CONTENT, [("content-range", "bytes 0-9/100")], vec![5u8; 10]).into_response()
        }
        ("redirect-loop", _) => (StatusCode::TEMPORARY_REDIRECT, [("location", path.clone())]).into_response(),
        ("redirect-away", _) => {
            let port = h.storage_port.load(Ordering::Relaxed);
            (StatusCode::TEMPORARY_REDIRECT, [("location", format!("http://127.0.0.1:{port}/storage/blob"))])
                .into_response()
        }
        _ => (StatusCode::NOT_FOUND, "{}").into_response(),
    }
}

#[test]
fn hostile_registry_answers_are_errors_and_the_authorization_stays_home() {
    let h = Arc::new(Hostile::default());
    let app = axum::Router::new().fallback(hostile).with_state(h.clone());
    let port = serve(app.clone());
    // Another origin (another port) plays the registry's storage backend.
    let storage = serve(app);
    h.storage_port.store(u64::from(storage), Ordering::Relaxed);
    let store = format!("oci+http://127.0.0.1:{port}/x");
    let set = |m: &str| *h.mode.lock().expect("mode") = m.to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let remote = Remote::open_with(&store, Duration::from_secs(5), &HttpOptions::default()).expect("remote");
    let Remote::Oci(registry) = &remote else { panic!("not a registry") };
    let id = ImageId([0xab; 32]);

    set("garbage");
    let e = why(rt.block_on(registry.resolve_tag("v1")));
    assert!(e.contains("not JSON"), "{e}");
    set("oversized");
    let e = why(rt.block_on(registry.resolve_tag("v1")));
    assert!(e.contains("more than"), "{e}");
    let e = why(rt.block_on(remote.manifest(&id)));
    assert!(e.contains("not image") || e.contains("failed verification") || e.contains("manifest"), "{e}");
    set("huge-challenge");
    let fresh = Remote::open_with(&store, Duration::from_secs(5), &HttpOptions::default()).expect("remote");
    let e = why(rt.block_on(fresh.range(&[1; 32], 0, 10)));
    assert!(e.contains("WWW-Authenticate"), "{e}");
    for mode in ["huge-token", "no-token"] {
        set(mode);
        let fresh = Remote::open_with(&store, Duration::from_secs(5), &HttpOptions::default()).expect("remote");
        let e = why(rt.block_on(fresh.range(&[1; 32], 0, 10)));
        assert!(e.contains("token"), "{mode}: {e}");
    }
    set("redirect-loop");
    let e = why(rt.block_on(remote.range(&[1; 32], 0, 10)));
    assert!(e.contains("redirects"), "{e}");
    // A redirect to the storage backend is followed, without the registry's token.
    set("redirect-away");
    let got = rt.block_on(remote.range(&[1; 32], 0, 10)).expect("read through the redirect");
    assert_eq!(&got[..], &[7u8; 10]);
    assert_eq!(h.storage_hits.load(Ordering::Relaxed), 1);
    assert!(!h.storage_saw_auth.load(Ordering::Relaxed), "the registry's Authorization went to another origin");

    // A token for 1 s is renewed before it runs out, without waiting for a 401.
    set("short-token");
    let fresh = Remote::open_with(&store, Duration::from_secs(5), &HttpOptions::default()).expect("remote");
    let Remote::Oci(short) = &fresh else { panic!("not a registry") };
    let before = h.unauthorized.load(Ordering::Relaxed);
    assert_eq!(&rt.block_on(fresh.range(&[1; 32], 0, 10)).expect("first read")[..], &[5u8; 10]);
    assert_eq!((short.tokens_fetched(), h.unauthorized.load(Ordering::Relaxed) - before), (1, 1));
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(&rt.block_on(fresh.range(&[1; 32], 0, 10)).expect("second read")[..], &[5u8; 10]);
    assert_eq!(short.tokens_fetched(), 2, "the token was not renewed before it expired");
    assert_eq!(h.unauthorized.load(Ordering::Relaxed) - before, 1, "a 401 was needed to renew it");

    // 32 requests at once on a fresh store, all refused at first: one token for all.
    let fresh = Remote::open_with(&store, Duration::from_secs(5), &HttpOptions::default()).expect("remote");
    let Remote::Oci(shared) = &fresh else { panic!("not a registry") };
    let mt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("rt");
    mt.block_on(async {
        let reads: Vec<_> = (0..32).map(|_| fresh.range(&[1; 32], 0, 10)).collect();
        for r in futures::future::join_all(reads).await {
            assert_eq!(&r.expect("read")[..], &[5u8; 10]);
        }
    });
    assert_eq!(shared.tokens_fetched(), 1, "concurrent requests did not share one token fetch");
}

/// A registry's upload endpoints in memory, whose second PATCH keeps half its chunk and
/// fails (a connection cut mid-chunk, as the registry sees it): the pusher must ask where the
/// upload stands (GET, `Range`) and go on from there.
#[derive(Default)]
struct Uploads {
    data: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    blobs: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
    posts: AtomicU64,
    patches: AtomicU64,
    status_checks: AtomicU64,
    manifests: std::sync::Mutex<Vec<String>>,
}

async fn uploads(State(u): State<Arc<Uploads>>, req: Request) -> Response {
    use axum::http::Method;
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let body = axum::body::to_bytes(req.into_body(), 64 << 20).await.map(|b| b.to_vec()).unwrap_or_default();
    let range = |n: usize| format!("0-{}", n.saturating_sub(1));
    match method {
        Method::HEAD if path.contains("/blobs/sha256:") => {
            let d = path.rsplit('/').next().unwrap_or("").to_string();
            let have = u.blobs.lock().expect("blobs").contains_key(&d);
            (if have { StatusCode::OK } else { StatusCode::NOT_FOUND }).into_response()
        }
        Method::POST if path.ends_with("/blobs/uploads/") => {
            let mut data = u.data.lock().expect("data");
            let id = format!("u{}", u.posts.fetch_add(1, Ordering::Relaxed));
            data.insert(id.clone(), Vec::new());
            (StatusCode::ACCEPTED, [("location", format!("/v2/x/blobs/uploads/{id}")), ("range", "0-0".into())])
                .into_response()
        }
        Method::PATCH => {
            let id = path.rsplit('/').next().unwrap_or("").to_string();
            let n = u.patches.fetch_add(1, Ordering::Relaxed);
            let mut data = u.data.lock().expect("data");
            let Some(d) = data.get_mut(&id) else { return StatusCode::NOT_FOUND.into_response() };
            if n == 1 {
                d.extend_from_slice(&body[..body.len() / 2]);
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            d.extend_from_slice(&body);
            let r = range(d.len());
            (StatusCode::ACCEPTED, [("location", format!("/v2/x/blobs/uploads/{id}")), ("range", r)]).into_response()
        }
        Method::GET if path.contains("/blobs/uploads/") => {
            u.status_checks.fetch_add(1, Ordering::Relaxed);
            let id = path.rsplit('/').next().unwrap_or("").to_string();
            let n = u.data.lock().expect("data").get(&id).map(Vec::len);
            match n {
                Some(n) => {
                    (StatusCode::NO_CONTENT, [("location", format!("/v2/x/blobs/uploads/{id}")), ("range", range(n))])
                        .into_response()
                }
                None => StatusCode::NOT_FOUND.into_response(),
            }
        }
        Method::PUT if path.contains("/blobs/uploads/") => {
            let id = path.rsplit('/').next().unwrap_or("").to_string();
            let digest = query.split('&').find_map(|kv| kv.strip_prefix("digest=")).unwrap_or("").replace("%3A", ":");
            let Some(d) = u.data.lock().expect("data").remove(&id) else {
                return StatusCode::NOT_FOUND.into_response();
            };
            let actual = format!("sha256:{}", hex(&sha2_digest(&d)));
            if actual != digest {
                return (StatusCode::BAD_REQUEST, "digest mismatch").into_response();
            }
            u.blobs.lock().expect("blobs").insert(digest, d);
            StatusCode::CREATED.into_response()
        }
        Method::PUT if path.contains("/manifests/") => {
            u.manifests.lock().expect("manifests").push(String::from_utf8_lossy(&body).into_owned());
            StatusCode::CREATED.into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn sha2_digest(d: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(d).into()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn an_upload_cut_mid_chunk_resumes_where_the_registry_says() {
    use incfs::pack::{pack, PackOptions};
    use incfs::store::oci::{OciRef, Registry};
    use incfs::store::Store;
    let u = Arc::new(Uploads::default());
    let port = serve(axum::Router::new().fallback(uploads).with_state(u.clone()));
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    // One blob of 10 MB: two chunks of at most 8 MiB.
    let mut x = 0x1234_5678_9abc_def1u64;
    let data: Vec<u8> = (0..10_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    fs::write(src.join("f"), &data).expect("write");
    let staging = Store::new(t.path().join("staging"));
    let opts = PackOptions { blob_size: 32 << 20, ..PackOptions::default() };
    let (id, _) = pack(&src, &staging, &opts).expect("pack");
    let reference = OciRef::parse(&format!("oci+http://127.0.0.1:{port}/x:v1")).expect("ref").expect("oci");
    let reg =
        Arc::new(Registry::open(reference, Duration::from_secs(10), &HttpOptions::default(), true).expect("open"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let stats = rt.block_on(reg.push(&staging, &id, "v1", false)).expect("push");
    assert_eq!(stats.uploaded, 3, "blob, manifest, config: {stats:?}");
    assert!(u.status_checks.load(Ordering::Relaxed) >= 1, "the failed chunk did not ask where the upload stood");
    assert_eq!(u.posts.load(Ordering::Relaxed), 3, "an upload was started again instead of resumed");
    // Every blob arrived whole (the server checked each digest), the data blob among them.
    let blobs = u.blobs.lock().expect("blobs");
    assert!(blobs.contains_key(&format!("sha256:{id}")));
    assert!(blobs.values().any(|b| b.len() > 8 << 20), "the big blob was not uploaded in several chunks");
    let m = u.manifests.lock().expect("manifests");
    assert_eq!(m.len(), 1);
    assert!(m[0].contains("application/vnd.incfs.image.v1") && m[0].contains(&id.to_string()));
}
