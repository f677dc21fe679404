//! S3 stores against a real S3-protocol server, `s3s-fs`, which checks every request's SigV4
//! signature: path-style and virtual-host-style addressing, a session token, keys from the
//! environment or a credentials file rotated while a sandboxed daemon serves, and clear
//! errors for a wrong secret, an unknown key and no credentials at all. The objects are the
//! packed store's files laid out as s3s-fs keeps them (ROOT/BUCKET/KEY): the upload is the
//! server's own (a copy into its directory); incfsd only reads.

mod support;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use incfs::image::ImageId;
use incfs::pack::{pack, PackOptions};
use incfs::store::s3::CREDENTIALS_RECHECK;
use incfs::store::Store;
use support::s3s::{self, S3s};
use support::*;

const KEY: &str = "AKIAINCFSTEST0001";
const SECRET: &str = "incfs-test-secret-key-0001";

/// A bucket `bkt` under `root/s3` with the image of one file at prefix `images/v1`.
fn bucket(root: &Path) -> (ImageId, Vec<u8>) {
    let src = root.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(7, 300_000);
    fs::write(src.join("f"), &data).expect("write");
    let store = root.join("s3/bkt/images/v1");
    let id = pack(&src, &Store::new(&store), &PackOptions::default()).expect("pack").0;
    // The packer's scratch directory is no object.
    let _ = fs::remove_dir_all(store.join("tmp"));
    (id, data)
}

/// `incfsd cat f` from `store` with a fresh cache, the AWS variables only as `env` says
/// (HOME pointed at `home` so that no real ~/.aws is read).
fn cat(store: &str, id: ImageId, home: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let cache = tempfile::tempdir().expect("tmp");
    let mut c = Command::new(INCFSD);
    c.args(["cat", "--store", store, "--image", &id.to_string(), "--cache"]).arg(cache.path()).args(extra).arg("f");
    clean_aws_env(&mut c, home);
    c.envs(env.iter().copied()).output().expect("incfsd cat")
}

