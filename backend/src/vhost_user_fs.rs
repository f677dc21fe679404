//! `incfsd vhost-user-fs`: incfsd as the vhost-user-fs backend program a libvirt domain names
//! (a vhost-user JSON descriptor, or `<binary path>`), so that libvirt starts it itself.
//!
//! It follows QEMU's "backend program conventions" (docs/interop/vhost-user.rst:
//! `--print-capabilities`, `--socket-path`, `--fd`) and takes the options libvirt gives
//! virtiofsd (libvirt's src/qemu/qemu_virtiofs.c, qemuVirtioFSBuildCommandLine): 9.0's
//! `--fd=N -o source=DIR[,cache=…][,sandbox=…][,xattr|no_xattr][,flock|no_flock]
//! [,posix_lock|no_posix_lock] [--thread-pool-size=N] [-d]`, and newer libvirts', which use
//! `--shared-dir DIR --cache … --sandbox … --xattr --rlimit-nofile=N --log-level debug
//! --uid-map … --gid-map …` once `--print-capabilities` lists "separate-options".
//!
//! The shared directory holds the share's settings, [`SETTINGS_FILE`]: `incfsd run`'s long
//! options, one `name = value` (or a bare flag's `name`) a line. All of it becomes one
//! `incfsd run` command line, which the usual path serves (the supervisor by default); its
//! workers and an upgraded supervisor are started with that command line, so a respawn
//! serves exactly what the first worker did.

use std::ffi::OsString;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::{Cli, SandboxArg, VhostUserFsArgs};
use incfs::daemon::{Error, Result};

/// The name under which incfsd acts as `incfsd vhost-user-fs` (a link to it): a descriptor
/// names a binary, not a command line.
pub const ALIAS: &str = "incfsd-vhost-user-fs";
/// The settings file in the share's directory.
pub const SETTINGS_FILE: &str = "incfsd.conf";
/// Longest settings file read.
const MAX_SETTINGS_BYTES: u64 = 64 << 10;

/// What `--print-capabilities` prints: QEMU's VHostUserBackendCapabilities for type "fs",
/// with the "features" libvirt reads (src/qemu/qemu_vhost_user.c, qemuVhostUserFSFeature):
/// "migrate-precopy" (the device's state migrates, QEMU 8.2 or later, docs/migration.md) and
/// "separate-options" (`--shared-dir` and friends are understood).
pub const CAPABILITIES: &str = r#"{
  "type": "fs",
  "features": [
    "migrate-precopy",
    "separate-options"
  ]
}"#;

/// What to do.
pub enum Plan {
    PrintCapabilities,
    /// Serve: `incfsd run`'s command line (without the program name), and the inherited
    /// listener if `--fd` named one.
    Serve {
        argv: Vec<OsString>,
        listener: Option<UnixListener>,
    },
}

/// The command line of `incfsd` started as `argv[0]`: as [`ALIAS`], `vhost-user-fs` is put
/// in as the subcommand (unless a subcommand is there: a supervisor re-executed for an
/// upgrade is started as `ALIAS run …`).
pub fn with_subcommand(mut argv: Vec<OsString>) -> Vec<OsString> {
    let alias = argv.first().and_then(|a| Path::new(a).file_name()).is_some_and(|n| n == ALIAS);
    let options_only = argv.get(1).is_none_or(|a| a.to_str().is_none_or(|s| s.starts_with('-')));
    if alias && options_only {
        argv.insert(1, "vhost-user-fs".into());
    }
    argv
}

/// `incfsd vhost-user-fs … --print-capabilities …`, whatever else the command line says.
pub fn asks_capabilities(argv: &[OsString]) -> bool {
    argv.get(1).is_some_and(|a| a == "vhost-user-fs") && argv.iter().skip(2).any(|a| a == "--print-capabilities")
}

