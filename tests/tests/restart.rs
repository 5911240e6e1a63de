//! Hitless restart: with `on_exit = "keep"` the pinned data plane keeps
//! forwarding while lbd is down, and the next lbd adopts it (same maps,
//! program swapped in place). A client requesting throughout, on persistent
//! and on new connections, sees no failure.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_tests::{HttpConn, Topology, addressing, in_netns, lbd};
use lb_userspace::dataplane::AttachMode;

const PORT: u16 = 80;

#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    failed: Vec<String>,
    persistent_moved: usize,
}

#[test]
fn restart_under_load_loses_nothing() {
    let t = Topology::new(3).unwrap();
    let mut servers = t.start_servers(PORT, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip: IpAddr = addressing::vip_v4(1).into();
    t.add_vip_on_backends(vip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-restart", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    let backends = lb_tests::lbd::backend_tables(t.backends());
    std::fs::write(
        &config,
        format!(
            "{pre}\
             [[vip]]\naddress = \"{vip}:{PORT}/tcp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n{backends}",
            pre = lbd::Preamble {
                on_exit: "keep",
                ..Default::default()
            }
            .render(&t, &dir),
        ),
    )
    .unwrap();
    let _teardown = lbd::Teardown::new(config.clone());

    let (mut lbd, ready) = lbd::start(&t, &config).unwrap();
    assert!(ready.contains("\"adopted\":false"), "{ready}");
    // One backend is down going into the restart: the next lbd must keep it
    // out of the ring, not start it as up and send it traffic until its
    // checks fail again.
    servers[0].stop();
    lbd.wait_for_line(
        |l| l.contains("\"backend\"") && l.contains("\"down\""),
        Duration::from_secs(10),
    )
    .unwrap();

    // The client: 4 persistent connections and a new one per round, until
    // told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let client_ns = t.client().ns().to_owned();
    let stop_flag = stop.clone();
    let client = std::thread::spawn(move || {
        in_netns(&client_ns, move || {
            let target = SocketAddr::new(vip, PORT);
            let mut tally = Tally::default();
            let mut persistent: Vec<(HttpConn, String)> = (0..4)
                .map(|_| {
                    let mut c = HttpConn::connect(target, Duration::from_secs(2)).unwrap();
                    let who = c.get("/").unwrap().text();
                    (c, who)
                })
                .collect();
            let mut rounds = 0;
            // Bounded: at most 2000 rounds even if nobody says stop.
            while !stop_flag.load(Ordering::Relaxed) && rounds < 2000 {
                rounds += 1;
                for (c, who) in persistent.iter_mut() {
                    match c.get("/") {
                        Ok(r) if r.text() == *who => tally.ok += 1,
                        Ok(r) => {
                            tally.persistent_moved += 1;
                            tally.failed.push(format!(
                                "persistent connection moved {who:?} -> {:?}",
                                r.text()
                            ));
                        }
                        Err(e) => tally.failed.push(format!("persistent: {e:#}")),
                    }
                }
                match HttpConn::connect(target, Duration::from_secs(2)).and_then(|mut c| c.get("/"))
                {
                    Ok(_) => tally.ok += 1,
                    Err(e) => tally.failed.push(format!("new connection: {e:#}")),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            tally
        })
        .unwrap()
    });

    std::thread::sleep(Duration::from_millis(500));
    let (_, status) = lbd::stop(&mut lbd).unwrap();
    assert!(status.is_some_and(|s| s.success()));
    // Nobody runs the control plane now; the data plane carries on.
    std::thread::sleep(Duration::from_millis(700));
    let (lbd2, ready) = lbd::start(&t, &config).unwrap();
    assert!(ready.contains("\"adopted\":true"), "{ready}");
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let tally = client.join().unwrap();

    assert!(
        tally.failed.is_empty(),
        "failures across the restart: {:?}",
        tally.failed
    );
    assert!(tally.ok > 100, "the client kept requesting: {tally:?}");
    drop(lbd2);
}

/// A restart that would change every ring is refused, not adopted: another
/// ring size (no map size: 65,537 and 65,539 slots fill as many `RINGS`
/// elements) or another hash seed moves every flow's slot, and on a fleet
/// would make this node disagree with its peers. `--accept-ring-change`
/// lets it through, and `lbctl node status` says so.
#[test]
fn a_restart_with_other_rings_is_refused_unless_accepted() {
    let t = Topology::new(1).unwrap();
    let vip: IpAddr = addressing::vip_v4(1).into();
    let dir = std::env::temp_dir().join(format!("{}-ringsize", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    let write = |ring: u32, seed: u32| {
        let pre = lbd::Preamble {
            on_exit: "keep",
            ..Default::default()
        }
        .render(&t, &dir);
        std::fs::write(
            &config,
            format!(
                "{}ring_size = {ring}
hash_seed = {seed}
[[vip]]
address = \"{vip}:{PORT}/tcp\"\nmode = \"ipip\"\n{}",
                pre,
                lb_tests::lbd::backend_tables(t.backends())
            ),
        )
        .unwrap();
    };
    let lbd_bin = lb_tests::lbd_path().unwrap();
    let run = |extra: &[&str]| {
        in_netns(t.lb().ns(), || {
            std::process::Command::new(&lbd_bin)
                .arg("--config")
                .arg(&config)
                .args(extra)
                .output()
                .unwrap()
        })
        .unwrap()
    };
    write(65537, 1);
    let _teardown = lbd::Teardown::new(config.clone());
    let (mut first, _) = lbd::start(&t, &config).unwrap();
    lbd::stop(&mut first).unwrap();
    for (ring, seed, change) in [
        (65539, 1, "ring_size 65537 -> 65539"),
        (65537, 2, "hash_seed 1 -> 2"),
    ] {
        write(ring, seed);
        let out = run(&[]);
        assert!(!out.status.success(), "{change}: refused");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(
            msg.contains(&format!("other rings ({change})"))
                && msg.contains("--accept-ring-change"),
            "{msg}"
        );
    }
    // Accepted: the node says so.
    let mut cmd = std::process::Command::new(&lbd_bin);
    cmd.arg("--config").arg(&config).arg("--accept-ring-change");
    let mut accepted = t.spawn(t.lb().ns(), &mut cmd).unwrap();
    accepted
        .wait_for_line(|l| l.contains("\"ready\""), Duration::from_secs(30))
        .unwrap();
    let status = std::process::Command::new(lb_tests::lbctl_path().unwrap())
        .arg("--socket")
        .arg(dir.join("lbd.sock"))
        .args(["node", "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("WARNING: adopted a data plane with other rings (hash_seed 1 -> 2)"),
        "{status}"
    );
    lbd::stop(&mut accepted).unwrap();
}