fn clean_aws_env(c: &mut Command, home: &Path) {
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("HOME", home);
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
fn path_style_signed_requests_and_clear_refusals() {
    let Some(bin) = s3s::binary() else { return };
    let t = tempfile::tempdir().expect("tmp");
    let (id, data) = bucket(t.path());
    let server = S3s::start(&bin, &t.path().join("s3"), KEY, SECRET, None);
    let home = t.path().join("home");
    fs::create_dir_all(&home).expect("mkdir");
    let ep = ["--s3-endpoint", server.endpoint.as_str()];
    let keys = [("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET)];

    assert_served(&cat("s3://bkt/images/v1", id, &home, &ep, &keys), &data);
    // The server refuses what is not signed, so the test above cannot pass unsigned.
    assert_refused(&cat(&format!("{}/bkt/images/v1", server.endpoint), id, &home, &[], &[]), "HTTP 403");
    // A wrong secret, an unknown key: refused at once, saying why, never showing a secret.
    let err = assert_refused(
        &cat(
            "s3://bkt/images/v1",
            id,
            &home,
            &ep,
            &[("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", "wrong-secret-9")],
        ),
        "SignatureDoesNotMatch (wrong secret key?)",
    );
    assert!(!err.contains("wrong-secret-9"), "{err}");
    assert_refused(
        &cat(
            "s3://bkt/images/v1",
            id,
            &home,
            &ep,
            &[("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN"), ("AWS_SECRET_ACCESS_KEY", SECRET)],
        ),
        "HTTP 403 Forbidden NotSignedUp (unknown access key id?)",
    );
    // No credentials anywhere.
    assert_refused(&cat("s3://bkt/images/v1", id, &home, &ep, &[]), "no S3 credentials");
    // The credentials file of a named profile, the region from the config file.
    fs::create_dir_all(home.join(".aws")).expect("mkdir");
    fs::write(
        home.join(".aws/credentials"),
        format!("[default]\naws_access_key_id = nope\naws_secret_access_key = nope\n\n[ci]\naws_access_key_id = {KEY}\naws_secret_access_key = {SECRET}\n"),
    )
    .expect("write");
    fs::write(home.join(".aws/config"), "[profile ci]\nregion = eu-west-3\n").expect("write");
    assert_served(&cat("s3://bkt/images/v1", id, &home, &ep, &[("AWS_PROFILE", "ci")]), &data);
    assert_refused(&cat("s3://bkt/images/v1", id, &home, &ep, &[]), "(unknown access key id?)");
}

/// Virtual-host style (`bkt.s3.test`) needs the bucket's name to resolve: the requests go
/// through an HTTP proxy (nginx, which passes the Host header on), as they would through a
/// corporate proxy. The session token is signed and sent.
#[test]
fn virtual_host_style_with_a_session_token() {
    let Some(bin) = s3s::binary() else { return };
    let t = tempfile::tempdir().expect("tmp");
    let (id, data) = bucket(t.path());
    let server = S3s::start(&bin, &t.path().join("s3"), KEY, SECRET, Some("s3.test"));
    let empty = t.path().join("empty");
    fs::create_dir_all(&empty).expect("mkdir");
    let proxy = Nginx::start_with(
        &empty,
        "",
        &format!("location ~ . {{ proxy_pass {}; proxy_set_header Host $http_host; }}", server.endpoint),
    );
    let home = t.path().join("home");
    fs::create_dir_all(&home).expect("mkdir");
    let env = [
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_SESSION_TOKEN", "session-token-1"),
        ("HTTP_PROXY", proxy.url.as_str()),
    ];
    let out =
        cat("s3://bkt/images/v1", id, &home, &["--s3-endpoint", "http://s3.test", "--s3-addressing", "virtual"], &env);
    assert_served(&out, &data);
    let log = proxy.log();
    assert!(!log.is_empty() && log.iter().all(|r| r.0 == 200 || r.0 == 206), "{log:?}");
    // Path style through the same proxy: the bucket is in the path, not the host.
    let out = cat("s3://bkt/images/v1", id, &home, &["--s3-endpoint", "http://s3.test"], &env);
    assert_served(&out, &data);
    assert!(proxy.log().iter().any(|r| r.3.starts_with("/bkt/images/v1/blobs/")), "{:?}", proxy.log());
}

/// A sandboxed `incfsd run` reading keys from ~/.aws/credentials: the server's key pair is
/// replaced and the new one renamed into the file while the daemon serves; the daemon signs
/// with it from the next check on, without a restart.
#[test]
fn rotated_credentials_file_is_picked_up_by_a_sandboxed_daemon() {
    let Some(bin) = s3s::binary() else { return };
    let t = tempfile::tempdir().expect("tmp");
    let (id, data) = bucket(t.path());
    let mut server = S3s::start(&bin, &t.path().join("s3"), KEY, SECRET, None);
    let home = t.path().join("home");
    let aws = home.join(".aws");
    fs::create_dir_all(&aws).expect("mkdir");
    let write_creds = |key: &str, secret: &str| {
        let tmp = aws.join("credentials.new");
        fs::write(&tmp, format!("[default]\naws_access_key_id={key}\naws_secret_access_key={secret}\n"))
            .expect("write");
        fs::rename(&tmp, aws.join("credentials")).expect("rename");
    };
    write_creds(KEY, SECRET);
    fs::create_dir_all(t.path().join("run")).expect("mkdir");
    let d = RunDaemon::start_env(
        "s3://bkt/images/v1",
        &id.to_string(),
        &t.path().join("cache"),
        &t.path().join("run/fs.sock"),
        &["--s3-endpoint", &server.endpoint, "--no-prefetch", "--readahead-kb", "4"],
        |c| clean_aws_env(c, &home),
    );
    let mut f = incfs_testing::FuseFrontend::connect(&d.socket).expect("connect");
    f.init().expect("init");
    let e = f.lookup(1, b"f").expect("lookup");
    let (fh, _) = f.open(e.nodeid, 0).expect("open");
    assert!(f.read(e.nodeid, fh, 0, 4096).expect("read with the first key") == data[..4096]);

    server.rekey("AKIAINCFSTEST0002", "incfs-test-secret-key-0002");
    write_creds("AKIAINCFSTEST0002", "incfs-test-secret-key-0002");
    std::thread::sleep(CREDENTIALS_RECHECK + Duration::from_millis(500));
    let rest = f.read(e.nodeid, fh, 4096, (data.len() - 4096) as u32).expect("read with the second key");
    assert!(rest == data[4096..], "wrong bytes");
    d.stop();
}

/// `incfsd pack --store s3://…` uploads with signed PUTs (manifests last), skips what is
/// already there, and what it uploaded serves reads; a wrong secret is refused.
#[test]
fn pack_uploads_with_signed_puts() {
    let Some(bin) = s3s::binary() else { return };
    let t = tempfile::tempdir().expect("tmp");
    let src = t.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    let data = pseudo_random(9, 200_000);
    fs::write(src.join("f"), &data).expect("write");
    fs::create_dir_all(t.path().join("s3/bkt")).expect("mkdir");
    let server = S3s::start(&bin, &t.path().join("s3"), KEY, SECRET, None);
    let home = t.path().join("home");
    fs::create_dir_all(&home).expect("mkdir");
    let pack_to = |store: &str, secret: &str| {
        let mut c = Command::new(INCFSD);
        c.arg("pack").arg(&src).args(["--store", store, "--s3-endpoint", &server.endpoint]);
        clean_aws_env(&mut c, &home);
        c.env("AWS_ACCESS_KEY_ID", KEY).env("AWS_SECRET_ACCESS_KEY", secret).output().expect("incfsd pack")
    };
    let out = pack_to("s3://bkt/packed", SECRET);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("uploaded 2 objects"), "{err}");
    let id: ImageId = String::from_utf8_lossy(&out.stdout).trim().parse().expect("image id");
    assert!(t.path().join(format!("s3/bkt/packed/images/{id}")).is_file(), "the manifest is in the bucket");
    let keys = [("AWS_ACCESS_KEY_ID", KEY), ("AWS_SECRET_ACCESS_KEY", SECRET)];
    assert_served(&cat("s3://bkt/packed", id, &home, &["--s3-endpoint", &server.endpoint], &keys), &data);
    // Again: everything is there already.
    let out = pack_to("s3://bkt/packed", SECRET);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.contains("uploaded 0 objects (0 bytes) to s3://bkt/packed; 2 already there"),
        "{err}"
    );
    // A wrong secret: nothing uploaded.
    let out = pack_to("s3://bkt/other", "wrong-secret-7");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("HTTP 403") && !err.contains("wrong-secret-7"), "{err}");
    assert!(!t.path().join("s3/bkt/other").exists());
}
