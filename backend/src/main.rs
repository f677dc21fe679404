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
use incfs::engine::{Engine, EngineConfig};
use incfs::image::ImageId;
use incfs::store::{Remote, Store};
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
        /// Request queues offered (QEMU's num-request-queues may be up to this).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=63))]
        queues: u32,
        /// Serve counters in Prometheus format on this address (GET /metrics).
        #[arg(long)]
        metrics: Option<SocketAddr>,
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
}

#[derive(Args)]
struct ImageArgs {
    /// Store directory or http(s):// URL of one.
    #[arg(long)]
    store: String,
    #[arg(long)]
    image: ImageId,
}

#[derive(Args, Clone)]
struct FetchArgs {
    /// How long a read waits for missing blocks before failing with ETIME.
    #[arg(long, default_value_t = 10_000)]
    read_timeout_ms: u64,
    /// Largest fetch, missing blocks included.
    #[arg(long, default_value_t = 512)]
    readahead_kb: u64,
}

impl FetchArgs {
    fn config(&self) -> EngineConfig {
        EngineConfig {
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            readahead: self.readahead_kb.max(4) << 10,
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

async fn open_engine(src: &ImageArgs, cache: &std::path::Path, cfg: EngineConfig) -> Result<Arc<Engine>> {
    let remote = Remote::open(&src.store, cfg.attempt_timeout)?;
    let cache = Arc::new(BlockCache::open(cache)?);
    Engine::open(remote, src.image, cache, cfg).await
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Pack { src, store, level, blob_size_mb } => {
            let opts = pack::PackOptions { level, blob_size: blob_size_mb.max(1) << 20, progress: true };
            let (id, s) = pack::pack(&src, &Store::new(store), &opts)?;
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
        Cmd::Serve { store, listen } => runtime()?.block_on(serve::serve(&store, listen, |a| eprintln!("serving {} on http://{a}", store.display())))?,
        Cmd::Cat { src, cache, fetch, stats, path } => {
            let rt = runtime()?;
            rt.block_on(async {
                let engine = open_engine(&src, &cache, fetch.config()).await?;
                let ino = engine.image().resolve(path.as_bytes()).ok_or_else(|| Error::NotFound(path.clone()))?;
                let size = engine.image().file(ino).ok_or_else(|| Error::Invalid(format!("{path} is not a regular file")))?.size;
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
        Cmd::Run { socket, src, cache, tag, fetch, threads, queues, metrics } => {
            tracing::info!(%tag, "starting");
            daemon::run(daemon::RunConfig {
                socket,
                store: src.store,
                image: src.image,
                cache,
                engine: fetch.config(),
                queues: queues as usize,
                threads,
                metrics,
            })?;
        }
        Cmd::Inspect { src, cache } => {
            let rt = runtime()?;
            rt.block_on(async {
                let dir = match &cache {
                    Some(c) => c.clone(),
                    None => std::env::temp_dir().join(format!("incfsd-inspect-{}", std::process::id())),
                };
                let engine = open_engine(&src, &dir, EngineConfig::default()).await;
                if cache.is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                let engine = engine?;
                inspect::print_tree(&engine, &mut std::io::stdout().lock()).map_err(|e| Error::io("write stdout", e))
            })?;
        }
        Cmd::Cache { cmd: CacheCmd::Status { dir } } => {
            let u = BlockCache::open(&dir)?.usage()?;
            println!("blocks {}\nslots {}\nevicted {}\nempty {}\ndisk_bytes {}\nimages {}", u.valid, u.slots, u.evicted, u.empty, u.disk_bytes, u.manifests);
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
