//! Packet rate through the real topology: 64-byte UDP frames injected at
//! the client's interface with BPF_PROG_TEST_RUN in XDP live-frames mode
//! (each run of `gen_tx` transmits a frame), forwarded by the LB, counted
//! as they arrive at the backends. The same for a trivial forwarder (one
//! MAC rewrite, XDP_TX) attached in the same place.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions},
};
use lb_common::testframe::{self, FrameSpec, L4};
use lb_tests::{Topology, addressing, fabric, in_netns, lbd};
use lb_userspace::dataplane::{self, AttachMode, MapSizes};

const FRAMES: u32 = 2_000_000;

fn small() -> MapSizes {
    MapSizes {
        max_vips: 2,
        max_backends: 8,
        ring_size: 7,
        conntrack_entries: 1024,
        flow_cache_slots: 1,
    }
}

/// Frames received by every backend's interface so far.
fn delivered(t: &Topology) -> Result<u64> {
    let mut n = 0;
    for b in t.backends() {
        let out = t.exec(b.ns(), &["ip", "-s", "-j", "link", "show", b.ifname()])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        n += v[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0);
    }
    Ok(n)
}

/// Injects FRAMES copies of `frame` out of the client's interface; returns
/// the wall time.
fn inject(t: &Topology, frame: Vec<u8>) -> Result<Duration> {
    let dev = t.client().ifname().to_owned();
    in_netns(t.client().ns(), move || -> Result<Duration> {
        // Not from /sys: that shows the namespace it was mounted in, and
        // this thread only switched its network namespace.
        let name = std::ffi::CString::new(dev.clone())?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(ifindex != 0, "no interface {dev} in the client namespace");
        let mut ebpf = dataplane::load_balancer_with(&small())?;
        let prog = dataplane::program_mut(&mut ebpf, "gen_tx")?;
        prog.load()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        // The kernel wants data_end = the frame's length.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let started = Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            repeat: FRAMES,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN with XDP live frames")?;
        Ok(started.elapsed())
    })?
}

fn measure(t: &Topology, frame: &[u8]) -> Result<f64> {
    let before = delivered(t)?;
    let took = inject(t, frame.to_vec())?;
    // Let the last frames land.
    std::thread::sleep(Duration::from_millis(300));
    let got = delivered(t)? - before;
    Ok(got as f64 / took.as_secs_f64())
}

/// A fresh topology per row: a veth that has carried one forwarder's live
/// frames was seen to stop forwarding to the next one, and one row must not
/// inherit another's bridge or queue state anyway.
fn with_topology(f: impl FnOnce(&Topology, &[u8]) -> Result<f64>) -> Result<f64> {
    let t = Topology::new(2)?;
    let vip: IpAddr = addressing::vip_v4(1).into();
    t.add_vip_on_backends(vip)?;
    let _fabric = fabric::prepare(&t, AttachMode::Native)?;
    // Live frames are transmitted through the client veth's XDP path: its
    // queue must be registered for XDP (a native program on it) and its
    // peer must take XDP frames (a native program there too).
    let (client_dev, client_peer) = (
        t.client().ifname().to_owned(),
        t.client().peer_ifname().to_owned(),
    );
    let _client_xdp = in_netns(t.client().ns(), move || -> Result<aya::Ebpf> {
        let mut e = dataplane::load_balancer_with(&small())?;
        dataplane::attach_program(
            &mut e,
            dataplane::PASS_PROGRAM,
            &client_dev,
            AttachMode::Native,
        )?;
        Ok(e)
    })??;
    let _client_peer_xdp = in_netns(t.fabric_ns(), move || -> Result<aya::Ebpf> {
        let mut e = dataplane::load_balancer_with(&small())?;
        dataplane::attach_program(
            &mut e,
            dataplane::PASS_PROGRAM,
            &client_peer,
            AttachMode::Native,
        )?;
        Ok(e)
    })??;
    let IpAddr::V4(vip4) = vip else {
        unreachable!("vip_v4 is IPv4")
    };
    // 60 bytes + FCS = a minimum-size, 64-byte Ethernet frame.
    let mut spec = FrameSpec::v4_udp(t.client().ipv4().octets(), vip4.octets(), 40000, 53);
    spec.src_mac = t.client().mac();
    spec.dst_mac = t.lb().mac();
    spec.payload = vec![0; 18];
    spec.l4 = L4::Udp {
        src_port: 40000,
        dst_port: 53,
    };
    let frame = testframe::build(&spec);
    f(&t, &frame)
}

