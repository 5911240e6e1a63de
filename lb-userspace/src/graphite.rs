//! Graphite plaintext push, `<prefix>.<vip>.<backend>.<metric> <value> <ts>`,
//! from a task of its own: carbon being slow or away never stalls lbd, and
//! what waits for it is bounded (the oldest lines go first).

use std::{collections::VecDeque, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream, sync::mpsc};

use crate::{config::GraphiteConfig, metrics::VipTraffic};

/// A metric path component: Graphite splits on '.', so anything but
/// `[A-Za-z0-9_-]` becomes '_' (`198.18.100.1:80/tcp` -> `198_18_100_1_80_tcp`).
pub fn component(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The lines for one push. VIP totals go under the backend name `all`.
pub fn lines(prefix: &str, snapshot: &[VipTraffic], timestamp: u64) -> Vec<String> {
    let mut out = Vec::new();
    for v in snapshot {
        let vip = component(&v.vip);
        for (metric, value) in [
            ("packets", v.packets),
            ("bytes", v.bytes),
            ("new_flows", v.new_flows),
        ] {
            out.push(format!("{prefix}.{vip}.all.{metric} {value} {timestamp}"));
        }
        for b in &v.backends {
            let backend = component(&b.backend);
            let up = u64::from(b.up);
            for (metric, value) in [
                ("packets", b.packets),
                ("bytes", b.bytes),
                ("new_flows", b.new_flows),
                ("up", up),
                ("weight", b.weight as u64),
            ] {
                out.push(format!(
                    "{prefix}.{vip}.{backend}.{metric} {value} {timestamp}"
                ));
            }
        }
    }
    out
}

/// Hands batches to the pushing task; never blocks.
pub struct Pusher {
    tx: mpsc::Sender<Vec<String>>,
}

impl Pusher {
    pub fn spawn(cfg: GraphiteConfig) -> Pusher {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(push_loop(cfg, rx));
        Pusher { tx }
    }

    /// Queues a batch; if the task is still busy with earlier ones, this one
    /// is dropped (the next carries newer totals anyway).
    pub fn offer(&self, batch: Vec<String>) {
        let _ = self.tx.try_send(batch);
    }
}

async fn push_loop(cfg: GraphiteConfig, mut rx: mpsc::Receiver<Vec<String>>) {
    let mut buffer: VecDeque<String> = VecDeque::new();
    let mut conn: Option<TcpStream> = None;
    let mut dropped: u64 = 0;
    while let Some(batch) = rx.recv().await {
        buffer.extend(batch);
        while buffer.len() > cfg.max_buffered_lines {
            buffer.pop_front();
            dropped += 1;
        }
        if conn.is_none() {
            match tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(cfg.address))
                .await
            {
                Ok(Ok(s)) => {
                    tracing::info!(carbon = %cfg.address, buffered = buffer.len(), dropped, "connected to carbon");
                    conn = Some(s);
                }
                _ => {
                    tracing::debug!(carbon = %cfg.address, buffered = buffer.len(), "carbon unreachable; keeping lines");
                    continue;
                }
            }
        }
        let Some(s) = conn.as_mut() else { continue };
        let mut text = String::with_capacity(buffer.len() * 64);
        for l in &buffer {
            text.push_str(l);
            text.push('\n');
        }
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(text.as_bytes())).await {
            Ok(Ok(())) => buffer.clear(),
            _ => {
                tracing::warn!(carbon = %cfg.address, "carbon write failed; reconnecting on the next push");
                conn = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BackendState;
    use crate::metrics::BackendTraffic;

    #[test]
    fn paths_and_values() {
        let snap = vec![VipTraffic {
            vip: "198.18.100.1:80/tcp".into(),
            packets: 10,
            bytes: 1000,
            new_flows: 2,
            backends: vec![BackendTraffic {
                backend: "fd00:198:18::20".into(),
                state: BackendState::Draining,
                up: true,
                weight: 100,
                packets: 10,
                bytes: 1000,
                new_flows: 2,
            }],
        }];
        let l = lines("lb", &snap, 1700000000);
        assert!(l.contains(&"lb.198_18_100_1_80_tcp.all.packets 10 1700000000".to_owned()));
        // `up` is the health checks' verdict, as lb_backend_up: a drained
        // backend whose checks pass is up.
        assert!(l.contains(&"lb.198_18_100_1_80_tcp.fd00_198_18__20.up 1 1700000000".to_owned()));
        assert_eq!(l.len(), 3 + 5);
    }
}
