//! One guest, four virtio-fs shares, each its own `incfsd run` on a store people already run:
//! an S3-protocol server that verifies SigV4 (`s3s-fs`), HTTPS with a private CA and a
//! required client certificate (nginx), and twice the origin behind a mirror list whose first
//! mirror is dead and whose second is the nginx caching tier of docs/nginx-cache-tier.conf,
//! two daemons with separate caches. The guest reads every file of every share, checksums
//! checked on the host; the origin's access log shows each blob byte sent once.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use incfs_e2e::*;

/// s3s-fs: `$S3S_FS`, on PATH or in cargo's bin directory. Missing outside CI: the test is skipped.
fn s3s_fs() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("S3S_FS").map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|c| c.join("bin"))
        .unwrap_or_default();
    let found = std::env::split_paths(&path).chain([home]).map(|d| d.join("s3s-fs")).find(|p| p.is_file());
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "s3s-fs is not installed (.ci/run installs it)");
        eprintln!("skipped: s3s-fs is not installed (cargo install s3s-fs --features binary, or set S3S_FS)");
    }
    found
}

/// A server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx in `dir` with `body` in its http {} block; the access log (`$status $bytes
/// "$range" $uri`) is `dir/access.log`.
fn nginx(dir: &Path, body: &str, port: u16) -> Server {
    std::fs::create_dir_all(dir).expect("mkdir");
    let d = dir.display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; error_log {d}/error.log warn; pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  log_format counted '$status $body_bytes_sent \"$http_range\" $uri';
  access_log {d}/access.log counted;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3; uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  default_type application/octet-stream;
  {body}
}}"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start nginx");
    wait_for_port(port, "nginx");
    Server(child)
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, by the openssl CLI.
fn pki(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    openssl(
        &[&["req", "-x509"][..], &key, &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ca"]]
            .concat(),
    );
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext");
        let (k, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        openssl(&[&["req"][..], &key, &["-keyout", &k, "-out", &csr, "-subj", &format!("/CN={name}")]].concat());
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
}

/// (status, bytes, range, uri) of each request in an access log.
fn access_log(path: &Path) -> Vec<(u16, u64, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            let status = it.next()?.parse().ok()?;
            let bytes = it.next()?.parse().ok()?;
            let (range, uri) = it.next()?.rsplit_once(' ')?;
            Some((status, bytes, range.trim_matches('"').to_string(), uri.to_string()))
        })
        .collect()
}

const TAGS: [&str; 4] = ["s3", "mtls", "tier1", "tier2"];

