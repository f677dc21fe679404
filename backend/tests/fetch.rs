//! What a hostile HTTP store can make a remote do: every body is capped before it is read,
//! redirects are refused, a server that ignores Range is still served, the per-attempt
//! deadline grows with the bytes asked for, and failures keep their status and source.
//!
//! The server here is a few lines over a raw socket, so that it can lie in ways a real HTTP
//! server library would not let it (a Content-Length of gigabytes, a body that never ends).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use incfs::image::ImageId;
use incfs::store::{FetchError, FetchFailure, Remote};

/// One answer: status line, headers, then `body` sent `repeat` times, `pace` apart.
#[derive(Clone, Default)]
struct Reply {
    status: &'static str,
    headers: Vec<String>,
    body: Vec<u8>,
    repeat: usize,
    pace: Duration,
}

impl Reply {
    fn new(status: &'static str, headers: &[&str], body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: headers.iter().map(|h| h.to_string()).collect(),
            body,
            repeat: 1,
            ..Default::default()
        }
    }
}

type Handler = dyn Fn(&str) -> Reply + Send + Sync;

/// Answers every request with `handler(request head)`, one request per connection.
struct RawServer {
    url: String,
    /// Request lines, in order.
    requests: Arc<Mutex<Vec<String>>>,
    /// Body bytes written to sockets, all requests together.
    sent: Arc<AtomicU64>,
}

impl RawServer {
    fn start(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let handler: Arc<Handler> = Arc::new(handler);
        let (r, s) = (requests.clone(), sent.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (r, s, h) = (r.clone(), s.clone(), handler.clone());
                std::thread::spawn(move || serve(conn, &*h, &r, &s));
            }
        });
        RawServer { url, requests, sent }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

