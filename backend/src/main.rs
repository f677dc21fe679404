//! `incfsd`: command line. Each subcommand turns its arguments into a validated config and
//! hands it to the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use incfs::cache::BlockCache;
use incfs::engine::{Engine, EngineConfig, FillSource};
use incfs::image::ImageId;
use incfs::store::Store;
use incfs::{daemon, inspect, pack, serve, Error, Result};

#[derive(Parser)]
#[command(name = "incfsd", version, about = "Serve incremental images to VM guests, fetching blocks lazily")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pack a directory tree into an image in a store; prints the image id last.
    Pack {
        src: PathBuf,
        #[arg(long)]
        store: PathBuf,
        /// zstd compression level.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Close a blob once it reaches this size.
        #[arg(long, default_value_t = 64)]
        blob_size_mb: u64,
        /// Publish this read trace (from `run --record-trace`) with the image, as
        /// STORE/traces/ID: daemons prefetch it from start-up.
        #[arg(long)]
        trace: Option<PathBuf>,
    },
    /// Serve a store over HTTP (single-range GET).
    Serve {
        store: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Write one file of an image to stdout through the block engine.
    Cat {
        #[command(flatten)]
        src: ImageArgs,
        #[arg(long)]
        cache: PathBuf,
        #[command(flatten)]
        fetch: FetchArgs,
        /// Print the engine's counters to stderr afterwards.
        #[arg(long)]
        stats: bool,
        path: String,
    },
    /// Serve an image to a VM as a vhost-user virtio-fs device.
    Run {
        /// vhost-user socket to listen on (QEMU connects to it).
        #[arg(long)]
        socket: PathBuf,
        #[command(flatten)]
        src: ImageArgs,
        #[arg(long)]
        cache: PathBuf,
        /// Mount tag, for the record (QEMU takes the tag from its own command line).
        #[arg(long, default_value = "incfs")]
        tag: String,
        #[command(flatten)]
        fetch: FetchArgs,
        /// Threads serving the queues (and fetching).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = DEFAULT_POLL_US, help = POLL_HELP)]
        poll_us: u64,
        /// Request queues offered (QEMU's num-request-queues may be up to this).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=63))]
        queues: u32,
        /// Serve counters in Prometheus format on this address (GET /metrics).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        /// Where missing blocks come from: `remote` (fetched by the daemon) or `guest` (only a
        /// guest data loader supplies them through `.fill`; see docs/pending-reads.md).
        #[arg(long, default_value = "remote", value_parser = ["remote", "guest"])]
        fill_from: String,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Serve one file of an image (a raw disk image) to a VM as a vhost-user-blk device.
    Blk {
        /// vhost-user socket to listen on (QEMU connects to it).
        #[arg(long)]
        socket: PathBuf,
        #[command(flatten)]
        src: ImageArgs,
        /// The disk image's path inside the image, e.g. system.img.
        #[arg(long)]
        path: String,
        #[arg(long)]
        cache: PathBuf,
        /// Per-VM copy-on-write overlay file (created if missing); without it the disk is
        /// read-only.
        #[arg(long)]
        overlay: Option<PathBuf>,
        #[command(flatten)]
        fetch: FetchArgs,
        /// Request queues offered. QEMU's num-queues must be at most this; its default is the
        /// guest's vCPU count.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
        queues: u32,
        /// Threads serving the queues (and fetching).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = DEFAULT_POLL_US, help = POLL_HELP)]
        poll_us: u64,
        /// Logical block size reported to the guest (512 with 4 KiB physical, or 4096).
        #[arg(long, default_value_t = 512)]
        logical_block_size: u32,
        /// Serve counters in Prometheus format on this address (GET /metrics).
        #[arg(long)]
        metrics: Option<SocketAddr>,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Print an image's tree with sizes (and how much of each file is cached).
    Inspect {
        #[command(flatten)]
        src: ImageArgs,
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Look after a cache directory.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// Blocks, bytes and images in a cache.
    Status { dir: PathBuf },
    /// Re-hash every cached block against its record; exit 1 if any is wrong.
    Verify { dir: PathBuf },
    /// Reclaim space left by killed daemons, evict down to --size, compact the index.
    /// Safe while daemons run.
    Gc {
        dir: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
}

/// Record and replay of first reads, and fetching the whole image in the background.
#[derive(Args)]
struct TraceArgs {
    /// Record the order of first reads to this file (rewritten every 2 s and at exit).
    #[arg(long)]
    record_trace: Option<PathBuf>,
    /// Prefetch the blocks of this trace in order, in the background, from start-up.
    /// Without it, a trace published with the image (STORE/traces/ID) is used.
    #[arg(long)]
    prefetch_trace: Option<PathBuf>,
    /// Do not prefetch a trace published with the image.
    #[arg(long)]
    no_prefetch: bool,
    /// After the trace, fetch every block of the image in the background (demand reads
    /// still go first), so the VM keeps running if the remote goes away later.
    #[arg(long)]
    fetch_all: bool,
    /// Cap for --fetch-all: it pauses while the daemon's downloads, demand reads included,
    /// run above this many bytes per second (suffixes K, M, G), e.g. 10M.
    #[arg(long, value_parser = parse_size, requires = "fetch_all")]
    fetch_all_rate: Option<u64>,
}

impl TraceArgs {
    fn background(&self) -> daemon::Background {
        let trace = match (&self.prefetch_trace, self.no_prefetch) {
            (_, true) => daemon::Prefetch::None,
            (Some(p), false) => daemon::Prefetch::File(p.clone()),
            (None, false) => daemon::Prefetch::Published,
        };
        let fetch_all = self.fetch_all.then(|| daemon::FetchAll { rate: self.fetch_all_rate.filter(|&r| r > 0) });
        daemon::Background { trace, fetch_all }
    }
}

#[derive(Args)]
struct ImageArgs {
    /// Store directory or http(s):// URL of one.
    #[arg(long)]
    store: String,
    #[arg(long)]
    image: ImageId,
}

const DEFAULT_POLL_US: u64 = incfs_vhost::DEFAULT_POLL_MAX.as_micros() as u64;
const POLL_HELP: &str = "Longest time a queue thread keeps polling a queue that ran dry before it sleeps, in microseconds (adaptive, as QEMU's iothread poll-max-ns; 0: never poll)";

#[derive(Args, Clone)]
struct FetchArgs {
    /// How long a read waits for missing blocks before failing with ETIME.
    #[arg(long, default_value_t = 10_000)]
    read_timeout_ms: u64,
    /// Largest fetch, missing blocks included.
    #[arg(long, default_value_t = 512)]
    readahead_kb: u64,
    /// Keep the shared cache under this size (e.g. 512M, 20G), evicting least recently
    /// used blocks. Unbounded if not given.
    #[arg(long, value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Stop readahead at the end of the file being read (by default it continues into the
    /// files packed after it, within the same window).
    #[arg(long)]
    no_cross_file_readahead: bool,
}

/// "4096", "64K", "512M", "20G", "1T" (powers of 1024).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n >= 4096)
        .ok_or_else(|| format!("{s:?} is not a size of at least 4096 bytes"))
}

impl FetchArgs {
    fn config(&self) -> EngineConfig {
        EngineConfig {
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            readahead: self.readahead_kb.max(4) << 10,
            cross_file_readahead: !self.no_cross_file_readahead,
            ..EngineConfig::default()
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("INCFS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("incfsd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| Error::io("start runtime", e))
}

async fn open_engine(
    src: &ImageArgs,
    cache: &std::path::Path,
    cache_size: Option<u64>,
    cfg: EngineConfig,
) -> Result<Arc<Engine>> {
    Engine::connect(&src.store, src.image, cache, cache_size, cfg).await
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Pack { src, store, level, blob_size_mb, trace } => {
            let opts = pack::PackOptions { level, blob_size: blob_size_mb.max(1) << 20, progress: true };
            let store = Store::new(store);
            let (id, s) = pack::pack(&src, &store, &opts)?;
            if let Some(t) = trace {
                let text = std::fs::read_to_string(&t).map_err(|e| Error::io(format!("read {}", t.display()), e))?;
                let bytes = std::fs::read(store.root.join("images").join(id.to_string()))
                    .map_err(|e| Error::io("read manifest", e))?;
                let image = incfs::image::Image::from_manifest_bytes(id, &incfs::image::manifest_from_stored(bytes)?)?;
                let (ranges, skipped) = incfs::trace::parse(&image, &text)?;
                store.write_trace(&id, &incfs::trace::format(&image, &ranges))?;
                eprintln!(
                    "published a trace of {} runs ({skipped} lines for paths not in this image skipped)",
                    ranges.len()
                );
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
            println!("{id}");
        }
        Cmd::Serve { store, listen } => runtime()?
            .block_on(serve::serve(&store, listen, |a| eprintln!("serving {} on http://{a}", store.display())))?,
        Cmd::Cat { src, cache, fetch, stats, path } => {
            let rt = runtime()?;
            rt.block_on(async {
                let engine = open_engine(&src, &cache, fetch.cache_size, fetch.config()).await?;
                let ino = engine.image().resolve(path.as_bytes()).ok_or_else(|| Error::NotFound(path.clone()))?;
                let size = engine
                    .image()
                    .file(ino)
                    .ok_or_else(|| Error::Invalid(format!("{path} is not a regular file")))?
                    .size;
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
                Ok::<_, Error>(())
            })?;
        }
        Cmd::Run { socket, src, cache, tag, fetch, threads, poll_us, queues, metrics, fill_from, trace } => {
            tracing::info!(%tag, "starting");
            daemon::run(daemon::RunConfig {
                socket,
                store: src.store,
                image: src.image,
                cache,
                cache_size: fetch.cache_size,
                engine: EngineConfig {
                    // `guest`: the daemon never fetches file data; misses wait for `.fill`.
                    fill: if fill_from == "guest" { FillSource::Supplied } else { FillSource::Remote },
                    ..fetch.config()
                },
                queues: queues as usize,
                threads,
                poll_max: std::time::Duration::from_micros(poll_us),
                metrics,
                background: trace.background(),
                record_trace: trace.record_trace,
            })?;
        }
        Cmd::Blk {
            socket,
            src,
            path,
            cache,
            overlay,
            fetch,
            queues,
            threads,
            poll_us,
            logical_block_size,
            metrics,
            trace,
        } => {
            let engine = fetch.config();
            let device = incfs::blk::DeviceConfig {
                queues: queues as usize,
                threads: threads.clamp(1, queues as usize),
                logical_block_size,
                opt_io: engine.readahead.min(1 << 20) as u32,
                poll_max: std::time::Duration::from_micros(poll_us),
                ..incfs::blk::DeviceConfig::default()
            };
            let cfg = incfs::blk::BlkConfig {
                socket,
                store: src.store,
                image: src.image,
                path,
                cache,
                cache_size: fetch.cache_size,
                overlay,
                engine,
                device,
                metrics,
                background: trace.background(),
                record_trace: trace.record_trace,
            };
            incfs::blk::run(cfg)?;
        }
        Cmd::Inspect { src, cache } => {
            let rt = runtime()?;
            rt.block_on(async {
                let dir = match &cache {
                    Some(c) => c.clone(),
                    None => std::env::temp_dir().join(format!("incfsd-inspect-{}", std::process::id())),
                };
                let engine = open_engine(&src, &dir, None, EngineConfig::default()).await;
                if cache.is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                let engine = engine?;
                inspect::print_tree(&engine, &mut std::io::stdout().lock()).map_err(|e| Error::io("write stdout", e))
            })?;
        }
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
        Cmd::Cache { cmd: CacheCmd::Verify { dir } } => {
            let (ok, bad) = inspect::verify_cache(&BlockCache::open(&dir)?)?;
            println!("verified {ok} blocks, {bad} bad");
            if bad > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
