//! `incfsd`: parses the command line ([`cli`]) and runs the subcommand; the daemons (`run`,
//! `blk`) are the library's, the one-shot commands are here.

mod cli;
mod vhost_user_fs;

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use cli::{CacheCmd, Cli, Cmd, EngineArgs, ImageArgs, PackArgs, TraceCmd};
use incfs::cache::BlockCache;
use incfs::daemon::{Error, Result};
use incfs::engine::{Engine, EngineConfig};
use incfs::store::Store;
use incfs::supervisor::{SupervisorConfig, WorkerFds};
use incfs::{http_store_server, inspect, pack};

fn main() -> ExitCode {
    // The daemon's start, for its time to ready (`incfs_ready_seconds`, `incfs_first_read_seconds`).
    let started_ns = incfs::engine::monotonic_ns();
    fixed_mmap_threshold();
    let argv = vhost_user_fs::with_subcommand(std::env::args_os().collect());
    // QEMU's backend program conventions: with --print-capabilities, other options and
    // arguments are ignored.
    if vhost_user_fs::asks_capabilities(&argv) {
        println!("{}", vhost_user_fs::CAPABILITIES);
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse_from(&argv);
    let mut default_log = "warn";
    if let Cmd::VhostUserFs(args) = &cli.cmd {
        if let Some(level) = vhost_user_fs::log_filter(args) {
            default_log = level;
            // The workers log as the supervisor does (they inherit the environment).
            if std::env::var_os("INCFS_LOG").is_none() {
                std::env::set_var("INCFS_LOG", level);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INCFS_LOG").unwrap_or_else(|_| default_log.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli, argv, started_ns) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("incfsd: {}", e.chain());
            ExitCode::FAILURE
        }
    }
}

/// Runs `cli`, parsed from `argv` (the program's name first); `started_ns`: when this
/// process started.
fn run(cli: Cli, argv: Vec<OsString>, started_ns: u64) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Pack(args) => pack(args)?,
        Cmd::Serve { store, listen } => runtime()?.block_on(http_store_server::run(&store, listen, |a| {
            eprintln!("serving {} on http://{a}", store.display())
        }))?,
        Cmd::Cat { engine, stats, path } => cat(&engine, stats, &path)?,
        Cmd::Run(args) => run_fs(args, argv.into_iter().skip(1).collect(), None, started_ns)?,
        Cmd::VhostUserFs(args) => match vhost_user_fs::plan(&args)? {
            vhost_user_fs::Plan::PrintCapabilities => println!("{}", vhost_user_fs::CAPABILITIES),
            vhost_user_fs::Plan::Serve { argv, listener } => {
                let run = vhost_user_fs::run_args(&argv)?;
                run_fs(run, argv, listener, started_ns)?
            }
        },
        Cmd::Upgrade { socket } => return upgrade(&socket),
        Cmd::Blk(args) => {
            let mut cfg = args.config()?;
            cfg.daemon.started_ns = started_ns;
            incfs::blk::run(cfg)?
        }
        Cmd::Inspect { src, cache } => inspect_image(&src, cache.as_deref())?,
        Cmd::Trace { cmd: TraceCmd::Merge { traces } } => merge_traces(&traces)?,
        Cmd::Cache { cmd: CacheCmd::Status { dir } } => {
            let u = BlockCache::open(&dir)?.usage()?;
            let lookups = u.hits + u.misses;
            let ratio = if lookups == 0 { 0.0 } else { u.hits as f64 / lookups as f64 };
            println!("size_bytes {}", u.valid * 4096);
            println!(
                "blocks {}\npinned {}\nslots {}\nfree_slots {}\nempty_slots {}\ndisk_bytes {}",
                u.valid, u.pinned, u.slots, u.free_listed, u.empty, u.disk_bytes
            );
            println!(
                "images {}\nhits {}\nmisses {}\nhit_ratio {ratio:.4}\nblocks_stored_total {}",
                u.manifests, u.hits, u.misses, u.fetched
            );
        }
        Cmd::Cache { cmd: CacheCmd::Gc { dir, size } } => {
            let r = BlockCache::open(&dir)?.gc(size)?;
            println!(
                "reclaimed {} orphaned slots, evicted {} blocks, index {} -> {} records",
                r.orphans_reclaimed, r.evicted, r.log_records_before, r.log_records_after
            );
        }
        Cmd::Cache { cmd: CacheCmd::Verify { dir, repair: false } } => {
            let (ok, bad) = inspect::verify_cache(&BlockCache::open(&dir)?)?;
            println!("verified {ok} blocks, {bad} bad");
            if bad > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Cache { cmd: CacheCmd::Verify { dir, repair: true } } => {
            let (ok, bad, dropped) = inspect::repair_cache(&BlockCache::open(&dir)?)?;
            println!("verified {ok} blocks, {bad} bad, {dropped} dropped");
            if bad > dropped {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `incfsd run`: a supervisor that starts the worker (the default), the worker itself, or
/// the daemon alone (`--no-supervisor`). `argv`: its command line without the program name
/// (workers get it too); `listener`: the socket `--listen-fd` names, already taken.
/// The time to ready counts from `started_ns`: this process's start, or for a worker the
/// start of the supervisor that started it (`--started-ns`).
fn run_fs(args: cli::RunArgs, argv: Vec<OsString>, listener: Option<UnixListener>, started_ns: u64) -> Result<()> {
    tracing::info!(tag = %args.tag, "starting");
    let worker_fds = args.worker_fds.clone();
    let handover = args.supervisor_state;
    let no_supervisor = args.no_supervisor;
    let listen_fd = args.listen_fd;
    let started_ns = args.started_ns.unwrap_or(started_ns);
    let mut cfg = args.config()?;
    cfg.daemon.started_ns = started_ns;
    if let Some(spec) = worker_fds {
        let fds = WorkerFds::take(&spec).map_err(|e| Error::io("take the worker's fds", e))?;
        return incfs::daemon::run_worker(cfg, fds);
    }
    if no_supervisor {
        return incfs::daemon::run(cfg);
    }
    // The path this binary was started as, resolved once: after a package upgrade
    // /proc/self/exe names the old, deleted inode. A supervisor re-executed for an upgrade
    // was started as its predecessor's path (argv[0]): reading /proc/self/exe now could
    // already see the binary replaced again.
    let exe = match (handover, std::env::args_os().next().map(PathBuf::from)) {
        (Some(_), Some(argv0)) if argv0.is_absolute() => argv0,
        _ => std::env::current_exe().map_err(|e| Error::io("find this binary", e))?,
    };
    let sup = SupervisorConfig {
        exe,
        worker_args: with_image(without_handover(argv.into_iter()), &cfg.daemon.image.to_string()),
        ready_line: format!("incfsd: serving image {} on {}", cfg.daemon.image, cfg.daemon.socket.display()),
        socket: cfg.daemon.socket.clone(),
        socket_inherited: listen_fd.is_some(),
        metrics: cfg.daemon.metrics,
        // A supervisor resumed after an upgrade is no start: its workers count from their own.
        started_ns: handover.is_none().then_some(started_ns),
        num_queues: u16::try_from(cfg.device.request_queues + 1).unwrap_or(u16::MAX),
        queue_size: cfg.device.server.queue_size,
    };
    match handover {
        // The listener comes with the handover: --listen-fd's number is stale by now.
        Some(fd) => incfs::supervisor::resume(sup, fd)?,
        None => {
            let listener = match listener {
                Some(l) => Some(l),
                None => listen_fd.map(|fd| inherited_at(fd, &cfg.daemon.socket)).transpose()?,
            };
            incfs::supervisor::run(sup, listener)?
        }
    }
    Ok(())
}

/// `incfsd run --listen-fd FD --socket PATH`: the inherited listener, which must be bound at
/// PATH (the control socket goes beside it).
fn inherited_at(fd: i32, socket: &Path) -> Result<UnixListener> {
    let (l, path) = incfs::supervisor::inherited_listener(fd)?;
    if path != socket {
        return Err(Error::Settings(format!(
            "--listen-fd {fd} is bound at {}, not at --socket {}",
            path.display(),
            socket.display()
        )));
    }
    Ok(l)
}

/// The command line without `--supervisor-state FD` (a worker, or the next re-execution,
/// gets its own).
fn without_handover(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.to_str() {
            Some("--supervisor-state") => skip = true,
            Some(s) if s.starts_with("--supervisor-state=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// The command line with `--image ID`, the image resolved at start: a worker (and the
/// supervisor re-executed by an upgrade) must serve the image the guest mounted, even if the
/// registry's tag it was given has moved since.
fn with_image(args: Vec<std::ffi::OsString>, id: &str) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("--image") => {
                args.next();
            }
            Some(s) if s.starts_with("--image=") => {}
            _ => out.push(a),
        }
    }
    out.extend(["--image".into(), id.into()]);
    out
}

/// `incfsd upgrade`: asks the supervisor on `socket` to upgrade its worker.
fn upgrade(socket: &Path) -> Result<ExitCode> {
    use std::io::Read;
    let ctl = incfs::supervisor::control_socket(socket);
    let mut conn = std::os::unix::net::UnixStream::connect(&ctl)
        .map_err(|e| Error::io(format!("connect to {} (is incfsd run serving there?)", ctl.display()), e))?;
    conn.write_all(b"upgrade\n").map_err(|e| Error::io("send the request", e))?;
    let mut answer = String::new();
    conn.take(4096).read_to_string(&mut answer).map_err(|e| Error::io("read the answer", e))?;
    let answer = answer.trim();
    if let Some(ok) = answer.strip_prefix("ok ") {
        println!("upgraded: {ok}");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("incfsd upgrade: {}", answer.strip_prefix("error: ").unwrap_or(answer));
        Ok(ExitCode::FAILURE)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| Error::io("start runtime", e))
}

fn pack(args: PackArgs) -> Result<()> {
    let PackArgs { src, store, level, blob_size_mb, dict_size, no_dict, inline_hashes, trace, http } = args;
    if dict_size > incfs::image::DICT_MAX {
        return Err(incfs::Error::Invalid(format!("--dict-size is at most {}", incfs::image::DICT_MAX)).into());
    }
    let dict_size = if no_dict { 0 } else { dict_size as usize };
    let trace = trace.map(|t| read_trace(&t)).transpose()?;
    let opts = pack::PackOptions {
        level,
        blob_size: blob_size_mb.max(1) << 20,
        progress: true,
        trace: trace.clone(),
        dict_size,
        inline_hashes,
    };
    if !http.sources.mirrors.is_empty() {
        return Err(incfs::Error::Invalid("--mirror is for reading; pack writes to --store only".into()).into());
    }
    // A registry or s3://: pack into a staging store in a temporary directory, then push or
    // upload it.
    let registry = incfs::store::oci::OciRef::parse(&store)?;
    if registry.is_some() && trace.is_some() {
        return Err(incfs::Error::Invalid("--trace is not published to registries (yet)".into()).into());
    }
    let s3_spec = store.starts_with("s3://").then(|| store.clone());
    let staging = match registry.is_some() || s3_spec.is_some() {
        true => Some(tempfile::tempdir().map_err(|e| Error::io("create a staging directory", e))?),
        false => None,
    };
    let store =
        Store::new(staging.as_ref().map_or_else(|| std::path::PathBuf::from(&store), |d| d.path().to_path_buf()));
    let (id, s) = pack::pack(&src, &store, &opts)?;
    if let Some(text) = trace {
        let bytes =
            std::fs::read(store.root.join("images").join(id.to_string())).map_err(|e| Error::io("read manifest", e))?;
        let image = incfs::image::Image::from_manifest_bytes(id, &incfs::image::manifest_from_stored(bytes)?)?;
        let (ranges, skipped) = incfs::trace::parse(&image, &text)?;
        store.write_trace(&id, &incfs::trace::format(&image, &ranges))?;
        eprintln!(
            "laid out {} traced blocks first; published a trace of {} runs ({skipped} lines for paths not in this image skipped)",
            s.traced_blocks,
            ranges.len()
        );
    }
    eprintln!(
        "packed {} inodes, {} files, {} bytes in {:.2}s ({:.1} MB/s): {} blocks ({} zero, {} duplicate), {} bytes stored, manifest {} bytes, file indexes {} bytes",
        s.inodes,
        s.files,
        s.bytes_in,
        s.seconds,
        s.bytes_in as f64 / 1e6 / s.seconds.max(1e-9),
        s.blocks,
        s.zero_blocks,
        s.dedup_blocks,
        s.stored_bytes,
        s.manifest_bytes,
        s.index_bytes
    );
    let dict = match s.dict_bytes {
        0 if dict_size == 0 => "no dictionary (--no-dict)".to_string(),
        0 => format!("no dictionary (it would not pay; {:.2}s to find out)", s.dict_seconds),
        n => format!("a {n}-byte dictionary (trained in {:.2}s) for {} of the blocks", s.dict_seconds, s.dict_blocks),
    };
    eprintln!(
        "compression {:.3}:1 (file bytes / stored blocks and dictionary), {dict}",
        s.bytes_in as f64 / (s.stored_bytes + s.dict_bytes).max(1) as f64
    );
    if let Some(reference) = registry {
        let tag = reference.tag.clone().unwrap_or_else(|| "latest".into());
        let shown = reference.to_string();
        let attempt = std::time::Duration::from_secs(30);
        let reg = std::sync::Arc::new(incfs::store::oci::Registry::open(reference, attempt, &http.options(), true)?);
        let p = runtime()?.block_on(reg.push(&store, &id, &tag, true))?;
        eprintln!(
            "pushed to {shown} (tag {tag}): {} blobs, {} uploaded, {} already there, {} bytes sent; OCI manifest {}",
            p.blobs, p.uploaded, p.skipped, p.bytes, p.manifest_digest
        );
    }
    if let Some(spec) = s3_spec {
        let timeout = std::time::Duration::from_secs(30);
        let s3 = http.sources.s3.options();
        let http = http.options();
        let u = runtime()?.block_on(incfs::store::s3::upload_store(&store.root, &spec, &s3, &http, timeout))?;
        eprintln!("uploaded {} objects ({} bytes) to {spec}; {} already there", u.uploaded, u.bytes, u.present);
    }
    println!("{id}");
    Ok(())
}

/// A trace file's text, refused over the size readers take.
fn read_trace(path: &Path) -> Result<String> {
    use std::io::Read;
    let max = incfs::trace::MAX_TRACE_BYTES;
    let f = std::fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut bytes = Vec::new();
    f.take(max as u64 + 1).read_to_end(&mut bytes).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if bytes.len() > max {
        return Err(incfs::Error::Invalid(format!("{}: over the {max} bytes a trace may have", path.display())).into());
    }
    // The format is ASCII: a line with other bytes is malformed, and skipped as such.
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `incfsd trace merge`: the merged trace to stdout, what was skipped to stderr.
fn merge_traces(paths: &[PathBuf]) -> Result<()> {
    let texts = paths.iter().map(|p| read_trace(p)).collect::<Result<Vec<String>>>()?;
    let m = incfs::trace::merge(&texts.iter().map(String::as_str).collect::<Vec<_>>())?;
    for (p, &bad) in paths.iter().zip(&m.malformed) {
        if bad > 0 {
            eprintln!("incfsd trace merge: {}: skipped {bad} malformed lines", p.display());
        }
    }
    let first = m.images.first().cloned().flatten();
    for (p, image) in paths.iter().zip(&m.images).skip(1) {
        if *image != first {
            eprintln!(
                "incfsd trace merge: warning: {} is a trace of image {}, not {} (paths carry across versions; merged anyway)",
                p.display(),
                image.as_deref().unwrap_or("unknown"),
                first.as_deref().unwrap_or("unknown")
            );
        }
    }
    std::io::stdout().lock().write_all(m.text.as_bytes()).map_err(|e| Error::io("write the merged trace", e))?;
    eprintln!("merged {} traces: {} runs, {} blocks", paths.len(), m.runs, m.blocks);
    Ok(())
}

fn cat(args: &EngineArgs, stats: bool, path: &str) -> Result<()> {
    let image = args.src.image_id()?;
    runtime()?.block_on(async {
        let EngineArgs { src, cache, fetch } = args;
        let engine = Engine::connect(&src.store, image, cache, fetch.cache_size, args.engine_config()).await?;
        let ino = engine.image().resolve(path.as_bytes()).ok_or_else(|| Error::NotFound(path.to_string()))?;
        let size = engine.image().file(ino).ok_or_else(|| Error::NotARegularFile(path.to_string()))?.size;
        let mut out = std::io::stdout().lock();
        let mut off = 0u64;
        while off < size {
            let data = engine.read(ino, off, 1 << 20).await?;
            if data.is_empty() {
                break;
            }
            off += data.len() as u64;
            out.write_all(&data).map_err(|e| Error::io("write stdout", e))?;
        }
        out.flush().map_err(|e| Error::io("write stdout", e))?;
        if stats {
            for (k, v) in engine.counters.snapshot() {
                eprintln!("{k} {v}");
            }
        }
        Ok(())
    })
}

/// Without a cache, a temporary one that is removed afterwards.
fn inspect_image(src: &ImageArgs, cache: Option<&Path>) -> Result<()> {
    let image = src.image_id()?;
    runtime()?.block_on(async {
        let temporary = std::env::temp_dir().join(format!("incfsd-inspect-{}", std::process::id()));
        let dir = cache.unwrap_or(&temporary);
        let cfg = EngineConfig { http: src.http.options(), ..EngineConfig::default() };
        let engine = Engine::connect(&src.store, image, dir, None, cfg).await;
        if cache.is_none() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let engine = engine?;
        inspect::print_tree(&engine, &mut std::io::stdout().lock()).map_err(|e| Error::io("write stdout", e))
    })
}

/// Buffers of 2 MiB and more get their own mapping, given back when freed, and a heap
/// whose free top exceeds 1 MiB gives it back. glibc starts at 128 KiB for both but raises
/// them (the trim threshold to twice the other, up to 64 MiB) each time a mapped buffer is
/// freed. After that the fetches' multi-MiB bodies and plaintext, and the cache index's
/// table as it doubles, come from the heaps, and a heap's free top is given back only
/// past the raised trim threshold; the periodic `malloc_trim` did not make up for it. On
/// the 1 GiB image of docs/benchmarks.md section 4 fixed thresholds took the daemon's peak
/// from 65 to 49 MiB (the trim threshold raised alone: back to 63).
/// 2 MiB keeps a vhost-user-blk request's buffer (at most 1.25 MiB with Linux's defaults)
/// out of mmap and munmap; a trim threshold left at 128 KiB gave pages back and faulted
/// them in again so often that READDIR's warm benchmark lost 10 %. A threshold set in
/// `GLIBC_TUNABLES` wins.
fn fixed_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    if !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold")) {
        // SAFETY: mallopt only sets allocator parameters; called before any other thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inherited_listener_must_be_bound_at_the_socket() {
        let d = tempfile::tempdir().expect("tempdir");
        let bind =
            |name: &str| std::os::fd::IntoRawFd::into_raw_fd(UnixListener::bind(d.path().join(name)).expect("bind"));
        let fd = bind("a.sock");
        assert!(inherited_at(fd, &d.path().join("a.sock")).is_ok());
        let fd = bind("b.sock");
        let e = inherited_at(fd, &d.path().join("c.sock")).err().map(|e| e.chain()).unwrap_or_default();
        assert!(e.contains("b.sock, not at --socket") && e.contains("c.sock"), "{e}");
    }

    #[test]
    fn workers_get_the_image_id_resolved_at_start() {
        let id = "ab".repeat(32);
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let pinned = with_image(args(&["run", "--store", "oci://r/x:v1", "--image", "v1", "--socket", "s"]), &id);
        assert_eq!(pinned, args(&["run", "--store", "oci://r/x:v1", "--socket", "s", "--image", &id]));
        let pinned = with_image(args(&["run", "--image=v1", "--store", "oci://r/x"]), &id);
        assert_eq!(pinned, args(&["run", "--store", "oci://r/x", "--image", &id]));
        // The tag only in the URL: the id is added.
        assert_eq!(
            with_image(args(&["run", "--store", "oci://r/x:v1"]), &id),
            args(&["run", "--store", "oci://r/x:v1", "--image", &id])
        );
    }
}
