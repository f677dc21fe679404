//! `incfsd`'s command line: clap definitions, their checks, and their conversion into the
//! library's configs. The arguments `run` and `blk` share are defined once ([`DeviceArgs`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use incfs::blk::{BlkConfig, DiskConfig};
use incfs::daemon::{Background, DaemonConfig, FetchAll, Prefetch, RunConfig};
use incfs::engine::{EngineConfig, FillSource};
use incfs::image::ImageId;
use incfs::sandbox::{Access, FsSandbox, Reachable, SandboxConfig, SeccompMode, DEFAULT_RLIMIT_NOFILE};
use incfs::store::HttpOptions;

#[derive(Parser)]
#[command(name = "incfsd", version, about = "Serve incremental images to VM guests, fetching blocks lazily")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Pack a directory tree into an image in a store; prints the image id last.
    Pack(PackArgs),
    /// Serve a store over HTTP (single-range GET).
    Serve {
        store: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Write one file of an image to stdout through the block engine.
    Cat {
        #[command(flatten)]
        engine: EngineArgs,
        /// Print the engine's counters to stderr afterwards.
        #[arg(long)]
        stats: bool,
        path: String,
    },
    /// Serve an image to a VM as a vhost-user virtio-fs device.
    Run(RunArgs),
    /// Replace the worker of a running `incfsd run` by one started from the binary on disk,
    /// without the guest noticing (docs/restart.md). Fails, and the old worker serves on, if
    /// the new one cannot start.
    Upgrade {
        /// The vhost-user socket `incfsd run` serves.
        #[arg(long)]
        socket: PathBuf,
    },
    /// Serve one file of an image (a raw disk image) to a VM as a vhost-user-blk device.
    Blk(BlkArgs),
    /// `incfsd run` as a vhost-user-fs backend program that libvirt starts (QEMU's backend
    /// program conventions, virtiofsd's options): the share's directory holds its settings,
    /// incfsd.conf (docs/libvirt.md). Also run as `incfsd-vhost-user-fs` (a link to incfsd).
    VhostUserFs(VhostUserFsArgs),
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
    /// Work with read traces (from `run --record-trace`).
    Trace {
        #[command(subcommand)]
        cmd: TraceCmd,
    },
}

#[derive(Subcommand)]
pub enum TraceCmd {
    /// Merge traces of several runs (of this image or of other versions: traces name paths)
    /// into one, written to stdout: every block any of them names, ordered by its median
    /// first-access rank across them (docs/image-format.md).
    Merge {
        #[arg(required = true)]
        traces: Vec<PathBuf>,
    },
}

#[derive(Args)]
pub struct PackArgs {
    pub src: PathBuf,
    /// A store directory, s3://BUCKET/PREFIX (packed in a temporary directory, then
    /// uploaded), or an OCI registry repository to push to: oci://HOST[:PORT]/REPO[:TAG] (tag
    /// `latest` if none; oci+http:// for a registry without TLS).
    #[arg(long)]
    pub store: String,
    /// zstd compression level.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// Close a blob once it reaches this size.
    #[arg(long, default_value_t = 64)]
    pub blob_size_mb: u64,
    /// Largest zstd dictionary to train on the image's blocks (kept only if it saves more
    /// than twice its size; at most 1M).
    #[arg(long, value_parser = parse_size, default_value = "112K")]
    pub dict_size: u64,
    /// Compress every block on its own, without an image dictionary.
    #[arg(long)]
    pub no_dict: bool,
    /// Keep every block's hash and location in the manifest (format version 1, or 2 with a
    /// dictionary: readable by older incfsd) instead of in per-file indexes in the blobs
    /// (version 3, whose manifest grows with the files, not with the blocks).
    #[arg(long)]
    pub inline_hashes: bool,
    /// Lay the image out for this read trace (from `run --record-trace` or `trace merge`):
    /// its blocks first, end to end in first-access order, then the rest in file order. The
    /// trace is published with the image, as STORE/traces/ID: daemons prefetch it from
    /// start-up.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// How to reach an s3:// or oci:// store (TLS, credentials, S3 settings).
    #[command(flatten)]
    pub http: HttpArgs,
}

