//! Signals keep their documented meaning: SIGHUP (which a supervisor sends
//! to mean "reload") reloads the configuration file and never kills lbd;
//! SIGUSR1 prints the counters; SIGTERM exits cleanly.

use std::{process::Command, time::Duration};

use lb_tests::{Topology, addressing, lbctl_path, lbd};

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2) on a child this test owns.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

#[test]
fn sighup_reloads_and_sigterm_still_exits() {
    let t = Topology::new(1).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-signals", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "{}[[vip]]\naddress = \"{}:80/tcp\"\nmode = \"ipip\"\n{}",
            lbd::Preamble::default().render(&t, &dir),
            addressing::vip_v4(1),
            lbd::backend_tables(t.backends()),
        ),
    )
    .unwrap();
    let _teardown = lbd::Teardown::new(config.clone());
    let (mut running, _) = lbd::start(&t, &config).unwrap();
    for _ in 0..2 {
        signal(running.pid(), libc::SIGHUP);
        running
            .wait_for_line(
                |l| l.contains("\"event\":\"reload\"") && l.contains("\"ok\":true"),
                Duration::from_secs(5),
            )
            .unwrap();
    }
    assert!(running.is_running(), "SIGHUP killed lbd");
    let list = Command::new(lbctl_path().unwrap())
        .arg("--socket")
        .arg(dir.join("lbd.sock"))
        .arg("list")
        .output()
        .unwrap();
    assert!(list.status.success(), "lbd still answers after SIGHUP");
    signal(running.pid(), libc::SIGUSR1);
    running
        .wait_for_line(|l| l.contains("\"counters\""), Duration::from_secs(5))
        .unwrap();
    let (_, status) = lbd::stop(&mut running).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
