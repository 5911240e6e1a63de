//! The test server run by `lb-testserver` in backend namespaces: HTTP that
//! answers every GET with the server's name (so a test sees which backend
//! served it), `/health` for health checks, `/stats` with its counters, and
//! a UDP echo that prefixes the name.

mod http;
mod socket;
mod udp;

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use anyhow::{Context, Result, bail};

/// Counters of what the server answered.
#[derive(Debug, Default)]
pub struct Stats {
    /// GETs answered with the name (not /health or /stats).
    pub http_requests: AtomicU64,
    pub udp_datagrams: AtomicU64,
}

impl Stats {
    /// The `/stats` body.
    pub fn json(&self, name: &str) -> String {
        serde_json::json!({
            "name": name,
            "http_requests": self.http_requests.load(Ordering::Relaxed),
            "udp_datagrams": self.udp_datagrams.load(Ordering::Relaxed),
        })
        .to_string()
    }
}

/// What to serve and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    pub http: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
}

pub const USAGE: &str =
    "usage: lb-testserver --name NAME [--http ADDR:PORT]... [--udp ADDR:PORT]...
  ADDR:PORT is 1.2.3.4:80 or [::]:80; --http and --udp may repeat.
  Prints {\"event\":\"listening\",...} on stdout once every socket is bound.";

impl Config {
    /// Parses the command line (without the program name).
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Config> {
        let mut name = None;
        let (mut http, mut udp) = (Vec::new(), Vec::new());
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--name" => name = Some(value()?),
                "--http" | "--udp" => {
                    let v = value()?;
                    let addr: SocketAddr = v.parse().with_context(|| {
                        format!("{flag} {v:?}: expected ADDR:PORT or [ADDR]:PORT")
                    })?;
                    if flag == "--http" {
                        &mut http
                    } else {
                        &mut udp
                    }
                    .push(addr);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        let name = name.context("--name is required")?;
        if name.is_empty() || name.contains(|c: char| c.is_control()) {
            bail!("--name must be non-empty printable text");
        }
        if http.is_empty() && udp.is_empty() {
            bail!("nothing to serve: give --http and/or --udp");
        }
        Ok(Config { name, http, udp })
    }
}

/// The bound sockets, ready to serve.
pub struct Server {
    name: Arc<str>,
    http: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
    stats: Arc<Stats>,
}

impl Server {
    /// Binds every address of `cfg`; fails on the first that cannot be.
    pub fn bind(cfg: &Config) -> Result<Server> {
        Ok(Server {
            name: cfg.name.as_str().into(),
            http: cfg
                .http
                .iter()
                .map(|&a| socket::tcp_listener(a))
                .collect::<Result<_>>()?,
            udp: cfg
                .udp
                .iter()
                .map(|&a| socket::udp_socket(a))
                .collect::<Result<_>>()?,
            stats: Arc::default(),
        })
    }

    /// Counters, shared with the serving threads.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The `{"event":"listening",...}` line, with the bound addresses (so
    /// port 0 shows the port the kernel picked).
    pub fn listening_line(&self) -> Result<String> {
        let http = self
            .http
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let udp = self
            .udp
            .iter()
            .map(|s| s.local_addr().map(|a| a.to_string()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(serde_json::json!({
            "event": "listening",
            "name": &*self.name,
            "pid": std::process::id(),
            "http": http,
            "udp": udp,
        })
        .to_string())
    }

    /// Serves on every socket until the process is killed.
    pub fn serve(self) -> Result<()> {
        let mut threads = Vec::new();
        for l in self.http {
            let (name, stats) = (self.name.clone(), self.stats.clone());
            threads.push(
                thread::Builder::new()
                    .name("http-accept".into())
                    .spawn(move || http::serve(l, name, stats))?,
            );
        }
        for s in self.udp {
            let (name, stats) = (self.name.clone(), self.stats.clone());
            threads.push(
                thread::Builder::new()
                    .name("udp".into())
                    .spawn(move || udp::serve(s, &name, &stats))?,
            );
        }
        for t in threads {
            if t.join().is_err() {
                bail!("a serving thread panicked");
            }
        }
        Ok(())
    }
}

/// `lb-testserver`'s main: bind, announce, serve.
pub fn main_with_args(args: impl IntoIterator<Item = String>) -> Result<()> {
    let cfg = Config::from_args(args)?;
    let server = Server::bind(&cfg)?;
    let line = server.listening_line()?;
    // The harness waits for this line; a closed stdout must not kill us.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
    drop(out);
    server.serve()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::client::{HttpConn, http_get, udp_echo};

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_args() {
        let c = Config::from_args(args(
            "--name b0 --http 0.0.0.0:80 --http [::]:80 --udp [::1]:9",
        ))
        .unwrap();
        assert_eq!(c.name, "b0");
        assert_eq!(c.http.len(), 2);
        assert_eq!(c.udp, vec!["[::1]:9".parse().unwrap()]);
        assert!(Config::from_args(args("--http 0.0.0.0:80")).is_err());
        assert!(Config::from_args(args("--name x")).is_err());
        assert!(Config::from_args(args("--name x --http nope")).is_err());
        assert!(Config::from_args(args("--name x --http")).is_err());
        assert!(Config::from_args(args("--name x --bogus 1")).is_err());
    }

    /// The whole server on loopback, in-process: no root needed.
    #[test]
    fn serves_http_and_udp_on_loopback() {
        let cfg = Config::from_args(args(
            "--name srv --http 127.0.0.1:0 --http [::1]:0 --udp 127.0.0.1:0",
        ))
        .unwrap();
        let server = Server::bind(&cfg).unwrap();
        let line: serde_json::Value =
            serde_json::from_str(&server.listening_line().unwrap()).unwrap();
        assert_eq!(line["event"], "listening");
        let addr =
            |k: &str, i: usize| -> SocketAddr { line[k][i].as_str().unwrap().parse().unwrap() };
        let (h4, h6, u4) = (addr("http", 0), addr("http", 1), addr("udp", 0));
        let stats = server.stats();
        // Serving threads run until the test process exits.
        thread::spawn(move || server.serve());
        let t = Duration::from_secs(5);

        assert_eq!(http_get(h4, "/", t).unwrap(), "srv\n");
        assert_eq!(http_get(h6, "/x?y", t).unwrap(), "srv\n");
        assert_eq!(http_get(h4, "/health", t).unwrap(), "ok");

        let mut conn = HttpConn::connect(h4, t).unwrap();
        for _ in 0..3 {
            let r = conn.get("/").unwrap();
            assert_eq!((r.status, r.text().as_str()), (200, "srv\n"));
        }
        assert_eq!(conn.request("POST", "/", true).unwrap().status, 405);
        assert!(conn.is_open());
        assert_eq!(stats.http_requests.load(Ordering::Relaxed), 5);

        // Garbage gets a 400 and a close, and the server lives on.
        let mut raw = std::net::TcpStream::connect(h4).unwrap();
        raw.set_read_timeout(Some(t)).unwrap();
        raw.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut resp = String::new();
        std::io::Read::read_to_string(&mut raw, &mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert_eq!(http_get(h4, "/", t).unwrap(), "srv\n");

        assert_eq!(udp_echo(u4, b"ping", t).unwrap(), b"srv:ping");
        let body = http_get(h4, "/stats", t).unwrap();
        let s: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(s["http_requests"], 6);
        assert_eq!(s["udp_datagrams"], 1);
    }
}