/// Checks the options and turns them, with the share's settings, into a plan.
pub fn plan(args: &VhostUserFsArgs) -> Result<Plan> {
    if args.print_capabilities {
        return Ok(Plan::PrintCapabilities);
    }
    note_ignored(args);
    let old = parse_o(&args.options)?;
    let dir = match (&old.source, &args.shared_dir) {
        (Some(_), Some(_)) => return Err(invalid("both -o source= and --shared-dir name the shared directory")),
        (Some(d), None) | (None, Some(d)) => d.clone(),
        (None, None) => return Err(invalid("no shared directory: -o source=DIR or --shared-dir DIR")),
    };
    let mut settings = read_settings(&dir)?;
    // What the domain says wins over the settings file.
    let sandbox = args.sandbox.or(old.sandbox);
    if let Some(s) = sandbox {
        let name = match s {
            SandboxArg::Namespace => "namespace",
            SandboxArg::Landlock => "landlock",
            SandboxArg::Chroot => "chroot",
            SandboxArg::None => "none",
        };
        set(&mut settings, "sandbox", name.into());
    }
    if let Some(n) = args.thread_pool_size.filter(|&n| n > 0) {
        set(&mut settings, "threads", n.to_string());
    }
    if let Some(n) = args.rlimit_nofile {
        set(&mut settings, "rlimit-nofile", n.to_string());
    }
    if args.fd.is_some() && settings.iter().any(|(n, _)| n == "no-supervisor") {
        return Err(invalid(format!(
            "{}: no-supervisor cannot serve a socket passed with --fd (the supervisor does)",
            dir.join(SETTINGS_FILE).display()
        )));
    }
    let (socket, listener, fd) = match (args.fd, &args.socket_path) {
        (Some(fd), _) => {
            let (l, path) = incfs::supervisor::inherited_listener(fd)?;
            (path, Some(l), Some(fd))
        }
        (None, Some(p)) => (p.clone(), None, None),
        (None, None) => return Err(invalid("no vhost-user socket: --fd=FDNUM or --socket-path=PATH")),
    };
    let mut argv: Vec<OsString> = vec!["run".into(), "--socket".into(), socket.into()];
    if let Some(fd) = fd {
        argv.extend(["--listen-fd".into(), fd.to_string().into()]);
    }
    for (name, value) in settings {
        argv.push(format!("--{name}").into());
        if let Some(v) = value {
            argv.push(v.into());
        }
    }
    Ok(Plan::Serve { argv, listener })
}

/// The default log filter `-d` or `--log-level` asks for.
pub fn log_filter(args: &VhostUserFsArgs) -> Option<&'static str> {
    use crate::cli::LogLevel;
    match (args.log_level, args.debug) {
        (Some(l), _) => Some(match l {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
            LogLevel::Off => "off",
        }),
        (None, true) => Some("debug"),
        (None, false) => None,
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Settings(msg.into())
}

/// Replaces (or adds) setting `name`.
fn set(settings: &mut Vec<(String, Option<String>)>, name: &str, value: String) {
    settings.retain(|(n, _)| n != name);
    settings.push((name.into(), Some(value)));
}

/// What libvirt 9.0's `-o` list says.
#[derive(Debug, Default, PartialEq)]
struct OldOptions {
    source: Option<PathBuf>,
    sandbox: Option<SandboxArg>,
}

/// Parses `-o` lists: comma-separated, a doubled comma is a comma of a value (libvirt's
/// virQEMUBuildBufferEscapeComma on the path).
fn parse_o(lists: &[String]) -> Result<OldOptions> {
    let mut out = OldOptions::default();
    for list in lists {
        for item in split_commas(list) {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item.as_str(), None),
            };
            match (name, value) {
                ("source", Some(v)) if !v.is_empty() => out.source = Some(PathBuf::from(v)),
                ("cache", Some(v)) if ["none", "never", "auto", "always", "metadata"].contains(&v) => {
                    tracing::info!(cache = v, "-o cache ignored: the image never changes, guest caching is always safe")
                }
                ("sandbox", Some(v)) => {
                    out.sandbox = Some(match v {
                        "namespace" => SandboxArg::Namespace,
                        "chroot" => SandboxArg::Chroot,
                        "none" => SandboxArg::None,
                        "landlock" => SandboxArg::Landlock,
                        _ => return Err(invalid(format!("-o sandbox={v}: not namespace, chroot, landlock or none"))),
                    })
                }
                ("xattr" | "no_xattr" | "flock" | "no_flock" | "posix_lock" | "no_posix_lock", None) => {
                    tracing::info!(option = name, "-o option ignored: the share is a read-only image")
                }
                _ => {
                    return Err(invalid(format!(
                        "-o {item}: not an option incfsd takes (source=DIR, cache=, sandbox=, xattr, no_xattr, \
                         flock, no_flock, posix_lock, no_posix_lock)"
                    )))
                }
            }
        }
    }
    Ok(out)
}

