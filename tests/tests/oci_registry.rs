//! One guest, two virtio-fs shares, each served lazily from Debian's `docker-registry`
//! (distribution 2.8) over TLS, the image pushed there by `incfsd pack --store oci://…`:
//! share `incfs` from a registry with htpasswd basic auth, by tag; share `incfs2` from a
//! registry with token auth, by id, whose tokens (from a token issuer here, JWTs signed with
//! the `openssl` CLI, behind nginx's TLS) expire while the guest reads. Checksums in the
//! guest match the tree's.
//!
//! Needs `docker-registry`, `htpasswd` (apache2-utils), `openssl` and nginx (`.ci/run`
//! installs them); without `docker-registry` the test says so and passes.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use incfs_e2e::*;

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const USER: &str = "alice";
const PASSWORD: &str = "e2e-pw";
const REPO: &str = "e2e/img";
/// How long the issuer's tokens are good for at the registry (it accepts a token 60 s past
/// its `exp`): the guest reads for longer than this.
const TOKEN_LIFE_S: u64 = 4;

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// CA, server certificate for 127.0.0.1, and a self-signed RSA certificate for tokens.
fn pki(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"];
    let ca = ["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=incfs e2e CA"];
    openssl(dir, &[&["req", "-x509"][..], &ec, &ca, &ca_ext].concat());
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").expect("ext");
    let csr = ["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=incfs e2e server"];
    openssl(dir, &[&["req"][..], &ec, &csr].concat());
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
    let tok = ["-keyout", "token.key", "-out", "token.pem", "-days", "2", "-subj", "/CN=incfs e2e tokens"];
    openssl(dir, &[&["req", "-x509", "-newkey", "rsa:2048", "-nodes"][..], &tok].concat());
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

/// `docker-registry serve` over TLS with `auth` (YAML under `auth:`) on a free port.
fn registry(work: &Path, name: &str, pki: &Path, auth: &str) -> (Proc, u16) {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let port = free_port();
    let conf = format!(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: e2e\n  tls:\n    certificate: {}\n    key: {}\nauth:\n{auth}",
        dir.join("root").display(),
        pki.join("server.pem").display(),
        pki.join("server.key").display()
    );
    std::fs::write(dir.join("config.yml"), conf).expect("config");
    let child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("registry.log")).expect("log"))
        .spawn()
        .expect("start docker-registry");
    wait_for_port(port, "docker-registry");
    (Proc { child, name: name.into() }, port)
}

