//! incfsd started the way libvirt starts a `<filesystem>`'s virtiofsd (docs/libvirt.md): as
//! `incfsd-vhost-user-fs` (the name docs/libvirt/60-incfsd.json gives), on a listening socket
//! created by the starter and passed as `--fd`, with the share's settings in the directory of
//! `<source dir>`.
//!
//! - `libvirt_9_launched_share_serves_a_guest_through_crash_and_upgrade`: the command line
//!   libvirt 9.0 (Debian bookworm) builds for docs/libvirt/vm-incfs-launched.xml's
//!   filesystem, the fd passed the way it passes it; a real guest (QEMU 7.2, bookworm's,
//!   which libvirt 9.0 drives there) mounts the share and checksums every file three times:
//!   before and after the worker is killed with SIGKILL, and after `incfsd upgrade` on the
//!   control socket beside libvirt's socket; a second share, started with the command
//!   line later libvirts build ("separate-options"), is checksummed alongside. Then SIGTERM (what libvirt sends at domain
//!   stop) ends the daemon, which leaves libvirt's socket for libvirt to remove.
//! - `capabilities_and_bad_settings_as_libvirt_sees_them`: `--print-capabilities` of the
//!   installed name, and a share whose settings are wrong: incfsd exits non-zero at once
//!   with a message naming the file and line in the log libvirt shows.
//! - `shipped_domains_validate_and_the_descriptor_names_the_binary`: docs/libvirt's domains
//!   against libvirt's schema (`virt-xml-validate`), and the descriptor's shape.
//! - `virsh_starts_the_example_domain_and_incfsd_with_it` (opt-in: needs a libvirtd on
//!   qemu:///system, tests/README.md): a real libvirt 9.0 starts the example domain and,
//!   with it, incfsd; the guest checksums the share; `virsh destroy` stops incfsd.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use incfs_e2e::check::sha256_hex;
use incfs_e2e::*;

/// The name the descriptor gives incfsd (a link to it).
const ALIAS: &str = "incfsd-vhost-user-fs";

/// `incfsd-vhost-user-fs` in `work/bin`, a link to the incfsd under test, as
/// docs/libvirt.md installs it.
fn installed(work: &WorkDir) -> PathBuf {
    let dir = work.join("bin");
    std::fs::create_dir_all(&dir).expect("mkdir bin");
    let link = dir.join(ALIAS);
    std::os::unix::fs::symlink(incfsd_bin(), &link).expect("symlink");
    link
}

/// The share's directory (`<source dir>`) with its incfsd.conf.
fn share(work: &WorkDir, settings: &str) -> PathBuf {
    let dir = work.join("share");
    std::fs::create_dir_all(&dir).expect("mkdir share");
    std::fs::write(dir.join("incfsd.conf"), settings).expect("write incfsd.conf");
    dir
}

/// Starts `bin` as libvirt 9.0's qemuVirtioFSStart does (src/qemu/qemu_virtiofs.c):
/// qemuVirtioFSOpenChardev creates and listens on the socket at `socket`,
/// qemuVirtioFSBuildCommandLine passes it with `virCommandPassFD` (its number kept, the
/// parent's copy closed) as `--fd=%d` followed by `args`, and the daemon runs daemonized
/// (`virCommandDaemonize`: its own session, stdin /dev/null) with stdout and stderr
/// appended to the log file (`virCommandSetOutputFD`/`virCommandSetErrorFD`).
fn start_like_libvirt(bin: &Path, socket: &Path, args: &[String], log: &Path) -> Proc {
    let listener = UnixListener::bind(socket).expect("bind the vhost-user socket");
    let fd = listener.as_raw_fd();
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log");
    let err = out.try_clone().expect("dup the log");
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--fd={fd}")).args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: only async-signal-safe calls (fcntl, setsid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("start incfsd-vhost-user-fs");
    // VIR_COMMAND_PASS_FD_CLOSE_PARENT: only the daemon holds the socket now.
    drop(listener);
    Proc { child, name: ALIAS.into() }
}