/// The trivial forwarder (`fwd_mac`) on the LB's interface, in `mode`:
/// every frame (ARP too) leaves again by that interface, rewritten from the
/// LB's MAC to backend 0's. Detached when the returned object is dropped.
pub fn attach_forwarder(t: &Topology, mode: AttachMode) -> Result<aya::Ebpf> {
    let lb_dev = t.lb().ifname().to_owned();
    let (b0_mac, lb_mac) = (t.backend(0).mac(), t.lb().mac());
    in_netns(t.lb().ns(), move || -> Result<aya::Ebpf> {
        let mut e = dataplane::load_balancer_with(&small())?;
        let mut mac = [0u8; 12];
        mac[..6].copy_from_slice(&b0_mac);
        mac[6..].copy_from_slice(&lb_mac);
        Array::<_, [u8; 12]>::try_from(e.map_mut("FWD_MAC").context("FWD_MAC")?)?.set(0, mac, 0)?;
        dataplane::attach_program(&mut e, "fwd_mac", &lb_dev, mode)?;
        Ok(e)
    })?
}

fn trivial(t: &Topology, frame: &[u8], mode: AttachMode) -> Result<f64> {
    let _fwd = attach_forwarder(t, mode)?;
    measure(t, frame)
}

fn balancer(t: &Topology, frame: &[u8], mode: AttachMode) -> Result<f64> {
    let vip = addressing::vip_v4(1);
    let dir = std::env::temp_dir().join(format!("{}-rate", t.id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("lb.toml");
    let mode = mode.to_string();
    std::fs::write(
        &config,
        format!(
            "{}[[vip]]\naddress = \"{vip}:53/udp\"\nmode = \"l2dsr\"\n{}",
            lbd::Preamble {
                xdp_mode: &mode,
                ..Default::default()
            }
            .render(t, &dir),
            lbd::backend_tables(t.backends()),
        ),
    )?;
    let (mut lbd, _) = lbd::start(t, &config)?;
    let pps = measure(t, frame);
    let _ = lbd::stop(&mut lbd);
    let _ = std::fs::remove_dir_all(&dir);
    pps
}

const ROUNDS: usize = 3;

pub fn run() -> Result<(String, Vec<(String, f64)>)> {
    // Interleaved rounds, median per row: veth rates on a shared 2-core
    // machine swing by 2x from one run to the next.
    let names: Vec<String> = [AttachMode::Native, AttachMode::Generic]
        .iter()
        .flat_map(|m| {
            [
                format!("trivial forwarder, {m} XDP"),
                format!("xdplb l2dsr, {m} XDP"),
            ]
        })
        .collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..ROUNDS {
        for (i, mode) in [AttachMode::Native, AttachMode::Generic]
            .into_iter()
            .enumerate()
        {
            samples[2 * i].push(with_topology(|t, f| trivial(t, f, mode))?);
            samples[2 * i + 1].push(with_topology(|t, f| balancer(t, f, mode))?);
        }
    }
    let rows: Vec<(String, f64)> = names
        .into_iter()
        .zip(samples)
        .map(|(n, v)| (n, crate::summary::median(v)))
        .collect();
    let mut md = format!(
        "{FRAMES} minimum-size (64-byte) UDP frames of one flow, injected at the client's veth with XDP live frames (batch 64), counted as received by the backends' interfaces. Each measurement gets a fresh topology; the median of {ROUNDS} interleaved rounds is shown. The trivial forwarder rewrites both MACs and sends every frame to one backend: the ceiling this path allows. The generator, both veth hops and the forwarder share the machine's 2 cores, so this shows how close the balancer comes to the path's ceiling, not a NIC's line rate (section 1 gives the per-packet cost).\n\n| forwarder at the LB | packets/s delivered | vs trivial |\n|---|---:|---:|\n"
    );
    for pair in rows.chunks(2) {
        let base = pair[0].1.max(1.0);
        for (name, pps) in pair {
            md.push_str(&format!("| {name} | {pps:.0} | {:.2} |\n", pps / base));
        }
    }
    Ok((md, rows))
}
