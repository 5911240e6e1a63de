//! `lbctl explain` tells the truth: for 100 established connections, and
//! again after a ring change (a backend added at runtime) and a drain, the
//! backend `explain` names is the one the connection's packets reach; for
//! new connections asked about before they start (`--syn`, from a chosen
//! source port), the backend named is the one the connection then reaches.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use lb_tests::{HttpConn, Topology, addressing, lbd};
use lb_userspace::{api::Explanation, dataplane::AttachMode};

const PORT: u16 = 80;
const FLOWS: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(3);

fn lbctl(socket: &Path, args: &[&str]) -> String {
    lb_tests::lbctl(socket, args).unwrap()
}

fn explain(socket: &Path, vip: &str, client: SocketAddr, syn: bool) -> Explanation {
    let client = client.to_string();
    let mut args = vec!["explain", vip, &client, "--json"];
    if syn {
        args.push("--syn");
    }
    serde_json::from_str(&lbctl(socket, &args)).unwrap()
}

/// Backend name (as its server answers) -> address.
fn names(t: &Topology) -> BTreeMap<String, IpAddr> {
    (0..t.backends().len())
        .map(|i| (format!("backend{i}"), IpAddr::from(t.backend(i).ipv4())))
        .collect()
}

/// Every connection's backend, as its next request shows, against what
/// `explain` says for its flow. Returns the explanations' `via` counts.
fn check_all(
    t: &Topology,
    socket: &Path,
    vip: &str,
    conns: &mut [(HttpConn, SocketAddr)],
    stage: &str,
) -> BTreeMap<String, usize> {
    let names = names(t);
    let mut vias = BTreeMap::new();
    let served: Vec<String> = t
        .in_client(|| {
            conns
                .iter_mut()
                .map(|(c, _)| c.get("/").unwrap().text().trim().to_owned())
                .collect()
        })
        .unwrap();
    for ((_, local), who) in conns.iter().zip(served) {
        let e = explain(socket, vip, *local, false);
        assert_eq!(
            e.backend,
            Some(names[&who]),
            "{stage}: {local} reached {who}, explain says {e:?}"
        );
        *vias.entry(e.via.unwrap_or_default()).or_insert(0) += 1;
    }
    vias
}

/// New connections asked about first (`--syn`), from ports not used yet:
/// each reaches the backend explain named.
fn check_new(t: &Topology, socket: &Path, vip: &str, ports: std::ops::Range<u16>, stage: &str) {
    let names = names(t);
    let client = IpAddr::from(t.client().ipv4());
    let vip_addr: SocketAddr = SocketAddr::new(IpAddr::from(addressing::vip_v4(1)), PORT);
    for port in ports {
        let local = SocketAddr::new(client, port);
        let e = explain(socket, vip, local, true);
        assert_eq!(e.via.as_deref(), Some("ring_syn"), "{stage}: {e:?}");
        let who = t
            .in_client(|| {
                let mut c = HttpConn::connect_from(local, vip_addr, TIMEOUT).unwrap();
                c.get("/").unwrap().text().trim().to_owned()
            })
            .unwrap();
        assert_eq!(
            e.backend,
            Some(names[&who]),
            "{stage}: new flow from {local} reached {who}, explain said {e:?}"
        );
    }
}

#[test]
fn explain_names_the_backend_packets_reach() {
    let t = Topology::new(3).unwrap();
    let _servers = t.start_servers(PORT, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip_ip = IpAddr::from(addressing::vip_v4(1));
    t.add_vip_on_backends(vip_ip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-explain", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lb.toml");
    // Two backends configured; the third comes at runtime (a ring change).
    std::fs::write(
        &cfg,
        format!(
            "{pre}[[vip]]\naddress = \"{vip_ip}:{PORT}/tcp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"none\"\n{backends}",
            pre = lbd::Preamble::default().render(&t, &dir),
            backends = lbd::backend_tables(&t.backends()[..2]),
        ),
    )
    .unwrap();
    let _teardown = lbd::Teardown::new(cfg.clone());
    let (mut lbd_proc, _) = lbd::start(&t, &cfg).unwrap();
    let socket = dir.join("lbd.sock");
    let vip = format!("{vip_ip}:{PORT}/tcp");
    let target = SocketAddr::new(vip_ip, PORT);

    let mut conns: Vec<(HttpConn, SocketAddr)> = t
        .in_client(|| {
            (0..FLOWS)
                .map(|_| {
                    let c = HttpConn::connect(target, TIMEOUT).unwrap();
                    let local = c.local_addr().unwrap();
                    (c, local)
                })
                .collect()
        })
        .unwrap();
    let vias = check_all(&t, &socket, &vip, &mut conns, "established");
    assert!(
        vias.keys().all(|v| v == "conntrack" || v == "flow_cache"),
        "established flows are answered from the table or a cache: {vias:?}"
    );
    check_new(&t, &socket, &vip, 45_000..45_020, "before the ring change");

    // A ring change: the third backend joins. Established flows stay put.
    let b2 = t.backend(2).ipv4().to_string();
    lbctl(&socket, &["add-backend", &vip, &b2]);
    check_all(&t, &socket, &vip, &mut conns, "after the ring change");
    check_new(&t, &socket, &vip, 45_100..45_130, "after the ring change");

    // A drain: its flows stay, new ones avoid it.
    let b0 = t.backend(0).ipv4().to_string();
    lbctl(&socket, &["drain", &vip, &b0]);
    check_all(&t, &socket, &vip, &mut conns, "after the drain");
    let drained = IpAddr::from(t.backend(0).ipv4());
    for port in 45_200..45_220 {
        let e = explain(
            &socket,
            &vip,
            SocketAddr::new(IpAddr::from(t.client().ipv4()), port),
            true,
        );
        assert_ne!(
            e.backend,
            Some(drained),
            "a new flow avoids the drained backend: {e:?}"
        );
    }
    check_new(&t, &socket, &vip, 45_300..45_320, "after the drain");
    drop(conns);
    lbd::stop(&mut lbd_proc).unwrap();
}