/// The supervisor's one child, once it is not `old`.
fn worker(supervisor: u32, old: Option<u32>, log: &Path) -> u32 {
    let t = Instant::now();
    loop {
        let children = std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"));
        if let Some(w) = children
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .filter(|w| Some(*w) != old)
        {
            return w;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no new worker within 30 s; log:\n{}", read(log));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn libvirt_9_launched_share_serves_a_guest_through_crash_and_upgrade() {
    let work = WorkDir::new("libvirt");
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("lib/python3/f{i}.py"),
                if i % 2 == 0 { text(i, 300_000 + 777 * i as usize) } else { pseudo_random(50 + i, 1 << 20) },
            )
        })
        .collect();
    for (p, d) in &files {
        write_file(&work.join("src"), p, d);
    }
    let store = work.join("store");
    let image = pack(&work.join("src"), &store);
    let dir = share(
        &work,
        &format!(
            "# the share served to vm1 (docs/libvirt.md)\nstore = {}\nimage = {image}\ncache = {}\ncache-size = 64M\n",
            store.display(),
            work.join("cache").display()
        ),
    );
    let bin = installed(&work);
    // libvirt's socket: <domain's private dir>/<alias>-fs.sock (qemuDomainGetVHostUserFSSocketPath).
    let socket = work.join("fs0-fs.sock");
    let log = work.join("vm1-fs0-virtiofsd.log");
    // What qemuVirtioFSBuildCommandLine (libvirt 9.0) makes of docs/libvirt/vm-incfs-launched.xml's
    // <filesystem>: "--fd=%d", then "-o" with "source=" (commas doubled), ",cache=%s" from
    // <cache mode>, ",sandbox=%s" from <sandbox mode>, ",xattr" from xattr='on', then
    // "--thread-pool-size=%i" from <thread_pool size>; no "-d" (virtiofsd_debug is off).
    let args = vec![
        "-o".to_string(),
        format!("source={},cache=always,sandbox=namespace,xattr", dir.display().to_string().replace(',', ",,")),
        "--thread-pool-size=2".to_string(),
    ];
    // And a second share, tag incfs2, as a later libvirt starts it once --print-capabilities
    // lists "separate-options" (qemuVirtioFSBuildCommandLine in libvirt 10 and later):
    // "--fd=%d", "--shared-dir" DIR, "--cache" from <cache mode>, "--sandbox" MODE, "--xattr",
    // "--thread-pool-size=%i", "--rlimit-nofile=%llu" from <openfiles max>.
    let newer_args: Vec<String> =
        ["--shared-dir", &dir.display().to_string(), "--cache", "always", "--sandbox", "namespace", "--xattr"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--thread-pool-size=2".to_string(), "--rlimit-nofile=4096".to_string()])
            .collect();
    let mut sums: String = files.iter().map(|(p, d)| format!("{}  /mnt/{p}\n", sha256_hex(d))).collect();
    sums.extend(files.iter().map(|(p, d)| format!("{}  /mnt2/{p}\n", sha256_hex(d))));
    let script = format!(
        r#"#!/bin/sh
fail() {{ echo "LIBVIRT-FAIL $*"; exit 1; }}
mount -t virtiofs incfs /mnt || fail mount
mkdir -p /mnt2 && mount -t virtiofs incfs2 /mnt2 || fail "mount incfs2"
cat > /tmp/sums <<'EOF'
{sums}EOF
for round in 1 2 3; do
    echo 3 > /proc/sys/vm/drop_caches
    sha256sum -c -s /tmp/sums || fail "checksums, round $round"
    echo "ROUND $round OK"
    # The host acts on the line (kill, upgrade) before the next round reads.
    sleep 3
done
dmesg | grep -iE 'virtio.*broken|I/O error|(virtiofs|fuse).*(error|fail)' && fail "kernel reported errors"
echo LIBVIRT-OK
"#
    );
    let _vm = vm_lock();
    let started = Instant::now();
    let mut daemon = start_like_libvirt(&bin, &socket, &args, &log);
    let socket2 = work.join("fs1-fs.sock");
    let log2 = work.join("vm1-fs1-virtiofsd.log");
    let mut newer = start_like_libvirt(&bin, &socket2, &newer_args, &log2);
    let supervisor = daemon.child.id();
    // libvirt starts QEMU without waiting for a ready line: QEMU connects into the backlog of
    // the socket it created.
    let first = worker(supervisor, None, &log);
    let mut second = None;
    let mut upgraded = None;
    let fs = format!("{}:incfs", socket.display());
    let fs2 = format!("{}:incfs2", socket2.display());
    let run = run_vm_with(&work.path, &["--fs", &fs, "--fs", &fs2], &script, 240, |line| {
        if line.contains("ROUND 1 OK") {
            // SAFETY: kill with a pid and a signal number.
            assert_eq!(unsafe { libc::kill(first as libc::pid_t, libc::SIGKILL) }, 0, "kill the worker");
            second = Some(worker(supervisor, Some(first), &log));
        }
        if line.contains("ROUND 2 OK") {
            let out = Command::new(incfsd_bin()).arg("upgrade").arg("--socket").arg(&socket).output().expect("upgrade");
            assert!(
                out.status.success(),
                "incfsd upgrade: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            upgraded = Some(worker(supervisor, second, &log));
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let log_text = read(&log);
    assert_eq!(run.status, 0, "guest failed; daemon log:\n{log_text}");
    assert!(run.console.contains("LIBVIRT-OK"), "no LIBVIRT-OK; daemon log:\n{log_text}");
    assert!(second.is_some() && upgraded.is_some(), "the worker was not replaced twice; log:\n{log_text}");
    assert!(daemon.is_running(), "the supervisor exited; log:\n{log_text}");
    assert!(log_text.contains("incfsd: serving image"), "no ready line in the log:\n{log_text}");
    assert!(newer.is_running(), "the second share's incfsd exited; log:\n{}", read(&log2));
    newer.kill();
    // libvirt's qemuVirtioFSStop: SIGTERM to the pid (virPidFileForceCleanupPath), then it
    // removes the socket itself.
    // SAFETY: kill with a pid and a signal number.
    assert_eq!(unsafe { libc::kill(supervisor as libc::pid_t, libc::SIGTERM) }, 0);
    let t = Instant::now();
    while daemon.is_running() {
        assert!(t.elapsed() < Duration::from_secs(20), "still running 20 s after SIGTERM; log:\n{}", read(&log));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(socket.exists(), "incfsd removed the socket libvirt created (libvirt removes it)");
    assert!(!work.join("fs0-fs.sock.ctl").exists(), "the control socket was left behind");
    println!("libvirt-launched share: guest {:.1} s, all {elapsed:.1} s", run.seconds);
}

#[test]
fn capabilities_and_bad_settings_as_libvirt_sees_them() {
    let work = WorkDir::new("libvirt-caps");
    let bin = installed(&work);
    // As libvirt runs it (qemuVhostUserFillFSCapabilities); other options are ignored then.
    let out = Command::new(&bin).arg("--print-capabilities").output().expect("run --print-capabilities");
    let ignoring = Command::new(&bin).args(["--fd=999", "--print-capabilities", "--frobnicate"]).output().expect("run");
    assert_eq!(ignoring.stdout, out.stdout, "{}", String::from_utf8_lossy(&ignoring.stderr));
    assert!(out.status.success(), "--print-capabilities: {}", String::from_utf8_lossy(&out.stderr));
    let caps = String::from_utf8_lossy(&out.stdout);
    let compact: String = caps.split_whitespace().collect();
    assert_eq!(compact, r#"{"type":"fs","features":["migrate-precopy","separate-options"]}"#);

    // A settings file with a typo: the start fails at once, the log says where.
    let dir = share(&work, "store = /nonexistent\nimage = 00\ncahce = /tmp/c\n");
    let socket = work.join("fs0-fs.sock");
    let log = work.join("vm1-fs0-virtiofsd.log");
    let args = vec!["-o".to_string(), format!("source={}", dir.display())];
    let mut p = start_like_libvirt(&bin, &socket, &args, &log);
    let status = p.child.wait().expect("wait");
    assert!(!status.success());
    let text = read(&log);
    assert!(text.contains("incfsd.conf line 3: 'cahce' is not a setting"), "log:\n{text}");

    // An option no libvirt passes.
    std::fs::remove_file(&socket).expect("rm socket");
    let args = vec!["-o".to_string(), format!("source={},writeback", dir.display())];
    let mut p = start_like_libvirt(&bin, &socket, &args, &log);
    assert!(!p.child.wait().expect("wait").success());
    let text = read(&log);
    assert!(text.contains("-o writeback: not an option incfsd takes"), "log:\n{text}");
}

/// A domain created with `virsh create`, destroyed on drop.
struct Domain {
    name: String,
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("run virsh (apt-get install libvirt-clients)")
}

/// Replaces `from` by `to` in `text`, which must contain it.
fn edit(text: &mut String, from: &str, to: &str) {
    assert!(text.contains(from), "docs/libvirt/vm-incfs-launched.xml has no {from:?}");
    *text = text.replacen(from, to, 1);
}

/// Opt-in (a libvirtd must answer on qemu:///system; tests/README.md says how): the example
/// domain docs/libvirt/vm-incfs-launched.xml, made bootable here (TCG, the test's kernel and
/// initramfs, a serial log), started by a real libvirt with `virsh create`: libvirt starts
/// incfsd-vhost-user-fs itself, the guest mounts the share and checksums every file, and
/// `virsh destroy` stops incfsd with the domain.
#[test]
fn virsh_starts_the_example_domain_and_incfsd_with_it() {
    let version = Command::new("virsh").args(["-c", "qemu:///system", "version"]).output();
    if !version.as_ref().is_ok_and(|o| o.status.success()) {
        println!("skipped: no libvirtd answers on qemu:///system (opt-in test; tests/README.md says how to run it)");
        return;
    }
    qemu_setup();
    let work = WorkDir::new("virsh");
    let files: Vec<(String, Vec<u8>)> =
        (0..4).map(|i| (format!("share/f{i}"), pseudo_random(70 + i, (1 << 20) + 4096 * i as usize))).collect();
    for (p, d) in &files {
        write_file(&work.join("src"), p, d);
    }
    let store = work.join("store");
    let image = pack(&work.join("src"), &store);
    let dir = share(
        &work,
        &format!("store = {}\nimage = {image}\ncache = {}\n", store.display(), work.join("cache").display()),
    );
    let bin = installed(&work);
    // The guest: the harness's initramfs with /run.sh appended, as qemu/run-vm builds it.
    let sums: String = files.iter().map(|(p, d)| format!("{}  /mnt/{p}\n", sha256_hex(d))).collect();
    let extra = work.join("extra");
    write_file(
        &extra,
        "run.sh",
        format!(
            "#!/bin/sh\nmount -t virtiofs incfs /mnt || {{ echo VIRSH-FAIL mount; exit 1; }}\n\
             cat > /tmp/sums <<'EOF'\n{sums}EOF\nsha256sum -c -s /tmp/sums || {{ echo VIRSH-FAIL sums; exit 1; }}\necho VIRSH-OK\n"
        )
        .as_bytes(),
    );
    let initrd = work.join("initrd");
    let out = workspace().join("qemu/out");
    let st = Command::new("sh")
        .arg("-c")
        .arg(r#"chmod 755 "$2/run.sh" && cp "$1/initramfs.cpio.gz" "$3" && (cd "$2" && find . | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >> "$3""#)
        .args(["sh", &out.display().to_string(), &extra.display().to_string(), &initrd.display().to_string()])
        .status()
        .expect("build the initramfs");
    assert!(st.success(), "build the initramfs");
    let name = format!("incfs-e2e-{}", std::process::id());
    let console = work.join("console.log");
    let kernel = if out.join("vmlinux").exists() { out.join("vmlinux") } else { out.join("vmlinuz") };
    let mut xml =
        std::fs::read_to_string(workspace().join("docs/libvirt/vm-incfs-launched.xml")).expect("read the example");
    edit(&mut xml, "<domain type='kvm'>", "<domain type='qemu'>");
    edit(&mut xml, "<name>vm1</name>", &format!("<name>{name}</name>"));
    edit(&mut xml, "<memory unit='GiB'>4</memory>", "<memory unit='GiB'>1</memory>");
    edit(&mut xml, "<vcpu>4</vcpu>", "<vcpu>2</vcpu>");
    edit(
        &mut xml,
        "</type>",
        &format!(
            "</type>\n    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>console=ttyS0 quiet panic=-1</cmdline>",
            kernel.display(),
            initrd.display()
        ),
    );
    edit(&mut xml, "</os>", "</os>\n  <cpu mode='maximum'/>");
    edit(&mut xml, "/usr/libexec/incfsd-vhost-user-fs", &bin.display().to_string());
    edit(&mut xml, "/var/lib/incfs/shares/vm1", &dir.display().to_string());
    edit(
        &mut xml,
        "  </devices>",
        &format!(
            "    <serial type='file'><source path='{}'/><target port='0'/></serial>\n    <memballoon model='none'/>\n  </devices>",
            console.display()
        ),
    );
    let xml_path = work.join("domain.xml");
    std::fs::write(&xml_path, &xml).expect("write the domain");
    let _vm = vm_lock();
    let started = Instant::now();
    let created = virsh(&["create", &xml_path.display().to_string()]);
    assert!(created.status.success(), "virsh create: {}", String::from_utf8_lossy(&created.stderr));
    let domain = Domain { name };
    let t = Instant::now();
    let text = loop {
        let text = read(&console);
        if text.contains("INCFS-EXIT=") {
            break text;
        }
        assert!(t.elapsed() < Duration::from_secs(240), "the guest did not finish in 240 s; console:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = PathBuf::from(format!("/var/log/libvirt/qemu/{}-fs0-virtiofsd.log", domain.name));
    let domain_log = read(&PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", domain.name)));
    assert!(text.contains("VIRSH-OK"), "guest failed; console:\n{text}\nincfsd's log:\n{}", read(&log));
    // The command line libvirt logged: the installed name, an fd, the share's directory.
    let launched = format!("{} --fd=", bin.display());
    assert!(
        domain_log.contains(&launched) && domain_log.contains(&format!("-o source={}", dir.display())),
        "{domain_log}"
    );
    // qemuVirtioFSCreatePidFilename: <state dir>/<short name, "ID-NAME">-fs0-fs.pid.
    let suffix = format!("-{}-fs0-fs.pid", domain.name);
    let pidfile = std::fs::read_dir("/run/libvirt/qemu")
        .expect("read /run/libvirt/qemu")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&suffix)))
        .unwrap_or_else(|| panic!("no /run/libvirt/qemu/*{suffix}"));
    let pid: i32 = read(&pidfile).trim().parse().unwrap_or_else(|_| panic!("no pid in {}", pidfile.display()));
    let cmdline = read(&PathBuf::from(format!("/proc/{pid}/cmdline")));
    assert!(cmdline.contains(ALIAS), "pid {pid} is not incfsd: {cmdline:?}");
    drop(domain);
    let t = Instant::now();
    // SAFETY: kill with signal 0 only probes the pid.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "incfsd {pid} still runs 20 s after virsh destroy");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("virsh create to the guest's checksums: {:.1} s", started.elapsed().as_secs_f64());
}

/// The shipped domains validate against the installed libvirt's schema (9.0 on bookworm:
/// `virt-xml-validate`, libvirt-clients), and the descriptor is QEMU's VhostUserBackend for
/// type "fs", naming the binary the example domain names.
#[test]
fn shipped_domains_validate_and_the_descriptor_names_the_binary() {
    if Command::new("virt-xml-validate").arg("--help").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "virt-xml-validate is not installed (.ci/run installs libvirt-clients)"
        );
        println!("skipped: virt-xml-validate is not installed (apt-get install libvirt-clients libxml2-utils)");
        return;
    }
    let docs = workspace().join("docs/libvirt");
    for xml in ["vm-incfs.xml", "vm-incfs-launched.xml"] {
        let out = Command::new("virt-xml-validate")
            .arg(docs.join(xml))
            .arg("domain")
            .output()
            .expect("run virt-xml-validate");
        assert!(
            out.status.success(),
            "{xml}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let descriptor = read(&docs.join("60-incfsd.json"));
    let compact: String = descriptor.split_whitespace().collect();
    let binary = "/usr/libexec/incfsd-vhost-user-fs";
    assert!(compact.starts_with("{\"description\":\"") && compact.ends_with('}'), "{descriptor}");
    assert!(compact.contains("\"type\":\"fs\""), "{descriptor}");
    assert!(compact.contains(&format!("\"binary\":\"{binary}\"")), "{descriptor}");
    assert!(read(&docs.join("vm-incfs-launched.xml")).contains(&format!("<binary path='{binary}'")));
}
