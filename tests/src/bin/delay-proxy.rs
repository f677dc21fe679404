//! A TCP proxy on loopback that behaves like a slow network link, for benchmarks (this
//! kernel has no tc netem).
//!
//! ```text
//! delay-proxy --listen ADDR --to ADDR [--rtt-ms 20] [--mbit 100] [--queue-ms 50] [--stats ADDR]
//! ```
//!
//! Model: one link per direction (client->server "up", server->client "down"), shared by all
//! connections, like one access link. A chunk of bytes read from a socket at time `t` starts
//! transmission at `max(t, link free)`, takes `bytes * 8 / rate` on the wire (serialization),
//! and is delivered `rtt/2` after that. Per connection and direction, chunks are delivered in
//! order. A reader stops reading while its link is booked more than `--queue-ms` ahead (the
//! router's queue), so the sender sees back-pressure through TCP and memory stays bounded by
//! about `rate * (rtt/2 + queue)` per direction plus one read buffer per connection.
//!
//! `--stats ADDR` serves plain text counters on any HTTP GET:
//! `up_bytes N`, `down_bytes N`, `connections N`, `active N`.
//! The proxy prints `delay-proxy: listening on ADDR` on stderr once it accepts connections.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest chunk read at once: 16 KiB is 1.3 ms at 100 Mbit/s, fine-grained enough to pace.
const CHUNK: usize = 16 * 1024;

struct Link {
    /// When the wire is next free.
    free_at: Mutex<Instant>,
    /// Nanoseconds of serialization per byte (0 = unlimited).
    ns_per_byte: f64,
    delay: Duration,
    queue: Duration,
    bytes: AtomicU64,
}

impl Link {
    /// Books `n` bytes read at `now`; returns when they arrive at the other end and how long
    /// the reader should wait before reading more (queue full).
    fn book(&self, n: usize, now: Instant) -> (Instant, Option<Instant>) {
        self.bytes.fetch_add(n as u64, Relaxed);
        let wire = Duration::from_nanos((n as f64 * self.ns_per_byte) as u64);
        let mut free = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*free).max(now);
        let done = start + wire;
        *free = done;
        let pause = if done > now + self.queue { Some(done - self.queue) } else { None };
        (done + self.delay, pause)
    }
}

struct Stats {
    connections: AtomicU64,
    active: AtomicU64,
}

struct Args {
    listen: String,
    to: String,
    rtt_ms: f64,
    mbit: f64,
    queue_ms: f64,
    stats: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a =
        Args { listen: String::new(), to: String::new(), rtt_ms: 20.0, mbit: 100.0, queue_ms: 50.0, stats: None };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--listen" => a.listen = v()?,
            "--to" => a.to = v()?,
            "--rtt-ms" => a.rtt_ms = v()?.parse().map_err(|e| format!("--rtt-ms: {e}"))?,
            "--mbit" => a.mbit = v()?.parse().map_err(|e| format!("--mbit: {e}"))?,
            "--queue-ms" => a.queue_ms = v()?.parse().map_err(|e| format!("--queue-ms: {e}"))?,
            "--stats" => a.stats = Some(v()?),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.listen.is_empty() || a.to.is_empty() {
        return Err("--listen and --to are required".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("delay-proxy: {e}\nusage: delay-proxy --listen ADDR --to ADDR [--rtt-ms 20] [--mbit 100] [--queue-ms 50] [--stats ADDR]");
            return ExitCode::from(2);
        }
    };
    let ns_per_byte = if args.mbit > 0.0 { 8.0 * 1000.0 / args.mbit } else { 0.0 };
    let link = |_: &str| {
        Arc::new(Link {
            free_at: Mutex::new(Instant::now()),
            ns_per_byte,
            delay: Duration::from_secs_f64(args.rtt_ms / 2000.0),
            queue: Duration::from_secs_f64(args.queue_ms / 1000.0),
            bytes: AtomicU64::new(0),
        })
    };
    let (up, down) = (link("up"), link("down"));
    let stats = Arc::new(Stats { connections: AtomicU64::new(0), active: AtomicU64::new(0) });
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("delay-proxy: bind {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = &args.stats {
        let l = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("delay-proxy: bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let (up, down, stats) = (up.clone(), down.clone(), stats.clone());
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.read(&mut buf);
                let body = format!(
                    "up_bytes {}\ndown_bytes {}\nconnections {}\nactive {}\n",
                    up.bytes.load(Relaxed),
                    down.bytes.load(Relaxed),
                    stats.connections.load(Relaxed),
                    stats.active.load(Relaxed)
                );
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
    }
    let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    eprintln!(
        "delay-proxy: listening on {local} -> {} (rtt {} ms, {} Mbit/s, queue {} ms)",
        args.to, args.rtt_ms, args.mbit, args.queue_ms
    );
    for client in listener.incoming() {
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                eprintln!("delay-proxy: accept: {e}");
                continue;
            }
        };
        let (to, up, down, stats) = (args.to.clone(), up.clone(), down.clone(), stats.clone());
        std::thread::spawn(move || {
            let server = match connect(&to) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("delay-proxy: connect {to}: {e}");
                    return;
                }
            };
            stats.connections.fetch_add(1, Relaxed);
            stats.active.fetch_add(1, Relaxed);
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let pipes = [pipe(clone(&client), clone(&server), up), pipe(clone(&server), clone(&client), down)];
            for p in pipes.into_iter().flatten() {
                let _ = p.join();
            }
            stats.active.fetch_sub(1, Relaxed);
        });
    }
    ExitCode::SUCCESS
}

fn connect(to: &str) -> std::io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(to)?.collect();
    TcpStream::connect(&addrs[..])
}

fn clone(s: &TcpStream) -> Option<TcpStream> {
    s.try_clone().ok()
}

/// One direction of one connection: a reader that books the link, a writer that delivers
/// on time. Returns the writer's handle (the reader ends first or together).
fn pipe(from: Option<TcpStream>, to: Option<TcpStream>, link: Arc<Link>) -> Option<std::thread::JoinHandle<()>> {
    let (mut from, mut to) = (from?, to?);
    // None marks end of stream (or a read error): the writer half-closes.
    let (tx, rx) = mpsc::channel::<Option<(Instant, Vec<u8>)>>();
    let reader_from = from.try_clone().ok();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let (deliver, pause) = link.book(n, Instant::now());
            if tx.send(Some((deliver, buf[..n].to_vec()))).is_err() {
                break;
            }
            if let Some(until) = pause {
                sleep_until(until);
            }
        }
        let _ = tx.send(None);
    });
    Some(std::thread::spawn(move || {
        let mut ok = true;
        while let Ok(msg) = rx.recv() {
            match msg {
                Some((deliver, data)) => {
                    sleep_until(deliver);
                    if ok && to.write_all(&data).is_err() {
                        // The receiver is gone: stop the sender too.
                        ok = false;
                        if let Some(f) = &reader_from {
                            let _ = f.shutdown(Shutdown::Read);
                        }
                    }
                }
                None => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = reader.join();
    }))
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}