#[derive(Subcommand)]
pub enum CacheCmd {
    /// Blocks, bytes and images in a cache.
    Status { dir: PathBuf },
    /// Re-hash every cached block against its record; exit 1 if any is wrong.
    Verify {
        dir: PathBuf,
        /// Drop the blocks that are wrong (safe while daemons run); exit 0 once repaired.
        #[arg(long)]
        repair: bool,
    },
    /// Reclaim space left by killed daemons, evict down to --size, compact the index.
    /// Safe while daemons run.
    Gc {
        dir: PathBuf,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Mount tag, for the record (QEMU takes the tag from its own command line).
    #[arg(long, default_value = "incfs")]
    pub tag: String,
    /// Request queues offered (QEMU's num-request-queues may be up to this).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=63))]
    pub queues: u32,
    /// Where missing blocks come from: `remote` (fetched by the daemon) or `guest` (only a
    /// guest data loader supplies them through `.fill`; see docs/pending-reads.md).
    #[arg(long, value_enum, default_value_t = FillFrom::Remote)]
    pub fill_from: FillFrom,
    /// Serve the socket from this one process, without a supervisor: a crash then ends the
    /// guest's mount (docs/restart.md).
    #[arg(long)]
    pub no_supervisor: bool,
    /// Internal: run as the worker of a supervisor, on these fds (CTRL,STATE,READY,METRICS).
    #[arg(long, hide = true)]
    pub worker_fds: Option<String>,
    /// Internal: go on as the supervisor the previous binary handed over to (an upgrade).
    #[arg(long, hide = true)]
    pub supervisor_state: Option<i32>,
    /// Internal (`vhost-user-fs --fd`): serve on this inherited listening socket, bound at
    /// --socket, which stays its creator's. Read by a starting supervisor only.
    #[arg(long, hide = true, conflicts_with = "no_supervisor")]
    pub listen_fd: Option<i32>,
    /// Internal: when the supervisor that starts this worker was started (CLOCK_MONOTONIC
    /// nanoseconds), for the time to ready.
    #[arg(long, hide = true)]
    pub started_ns: Option<u64>,
}

/// `incfsd vhost-user-fs`: what QEMU's backend program conventions
/// (docs/interop/vhost-user.rst) and libvirt's virtiofsd command lines pass. Options without
/// a meaning for an image served from a store are accepted and ignored with a note
/// (crate::vhost_user_fs says which and why); any other is an error.
#[derive(Args, Debug)]
pub struct VhostUserFsArgs {
    /// Print the backend's capabilities as JSON (type "fs") and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Serve on this inherited, listening vhost-user socket (libvirt creates it).
    #[arg(long, value_name = "FDNUM", conflicts_with = "socket_path")]
    pub fd: Option<i32>,
    /// Listen on a vhost-user socket at this path.
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,
    /// The share's directory, holding incfsd.conf (libvirt's `<source dir>`; newer libvirts).
    #[arg(long, value_name = "DIR")]
    pub shared_dir: Option<PathBuf>,
    /// virtiofsd's old option list (libvirt 9.0): source=DIR, cache=, sandbox=, xattr,
    /// no_xattr, flock, no_flock, posix_lock, no_posix_lock.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Guest caching (auto, always, never, metadata): ignored, the image never changes.
    #[arg(long, value_name = "MODE")]
    pub cache: Option<String>,
    /// Sandbox: namespace, chroot, none (as virtiofsd), or landlock.
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxArg>,
    /// Extended attributes: ignored, the image's are served.
    #[arg(long)]
    pub xattr: bool,
    /// Threads serving the queues (incfsd run's --threads); 0 keeps the settings' value.
    #[arg(long, value_name = "N")]
    pub thread_pool_size: Option<usize>,
    /// Limit on open file descriptors.
    #[arg(long, value_name = "N")]
    pub rlimit_nofile: Option<u64>,
    /// Log at debug level (unless INCFS_LOG says otherwise).
    #[arg(short = 'd')]
    pub debug: bool,
    /// Log level (error, warn, info, debug, trace, off), unless INCFS_LOG says otherwise.
    #[arg(long, value_enum)]
    pub log_level: Option<LogLevel>,
    /// UID mapping (unprivileged libvirt): ignored, files have the image's owners.
    #[arg(long, value_name = "MAP")]
    pub uid_map: Vec<String>,
    /// GID mapping (unprivileged libvirt): ignored, files have the image's owners.
    #[arg(long, value_name = "MAP")]
    pub gid_map: Vec<String>,
    /// Ignored: an image has no submounts.
    #[arg(long)]
    pub announce_submounts: bool,
    /// Ignored: the share is always read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Ignored: the device's whole state migrates with it (docs/migration.md).
    #[arg(long, value_name = "MODE")]
    pub migration_mode: Option<String>,
    /// Ignored: the device's whole state migrates with it (docs/migration.md).
    #[arg(long, value_name = "MODE")]
    pub migration_on_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FillFrom {
    Remote,
    Guest,
}

#[derive(Args)]
pub struct BlkArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The disk image's path inside the image, e.g. system.img.
    #[arg(long)]
    pub path: String,
    /// Per-VM copy-on-write overlay file (created if missing); without it the disk is
    /// read-only.
    #[arg(long)]
    pub overlay: Option<PathBuf>,
    /// This daemon serves a live migration's destination: the overlay is taken over from the
    /// source's daemon, which releases it at the switch-over, when the destination QEMU starts
    /// the device (waiting up to 10 s for its lock), not at start-up. See docs/migration.md.
    #[arg(long, requires = "overlay")]
    pub incoming: bool,
    /// Request queues offered. QEMU's num-queues must be at most this; its default is the
    /// guest's vCPU count.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub queues: u32,
    /// Logical block size reported to the guest (512 with 4 KiB physical, or 4096).
    #[arg(long, default_value_t = 512)]
    pub logical_block_size: u32,
}

/// What `run` and `blk` share. `--queues` is not here: its default and limit are the
/// device's (virtio-fs has a hiprio queue besides the request queues).
#[derive(Args)]
pub struct DeviceArgs {
    /// vhost-user socket to listen on (QEMU connects to it).
    #[arg(long)]
    pub socket: PathBuf,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Threads serving the queues (and fetching).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = DEFAULT_POLL_US, help = POLL_HELP)]
    pub poll_us: u64,
    /// Serve counters in Prometheus format on this address (GET /metrics).
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// How the daemon confines itself (docs/sandbox.md).
#[derive(Args)]
pub struct SandboxArgs {
    /// Filesystem sandbox: `namespace` (a mount namespace whose root holds only the paths
    /// in use; Landlock if namespaces are refused), `landlock`, `chroot` (into an empty
    /// directory once everything is open) or `none`.
    #[arg(long, value_enum, default_value_t = SandboxArg::Namespace)]
    pub sandbox: SandboxArg,
    /// System calls outside the daemon's allow-list: `kill` the process, `log` them to the
    /// audit log and let them run, or `none` (no filter).
    #[arg(long, value_enum, default_value_t = SeccompArg::Kill)]
    pub seccomp: SeccompArg,
    /// Limit on open file descriptors (soft and hard); 0 leaves the inherited limit.
    #[arg(long, default_value_t = DEFAULT_RLIMIT_NOFILE)]
    pub rlimit_nofile: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SandboxArg {
    Namespace,
    Landlock,
    Chroot,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SeccompArg {
    Kill,
    Log,
    None,
}

impl SandboxArgs {
    fn config(&self) -> SandboxConfig {
        SandboxConfig {
            fs: match self.sandbox {
                SandboxArg::Namespace => FsSandbox::Namespace,
                SandboxArg::Landlock => FsSandbox::Landlock,
                SandboxArg::Chroot => FsSandbox::Chroot,
                SandboxArg::None => FsSandbox::None,
            },
            seccomp: match self.seccomp {
                SeccompArg::Kill => SeccompMode::Kill,
                SeccompArg::Log => SeccompMode::Log,
                SeccompArg::None => SeccompMode::None,
            },
            rlimit_nofile: (self.rlimit_nofile > 0).then_some(self.rlimit_nofile),
        }
    }
}

const DEFAULT_POLL_US: u64 = incfs_vhost::DEFAULT_POLL_MAX.as_micros() as u64;
const POLL_HELP: &str = "Longest time a queue thread keeps polling a queue that ran dry before it sleeps, in microseconds (adaptive, as QEMU's iothread poll-max-ns; 0: never poll)";

/// An image, its cache and how its blocks are fetched: what the block engine needs.
#[derive(Args)]
pub struct EngineArgs {
    #[command(flatten)]
    pub src: ImageArgs,
    #[arg(long)]
    pub cache: PathBuf,
    #[command(flatten)]
    pub fetch: FetchArgs,
}

#[derive(Args)]
pub struct ImageArgs {
    /// Store directory, http(s):// URL of one, or s3://BUCKET/PREFIX. A URL's query (a
    /// signed URL's) is kept on every request, after the object's path. Or an OCI registry
    /// repository, oci://HOST[:PORT]/REPO[:TAG] (oci+http:// for one without TLS).
    #[arg(long)]
    pub store: String,
    /// The image id; for an oci:// store, a tag instead (resolved once at start, the id
    /// logged: pin the id to trust no registry). Default: the oci:// URL's tag.
    #[arg(long, value_name = "ID|TAG")]
    pub image: Option<String>,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// How requests to an HTTP(S) store are made (docs/stores.md).
#[derive(Args)]
pub struct HttpArgs {
    /// PEM file of further trusted CA certificates (besides the built-in roots and the
    /// system's bundle, $SSL_CERT_FILE or /etc/ssl/certs/ca-certificates.crt). Repeatable.
    #[arg(long = "ca-file", value_name = "PEM")]
    pub ca_files: Vec<PathBuf>,
    /// PEM client certificate for mutual TLS (with its key, unless --client-key is given).
    #[arg(long, value_name = "PEM")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, value_name = "PEM", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// A header sent on every request to the store, e.g. 'X-Token: s3cret'. Repeatable.
    /// Its value is never logged.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// File holding a token sent as `Authorization: Bearer <token>`; re-read when it
    /// changes (checked at most once a second), so a rotated token needs no restart.
    #[arg(long, value_name = "FILE")]
    pub bearer_token_file: Option<PathBuf>,
    /// Credentials for an oci:// registry, docker's format ({"auths": {"HOST": {"auth":
    /// base64 of user:password}}}); default ~/.docker/config.json (credential helpers are
    /// not run).
    #[arg(long, value_name = "FILE")]
    pub registry_auth: Option<PathBuf>,
    #[command(flatten)]
    pub sources: SourceArgs,
}

/// S3 settings and mirrors (docs/stores.md).
#[derive(Args)]
pub struct SourceArgs {
    #[command(flatten)]
    pub s3: S3Args,
    /// A mirror of the store (same layout: http(s)://, s3:// or a directory), tried before
    /// it; repeatable, tried in order. What a mirror sends is verified like the store's.
    #[arg(long = "mirror", value_name = "URL")]
    pub mirrors: Vec<String>,
    /// How long a failing mirror is first skipped; doubles with each failure in a row (to 64
    /// times this), and a success resets it.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub mirror_backoff_ms: u64,
}

/// Where an s3:// store is (docs/stores.md); credentials come from the environment.
#[derive(Args)]
pub struct S3Args {
    /// Region of an s3:// store (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's
    /// region in ~/.aws/config, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// http(s)://HOST[:PORT] of an S3-protocol server that is not AWS (default: AWS's
    /// endpoint of the region).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// How the bucket is named: path (ENDPOINT/BUCKET/KEY) or virtual (BUCKET.HOST/KEY).
    /// Default: virtual on AWS, path with --s3-endpoint.
    #[arg(long, value_enum, value_name = "STYLE")]
    pub s3_addressing: Option<S3Addressing>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum S3Addressing {
    Path,
    Virtual,
}

impl S3Args {
    pub fn options(&self) -> incfs::store::s3::S3Options {
        use incfs::store::s3::{Addressing, S3Options};
        S3Options {
            region: self.s3_region.clone(),
            endpoint: self.s3_endpoint.clone(),
            addressing: self.s3_addressing.map(|a| match a {
                S3Addressing::Path => Addressing::Path,
                S3Addressing::Virtual => Addressing::Virtual,
            }),
        }
    }
}

impl HttpArgs {
    pub fn options(&self) -> HttpOptions {
        HttpOptions {
            ca_files: self.ca_files.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            headers: self.headers.clone(),
            bearer_token_file: self.bearer_token_file.clone(),
            registry_auth: self.registry_auth.clone(),
            s3: self.sources.s3.options(),
            mirrors: self.sources.mirrors.clone(),
            mirror_backoff: Some(Duration::from_millis(self.sources.mirror_backoff_ms)),
        }
    }
}

impl ImageArgs {
    /// The image id: --image's, or the id its tag (or the oci:// URL's) names now.
    pub fn image_id(&self) -> Result<ImageId, incfs::Error> {
        incfs::store::oci::resolve_image(&self.store, self.image.as_deref(), &self.http.options())
    }
}

impl EngineArgs {
    /// The engine's settings: fetching's and the store's requests'.
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig { http: self.src.http.options(), ..self.fetch.engine_config() }
    }
}

#[derive(Args)]
pub struct FetchArgs {
    /// How long a read waits for missing blocks before failing with ETIME.
    #[arg(long, default_value_t = 10_000)]
    pub read_timeout_ms: u64,
    /// Largest fetch, missing blocks included, for the first read of a file (a sequential
    /// reader's window then grows up to --readahead-max-kb).
    #[arg(long, default_value_t = 512)]
    pub readahead_kb: u64,
    /// Largest window of a sequential reader (doubling from --readahead-kb).
    #[arg(long, default_value_t = 4096)]
    pub readahead_max_kb: u64,
    /// Window of a miss away from where the file's last fetch ended (random access), at most
    /// --readahead-kb; 4 fetches only what was asked.
    #[arg(long, default_value_t = 512)]
    pub readahead_random_kb: u64,
    /// Keep every fetch's window at --readahead-kb: do not grow it for sequential readers
    /// nor use --readahead-random-kb for random ones.
    #[arg(long)]
    pub no_adaptive_readahead: bool,
    /// Do not fetch the head of a file in the background when the guest opens it.
    #[arg(long)]
    pub no_open_prefetch: bool,
    /// Also fetch the head of a regular file in the background on LOOKUP (stat, ls -l, path
    /// walks), not only on OPEN.
    #[arg(long)]
    pub lookup_prefetch: bool,
    /// Fetch a read's readahead in the same request as the blocks it waits for, not in a
    /// second request beside it.
    #[arg(long)]
    pub no_split_fetch: bool,
    /// Keep the shared cache under this size (e.g. 512M, 20G), evicting least recently
    /// used blocks. Unbounded if not given.
    #[arg(long, value_parser = parse_size)]
    pub cache_size: Option<u64>,
    /// Stop readahead at the end of the file being read (by default it continues into the
    /// files packed after it, within the same window).
    #[arg(long)]
    pub no_cross_file_readahead: bool,
    /// How long one request to the store may take before its answer starts; the body then
    /// gets this plus its length at 256 KiB/s, so big runs and manifests on slow links
    /// finish. A late answer counts as a transient failure and is retried.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub fetch_timeout_ms: u64,
    /// Bytes that reads waiting for blocks may hold at once, in MiB; past it, further waiting
    /// reads wait for room before allocating anything.
    #[arg(long, default_value_t = DEFAULT_MAX_PARKED_MB, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_parked_mb: u64,
    /// Memory for the file index segments loaded so far (format version 3), in KiB; past it
    /// the least recently used are dropped: their hashes come back from the cache, their
    /// block locations from the store when a block must be fetched again.
    #[arg(long, default_value_t = (incfs::engine::DEFAULT_INDEX_MEMORY >> 10) as u64,
          value_parser = clap::value_parser!(u64).range((incfs::engine::MIN_INDEX_MEMORY >> 10) as u64..=(1 << 30)))]
    pub index_memory_kb: u64,
    /// Re-hash every cached block on read, for a cache on storage that other hosts or users
    /// can write: a block that does not match is fetched again, never served.
    #[arg(long)]
    pub verify_cached: bool,
}

const DEFAULT_MAX_PARKED_MB: u64 = incfs::engine::DEFAULT_MAX_PARKED_BYTES >> 20;

/// Record and replay of first reads, and fetching the whole image in the background.
#[derive(Args)]
pub struct TraceArgs {
    /// Record the order of first reads to this file (rewritten every 2 s and at exit).
    #[arg(long)]
    pub record_trace: Option<PathBuf>,
    /// Prefetch the blocks of this trace in order, in the background, from start-up.
    /// Without it, a trace published with the image (STORE/traces/ID) is used.
    #[arg(long)]
    pub prefetch_trace: Option<PathBuf>,
    /// Do not prefetch a trace published with the image.
    #[arg(long)]
    pub no_prefetch: bool,
    /// After the trace, fetch every block of the image in the background (demand reads
    /// still go first), so the VM keeps running if the remote goes away later.
    #[arg(long)]
    pub fetch_all: bool,
    /// Cap for --fetch-all: it pauses while the daemon's downloads, demand reads included,
    /// run above this many bytes per second (suffixes K, M, G), e.g. 10M.
    #[arg(long, value_parser = parse_size, requires = "fetch_all")]
    pub fetch_all_rate: Option<u64>,
}

/// Smallest size a size argument takes: one block.
const MIN_SIZE: u64 = 4096;

/// "4096", "64K", "512M", "20G", "1T": powers of 1024, as "64KiB", "1.5G" or "20 GB" are.
fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .ok()
        .filter(|&n| n >= MIN_SIZE)
        .ok_or_else(|| format!("{s:?} is not a size of at least {MIN_SIZE} bytes (suffixes K, M, G, T)"))
}

