//! `incfsd`: parses the command line ([`cli`]) and runs the subcommand; the daemons (`run`,
//! `blk`) are the library's, the one-shot commands are here.

mod cli;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use cli::{CacheCmd, Cli, Cmd, EngineArgs, ImageArgs, PackArgs};
use incfs::cache::BlockCache;
use incfs::daemon::{Error, Result};
use incfs::engine::{Engine, EngineConfig};
use incfs::store::Store;
use incfs::supervisor::{SupervisorConfig, WorkerFds};
use incfs::{http_store_server, inspect, pack};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("INCFS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("incfsd: {}", e.chain());
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Pack(args) => pack(args)?,
        Cmd::Serve { store, listen } => runtime()?.block_on(http_store_server::run(&store, listen, |a| {
            eprintln!("serving {} on http://{a}", store.display())
        }))?,
        Cmd::Cat { engine, stats, path } => cat(&engine, stats, &path)?,
        Cmd::Run(args) => run_fs(args)?,
        Cmd::Upgrade { socket } => return upgrade(&socket),
        Cmd::Blk(args) => incfs::blk::run(args.config()?)?,
        Cmd::Inspect { src, cache } => inspect_image(&src, cache.as_deref())?,
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
/// the daemon alone (`--no-supervisor`).
fn run_fs(args: cli::RunArgs) -> Result<()> {
    tracing::info!(tag = %args.tag, "starting");
    let worker_fds = args.worker_fds.clone();
    let handover = args.supervisor_state;
    let no_supervisor = args.no_supervisor;
    let cfg = args.config()?;
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
        worker_args: with_image(without_handover(std::env::args_os().skip(1)), &cfg.daemon.image.to_string()),
        ready_line: format!("incfsd: serving image {} on {}", cfg.daemon.image, cfg.daemon.socket.display()),
        socket: cfg.daemon.socket.clone(),
        metrics: cfg.daemon.metrics,
        num_queues: u16::try_from(cfg.device.request_queues + 1).unwrap_or(u16::MAX),
        queue_size: cfg.device.server.queue_size,
    };
    match handover {
        Some(fd) => incfs::supervisor::resume(sup, fd)?,
        None => incfs::supervisor::run(sup)?,
    }
    Ok(())
}

/// The command line without `--supervisor-state FD` (a worker, or the next re-execution,
/// gets its own).
fn without_handover(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
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
    let PackArgs { src, store, level, blob_size_mb, dict_size, no_dict, trace, http } = args;
    if dict_size > incfs::image::DICT_MAX {
        return Err(incfs::Error::Invalid(format!("--dict-size is at most {}", incfs::image::DICT_MAX)).into());
    }
    let dict_size = if no_dict { 0 } else { dict_size as usize };
    let opts = pack::PackOptions { level, blob_size: blob_size_mb.max(1) << 20, progress: true, dict_size };
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
    if let Some(t) = trace {
        let text = std::fs::read_to_string(&t).map_err(|e| Error::io(format!("read {}", t.display()), e))?;
        let bytes =
            std::fs::read(store.root.join("images").join(id.to_string())).map_err(|e| Error::io("read manifest", e))?;
        let image = incfs::image::Image::from_manifest_bytes(id, &incfs::image::manifest_from_stored(bytes)?)?;
        let (ranges, skipped) = incfs::trace::parse(&image, &text)?;
        store.write_trace(&id, &incfs::trace::format(&image, &ranges))?;
        eprintln!("published a trace of {} runs ({skipped} lines for paths not in this image skipped)", ranges.len());
    }
    eprintln!(
        "packed {} inodes, {} files, {} bytes in {:.2}s ({:.1} MB/s): {} blocks ({} zero, {} duplicate), {} bytes stored, manifest {} bytes",
        s.inodes,
        s.files,
        s.bytes_in,
        s.seconds,
        s.bytes_in as f64 / 1e6 / s.seconds.max(1e-9),
        s.blocks,
        s.zero_blocks,
        s.dedup_blocks,
        s.stored_bytes,
        s.manifest_bytes
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

#[cfg(test)]
mod tests {
    use super::*;

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
