//! Builds well-formed test frames (valid checksums) for host, kernel and
//! end-to-end tests, so each test states only what differs.

use std::vec::Vec;

use crate::csum;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0xc6, 0x12, 0x00, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0xc6, 0x12, 0x00, 0x02];

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
    },
    Raw {
        proto: u8,
        payload_len: usize,
    },
}

#[derive(Clone, Debug)]
pub struct FrameSpec {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    /// 4 bytes for IPv4, 16 for IPv6.
    pub src_ip: Vec<u8>,
    pub dst_ip: Vec<u8>,
    pub ttl: u8,
    pub tos: u8,
    /// IPv4 option bytes (multiple of 4, filled with NOPs).
    pub ipv4_options: usize,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl FrameSpec {
    fn base(src: &[u8], dst: &[u8], l4: L4) -> Self {
        FrameSpec {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            vlan: None,
            src_ip: src.to_vec(),
            dst_ip: dst.to_vec(),
            ttl: 64,
            tos: 0,
            ipv4_options: 0,
            l4,
            payload: b"hello".to_vec(),
        }
    }
    pub fn v4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Self {
        Self::base(
            &src,
            &dst,
            L4::Tcp {
                src_port: sport,
                dst_port: dport,
                flags: crate::wire::tcp::TCP_SYN,
            },
        )
    }
    pub fn v4_udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Self {
        Self::base(
            &src,
            &dst,
            L4::Udp {
                src_port: sport,
                dst_port: dport,
            },
        )
    }
    pub fn v6_tcp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Self {
        Self::base(
            &src,
            &dst,
            L4::Tcp {
                src_port: sport,
                dst_port: dport,
                flags: crate::wire::tcp::TCP_SYN,
            },
        )
    }
    pub fn v6_udp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Self {
        Self::base(
            &src,
            &dst,
            L4::Udp {
                src_port: sport,
                dst_port: dport,
            },
        )
    }
    pub fn is_ipv6(&self) -> bool {
        self.src_ip.len() == 16
    }
}

/// `fd00:198:18::<n>`, the test topology's IPv6 host range.
pub fn v6(n: u16) -> [u8; 16] {
    let mut a = [
        0xfd, 0x00, 0x01, 0x98, 0x00, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    a[14..].copy_from_slice(&n.to_be_bytes());
    a
}

/// `fd00:198:18:100::<n>`, the test topology's IPv6 VIP range.
pub fn v6_vip(n: u16) -> [u8; 16] {
    let mut a = v6(n);
    a[6..8].copy_from_slice(&0x0100u16.to_be_bytes());
    a
}

fn pseudo_header_sum(spec: &FrameSpec, proto: u8, l4_len: usize) -> u32 {
    let mut acc = csum::sum_words(&spec.src_ip, 0);
    acc = csum::sum_words(&spec.dst_ip, acc);
    acc = acc.wrapping_add(proto as u32);
    acc.wrapping_add(l4_len as u32)
}

/// Flow number `n` to a VIP (source address and port from `n`): the keys
/// the flow-table unit tests fill their tables with.
pub fn flow_key(n: u32, proto: u8) -> crate::maps::FlowKey {
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&n.to_be_bytes());
    crate::maps::FlowKey {
        src,
        dst: [7; 16],
        src_port: (n % 60000) as u16,
        dst_port: 443,
        proto,
        family: 4,
        _pad: [0; 2],
    }
}

/// Serialises `spec` into an Ethernet frame with correct lengths and checksums.
pub fn build(spec: &FrameSpec) -> Vec<u8> {
    let (proto, mut l4) = match spec.l4 {
        L4::Tcp {
            src_port,
            dst_port,
            flags,
        } => {
            let mut h = Vec::with_capacity(20);
            h.extend_from_slice(&src_port.to_be_bytes());
            h.extend_from_slice(&dst_port.to_be_bytes());
            h.extend_from_slice(&1u32.to_be_bytes());
            h.extend_from_slice(&0u32.to_be_bytes());
            h.push(5 << 4);
            h.push(flags);
            h.extend_from_slice(&64240u16.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 0]);
            (crate::parse::IPPROTO_TCP, h)
        }
        L4::Udp { src_port, dst_port } => {
            let mut h = Vec::with_capacity(8);
            h.extend_from_slice(&src_port.to_be_bytes());
            h.extend_from_slice(&dst_port.to_be_bytes());
            h.extend_from_slice(&((8 + spec.payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            (crate::parse::IPPROTO_UDP, h)
        }
        L4::Raw { proto, payload_len } => (proto, vec![0xab; payload_len]),
    };
    if !matches!(spec.l4, L4::Raw { .. }) {
        l4.extend_from_slice(&spec.payload);
    }
    let check_at = match spec.l4 {
        L4::Tcp { .. } => Some(16),
        L4::Udp { .. } => Some(6),
        L4::Raw { .. } => None,
    };
    if let Some(at) = check_at {
        let acc = csum::sum_words(&l4, pseudo_header_sum(spec, proto, l4.len()));
        let mut c = csum::fold(acc);
        if c == 0 && matches!(spec.l4, L4::Udp { .. }) {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    let mut f = Vec::with_capacity(64 + l4.len());
    f.extend_from_slice(&spec.dst_mac);
    f.extend_from_slice(&spec.src_mac);
    let ether_type: u16 = if spec.is_ipv6() { 0x86dd } else { 0x0800 };
    if let Some(vid) = spec.vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    if spec.is_ipv6() {
        f.push(0x60 | (spec.tos >> 4));
        f.push(spec.tos << 4);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.push(proto);
        f.push(spec.ttl);
        f.extend_from_slice(&spec.src_ip);
        f.extend_from_slice(&spec.dst_ip);
    } else {
        assert!(spec.ipv4_options.is_multiple_of(4) && spec.ipv4_options <= 40);
        let hl = 20 + spec.ipv4_options;
        let start = f.len();
        f.push(0x40 | (hl / 4) as u8);
        f.push(spec.tos);
        f.extend_from_slice(&((hl + l4.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00]);
        f.push(spec.ttl);
        f.push(proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&spec.src_ip);
        f.extend_from_slice(&spec.dst_ip);
        f.extend(std::iter::repeat_n(1u8, spec.ipv4_options));
        let c = csum::checksum(&f[start..start + hl]);
        f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&l4);
    f
}

/// Cuts a built frame down so that its IP datagram carries only `l4_len`
/// bytes of L4, fixing the IP length fields (checksum included) so that only
/// the L4 header is short.
pub fn truncate_datagram(frame: &[u8], l4_len: usize) -> Vec<u8> {
    let parsed = crate::parse::parse(frame).expect("truncate_datagram needs a valid frame");
    let mut f = frame[..parsed.l4_offset + l4_len].to_vec();
    let l3 = parsed.l3_offset;
    if parsed.is_ipv6 {
        f[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    } else {
        let hl = parsed.l4_offset - l3;
        f[l3 + 2..l3 + 4].copy_from_slice(&((hl + l4_len) as u16).to_be_bytes());
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = csum::checksum(&f[l3..l3 + hl]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    f
}

/// An ICMPv4 fragmentation-needed error from `router` to `to`, quoting the
/// IP header and first 8 L4 bytes of `offending` (an Ethernet frame).
pub fn icmp_too_big(offending: &[u8], router: [u8; 4], to: [u8; 4], mtu: u16) -> Vec<u8> {
    let p = crate::parse::parse(offending).expect("offending frame must parse");
    let quoted = &offending[p.l3_offset..(p.l4_offset + 8).min(offending.len())];
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = csum::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut spec = FrameSpec::base(
        &router,
        &to,
        L4::Raw {
            proto: crate::parse::IPPROTO_ICMP,
            payload_len: 0,
        },
    );
    spec.payload = Vec::new();
    let mut f = build(&spec);
    let parsed = p_of(&f);
    append_l4(&mut f, &parsed, &icmp);
    f
}

/// An ICMPv6 packet-too-big error from `router` to `to` quoting `offending`.
pub fn icmp6_too_big(offending: &[u8], router: [u8; 16], to: [u8; 16], mtu: u32) -> Vec<u8> {
    let p = crate::parse::parse(offending).expect("offending frame must parse");
    let quoted = &offending[p.l3_offset..(p.l4_offset + 8).min(offending.len())];
    let mut icmp = vec![2u8, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let mut acc = csum::sum_words(&router, 0);
    acc = csum::sum_words(&to, acc);
    acc = acc.wrapping_add(icmp.len() as u32).wrapping_add(58);
    let c = csum::fold(csum::sum_words(&icmp, acc));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let spec = FrameSpec::base(
        &router,
        &to,
        L4::Raw {
            proto: crate::parse::IPPROTO_ICMPV6,
            payload_len: 0,
        },
    );
    let mut f = build(&spec);
    let parsed = p_of(&f);
    append_l4(&mut f, &parsed, &icmp);
    f
}

fn p_of(f: &[u8]) -> crate::parse::Parsed {
    crate::parse::parse(f).expect("built frame parses")
}

/// Appends `l4` to a frame whose IP payload is empty, fixing IP lengths.
fn append_l4(f: &mut Vec<u8>, p: &crate::parse::Parsed, l4: &[u8]) {
    f.extend_from_slice(l4);
    let l3 = p.l3_offset;
    if p.is_ipv6 {
        f[l3 + 4..l3 + 6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    } else {
        let hl = p.l4_offset - l3;
        f[l3 + 2..l3 + 4].copy_from_slice(&((hl + l4.len()) as u16).to_be_bytes());
        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let c = csum::checksum(&f[l3..l3 + hl]);
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
}

/// How [`encapsulate`] wraps a frame: the outer addresses (4 or 16 bytes,
/// which picks the outer family) and, for GUE, the UDP ports and an
/// optional second hop (4 or 16 bytes).
#[derive(Clone, Debug)]
pub struct Wrap {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub outer_src: Vec<u8>,
    pub outer_dst: Vec<u8>,
    pub ttl: u8,
    pub tos: u8,
    /// `(source port, destination port, second hop)`; `None`: IPIP.
    pub gue: Option<(u16, u16, Option<Vec<u8>>)>,
}

/// `inner`'s IP datagram inside the outer headers `w` describes, written
/// byte by byte from the RFCs and the documented GUE format (not with the
/// data plane's writers): the golden bytes the data plane's output must
/// equal, and the input of decapsulator tests.
pub fn encapsulate(inner: &[u8], w: &Wrap) -> Vec<u8> {
    let parsed = crate::parse::parse(inner).expect("encapsulate needs a valid frame");
    let datagram = &inner[parsed.l3_offset..];
    let inner_proto: u8 = if parsed.is_ipv6 { 41 } else { 4 };
    let mut payload = Vec::new();
    let proto = match &w.gue {
        None => inner_proto,
        Some((sport, dport, hop)) => {
            let opts = if hop.is_some() { 20 } else { 0 };
            let len = 8 + 4 + opts + datagram.len();
            payload.extend_from_slice(&sport.to_be_bytes());
            payload.extend_from_slice(&dport.to_be_bytes());
            payload.extend_from_slice(&(len as u16).to_be_bytes());
            payload.extend_from_slice(&[0, 0]);
            payload.extend_from_slice(&[(opts / 4) as u8, inner_proto, 0, 0]);
            if let Some(addr) = hop {
                payload.push(1);
                payload.push(if addr.len() == 16 { 6 } else { 4 });
                payload.extend_from_slice(&[0, 0]);
                let mut a = [0u8; 16];
                a[..addr.len()].copy_from_slice(addr);
                payload.extend_from_slice(&a);
            }
            17
        }
    };
    payload.extend_from_slice(datagram);
    let mut f = Vec::new();
    f.extend_from_slice(&w.dst_mac);
    f.extend_from_slice(&w.src_mac);
    if w.outer_dst.len() == 16 {
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.push(0x60 | (w.tos >> 4));
        f.push(w.tos << 4);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.push(proto);
        f.push(w.ttl);
    } else {
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let start = f.len();
        f.push(0x45);
        f.push(w.tos);
        f.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0]);
        f.push(w.ttl);
        f.push(proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&w.outer_src);
        f.extend_from_slice(&w.outer_dst);
        let c = csum::checksum(&f[start..start + 20]);
        f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&payload);
        return f;
    }
    f.extend_from_slice(&w.outer_src);
    f.extend_from_slice(&w.outer_dst);
    f.extend_from_slice(&payload);
    f
}
