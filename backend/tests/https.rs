//! HTTPS stores as deployments need them, against a real nginx over real TLS with a CA and
//! certificates made here by the `openssl` CLI: extra trusted roots (`--ca-file`), client
//! certificates, headers, a bearer token rotated while in use, and signed URLs (a query kept
//! on every request). Secrets never show in what incfsd prints.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use std::sync::Arc;

use incfs::cache::BlockCache;
use incfs::engine::{Engine, EngineConfig};
use incfs::image::ImageId;
use incfs::pack::{pack, PackOptions};
use incfs::store::{FetchError, HttpOptions, Remote, Store, TOKEN_RECHECK};
use support::*;

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        fs::create_dir_all(dir).expect("mkdir");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        openssl(
            &[
                &["req", "-x509"][..],
                &key,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=incfs test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        for (name, ext) in [
            ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"),
            ("client", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"),
        ] {
            fs::write(dir.join(format!("{name}.ext")), ext).expect("ext");
            let (k, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
            openssl(
                &[&["req"][..], &key, &["-keyout", &k, "-out", &csr, "-subj", &format!("/CN=incfs {name}")]].concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        Pki { dir: dir.to_path_buf() }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// nginx's TLS directives; with `verify_client`, a client certificate from the CA is
    /// required.
    fn ssl(&self, verify_client: bool) -> String {
        let mut s =
            format!("ssl_certificate {}; ssl_certificate_key {};", self.path("server.pem"), self.path("server.key"));
        if verify_client {
            s += &format!(" ssl_client_certificate {}; ssl_verify_client on;", self.path("ca.pem"));
        }
        s
    }
}

/// A store with one file `f` (a few blocks of varied bytes) under `root/store`.
fn packed(root: &Path) -> (ImageId, Vec<u8>) {
    let src = root.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    fs::write(src.join("f"), &data).expect("write");
    let id = pack(&src, &Store::new(root.join("www/store")), &PackOptions::default()).expect("pack").0;
    (id, data)
}

/// `incfsd cat f` from `store` with a fresh cache (so that everything is fetched), as
/// `extra` says; SSL_CERT_FILE is not inherited.
fn cat(store: &str, id: ImageId, extra: &[&str]) -> Output {
    let cache = tempfile::tempdir().expect("tmp");
    Command::new(INCFSD)
        .args(["cat", "--store", store, "--image", &id.to_string(), "--cache"])
        .arg(cache.path())
        .args(extra)
        .arg("f")
        .env_remove("SSL_CERT_FILE")
        .output()
        .expect("incfsd cat")
}

fn assert_served(out: &Output, data: &[u8]) {
    assert!(out.status.success(), "cat failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout == data, "cat printed {} bytes, not the file's {}", out.stdout.len(), data.len());
}

fn assert_refused(out: &Output, why: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && out.stdout.is_empty(), "served anyway: {err}");
    assert!(err.contains(why), "error does not say {why:?}: {err}");
    err
}

#[test]
fn https_store_trusted_through_ca_file_or_system_bundle_and_refused_without() {
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let (id, data) = packed(t.path());
    let nginx = Nginx::start_with(&t.path().join("www"), &pki.ssl(false), "");
    let url = format!("{}/store", nginx.url);
    assert!(url.starts_with("https://"));

    assert_served(&cat(&url, id, &["--ca-file", &pki.path("ca.pem")]), &data);
    // The system's bundle ($SSL_CERT_FILE) is trusted as well.
    let cache = tempfile::tempdir().expect("tmp");
    let out = Command::new(INCFSD)
        .args(["cat", "--store", &url, "--image", &id.to_string(), "--cache"])
        .arg(cache.path())
        .arg("f")
        .env("SSL_CERT_FILE", pki.path("ca.pem"))
        .output()
        .expect("cat");
    assert_served(&out, &data);

    // Refused for good: not retried until the manifest's 30 s deadline.
    let t0 = Instant::now();
    let err = assert_refused(&cat(&url, id, &[]), "certificate");
    assert!(t0.elapsed() < Duration::from_secs(10), "an unknown issuer was retried for {:?}", t0.elapsed());
    assert!(err.contains(&format!("GET {url}/images/{id}")), "the error names the request: {err}");
    // A CA file that is no PEM is refused as such.
    fs::write(t.path().join("junk.pem"), "not a certificate").expect("write");
    assert_refused(&cat(&url, id, &["--ca-file", &t.path().join("junk.pem").to_string_lossy()]), "junk.pem");
}

#[test]
fn client_certificate_required_by_nginx() {
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let (id, data) = packed(t.path());
    let nginx = Nginx::start_with(&t.path().join("www"), &pki.ssl(true), "");
    let url = format!("{}/store", nginx.url);
    let ca = pki.path("ca.pem");

    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    assert_served(&cat(&url, id, &["--ca-file", &ca, "--client-cert", &cert, "--client-key", &key]), &data);
    // One PEM holding both.
    let both = t.path().join("identity.pem");
    fs::write(&both, [fs::read(&cert).expect("cert"), fs::read(&key).expect("key")].concat()).expect("write");
    assert_served(&cat(&url, id, &["--ca-file", &ca, "--client-cert", &both.to_string_lossy()]), &data);

    // nginx answers 400 to a connection without a certificate.
    assert_refused(&cat(&url, id, &["--ca-file", &ca]), "HTTP 400");
    assert!(nginx.log().iter().any(|r| r.0 == 400), "nginx refused the request itself");
}

#[test]
fn header_required_by_nginx_and_never_printed() {
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let (id, data) = packed(t.path());
    let check = r#"if ($http_x_token != "s3cret") { return 403; }"#;
    let nginx = Nginx::start_with(&t.path().join("www"), &pki.ssl(false), check);
    let url = format!("{}/store", nginx.url);
    let ca = pki.path("ca.pem");

    assert_served(&cat(&url, id, &["--ca-file", &ca, "--header", "X-Token: s3cret"]), &data);
    assert_refused(&cat(&url, id, &["--ca-file", &ca]), "HTTP 403");
    let err = assert_refused(&cat(&url, id, &["--ca-file", &ca, "--header", "X-Token: wrong-value-1234"]), "HTTP 403");
    assert!(!err.contains("wrong-value-1234"), "a header's value was printed: {err}");
    let err = assert_refused(&cat(&url, id, &["--ca-file", &ca, "--header", "X-Token: bad\u{7f}value"]), "x-token");
    assert!(!err.contains("bad"), "a header's value was printed: {err}");
}

#[test]
fn base_url_query_kept_on_every_request() {
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let (id, data) = packed(t.path());
    let check = r#"if ($arg_sig != "abc123") { return 403; }"#;
    let nginx = Nginx::start_with(&t.path().join("www"), &pki.ssl(false), check);
    let ca = pki.path("ca.pem");

    assert_served(&cat(&format!("{}/store/?sig=abc123", nginx.url), id, &["--ca-file", &ca]), &data);
    let log = nginx.log();
    assert!(log.iter().any(|r| r.3.starts_with("/store/blobs/")), "blobs were fetched: {log:?}");
    assert!(log.iter().all(|r| r.0 == 200 || r.0 == 206), "a request without the query: {log:?}");

    let err =
        assert_refused(&cat(&format!("{}/store?sig=wrong-sig-5678", nginx.url), id, &["--ca-file", &ca]), "HTTP 403");
    assert!(!err.contains("wrong-sig-5678"), "the query was printed: {err}");
    assert!(err.contains("?<query hidden>"), "{err}");
}

/// Fetches the manifest until it is served, for at most `within`.
async fn manifest_within(remote: &Remote, id: &ImageId, within: Duration) -> Result<Vec<u8>, FetchError> {
    let t = Instant::now();
    loop {
        match remote.manifest(id).await {
            Err(_) if t.elapsed() < within => tokio::time::sleep(Duration::from_millis(100)).await,
            r => return r,
        }
    }
}

#[tokio::test]
async fn bearer_token_rotated_in_its_file_is_picked_up_without_a_restart() {
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let (id, data) = packed(t.path());
    let only = |token: &str| format!(r#"if ($http_authorization != "Bearer {token}") {{ return 401; }}"#);
    let mut nginx = Nginx::start_with(&t.path().join("www"), &pki.ssl(false), &only("first-token"));
    let token_dir = t.path().join("secrets");
    fs::create_dir_all(&token_dir).expect("mkdir");
    let token = token_dir.join("token");
    fs::write(&token, "first-token\n").expect("write");
    let opts = HttpOptions {
        ca_files: vec![pki.dir.join("ca.pem")],
        bearer_token_file: Some(token.clone()),
        ..HttpOptions::default()
    };
    assert!(!format!("{opts:?}").contains("first-token"));
    let remote = Remote::open_with(&format!("{}/store", nginx.url), Duration::from_secs(5), &opts).expect("remote");
    assert!(!format!("{remote:?}").contains("first-token"));
    let cache = tempfile::tempdir().expect("tmp");
    let cache = Arc::new(BlockCache::open(cache.path()).expect("cache"));
    let engine = Engine::open(remote.clone(), id, cache, EngineConfig::default()).await.expect("engine");
    let ino = engine.image().resolve(b"f").expect("f");
    let first = engine.read(ino, 0, 4096).await.expect("read with the first token");
    assert!(first[..] == data[..4096]);

    // The first token is revoked...
    nginx.reconfigure(&only("second-token"));
    // (The pool's connections died with nginx: a transport error may come first.)
    let t0 = Instant::now();
    let refused = loop {
        let e = remote.manifest(&id).await.expect_err("the first token was revoked");
        if e.failure().status().is_some() || t0.elapsed() > Duration::from_secs(10) {
            break e;
        }
    };
    assert_eq!(refused.failure().status().map(|s| s.as_u16()), Some(401), "{refused}");
    // ...and the second one written as rotators do: a new file renamed over the old one.
    let tmp = token_dir.join("token.new");
    fs::write(&tmp, "second-token").expect("write");
    fs::rename(&tmp, &token).expect("rename");
    manifest_within(&remote, &id, Duration::from_secs(5)).await.expect("served with the second token");
    // The engine opened with the first token reads the rest with the second.
    let mut got = first.to_vec();
    while got.len() < data.len() {
        let d = engine.read(ino, got.len() as u64, 1 << 20).await.expect("read with the second token");
        assert!(!d.is_empty(), "short file");
        got.extend_from_slice(&d);
    }
    assert!(got == data, "wrong bytes");
}

/// `incfsd run`, confined as by default (mount namespace, seccomp): the CA, the client
/// certificate and key are read at start; the bearer token file is read again when a new
/// one is renamed into place while serving.
#[test]
fn a_sandboxed_daemon_serves_over_mtls_and_picks_up_a_rotated_token() {
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let (id, data) = packed(t.path());
    let only = |token: &str| format!(r#"if ($http_authorization != "Bearer {token}") {{ return 401; }}"#);
    let mut nginx = Nginx::start_with(&t.path().join("www"), &pki.ssl(true), &only("first-token"));
    let secrets = t.path().join("secrets");
    fs::create_dir_all(&secrets).expect("mkdir");
    let token = secrets.join("token");
    fs::write(&token, "first-token").expect("write");
    fs::create_dir_all(t.path().join("run")).expect("mkdir");
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"));
    let d = RunDaemon::start(
        &format!("{}/store", nginx.url),
        &id.to_string(),
        &t.path().join("cache"),
        &t.path().join("run/fs.sock"),
        &[
            "--ca-file",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
            "--bearer-token-file",
            &token.to_string_lossy(),
            "--no-prefetch",
            "--readahead-kb",
            "4",
        ],
    );
    let mut f = incfs_testing::FuseFrontend::connect(&d.socket).expect("connect");
    f.init().expect("init");
    let e = f.lookup(1, b"f").expect("lookup");
    let (fh, _) = f.open(e.nodeid, 0).expect("open");
    assert!(f.read(e.nodeid, fh, 0, 4096).expect("read with the first token") == data[..4096]);

    // The first token revoked and the second renamed into place.
    let tmp = secrets.join("token.new");
    fs::write(&tmp, "second-token").expect("write");
    fs::rename(&tmp, &token).expect("rename");
    nginx.reconfigure(&only("second-token"));
    std::thread::sleep(TOKEN_RECHECK + Duration::from_millis(500));
    let rest = f.read(e.nodeid, fh, 4096, (data.len() - 4096) as u32).expect("read with the second token");
    assert!(rest == data[4096..], "wrong bytes");
    let log = nginx.log();
    assert!(log.iter().all(|r| r.0 == 200 || r.0 == 206), "a request was refused: {log:?}");
    d.stop();
}

/// HTTP_PROXY is honoured (reqwest's default, kept) and NO_PROXY too: nginx forwards to
/// another nginx serving the store, under a host name that does not resolve.
#[test]
fn http_proxy_from_the_environment_is_used() {
    let t = tempfile::tempdir().expect("tmp");
    let (id, data) = packed(t.path());
    let origin = Nginx::start(&t.path().join("www"), 0);
    let empty = t.path().join("empty");
    fs::create_dir_all(&empty).expect("mkdir");
    let proxy = Nginx::start_with(&empty, "", &format!("location /store/ {{ proxy_pass {}; }}", origin.url));
    let cat_via = |store: &str, no_proxy: &str| {
        let cache = tempfile::tempdir().expect("tmp");
        Command::new(INCFSD)
            .args(["cat", "--store", store, "--image", &id.to_string(), "--cache"])
            .arg(cache.path())
            .arg("f")
            .env("HTTP_PROXY", &proxy.url)
            .env("NO_PROXY", no_proxy)
            .env_remove("http_proxy")
            .env_remove("no_proxy")
            .output()
            .expect("incfsd cat")
    };
    assert_served(&cat_via("http://store.invalid/store", ""), &data);
    assert!(origin.log().iter().any(|r| r.3.starts_with("/store/blobs/")), "the origin served the blobs");
    let proxied = proxy.log().len();
    assert!(proxied > 0, "through the proxy");
    // NO_PROXY: straight to the origin.
    assert_served(&cat_via(&format!("{}/store", origin.url), "127.0.0.1"), &data);
    assert_eq!(proxy.log().len(), proxied, "NO_PROXY ignored");
}

/// Where tinyproxy is (Debian's `tinyproxy`, a CONNECT proxy), or None outside CI when it is
/// not installed (the test then says it is skipped).
fn tinyproxy() -> Option<&'static str> {
    let bin = "/usr/bin/tinyproxy";
    if Path::new(bin).exists() {
        return Some(bin);
    }
    assert!(std::env::var_os("CI").is_none(), "tinyproxy is not installed (apt-get install tinyproxy)");
    eprintln!("skipped: tinyproxy is not installed (apt-get install tinyproxy)");
    None
}

/// HTTPS_PROXY is honoured for an https:// store: the request is tunnelled through the
/// proxy with CONNECT (TLS end to end, the proxy sees only the origin's address), and
/// NO_PROXY sends it straight to the origin.
#[test]
fn https_proxy_from_the_environment_tunnels_with_connect() {
    let Some(bin) = tinyproxy() else { return };
    let t = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&t.path().join("pki"));
    let (id, data) = packed(t.path());
    let origin = Nginx::start_with(&t.path().join("www"), &pki.ssl(false), "");
    let url = format!("{}/store", origin.url);
    let origin_port = origin.url.rsplit(':').next().expect("port").to_string();
    let port = free_port();
    let log = t.path().join("tinyproxy.log");
    let conf = t.path().join("tinyproxy.conf");
    fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 16\n\
             Allow 127.0.0.1\nConnectPort {origin_port}\n",
            log.display()
        ),
    )
    .expect("conf");
    let mut proxy = Command::new(bin).arg("-d").arg("-c").arg(&conf).spawn().expect("start tinyproxy");
    wait_for_port(port);
    let connects = || fs::read_to_string(&log).unwrap_or_default().matches("CONNECT").count();
    let cat_via = |no_proxy: &str| {
        let cache = tempfile::tempdir().expect("tmp");
        Command::new(INCFSD)
            .args(["cat", "--store", &url, "--image", &id.to_string(), "--cache"])
            .arg(cache.path())
            .args(["--ca-file", &pki.path("ca.pem"), "f"])
            .env("HTTPS_PROXY", format!("http://127.0.0.1:{port}"))
            .env("NO_PROXY", no_proxy)
            .env_remove("https_proxy")
            .env_remove("no_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output()
            .expect("incfsd cat")
    };
    assert_served(&cat_via(""), &data);
    let tunnelled = connects();
    assert!(tunnelled > 0, "no CONNECT through the proxy:\n{}", fs::read_to_string(&log).unwrap_or_default());
    assert_served(&cat_via("127.0.0.1"), &data);
    assert_eq!(connects(), tunnelled, "NO_PROXY ignored");
    let _ = proxy.kill();
    let _ = proxy.wait();
}
