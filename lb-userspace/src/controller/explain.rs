//! `lbctl explain`: the per-packet policy run over a read-only snapshot of
//! the live maps.

use std::net::SocketAddr;

use lb_common::maps::FlowKey;

use super::{AdminError, Controller};
use crate::{
    api::Explanation,
    config::{VipSpec, vip::addr16},
};

impl Controller {
    /// What the data plane would do now with a packet of `client`'s flow to
    /// `vip` (a SYN when `syn`), and why: `lb_common::policy::decide` over a
    /// read-only snapshot of the live maps, the rules the data plane runs.
    pub fn explain(
        &self,
        vip: &VipSpec,
        client: SocketAddr,
        syn: bool,
    ) -> Result<Explanation, AdminError> {
        use lb_common::{
            policy::{Kind, Verdict},
            wire::tcp::{TCP_ACK, TCP_SYN},
        };
        self.vip_index(vip)?;
        if client.is_ipv6() != vip.is_ipv6() {
            return Err(AdminError::Invalid(format!(
                "client {client} and VIP {vip} are of different address families"
            )));
        }
        let (src, family) = addr16(client.ip());
        let key = FlowKey {
            src,
            dst: addr16(vip.addr).0,
            src_port: client.port(),
            dst_port: vip.port,
            proto: vip.proto.number(),
            family: family.wire(),
            _pad: [0; 2],
        };
        let (kind, packet) = match vip.proto {
            crate::config::vip::Proto::Udp => (Kind::Udp, "udp"),
            crate::config::vip::Proto::Tcp if syn => (Kind::Tcp { flags: TCP_SYN }, "syn"),
            crate::config::vip::Proto::Tcp => (Kind::Tcp { flags: TCP_ACK }, "ack"),
        };
        let snapshot = crate::snapshot::Snapshot::new(&self.ebpf, key)?;
        let d = snapshot.decide(kind)?;
        let via = d.via.map(|v| v.label().to_owned());
        let mut out = Explanation {
            vip: vip.to_string(),
            client,
            packet: packet.into(),
            verdict: String::new(),
            backend: None,
            backend_id: None,
            backend_state: None,
            via,
            reason: String::new(),
        };
        match d.verdict {
            Verdict::Forward(f) => {
                let b = f.backend;
                out.verdict = "forward".into();
                out.backend = Some(crate::config::vip::ip_of(&b.addr, b.family()));
                out.backend_id = Some(f.backend_id);
                out.backend_state = Some(b.state().label().into());
                let how = d.via.map(|v| v.describe()).unwrap_or_default();
                out.reason = match snapshot.cache_cpu() {
                    Some(cpu) => format!("{how} (CPU {cpu})"),
                    None => how.to_owned(),
                };
            }
            Verdict::Drop(c) => {
                out.verdict = "drop".into();
                out.reason = match c {
                    lb_common::stats::Counter::LbNoBackend => {
                        "no backend: the VIP's ring is empty (no backend is up)".into()
                    }
                    other => format!("dropped ({})", other.name()),
                };
            }
            Verdict::Pass(c) => {
                out.verdict = "pass".into();
                out.reason = format!("passed to the kernel ({})", c.name());
            }
        }
        Ok(out)
    }
}