impl FetchArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            read_timeout: Duration::from_millis(self.read_timeout_ms),
            readahead: self.readahead_kb.max(4) << 10,
            readahead_max: self.readahead_max_kb.max(4) << 10,
            readahead_random: self.readahead_random_kb.max(4) << 10,
            adaptive_readahead: !self.no_adaptive_readahead,
            open_prefetch: !self.no_open_prefetch,
            lookup_prefetch: self.lookup_prefetch,
            split_fetch: !self.no_split_fetch,
            cross_file_readahead: !self.no_cross_file_readahead,
            attempt_timeout: Duration::from_millis(self.fetch_timeout_ms),
            max_parked_bytes: self.max_parked_mb.saturating_mul(1 << 20),
            verify_cached: self.verify_cached,
            index_memory: usize::try_from(self.index_memory_kb << 10).unwrap_or(usize::MAX),
            ..EngineConfig::default()
        }
    }
}

impl TraceArgs {
    fn background(&self) -> Background {
        let trace = match (&self.prefetch_trace, self.no_prefetch) {
            (_, true) => Prefetch::None,
            (Some(p), false) => Prefetch::File(p.clone()),
            (None, false) => Prefetch::Published,
        };
        // A rate of 0 means no cap.
        let fetch_all = self.fetch_all.then(|| FetchAll { rate: self.fetch_all_rate.filter(|&r| r > 0) });
        Background { trace, fetch_all }
    }
}