fn split_commas(list: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => items.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    items.push(current);
    items.retain(|s| !s.is_empty());
    items
}

/// Logs the options that are accepted and have no meaning for incfsd.
fn note_ignored(args: &VhostUserFsArgs) {
    if let Some(c) = &args.cache {
        tracing::info!(cache = %c, "--cache ignored: the image never changes, guest caching is always safe");
    }
    if args.xattr {
        tracing::info!("--xattr ignored: the image's extended attributes are served as packed");
    }
    if !args.uid_map.is_empty() || !args.gid_map.is_empty() {
        tracing::warn!("--uid-map/--gid-map ignored: files have the owners the image was packed with");
    }
    if args.announce_submounts {
        tracing::info!("--announce-submounts ignored: an image has no submounts");
    }
    if args.readonly {
        tracing::info!("--readonly: the share is always read-only");
    }
    if args.migration_mode.is_some() || args.migration_on_error.is_some() {
        tracing::info!("--migration-mode/--migration-on-error ignored: the device's whole state migrates with it");
    }
}

/// `incfsd run`'s options a settings file may not set: the socket is the domain's, the
/// rest are internal.
const NOT_SETTINGS: &[&str] = &["socket", "help", "version"];

/// Reads `DIR/incfsd.conf`: (name, value) of `incfsd run`'s long options, checked against
/// them (a name `run` lacks, a value missing or one too many, is an error naming the line).
/// Values are never echoed: a header may carry a secret.
fn read_settings(dir: &Path) -> Result<Vec<(String, Option<String>)>> {
    use std::io::Read;
    let path = dir.join(SETTINGS_FILE);
    let shown = path.display().to_string();
    let file = std::fs::File::open(&path).map_err(|e| Error::io(format!("open the share's settings {shown}"), e))?;
    let mut text = String::new();
    file.take(MAX_SETTINGS_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(format!("read the share's settings {shown} (UTF-8 text)"), e))?;
    if text.len() as u64 > MAX_SETTINGS_BYTES {
        return Err(invalid(format!("{shown}: longer than {MAX_SETTINGS_BYTES} bytes")));
    }
    let cmd = Cli::command();
    let run = cmd.find_subcommand("run").ok_or_else(|| invalid("no run subcommand"))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{shown} line {}", i + 1);
        let (name, value) = match line.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().to_string())),
            None => (line, None),
        };
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(name) && !a.is_hide_set() && !NOT_SETTINGS.contains(&name))
            .ok_or_else(|| {
                invalid(format!("{}: '{name}' is not a setting (they are incfsd run's long options but socket)", at()))
            })?;
        let takes_value = arg.get_action().takes_values();
        match (takes_value, &value) {
            (true, None) => return Err(invalid(format!("{}: '{name}' needs a value (name = value)", at()))),
            (true, Some(v)) if v.is_empty() => {
                return Err(invalid(format!("{}: '{name}' needs a value (name = value)", at())))
            }
            (false, Some(_)) => return Err(invalid(format!("{}: '{name}' is a flag; write it alone", at()))),
            _ => {}
        }
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// Parses `incfsd run`'s command line made by [`plan`]; a bad value is the settings file's.
pub fn run_args(argv: &[OsString]) -> Result<crate::cli::RunArgs> {
    let full = std::iter::once(OsString::from("incfsd")).chain(argv.iter().cloned());
    match clap::Parser::try_parse_from(full) {
        Ok(Cli { cmd: crate::cli::Cmd::Run(args) }) => Ok(args),
        Ok(_) => Err(invalid("not a run command line")),
        Err(e) => {
            // clap's message up to its usage lines, on one line.
            let text = e.to_string();
            let what: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
            let what = what.join(" ");
            Err(invalid(format!("the share's {SETTINGS_FILE}: {}", what.trim_start_matches("error: "))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(v: &[&str]) -> VhostUserFsArgs {
        let full = [&["incfsd", "vhost-user-fs"], v].concat();
        match Cli::try_parse_from(full).map(|c| c.cmd) {
            Ok(crate::cli::Cmd::VhostUserFs(a)) => a,
            Ok(_) => panic!("not vhost-user-fs"),
            Err(e) => panic!("{v:?}: {e}"),
        }
    }

    fn settings_dir(text: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join(SETTINGS_FILE), text).expect("write settings");
        d
    }

    fn strings(argv: &[OsString]) -> Vec<String> {
        argv.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    const ID: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn capabilities_have_the_shape_of_qemus_schema_and_what_libvirt_reads() {
        let caps: serde_json::Value = serde_json::from_str(CAPABILITIES).expect("valid JSON");
        let obj = caps.as_object().expect("an object");
        // VHostUserBackendCapabilities: the union's base is `type`, a VHostUserBackendType.
        assert_eq!(obj.get("type").and_then(|t| t.as_str()), Some("fs"));
        // Type "fs" has no variant members in the schema; libvirt reads `features`, each one
        // of its qemuVhostUserFSFeature names.
        let features: Vec<&str> = obj
            .get("features")
            .and_then(|f| f.as_array())
            .expect("a features list")
            .iter()
            .map(|f| f.as_str().expect("a string"))
            .collect();
        assert_eq!(features, ["migrate-precopy", "separate-options"]);
        assert_eq!(obj.len(), 2, "nothing else: {obj:?}");
        assert!(matches!(plan(&args(&["--print-capabilities"])), Ok(Plan::PrintCapabilities)));
        // Other options and arguments are ignored (QEMU's conventions), even unknown ones.
        let v = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(asks_capabilities(&v(&["incfsd", "vhost-user-fs", "--bogus", "--print-capabilities"])));
        assert!(asks_capabilities(&with_subcommand(v(&["/x/incfsd-vhost-user-fs", "--print-capabilities"]))));
        assert!(!asks_capabilities(&v(&["incfsd", "run", "--print-capabilities"])));
        assert!(!asks_capabilities(&v(&["incfsd", "vhost-user-fs", "--fd=3"])));
    }

    #[test]
    fn the_alias_adds_the_subcommand_unless_one_is_there() {
        let v = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let alias = "/usr/libexec/incfsd-vhost-user-fs";
        assert_eq!(
            with_subcommand(v(&[alias, "--fd=3", "-o", "source=/s"])),
            v(&[alias, "vhost-user-fs", "--fd=3", "-o", "source=/s"])
        );
        assert_eq!(with_subcommand(v(&[alias])), v(&[alias, "vhost-user-fs"]));
        assert_eq!(with_subcommand(v(&[alias, "run", "--socket", "s"])), v(&[alias, "run", "--socket", "s"]));
        assert_eq!(with_subcommand(v(&["/usr/bin/incfsd", "--fd=3"])), v(&["/usr/bin/incfsd", "--fd=3"]));
    }

    #[test]
    fn libvirt_9_command_line_becomes_incfsd_run() {
        let d = settings_dir(&format!(
            "# the share's image\nstore = /srv/store\nimage = {ID}\ncache = /var/cache/incfs\n\
             cache-size = 20G\nfetch-all\nheader = X-Token: s3cret\nsandbox = landlock\n"
        ));
        let mut dir = d.path().display().to_string();
        // A comma in the path, escaped by doubling as libvirt does.
        let comma = d.path().join("a,b");
        std::fs::create_dir(&comma).expect("mkdir");
        std::fs::copy(d.path().join(SETTINGS_FILE), comma.join(SETTINGS_FILE)).expect("copy");
        dir.push_str("/a,,b");
        let o = format!("source={dir},cache=always,sandbox=chroot,xattr,no_flock,posix_lock");
        let a = args(&["--socket-path=/run/x.sock", "-o", &o, "--thread-pool-size=3", "-d"]);
        assert_eq!(log_filter(&a), Some("debug"));
        let Ok(Plan::Serve { argv, listener: None }) = plan(&a) else { panic!("not served") };
        let expected = [
            "run",
            "--socket",
            "/run/x.sock",
            "--store",
            "/srv/store",
            "--image",
            ID,
            "--cache",
            "/var/cache/incfs",
            "--cache-size",
            "20G",
            "--fetch-all",
            "--header",
            "X-Token: s3cret",
            // The domain's sandbox replaces the file's.
            "--sandbox",
            "chroot",
            "--threads",
            "3",
        ];
        assert_eq!(strings(&argv), expected);
        let run = run_args(&argv).expect("a valid run command line");
        let cfg = run.config().expect("config");
        assert_eq!(cfg.daemon.cache_size, Some(20 << 30));
        assert_eq!(cfg.daemon.sandbox.fs, incfs::sandbox::FsSandbox::Chroot);
        assert_eq!(cfg.device.server.threads, 3);
    }

    #[test]
    fn newer_libvirt_command_line_too() {
        let d = settings_dir(&format!("store = /srv/store\nimage = {ID}\ncache = /c\n"));
        let dir = d.path().display().to_string();
        let a = args(&[
            "--socket-path=/run/x.sock",
            "--shared-dir",
            &dir,
            "--cache",
            "never",
            "--sandbox",
            "namespace",
            "--xattr",
            "--thread-pool-size=0",
            "--rlimit-nofile=1000",
            "--log-level",
            "debug",
            "--uid-map=:0:1000:1:",
            "--gid-map=:0:1000:1:",
            "--announce-submounts",
            "--readonly",
            "--migration-mode",
            "find-paths",
            "--migration-on-error",
            "guest-error",
        ]);
        assert_eq!(log_filter(&a), Some("debug"));
        let Ok(Plan::Serve { argv, .. }) = plan(&a) else { panic!("not served") };
        let tail = ["--sandbox", "namespace", "--rlimit-nofile", "1000"];
        assert_eq!(strings(&argv[argv.len() - 4..]), tail, "thread-pool-size 0 keeps the default");
        let cfg = run_args(&argv).expect("valid").config().expect("config");
        assert_eq!(cfg.daemon.sandbox.rlimit_nofile, Some(1000));
    }

    fn error_of(a: &[&str]) -> String {
        match plan(&args(a)) {
            Err(e) => e.chain(),
            Ok(_) => panic!("{a:?} accepted"),
        }
    }

    #[test]
    fn bad_command_lines_are_clear_errors() {
        let d = settings_dir(&format!("store = /s\nimage = {ID}\ncache = /c\n"));
        let o = format!("source={}", d.path().display());
        assert!(
            error_of(&["--socket-path=/x", "-o", &format!("{o},writeback")]).contains("-o writeback: not an option")
        );
        assert!(error_of(&["--socket-path=/x", "-o", &format!("{o},sandbox=jail")]).contains("sandbox=jail"));
        assert!(error_of(&["--socket-path=/x"]).contains("no shared directory"));
        assert!(error_of(&["-o", &o]).contains("no vhost-user socket"));
        let both = ["--socket-path=/x", "-o", &o, "--shared-dir", "/y"];
        assert!(error_of(&both).contains("both -o source= and --shared-dir"));
        // Options neither libvirt nor QEMU's conventions pass are clap's errors.
        for bad in [&["--syslog"][..], &["--fd=3", "--socket-path=/x"], &["--sandbox", "jail"], &["-f"]] {
            let full = [&["incfsd", "vhost-user-fs"], bad].concat();
            assert!(Cli::try_parse_from(&full).is_err(), "{bad:?} accepted");
        }
        // no-supervisor cannot take libvirt's socket.
        let d2 = settings_dir(&format!("store = /s\nimage = {ID}\ncache = /c\nno-supervisor\n"));
        let o2 = format!("source={}", d2.path().display());
        assert!(error_of(&["--fd=3", "-o", &o2]).contains("no-supervisor cannot serve a socket passed with --fd"));
        let Ok(Plan::Serve { argv, .. }) = plan(&args(&["--socket-path=/x", "-o", &o2])) else { panic!("not served") };
        assert!(run_args(&argv).is_ok_and(|a| a.no_supervisor), "fine with a socket of its own");
        // An fd that is not a listening Unix socket.
        let file = std::fs::File::open(d.path().join(SETTINGS_FILE)).expect("open");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file).to_string();
        let e = error_of(&[&format!("--fd={fd}"), "-o", &o]);
        assert!(e.contains(&format!("inherited fd {fd} cannot be the vhost-user listener: not an open socket")), "{e}");
        let e = error_of(&["--fd=100000", "-o", &o]);
        assert!(e.contains("not an open socket"), "{e}");
    }

    #[test]
    fn bad_settings_are_clear_errors_without_values() {
        let cases = [
            ("store = /s\ncach = /c\n", "line 2: 'cach' is not a setting"),
            ("store = /s\nsocket = /x\n", "line 2: 'socket' is not a setting"),
            ("worker-fds = 1,2,3,4\n", "line 1: 'worker-fds' is not a setting"),
            ("store\n", "line 1: 'store' needs a value"),
            ("store =\n", "line 1: 'store' needs a value"),
            ("fetch-all = yes\n", "line 1: 'fetch-all' is a flag"),
        ];
        for (text, want) in cases {
            let d = settings_dir(text);
            let e = error_of(&["--socket-path=/x", "--shared-dir", &d.path().display().to_string()]);
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // A bad value is clap's error, named as the settings file's.
        let d = settings_dir(&format!("store = /s\nimage = {ID}\ncache = /c\ncache-size = lots\n"));
        let Ok(Plan::Serve { argv, .. }) =
            plan(&args(&["--socket-path=/x", "--shared-dir", &d.path().display().to_string()]))
        else {
            panic!("not served")
        };
        let e = run_args(&argv).err().expect("refused").chain();
        assert!(e.contains("incfsd.conf") && e.contains("--cache-size"), "{e}");
        // A missing file, a missing store.
        let empty = tempfile::tempdir().expect("tempdir");
        let e = error_of(&["--socket-path=/x", "--shared-dir", &empty.path().display().to_string()]);
        assert!(e.contains("open the share's settings") && e.contains("incfsd.conf"), "{e}");
        let d = settings_dir("cache = /c\n");
        let Ok(Plan::Serve { argv, .. }) =
            plan(&args(&["--socket-path=/x", "--shared-dir", &d.path().display().to_string()]))
        else {
            panic!("not served")
        };
        assert!(run_args(&argv).err().expect("refused").chain().contains("--store"));
        // Too long.
        let d = settings_dir(&"# padding\n".repeat(7000));
        let e = error_of(&["--socket-path=/x", "--shared-dir", &d.path().display().to_string()]);
        assert!(e.contains("longer than"), "{e}");
        // A header's value (a secret) is never in an error.
        let d = settings_dir("header = X-Token: s3cret\nheader\n");
        let e = error_of(&["--socket-path=/x", "--shared-dir", &d.path().display().to_string()]);
        assert!(e.contains("line 2") && !e.contains("s3cret"), "{e}");
    }

    #[test]
    fn an_inherited_listener_gives_its_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let sock = d.path().join("fs0-fs.sock");
        let l = UnixListener::bind(&sock).expect("bind");
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
        let (l, path) = incfs::supervisor::inherited_listener(fd).expect("a listener");
        assert_eq!(path, sock);
        // SAFETY: fcntl on the open fd.
        let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&l), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "workers must not inherit it");
        // A connected (not listening) socket is refused.
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let e = incfs::supervisor::inherited_listener(std::os::fd::AsRawFd::as_raw_fd(&a)).expect_err("refused");
        assert!(e.to_string().contains("does not listen"), "{e}");
    }
}
