//! Reading lbd's `/metrics` from inside a topology namespace: the LB's, or
//! a backend's.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{Topology, in_netns};

/// `GET /metrics` from lbd's `metrics_listen` address `addr`, inside the
/// LB's namespace: the exposition's body.
pub fn scrape(t: &Topology, addr: &str) -> Result<String> {
    scrape_in(t.lb().ns(), addr)
}

/// [`scrape`] inside namespace `ns` (a backend's lbd, say).
pub fn scrape_in(ns: &str, addr: &str) -> Result<String> {
    let addr = addr.to_owned();
    in_netns(ns, move || -> Result<String> {
        let mut s = TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no end of the head")?;
        if !head.starts_with("HTTP/1.1 200") || !head.contains("text/plain; version=0.0.4") {
            bail!("unexpected answer head: {head}");
        }
        Ok(body.to_owned())
    })?
}

/// The value of the sample whose name and labels are exactly these.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<u64> {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}