impl DeviceArgs {
    /// The vhost server's settings for a device of `queues` queues.
    fn server(&self, queues: usize) -> incfs_vhost::ServerConfig {
        incfs_vhost::ServerConfig {
            threads: self.threads.clamp(1, queues),
            poll_max: Duration::from_micros(self.poll_us),
            // A parked read is answered (ETIME) by the read timeout: a stopping queue waits
            // for that and a little more.
            stop_drain: Duration::from_millis(self.engine.fetch.read_timeout_ms).saturating_add(Duration::from_secs(2)),
            ..incfs_vhost::ServerConfig::default()
        }
    }

    fn daemon_config(self, engine: EngineConfig, worker_threads: usize) -> Result<DaemonConfig, incfs::Error> {
        let background = self.trace.background();
        let image = self.engine.src.image_id()?;
        Ok(DaemonConfig {
            socket: self.socket,
            store: self.engine.src.store,
            image,
            cache: self.engine.cache,
            cache_size: self.engine.fetch.cache_size,
            engine,
            worker_threads,
            metrics: self.metrics,
            // Set by main, which knows when the process (or its supervisor) started.
            started_ns: 0,
            record_trace: self.trace.record_trace,
            background,
            sandbox: self.sandbox.config(),
            device_paths: Vec::new(),
        })
    }
}

