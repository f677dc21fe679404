//! `s3s-fs`, a real S3-protocol server (crates.io: `cargo install s3s-fs --features binary`)
//! that verifies every request's SigV4 signature against its one key pair, serving a
//! directory: `ROOT/BUCKET/KEY` is object KEY of BUCKET.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{free_port, wait_for_port};

/// The s3s-fs binary: `$S3S_FS`, else on PATH, else in cargo's bin directory. None outside
/// CI means the tests that need it are skipped (CI installs it: `.ci/run`).
pub fn binary() -> Option<PathBuf> {
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

/// s3s-fs on a loopback port, serving `root`, accepting only `access_key`/`secret_key`.
pub struct S3s {
    child: Child,
    pub port: u16,
    pub endpoint: String,
    bin: PathBuf,
    root: PathBuf,
    domain: Option<String>,
}

impl S3s {
    /// `domain`: for virtual-host-style requests (`BUCKET.DOMAIN`).
    pub fn start(bin: &Path, root: &Path, access_key: &str, secret_key: &str, domain: Option<&str>) -> S3s {
        let port = free_port();
        let mut s = S3s {
            child: Self::spawn(bin, root, port, access_key, secret_key, domain),
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            bin: bin.to_path_buf(),
            root: root.to_path_buf(),
            domain: domain.map(String::from),
        };
        wait_for_port(s.port);
        s.port = port;
        s
    }

    fn spawn(bin: &Path, root: &Path, port: u16, access_key: &str, secret_key: &str, domain: Option<&str>) -> Child {
        let mut c = Command::new(bin);
        c.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", access_key])
            .args(["--secret-key", secret_key]);
        if let Some(d) = domain {
            c.args(["--domain", d]);
        }
        c.arg(root).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start s3s-fs")
    }

    /// Restarts on the same port with another key pair (the old one is revoked).
    pub fn rekey(&mut self, access_key: &str, secret_key: &str) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.bin, &self.root, self.port, access_key, secret_key, self.domain.as_deref());
        wait_for_port(self.port);
    }
}

impl Drop for S3s {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