fn serve(mut conn: TcpStream, handler: &Handler, requests: &Mutex<Vec<String>>, sent: &AtomicU64) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    requests.lock().expect("lock").push(head.lines().next().unwrap_or_default().to_string());
    let reply = handler(&head);
    let mut out = format!("HTTP/1.1 {}\r\n", reply.status);
    for h in &reply.headers {
        out.push_str(&format!("{h}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    if conn.write_all(out.as_bytes()).is_err() {
        return;
    }
    for _ in 0..reply.repeat {
        if conn.write_all(&reply.body).is_err() {
            return;
        }
        sent.fetch_add(reply.body.len() as u64, Ordering::SeqCst);
        std::thread::sleep(reply.pace);
    }
}

/// The Range a request asked for, as (first, last).
fn range_of(head: &str) -> Option<(usize, usize)> {
    let v = head.lines().find_map(|l| l.strip_prefix("range: ").or_else(|| l.strip_prefix("Range: ")))?;
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

const BLOB: [u8; 32] = [0xab; 32];

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Gives the client time to drop the connection and the server's writes to fail.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_range_body_larger_than_asked_is_never_read_whole() {
    const HUGE: u64 = 256 << 20;
    let chunk = vec![0u8; 64 << 10];
    let repeat = (HUGE / chunk.len() as u64) as usize;
    // Content-Length says 256 MiB for a 4 KiB range; then the same with no length at all.
    for announced in [true, false] {
        let c = chunk.clone();
        let srv = RawServer::start(move |_| {
            let mut headers = vec!["Content-Range: bytes 0-4095/*".to_string()];
            if announced {
                headers.push(format!("Content-Length: {HUGE}"));
            }
            Reply { status: "206 Partial Content", headers, body: c.clone(), repeat, ..Default::default() }
        });
        let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
        let t = Instant::now();
        let r = rt().block_on(remote.range(&BLOB, 0, 4096));
        assert!(r.is_err(), "a 256 MiB answer to a 4 KiB range was accepted");
        settle();
        let sent = srv.sent();
        println!("announced={announced}: {:?} after {:?}, {sent} bytes pulled", r.map(|b| b.len()), t.elapsed());
        assert!(
            sent < 32 << 20,
            "the client read {sent} bytes of a body it should have cut off (announced={announced})"
        );
    }
}

#[test]
fn a_server_that_ignores_range_is_served_from_the_front_of_the_blob() {
    let blob = data(1 << 20);
    let b = blob.clone();
    let srv = RawServer::start(move |_| Reply::new("200 OK", &[&format!("Content-Length: {}", b.len())], b.clone()));
    let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
    let got = rt().block_on(remote.range(&BLOB, 5000, 3000)).expect("a 200 answer is sliced");
    assert!(got[..] == blob[5000..8000]);
}

#[test]
fn a_range_past_the_unranged_limit_fails_clearly_without_reading() {
    let srv = RawServer::start(|_| Reply {
        status: "200 OK",
        headers: vec![format!("Content-Length: {}", 64u64 << 20)],
        body: vec![0u8; 1 << 20],
        repeat: 64,
        ..Default::default()
    });
    let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
    let r = rt().block_on(remote.range(&BLOB, 40 << 20, 4096));
    let Err(FetchError::Permanent(e)) = r else { panic!("wanted a permanent error, got {:?}", r.map(|b| b.len())) };
    assert!(e.to_string().contains("ignored the Range"), "{e}");
    settle();
    assert!(srv.sent() < 32 << 20, "{} bytes pulled", srv.sent());
}

#[test]
fn redirects_are_not_followed() {
    let port = Arc::new(Mutex::new(String::new()));
    let p = port.clone();
    let srv = RawServer::start(move |head| {
        if head.starts_with("GET /elsewhere") {
            let (a, b) = range_of(head).unwrap_or((0, 0));
            let body = data(b + 1)[a..].to_vec();
            Reply::new(
                "206 Partial Content",
                &[&format!("Content-Length: {}", body.len()), &format!("Content-Range: bytes {a}-{b}/*")],
                body,
            )
        } else {
            let loc = format!("Location: {}/elsewhere", p.lock().expect("lock"));
            Reply::new("302 Found", &[&loc, "Content-Length: 0"], vec![])
        }
    });
    *port.lock().expect("lock") = srv.url.clone();
    let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
    let r = rt().block_on(remote.range(&BLOB, 0, 4096));
    assert!(matches!(r, Err(FetchError::Permanent(_))), "a redirect was followed: {:?}", r.map(|b| b.len()));
    assert_eq!(srv.requests().len(), 1, "{:?}", srv.requests());
}

#[test]
fn a_big_range_on_a_slow_link_may_take_longer_than_the_base_deadline() {
    // 1 MiB at about 1 MiB/s, with a base allowance of 300 ms.
    let srv = RawServer::start(|head| {
        let (a, b) = range_of(head).unwrap_or((0, 0));
        Reply {
            status: "206 Partial Content",
            headers: vec![format!("Content-Length: {}", b + 1 - a), format!("Content-Range: bytes {a}-{b}/*")],
            body: vec![7u8; (b + 1 - a) / 16],
            repeat: 16,
            pace: Duration::from_millis(60),
        }
    });
    let remote = Remote::open(&srv.url, Duration::from_millis(300)).expect("remote");
    let t = Instant::now();
    let got = rt().block_on(remote.range(&BLOB, 0, 1 << 20)).expect("a slow but moving transfer finishes");
    assert_eq!(got.len(), 1 << 20);
    assert!(t.elapsed() > Duration::from_millis(600), "the server was not slow: {:?}", t.elapsed());
}

#[test]
fn a_stalled_body_still_times_out() {
    let srv = RawServer::start(|_| Reply {
        status: "206 Partial Content",
        headers: vec!["Content-Length: 4096".into(), "Content-Range: bytes 0-4095/*".into()],
        body: vec![1u8; 100],
        repeat: 1,
        pace: Duration::from_secs(30),
    });
    let remote = Remote::open(&srv.url, Duration::from_millis(300)).expect("remote");
    let t = Instant::now();
    let r = rt().block_on(remote.range(&BLOB, 0, 4096));
    assert!(matches!(r, Err(FetchError::Transient(_))), "{:?}", r.map(|b| b.len()));
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
}

#[test]
fn a_published_trace_is_capped_and_need_not_be_utf8() {
    let mut body = b"f\xff\t0\t1\n".to_vec();
    body.extend(std::iter::repeat_n(b"x\t0\t1\n".as_slice(), (24 << 20) / 6).flatten());
    let len = body.len();
    let srv = RawServer::start(move |_| Reply::new("200 OK", &[&format!("Content-Length: {len}")], body.clone()));
    let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
    let text = rt().block_on(remote.trace(&ImageId([1; 32]))).expect("a trace is a hint").expect("a trace");
    assert!(text.starts_with("f\u{fffd}\t0\t1\n"));
    assert!(text.len() <= incfs::trace::MAX_TRACE_BYTES + 16, "{} bytes kept", text.len());
}

#[test]
fn a_manifest_that_is_not_the_images_is_refused_by_the_remote() {
    // A zstd bomb: 64 MiB of zeros in a few KiB, served as the manifest.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).expect("compress");
    let srv =
        RawServer::start(move |_| Reply::new("200 OK", &[&format!("Content-Length: {}", bomb.len())], bomb.clone()));
    let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
    let r = rt().block_on(remote.manifest(&ImageId([1; 32])));
    let Err(FetchError::Permanent(e)) = r else {
        panic!("a manifest that is not the image's came back: {:?}", r.map(|b| b.len()))
    };
    assert!(e.to_string().contains("hashes to"), "{e}");
}

#[test]
fn a_manifest_larger_than_the_cap_is_refused_unread() {
    // Over HTTP: a Content-Length past the cap is refused before the body is read.
    let srv = RawServer::start(|_| Reply {
        status: "200 OK",
        headers: vec![format!("Content-Length: {}", 3u64 << 30)],
        body: vec![0u8; 1 << 20],
        repeat: 3 << 10,
        ..Default::default()
    });
    let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
    let r = rt().block_on(remote.manifest(&ImageId([1; 32])));
    let Err(FetchError::Permanent(e)) = r else { panic!("wanted a permanent error, got {:?}", r.map(|b| b.len())) };
    assert!(matches!(e, FetchFailure::TooLarge { .. }), "{e}");
    settle();
    assert!(srv.sent() < 32 << 20, "{} bytes pulled", srv.sent());
    // In a store directory: a (sparse) file past the cap is refused by its size.
    let store = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(store.path().join("images")).expect("mkdir");
    let id = ImageId([2; 32]);
    let f = std::fs::File::create(store.path().join("images").join(id.to_string())).expect("create");
    f.set_len(incfs::store::MANIFEST_FETCH_MAX + 1).expect("sparse file");
    let remote = Remote::open(store.path().to_str().expect("utf8"), Duration::from_secs(5)).expect("remote");
    let t = Instant::now();
    let r = rt().block_on(remote.manifest(&id));
    assert!(matches!(r, Err(FetchError::Permanent(FetchFailure::TooLarge { .. }))), "{:?}", r.map(|b| b.len()));
    assert!(t.elapsed() < Duration::from_secs(2), "read it? {:?}", t.elapsed());
}

#[test]
fn fetch_errors_keep_the_status_and_the_source() {
    use std::error::Error as _;
    let srv = RawServer::start(|head| {
        let status = if head.contains("/blobs/") { "503 Service Unavailable" } else { "404 Not Found" };
        Reply::new(status, &["Content-Length: 0"], vec![])
    });
    let remote = Remote::open(&srv.url, Duration::from_secs(5)).expect("remote");
    let rt = rt();
    let Err(FetchError::Transient(e)) = rt.block_on(remote.range(&BLOB, 0, 10)) else { panic!("503 is transient") };
    assert_eq!(e.status(), Some(reqwest::StatusCode::SERVICE_UNAVAILABLE));
    let Err(FetchError::Permanent(e)) = rt.block_on(remote.manifest(&ImageId([1; 32]))) else {
        panic!("404 is permanent")
    };
    assert_eq!(e.status(), Some(reqwest::StatusCode::NOT_FOUND));
    // A transport failure keeps the reqwest error as its source, through clones and into the
    // crate's error.
    let dead = Remote::open(&format!("http://127.0.0.1:{}", free_port()), Duration::from_secs(5)).expect("remote");
    let Err(FetchError::Transient(e)) = rt.block_on(dead.range(&BLOB, 0, 10)) else { panic!("refused is transient") };
    let copy = e.clone();
    assert!(matches!(copy, FetchFailure::Http { .. }), "{copy}");
    assert!(copy.source().is_some_and(|s| s.is::<Arc<reqwest::Error>>()), "{copy:?}");
    let err = incfs::Error::from(copy);
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.source().is_some_and(|s| s.is::<FetchFailure>()));
    // A store directory's read error keeps the io::Error.
    let store = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(store.path().join("images")).expect("mkdir");
    let local = Remote::open(store.path().to_str().expect("utf8"), Duration::from_secs(5)).expect("remote");
    let Err(FetchError::Permanent(e)) = rt.block_on(local.range(&BLOB, 0, 10)) else { panic!("no blob") };
    let io = e.source().and_then(|s| s.downcast_ref::<Arc<std::io::Error>>()).expect("io source");
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}