impl RunArgs {
    /// The daemon's settings (an image tag is resolved here).
    pub fn config(self) -> Result<RunConfig, incfs::Error> {
        let queues = self.queues as usize;
        let engine = EngineConfig {
            // `guest`: the daemon never fetches file data; misses wait for `.fill`.
            fill: match self.fill_from {
                FillFrom::Remote => FillSource::Remote,
                FillFrom::Guest => FillSource::Supplied,
            },
            ..self.device.engine.engine_config()
        };
        let device = incfs_fuse::VirtioFsConfig {
            request_queues: queues.max(1),
            server: self.device.server(queues.max(1)),
            ..incfs_fuse::VirtioFsConfig::default()
        };
        // One runtime worker per queue thread asked for, for the fetches they start.
        let worker_threads = self.device.threads.max(1);
        Ok(RunConfig { daemon: self.device.daemon_config(engine, worker_threads)?, device })
    }
}

impl BlkArgs {
    /// The daemon's settings (an image tag is resolved here).
    pub fn config(self) -> Result<BlkConfig, incfs::Error> {
        let queues = self.queues as usize;
        let engine = self.device.engine.engine_config();
        let device = incfs::blk::BlkDeviceConfig {
            queues,
            server: self.device.server(queues),
            logical_block_size: self.logical_block_size,
            opt_io: engine.readahead.min(1 << 20) as u32,
            ..incfs::blk::BlkDeviceConfig::default()
        };
        // Flushes and overlay writes run on the runtime too: at least two workers.
        let worker_threads = device.server.threads.max(2);
        // The overlay is created (or opened) by name in its directory once sandboxed.
        let overlay = self.overlay.map(|p| std::path::absolute(&p).unwrap_or(p));
        let mut daemon = self.device.daemon_config(engine, worker_threads)?;
        if let Some(dir) = overlay.as_deref().and_then(std::path::Path::parent) {
            daemon.device_paths.push(Reachable {
                what: "the overlay's directory",
                path: dir.to_path_buf(),
                access: Access::ReadWrite,
                // Opened again after a migration's switch-over (taken by an incoming daemon,
                // taken back by a source whose migration failed); `--sandbox chroot` has
                // only what was open at start-up, so an incoming daemon cannot use it.
                while_serving: self.incoming,
            });
        }
        let disk = DiskConfig { path: self.path, overlay, incoming: self.incoming, device };
        Ok(BlkConfig { daemon, disk })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert!(parse_size("1K").is_err(), "below one block");
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
    }