/// A token issuer on plain HTTP (nginx puts TLS in front): GET /token with alice's basic
/// credentials answers a JWT (RS256 by `openssl`, x5c = the token certificate) for the
/// repository, good at the registry for TOKEN_LIFE_S while it claims 300 s, so that the
/// registry's 401 is what makes the daemon renew it. Returns the port and the count.
fn token_issuer(pki: PathBuf) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let issued = Arc::new(AtomicU64::new(0));
    let count = issued.clone();
    let der = openssl(&pki, &["x509", "-in", "token.pem", "-outform", "DER"]);
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let mut r = BufReader::new(conn);
            let mut head = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                head.push(std::mem::take(&mut line));
            }
            let want = format!("authorization: basic {}", b64(format!("{USER}:{PASSWORD}").as_bytes(), false));
            let authed = head.iter().any(|h| h.trim().eq_ignore_ascii_case(&want));
            let push = head.first().is_some_and(|l| l.contains("pull%2Cpush") || l.contains("pull,push"));
            let (status, body) = if authed {
                let n = count.fetch_add(1, Ordering::Relaxed);
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let actions = if push { r#"["pull","push"]"# } else { r#"["pull"]"# };
                let header = format!(r#"{{"typ":"JWT","alg":"RS256","x5c":["{}"]}}"#, b64(&der, false));
                let claims = format!(
                    r#"{{"iss":"e2e-issuer","sub":"{USER}","aud":"e2e-registry","exp":{},"nbf":{},"iat":{now},"jti":"t{n}","access":[{{"type":"repository","name":"{REPO}","actions":{actions}}}]}}"#,
                    (now + TOKEN_LIFE_S).saturating_sub(60),
                    now.saturating_sub(1)
                );
                let input = format!("{}.{}", b64(header.as_bytes(), true), b64(claims.as_bytes(), true));
                let mut sign = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign", "token.key"])
                    .current_dir(&pki)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("openssl dgst");
                sign.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("sign");
                let sig = sign.wait_with_output().expect("signature").stdout;
                ("200 OK", format!(r#"{{"token":"{input}.{}","expires_in":300}}"#, b64(&sig, true)))
            } else {
                ("401 Unauthorized", "{}".to_string())
            };
            let mut conn = r.into_inner();
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, issued)
}

/// nginx with TLS in front of the issuer; its realm URL.
fn tls_front(work: &Path, pki: &Path, to: u16) -> (Proc, String) {
    let dir = work.join("nginx-realm");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; error_log {d}/error.log warn; pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{ access_log off; client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    location /token {{ proxy_pass http://127.0.0.1:{to}; }} }} }}",
        cert = pki.join("server.pem").display(),
        key = pki.join("server.key").display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("conf");
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().find(|p| Path::new(p).exists()).expect("nginx");
    let child = Command::new(bin).arg("-p").arg(&dir).arg("-c").arg(dir.join("nginx.conf")).spawn().expect("nginx");
    wait_for_port(port, "nginx");
    (Proc { child, name: "nginx".into() }, format!("https://127.0.0.1:{port}/token"))
}

fn push(src: &Path, store: &str, auth: &[&str]) -> String {
    let out = Command::new(incfsd_bin())
        .arg("pack")
        .arg(src)
        .args(["--store", store, "--blob-size-mb", "2"])
        .args(auth)
        .output()
        .expect("incfsd pack");
    assert!(out.status.success(), "push to {store}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().expect("id").trim().to_string()
}

#[test]
fn a_guest_reads_images_lazily_from_registries_with_basic_and_expiring_token_auth() {
    if !Path::new(REGISTRY_BIN).exists() {
        eprintln!("skipped: {REGISTRY_BIN} is not installed (`apt-get install docker-registry apache2-utils`, as .ci/run does)");
        return;
    }
    let work = WorkDir::new("oci");
    let pki_dir = work.join("pki");
    pki(&pki_dir);
    let src = work.join("src");
    let mut files = Vec::new();
    for i in 0..8u64 {
        let rel = format!("d/f{i}.bin");
        write_file(&src, &rel, &pseudo_random(70 + i, (512 << 10) + i as usize * 77_777));
        files.push(rel);
    }

    let htpasswd = Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]).output().expect("htpasswd (apache2-utils)");
    assert!(htpasswd.status.success());
    std::fs::write(work.join("htpasswd"), htpasswd.stdout).expect("write");
    let basic = format!("  htpasswd:\n    realm: e2e\n    path: {}\n", work.join("htpasswd").display());
    let (_basic_reg, basic_port) = registry(&work.path, "reg-basic", &pki_dir, &basic);

    let (issuer_port, issued) = token_issuer(pki_dir.clone());
    let (_front, realm) = tls_front(&work.path, &pki_dir, issuer_port);
    let token = format!(
        "  token:\n    realm: {realm}\n    service: e2e-registry\n    issuer: e2e-issuer\n    rootcertbundle: {}\n",
        pki_dir.join("token.pem").display()
    );
    let (_token_reg, token_port) = registry(&work.path, "reg-token", &pki_dir, &token);

    let auth = b64(format!("{USER}:{PASSWORD}").as_bytes(), false);
    let creds = work.join("docker-config.json");
    std::fs::write(
        &creds,
        format!(r#"{{"auths":{{"127.0.0.1:{basic_port}":{{"auth":"{auth}"}},"127.0.0.1:{token_port}":{{"auth":"{auth}"}}}}}}"#),
    )
    .expect("write");
    let (ca, creds) = (pki_dir.join("ca.pem").display().to_string(), creds.display().to_string());
    let opts = ["--ca-file", ca.as_str(), "--registry-auth", creds.as_str()];

    let basic_store = format!("oci://127.0.0.1:{basic_port}/{REPO}");
    let token_store = format!("oci://127.0.0.1:{token_port}/{REPO}");
    let id = push(&src, &format!("{basic_store}:v1"), &opts);
    assert_eq!(push(&src, &format!("{token_store}:v1"), &opts), id, "same tree, same image");

    let _vm = vm_lock();
    // By tag from the basic-auth registry, by id from the token one.
    let by_tag = Daemon::start_with(&work.join("basic.sock"), &work.join("cache-basic"), &basic_store, "v1", &opts);
    let by_id = Daemon::start_with(&work.join("token.sock"), &work.join("cache-token"), &token_store, &id, &opts);
    let tokens_at_start = issued.load(Ordering::Relaxed);

    // Half the files from each share, a pause longer than a token's life, the other halves.
    let mut script = String::from(
        "#!/bin/sh\nmkdir -p /mnt2\nmount -t virtiofs incfs /mnt || exit 10\nmount -t virtiofs incfs2 /mnt2 || exit 10\n",
    );
    for (k, f) in files.iter().enumerate() {
        if k == files.len() / 2 {
            script.push_str(&format!("sleep {}\n", TOKEN_LIFE_S + 2));
        }
        script.push_str(&format!("/bin/guest-check seq /mnt/{f} /mnt2/{f} || exit 11\n"));
    }
    let fs1 = format!("{}:incfs", by_tag.socket.display());
    let fs2 = format!("{}:incfs2", by_id.socket.display());
    std::fs::create_dir_all(work.join("vm")).expect("mkdir");
    let run = run_vm_with(&work.join("vm"), &["--fs", &fs1, "--fs", &fs2], &script, 300, |_| {});
    assert_eq!(run.status, 0, "guest script failed:\n{}", run.console);

    let seq: Vec<Vec<String>> = run.results().into_iter().filter(|r| r[0] == "SEQ").collect();
    assert_eq!(seq.len(), 2 * files.len(), "one SEQ line per file and share");
    for r in &seq {
        let rel = r[1].trim_start_matches("/mnt2/").trim_start_matches("/mnt/");
        let data = std::fs::read(src.join(rel)).expect("host read");
        assert_eq!(r[2], data.len().to_string(), "{}: length", r[1]);
        assert_eq!(r[3], check::sha256_hex(&data), "{}: content", r[1]);
    }
    let renewed = issued.load(Ordering::Relaxed) - tokens_at_start;
    println!("tokens renewed while the guest read: {renewed}");
    assert!(renewed >= 1, "no token expired and was renewed during the run");
    assert!(
        by_tag.stderr().contains(&format!("{REPO}:v1 is image {id}")),
        "the daemon did not log the id its tag resolved to"
    );
    for d in [&by_tag, &by_id] {
        assert!(!d.stderr().contains(PASSWORD), "a password in the daemon's log");
        assert!(d.metric("incfs_bytes_fetched_total") > 0, "nothing fetched from the registry");
    }
}
