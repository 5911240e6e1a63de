//! lbd's control socket as a client meets it: any bytes written to the real
//! server (`api::server::serve`, hyper with lbd's limits) over a real unix
//! socket. The server never panics and always either answers with an HTTP
//! status line or closes; a connection reaches the main loop at most once,
//! whatever else it carries (a second, pipelined or smuggled request must
//! never be handled); what reaches it is a request hyper framed (a method
//! token, a target, a body within the cap) and its answer is the main
//! loop's.
#![no_main]

use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use lb_userspace::api::{
    http::{MAX_BODY, Request},
    server::{self, ApiCall},
};
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use tokio::sync::mpsc;

/// The main loop's status for every call, so its answers are told apart
/// from the server's own refusals.
const HANDLED: u16 = 299;

struct Server {
    socket: PathBuf,
    calls: Mutex<std::sync::mpsc::Receiver<Request>>,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lb-fuzz-http-{}", std::process::id()));
        let socket = dir.join("lbd.sock");
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = socket.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                let listener = server::bind(&path).expect("binding the control socket");
                let (calls_tx, mut calls_rx) = mpsc::channel::<ApiCall>(16);
                tokio::spawn(server::serve(listener, calls_tx));
                ready_tx.send(()).expect("the harness waits");
                // The main loop: records each request and answers it.
                while let Some(call) = calls_rx.recv().await {
                    let _ = seen_tx.send(call.request);
                    let _ = call.reply.send((HANDLED, json!({"handled": true})));
                }
            });
        });
        ready_rx.recv().expect("the server started");
        Server {
            socket,
            calls: Mutex::new(seen_rx),
        }
    })
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let text = std::str::from_utf8(line).ok()?;
    // hyper answers an HTTP/1.0 request in 1.0.
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))?
        .get(..3)?;
    code.parse().ok()
}

fuzz_target!(|data: &[u8]| {
    let s = server();
    let calls = s.calls.lock().expect("one input at a time");
    let mut conn = UnixStream::connect(&s.socket).expect("the server accepts");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a timeout");
    // The server may answer and close before reading everything (a refused
    // head): a write cut short is the client's problem, not a finding.
    match conn.write_all(data) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {}
        Err(e) => panic!("writing the request: {e}"),
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    match conn.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading the answer: {e} (after {} bytes)", answer.len()),
    }

    let handled: Vec<Request> = calls.try_iter().collect();
    assert!(
        handled.len() <= 1,
        "one connection reached the main loop {} times: {handled:?}",
        handled.len()
    );
    let status = if answer.is_empty() {
        None
    } else {
        Some(status_of(&answer).unwrap_or_else(|| {
            panic!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(200)])
            )
        }))
    };
    match handled.first() {
        Some(req) => {
            assert_eq!(
                status,
                Some(HANDLED),
                "a handled request gets the main loop's answer"
            );
            assert!(!req.method.is_empty() && req.method.bytes().all(|b| b.is_ascii_graphic()));
            assert!(!req.path.is_empty(), "{req:?}");
            assert!(req.body.len() <= MAX_BODY);
        }
        None => {
            if let Some(status) = status {
                assert!(
                    (400..600).contains(&status),
                    "an unhandled request answered {status}"
                );
            }
        }
    }
});