#[test]
fn a_guest_reads_from_s3_mtls_https_and_a_mirror_list_with_a_caching_tier() {
    let Some(s3s) = s3s_fs() else { return };
    let work = WorkDir::new("stores");
    let src = work.join("src");
    let mut files = Vec::new();
    for i in 0..4u64 {
        let rel = format!("d/f{i}.bin");
        write_file(&src, &rel, &pseudo_random(70 + i, (700 << 10) + i as usize * 123_457));
        files.push(rel);
    }
    let store = work.join("www/store");
    let image = pack(&src, &store);
    let _ = std::fs::remove_dir_all(store.join("tmp"));
    let blob_bytes = dir_bytes(&store.join("blobs"));

    // S3: the store's objects laid out as s3s-fs keeps them (ROOT/BUCKET/KEY).
    let bucket = work.join("s3/bkt");
    std::fs::create_dir_all(&bucket).expect("mkdir");
    let cp = Command::new("cp").arg("-r").arg(&store).arg(bucket.join("img")).status().expect("cp");
    assert!(cp.success());
    let s3_port = free_port();
    let _s3 = Server(
        Command::new(&s3s)
            .args(["--host", "127.0.0.1", "--port", &s3_port.to_string()])
            .args(["--access-key", "AKIAE2ETEST", "--secret-key", "e2e-secret-key"])
            .arg(work.join("s3"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs"),
    );
    wait_for_port(s3_port, "s3s-fs");

    // HTTPS, a client certificate required.
    let pki_dir = work.join("pki");
    pki(&pki_dir);
    let p = |n: &str| pki_dir.join(n).display().to_string();
    let tls_port = free_port();
    let _tls = nginx(
        &work.join("nginx-tls"),
        &format!(
            "server {{ listen 127.0.0.1:{tls_port} ssl; ssl_certificate {}; ssl_certificate_key {}; \
             ssl_client_certificate {}; ssl_verify_client on; root {}; location / {{ }} }}",
            p("server.pem"),
            p("server.key"),
            p("ca.pem"),
            work.join("www").display()
        ),
        tls_port,
    );

    // The origin and the caching tier in front of it (the document's configuration).
    let origin_port = free_port();
    let _origin = nginx(
        &work.join("nginx-origin"),
        &format!("server {{ listen 127.0.0.1:{origin_port}; root {}; location / {{ }} }}", work.join("www").display()),
        origin_port,
    );
    let tier_port = free_port();
    let tier_conf = std::fs::read_to_string(workspace().join("docs/nginx-cache-tier.conf"))
        .expect("docs/nginx-cache-tier.conf")
        .replace("listen 8080;", &format!("listen 127.0.0.1:{tier_port};"))
        .replace("/var/cache/nginx/incfs", &work.join("tier-cache").display().to_string())
        .replace("origin.example:80", &format!("127.0.0.1:{origin_port}"));
    std::fs::create_dir_all(work.join("nginx-tier")).expect("mkdir");
    std::fs::write(work.join("nginx-tier/tier.conf"), tier_conf).expect("write");
    let _tier = nginx(
        &work.join("nginx-tier"),
        &format!("include {};", work.join("nginx-tier/tier.conf").display()),
        tier_port,
    );

    let _vm = vm_lock();
    // The S3 daemon's keys come from the environment (inherited by the daemon).
    std::env::set_var("AWS_ACCESS_KEY_ID", "AKIAE2ETEST");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "e2e-secret-key");
    let s3_endpoint = format!("http://127.0.0.1:{s3_port}");
    let dead = format!("http://127.0.0.1:{}/store", free_port());
    let tier = format!("http://127.0.0.1:{tier_port}/store");
    let origin = format!("http://127.0.0.1:{origin_port}/store");
    let tls = format!("https://127.0.0.1:{tls_port}/store");
    let sock = |t: &str| work.join(&format!("{t}.sock"));
    let cache = |t: &str| work.join(&format!("cache-{t}"));
    let daemons = [
        Daemon::start_with(&sock("s3"), &cache("s3"), "s3://bkt/img", &image, &["--s3-endpoint", &s3_endpoint]),
        Daemon::start_with(
            &sock("mtls"),
            &cache("mtls"),
            &tls,
            &image,
            &["--ca-file", &p("ca.pem"), "--client-cert", &p("client.pem"), "--client-key", &p("client.key")],
        ),
        Daemon::start_with(&sock("tier1"), &cache("tier1"), &origin, &image, &["--mirror", &dead, "--mirror", &tier]),
        Daemon::start_with(&sock("tier2"), &cache("tier2"), &origin, &image, &["--mirror", &dead, "--mirror", &tier]),
    ];

    let mut script = String::from("#!/bin/sh\n");
    for t in TAGS {
        script.push_str(&format!("mkdir -p /m/{t} && mount -t virtiofs {t} /m/{t} || exit 10\n"));
    }
    for t in TAGS {
        for f in &files {
            script.push_str(&format!("/bin/guest-check seq /m/{t}/{f} || exit 11\n"));
        }
    }
    let fs_args: Vec<String> = daemons.iter().zip(TAGS).map(|(d, t)| format!("{}:{t}", d.socket.display())).collect();
    let mut args: Vec<&str> = Vec::new();
    for a in &fs_args {
        args.extend(["--fs", a.as_str()]);
    }
    std::fs::create_dir_all(work.join("vm")).expect("mkdir");
    let run = run_vm_with(&work.join("vm"), &args, &script, 300, |_| {});
    assert_eq!(run.status, 0, "guest script failed:\n{}", run.console);
    let seq: Vec<Vec<String>> = run.results().into_iter().filter(|r| r[0] == "SEQ").collect();
    assert_eq!(seq.len(), TAGS.len() * files.len(), "one SEQ line per file and share");
    for (k, r) in seq.iter().enumerate() {
        let (t, f) = (TAGS[k / files.len()], &files[k % files.len()]);
        let data = std::fs::read(src.join(f)).expect("host read");
        assert_eq!(r[1], format!("/m/{t}/{f}"));
        assert_eq!(r[2], data.len().to_string(), "{t}/{f}: length");
        assert_eq!(r[3], check::sha256_hex(&data), "{t}/{f}: content");
    }
    for (d, t) in daemons.iter().zip(TAGS) {
        assert!(d.metric("incfs_bytes_fetched_total") > 0, "{t}: nothing fetched");
    }
    // Behind the tier the two daemons fetched everything, and the origin sent each blob
    // byte once: its ranges (the tier's 1 MiB slices) never overlap and add up to the blobs.
    let log = access_log(&work.join("nginx-origin/access.log"));
    let blobs: Vec<_> = log.iter().filter(|r| r.3.starts_with("/store/blobs/")).collect();
    let mut ranges: Vec<(String, u64, u64)> = blobs
        .iter()
        .filter_map(|r| {
            let (a, b) = r.2.strip_prefix("bytes=")?.split_once('-')?;
            Some((r.3.clone(), a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    assert_eq!(ranges.len(), blobs.len(), "every blob request was a range: {log:?}");
    ranges.sort();
    for w in ranges.windows(2) {
        assert!(w[0].0 != w[1].0 || w[0].2 < w[1].1, "a range was fetched twice: {ranges:?}");
    }
    let sent: u64 = blobs.iter().map(|r| r.1).sum();
    println!("origin: {} blob requests, {sent} bytes for {blob_bytes} bytes of blobs", blobs.len());
    assert_eq!(sent, blob_bytes, "{ranges:?}");
    let tier_metric = |d: &Daemon| d.metric("incfs_source_mirror1_bytes_total");
    assert!(tier_metric(&daemons[2]) > 0 && tier_metric(&daemons[3]) > 0, "the tier served both daemons");
    assert_eq!(daemons[2].metric("incfs_source_origin_bytes_total"), 0, "the origin was asked directly");
}