    fn parse(args: &[&str]) -> Cmd {
        Cli::try_parse_from(args).map(|c| c.cmd).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    const ID: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn run_defaults() {
        let Cmd::Run(args) = parse(&["incfsd", "run", "--socket", "s", "--store", "d", "--image", ID, "--cache", "c"])
        else {
            panic!("not run")
        };
        assert_eq!(args.tag, "incfs");
        let cfg = args.config().expect("config");
        assert_eq!((cfg.device.request_queues, cfg.device.server.threads, cfg.daemon.worker_threads), (4, 2, 2));
        assert_eq!(cfg.device.server.poll_max, incfs_vhost::DEFAULT_POLL_MAX);
        assert_eq!(cfg.daemon.engine.read_timeout, Duration::from_secs(10));
        assert_eq!(cfg.daemon.engine.readahead, 512 << 10);
        assert!(matches!(cfg.daemon.engine.fill, FillSource::Remote));
        assert!(matches!(cfg.daemon.background.trace, Prefetch::Published));
        assert!(cfg.daemon.background.fetch_all.is_none() && cfg.daemon.cache_size.is_none());
    }

    #[test]
    fn run_has_a_supervisor_unless_told_and_upgrade_names_the_socket() {
        let base = ["incfsd", "run", "--socket", "s", "--store", "d", "--image", ID, "--cache", "c"];
        let Cmd::Run(args) = parse(&base) else { panic!("not run") };
        assert!(!args.no_supervisor && args.worker_fds.is_none() && args.supervisor_state.is_none());
        let Cmd::Run(args) = parse(&[&base[..], &["--no-supervisor"]].concat()) else { panic!("not run") };
        assert!(args.no_supervisor);
        let Cmd::Upgrade { socket } = parse(&["incfsd", "upgrade", "--socket", "/run/x.sock"]) else {
            panic!("not upgrade")
        };
        assert_eq!(socket, PathBuf::from("/run/x.sock"));
    }

    #[test]
    fn blk_defaults_and_shared_flags() {
        let Cmd::Blk(args) = parse(&[
            "incfsd",
            "blk",
            "--socket",
            "s",
            "--store",
            "d",
            "--image",
            ID,
            "--cache",
            "c",
            "--path",
            "system.img",
            "--cache-size",
            "20G",
            "--fetch-all",
            "--fetch-all-rate",
            "10M",
            "--no-prefetch",
            "--threads",
            "16",
        ]) else {
            panic!("not blk")
        };
        let cfg = args.config().expect("config");
        assert_eq!((cfg.disk.device.queues, cfg.disk.device.server.threads, cfg.daemon.worker_threads), (8, 8, 8));
        assert_eq!(cfg.disk.device.logical_block_size, 512);
        assert_eq!(cfg.daemon.cache_size, Some(20 << 30));
        assert!(matches!(cfg.daemon.background.trace, Prefetch::None));
        assert_eq!(cfg.daemon.background.fetch_all.map(|f| f.rate), Some(Some(10 << 20)));
    }

    #[test]
    fn checks() {
        let base = ["incfsd", "run", "--socket", "s", "--store", "d", "--image", ID, "--cache", "c"];
        let with = |extra: &[&str]| Cli::try_parse_from(base.iter().chain(extra)).map(|_| ());
        assert!(with(&["--fill-from", "guest"]).is_ok());
        assert!(with(&["--fill-from", "elsewhere"]).is_err());
        assert!(with(&["--queues", "64"]).is_err(), "virtio-fs offers at most 63 request queues");
        assert!(with(&["--fetch-all-rate", "10M"]).is_err(), "the rate needs --fetch-all");
        assert!(with(&["--sandbox", "jail"]).is_err());
        assert!(with(&["--seccomp", "trap"]).is_err());
    }

    #[test]
    fn http_options_for_every_store_command() {
        let http = [
            "--ca-file",
            "ca.pem",
            "--ca-file",
            "ca2.pem",
            "--client-cert",
            "c.pem",
            "--client-key",
            "k.pem",
            "--header",
            "X-A: 1",
            "--header",
            "X-B: 2",
            "--bearer-token-file",
            "tok",
        ];
        let common = ["--store", "https://h/p?sig=1", "--image", ID];
        let check = |o: HttpOptions| {
            assert_eq!(o.ca_files, [PathBuf::from("ca.pem"), PathBuf::from("ca2.pem")]);
            assert_eq!(
                (o.client_cert.as_deref(), o.client_key.as_deref()),
                (Some("c.pem".as_ref()), Some("k.pem".as_ref()))
            );
            assert_eq!(o.headers, ["X-A: 1", "X-B: 2"]);
            assert_eq!(o.bearer_token_file, Some(PathBuf::from("tok")));
            assert!(!format!("{o:?}").contains(": 1"), "a header's value in Debug");
        };
        let args = |cmd: &[&'static str]| -> Vec<&'static str> { [&["incfsd"], cmd, &common, &http].concat() };
        let Cmd::Run(a) = parse(&args(&["run", "--socket", "s", "--cache", "c"])) else { panic!("not run") };
        check(a.config().expect("config").daemon.engine.http);
        let Cmd::Blk(a) = parse(&args(&["blk", "--socket", "s", "--cache", "c", "--path", "d"])) else {
            panic!("not blk")
        };
        check(a.config().expect("config").daemon.engine.http);
        let Cmd::Cat { engine, .. } = parse(&[args(&["cat", "--cache", "c"]), vec!["f"]].concat()) else {
            panic!("not cat")
        };
        check(engine.engine_config().http);
        let Cmd::Inspect { src, .. } = parse(&args(&["inspect"])) else { panic!("not inspect") };
        check(src.http.options());
        let key_alone = ["incfsd", "inspect", "--store", "https://h", "--image", ID, "--client-key", "k.pem"];
        assert!(Cli::try_parse_from(key_alone).is_err(), "--client-key needs --client-cert");
    }

    #[test]
    fn sandbox_on_by_default_and_configurable() {
        let base = ["incfsd", "run", "--socket", "s", "--store", "d", "--image", ID, "--cache", "c"];
        let Cmd::Run(args) = parse(&base) else { panic!("not run") };
        assert_eq!(args.config().expect("config").daemon.sandbox, SandboxConfig::default());
        assert_eq!(
            SandboxConfig::default(),
            SandboxConfig { fs: FsSandbox::Namespace, seccomp: SeccompMode::Kill, rlimit_nofile: Some(4096) }
        );
        let Cmd::Blk(args) = parse(&[
            "incfsd",
            "blk",
            "--socket",
            "s",
            "--store",
            "d",
            "--image",
            ID,
            "--cache",
            "c",
            "--path",
            "disk.img",
            "--overlay",
            "vm/overlay",
            "--sandbox",
            "landlock",
            "--seccomp",
            "log",
            "--rlimit-nofile",
            "0",
        ]) else {
            panic!("not blk")
        };
        let cfg = args.config().expect("config");
        let expected = SandboxConfig { fs: FsSandbox::Landlock, seccomp: SeccompMode::Log, rlimit_nofile: None };
        assert_eq!(cfg.daemon.sandbox, expected);
        let kept = &cfg.daemon.device_paths[0];
        assert!(kept.path.is_absolute() && kept.path.ends_with("vm") && kept.access == Access::ReadWrite);
        assert!(cfg.disk.overlay.is_some_and(|o| o.is_absolute()));
    }
}
