//! `incfs-guest`: the pending-read interface of a virtio-incfs mount, from a guest shell.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use incfs_guest::{Error, Mount, ReadRecord, RecordReader};
use incfs_wire::file_id_to_hex;

#[derive(Parser)]
#[command(
    name = "incfs-guest",
    version,
    about = "Pending reads, read log, fill state and block supply on a virtio-incfs mount"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Reads waiting for missing blocks, one a line.
    Pending {
        mount: PathBuf,
        /// Keep printing new pending reads until killed.
        #[arg(long)]
        follow: bool,
        /// Wait this long for the first record(s) (0: what is pending now).
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
    },
    /// The read log: every block read, one a line.
    Log {
        mount: PathBuf,
        #[arg(long)]
        follow: bool,
        #[arg(long, default_value_t = 0)]
        timeout_ms: u64,
    },
    /// Counters of the mount, or the fill state of one file.
    Status { mount: PathBuf, path: Option<PathBuf> },
    /// Print a file's incfs id.
    Id { mount: PathBuf, path: PathBuf },
    /// Supply the missing blocks of PATH from a local copy; the host verifies every block.
    Fill {
        mount: PathBuf,
        path: PathBuf,
        #[arg(long)]
        from: PathBuf,
        /// Only these blocks (repeatable); default: every missing block.
        #[arg(long)]
        block: Vec<u32>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("incfs-guest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn line(m: &Mount, r: &ReadRecord) -> String {
    let path = m
        .path_of(&r.file_id)
        .map(|p| p.strip_prefix(m.root()).map(|q| q.display().to_string()).unwrap_or_else(|_| p.display().to_string()));
    format!(
        "file_id={} block={} serial={} timestamp_us={} uid={} path={}",
        file_id_to_hex(&r.file_id),
        r.block,
        r.serial,
        r.timestamp_us,
        r.uid,
        path.as_deref().unwrap_or("?")
    )
}

fn records(m: &Mount, mut reader: RecordReader, follow: bool, timeout_ms: u64) -> Result<(), Error> {
    use std::io::Write;
    let mut first = true;
    loop {
        let wait = if first { Duration::from_millis(timeout_ms) } else { Duration::ZERO };
        let recs = reader.wait(if follow && !first { Duration::from_secs(60) } else { wait }, 256)?;
        let mut out = std::io::stdout().lock();
        for r in &recs {
            let _ = writeln!(out, "{}", line(m, r));
        }
        let _ = out.flush();
        first = false;
        if !follow && (recs.is_empty() || recs.len() < 256) {
            return Ok(());
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.cmd {
        Cmd::Pending { mount, follow, timeout_ms } => {
            let m = Mount::open(&mount)?;
            records(&m, m.pending_reads()?, follow, timeout_ms)
        }
        Cmd::Log { mount, follow, timeout_ms } => {
            let m = Mount::open(&mount)?;
            records(&m, m.read_log()?, follow, timeout_ms)
        }
        Cmd::Status { mount, path: None } => {
            let m = Mount::open(&mount)?;
            println!("blocks_written {}", m.blocks_written()?);
            for (k, v) in m.stats()? {
                println!("{k} {v}");
            }
            println!("incomplete_files {}", m.incomplete_files()?.len());
            let e = m.last_read_error()?;
            if e.errno != 0 {
                println!(
                    "last_read_error file_id={} block={} errno={} ({}) uid={} time_us={}",
                    file_id_to_hex(&e.file_id),
                    e.block,
                    e.errno,
                    std::io::Error::from_raw_os_error(e.errno as i32),
                    e.uid,
                    e.time_us
                );
            }
            Ok(())
        }
        Cmd::Status { mount, path: Some(p) } => {
            let m = Mount::open(&mount)?;
            let id = m.file_id(&p)?;
            let s = m.file_state(&id)?;
            let ranges: Vec<String> = s.ranges.iter().map(|(b, e)| format!("{b}-{e}")).collect();
            println!(
                "file_id={} size={} blocks={}/{} fully_loaded={} ranges={}",
                file_id_to_hex(&id),
                s.size,
                s.filled_blocks,
                s.total_blocks,
                if s.fully_loaded { "yes" } else { "no" },
                if ranges.is_empty() { "-".to_string() } else { ranges.join(",") }
            );
            Ok(())
        }
        Cmd::Id { mount, path } => {
            let m = Mount::open(&mount)?;
            println!("{}", file_id_to_hex(&m.file_id(&path)?));
            Ok(())
        }
        Cmd::Fill { mount, path, from, block } => {
            let m = Mount::open(&mount)?;
            let only = (!block.is_empty()).then_some(block.as_slice());
            let n = m.fill_from_copy(&path, &from, only)?;
            println!("filled {n} blocks of {}", path.display());
            Ok(())
        }
    }
}
