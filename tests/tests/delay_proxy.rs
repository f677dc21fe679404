//! The emulated link of `delay-proxy` (tests/src/bin/delay-proxy.rs): a bulk transfer takes
//! its serialization time, a small request/response takes one round trip, and any number of
//! connections share one link's rate.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proxy {
    child: Child,
    port: u16,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn proxy(to: u16, rtt_ms: u32, mbit: u32) -> Proxy {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_delay-proxy"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--to", &format!("127.0.0.1:{to}")])
        .args(["--rtt-ms", &rtt_ms.to_string(), "--mbit", &mbit.to_string()])
        .stderr(Stdio::null())
        .spawn()
        .expect("start delay-proxy");
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "delay-proxy did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    Proxy { child, port }
}

/// A server that, per connection, answers each 1-byte request `n` with `n` MiB... or with
/// one byte for request 0 (ping).
fn server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).is_ok() {
                    let len = if b[0] == 0 { 1 } else { b[0] as usize * 1_000_000 };
                    let data = vec![0xa5u8; len];
                    if s.write_all(&data).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Sends request `n` and reads the whole answer; returns the elapsed time.
fn exchange(s: &mut TcpStream, n: u8) -> Duration {
    let len = if n == 0 { 1 } else { n as usize * 1_000_000 };
    let t = Instant::now();
    s.write_all(&[n]).expect("send");
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).expect("receive");
    assert!(buf.iter().all(|&b| b == 0xa5));
    t.elapsed()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to proxy");
    s.set_nodelay(true).expect("nodelay");
    s
}

#[test]
fn small_exchange_takes_one_round_trip() {
    let p = proxy(server(), 20, 100);
    let mut s = connect(p.port);
    exchange(&mut s, 0); // connection set-up
    let mut times: Vec<f64> = (0..10).map(|_| exchange(&mut s, 0).as_secs_f64() * 1000.0).collect();
    times.sort_by(f64::total_cmp);
    let median = times[5];
    eprintln!("ping over 20 ms RTT: median {median:.1} ms, all {times:?}");
    assert!((19.5..25.0).contains(&median), "median round trip {median:.1} ms, want about 20");
}

#[test]
fn bulk_transfer_takes_its_serialization_time() {
    let p = proxy(server(), 20, 100);
    let mut s = connect(p.port);
    exchange(&mut s, 0);
    // 10 MB at 100 Mbit/s: 0.8 s on the wire, plus one round trip.
    let t = exchange(&mut s, 10).as_secs_f64();
    eprintln!("10 MB over 100 Mbit/s, 20 ms RTT: {t:.3} s ({:.1} Mbit/s)", 80.0 / t);
    assert!((0.78..0.95).contains(&t), "10 MB took {t:.3} s, want about 0.82");
}

/// `n` connections each transferring `mb` MB at once; the wall time of all of them.
fn parallel(port: u16, n: usize, mb: u8) -> f64 {
    let t = Instant::now();
    let hs: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = connect(port);
                exchange(&mut s, mb)
            })
        })
        .collect();
    for h in hs {
        h.join().expect("transfer thread");
    }
    t.elapsed().as_secs_f64()
}

#[test]
fn connections_share_one_link() {
    let p = proxy(server(), 20, 100);
    let t = parallel(p.port, 2, 5);
    eprintln!("2 x 5 MB at once over one 100 Mbit/s link: {t:.3} s");
    assert!((0.78..1.0).contains(&t), "2 x 5 MB took {t:.3} s, want about 0.84 (one shared link)");
}

/// Many connections buy no bandwidth: 8 MB over 8 connections take as long as over one
/// (0.64 s on the wire at 100 Mbit/s), not an eighth of it.
#[test]
fn many_connections_buy_no_bandwidth() {
    let p = proxy(server(), 20, 100);
    let t = parallel(p.port, 8, 1);
    eprintln!("8 x 1 MB at once over one 100 Mbit/s link: {t:.3} s ({:.1} Mbit/s)", 64.0 / t);
    assert!((0.62..0.85).contains(&t), "8 x 1 MB took {t:.3} s, want about 0.66 (one shared link)");
}
