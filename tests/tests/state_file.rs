//! The state file is the operator's: written 0600, and when it cannot be
//! written (a full disk: here a tiny tmpfs) a change still applies to the
//! data plane, but the API says so with a status of its own (507), `lbctl`
//! exits 3, `lb_state_save_failures_total` rises, `lbctl node status` warns,
//! and no temporary file is left. Once there is room again the next change
//! saves everything, the earlier change included.

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use lb_tests::{Topology, addressing, lbd, scrape};
use serde_json::Value;

const METRICS: &str = "127.0.0.1:9132";

/// A tmpfs of a few pages, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {}", at.display());
        Tmpfs(at.to_owned())
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = [0u8; 4096];
        while f.write_all(&block).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn lbctl(socket: &Path, args: &[&str]) -> (i32, String, String) {
    lb_tests::lbctl_output(socket, args).unwrap()
}

fn failures(t: &Topology) -> u64 {
    let text = scrape::scrape(t, METRICS).unwrap();
    scrape::sample(&text, "lb_state_save_failures_total", "").expect("counter exported")
}

fn saved_drain(state: &Path, backend: &str) -> bool {
    let saved: Value = serde_json::from_slice(&std::fs::read(state).unwrap()).unwrap();
    saved["vips"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|l| l.as_array().unwrap())
        .any(|b| b["address"] == backend && b["drained"] == true)
}

#[test]
fn a_full_disk_is_reported_and_leaves_no_temporary_file() {
    let t = Topology::new(2).unwrap();
    let outer = std::env::temp_dir().join(format!("{}-state", t.id()));
    std::fs::create_dir_all(&outer).unwrap();
    let config = outer.join("lb.toml");
    // Dropped after the tmpfs is unmounted.
    let _teardown = lbd::Teardown::new(config.clone());
    let disk = Tmpfs::mount(&outer.join("disk"), "64k");
    let vip = format!("{}:80/tcp", addressing::vip_v4(1));
    std::fs::write(
        &config,
        format!(
            "{}[[vip]]\naddress = \"{vip}\"\nmode = \"ipip\"\n{}",
            lbd::Preamble {
                instance_extra: &format!("metrics_listen = \"{METRICS}\"\n"),
                ..Default::default()
            }
            .render(&t, &disk.0),
            lbd::backend_tables(t.backends()),
        ),
    )
    .unwrap();
    let (mut running, _) = lbd::start(&t, &config).unwrap();
    let socket = disk.0.join("lbd.sock");
    let state = disk.0.join("state.json");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "state file mode {mode:o}");
    assert_eq!(failures(&t), 0);

    let filler = disk.fill();
    let b0 = t.backend(0).ipv4().to_string();
    let (code, _, err) = lbctl(&socket, &["drain", &vip, &b0]);
    assert_eq!(code, 3, "exit code for a change not saved: {err}");
    assert!(
        err.contains("applied to the data plane, not saved"),
        "{err}"
    );
    assert!(
        err.contains(&state.display().to_string()),
        "names the file: {err}"
    );
    let (code, list, _) = lbctl(&socket, &["list", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&list).unwrap();
    let drained = list[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["address"] == b0.as_str() && b["drained"] == true);
    assert!(drained, "the drain is live: {list}");
    assert_eq!(failures(&t), 1);
    let (_, status, _) = lbctl(&socket, &["node", "status"]);
    assert!(status.contains("not saved"), "{status}");
    let names: Vec<String> = std::fs::read_dir(&disk.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "a temporary file was left: {names:?}"
    );
    assert!(!saved_drain(&state, &b0), "the old state file is intact");

    // Room again: the next change saves both.
    std::fs::remove_file(filler).unwrap();
    let b1 = t.backend(1).ipv4().to_string();
    let (code, _, err) = lbctl(&socket, &["drain", &vip, &b1]);
    assert_eq!(code, 0, "{err}");
    assert!(saved_drain(&state, &b0) && saved_drain(&state, &b1));
    assert_eq!(failures(&t), 1, "a counter: it does not fall back");
    let (_, status, _) = lbctl(&socket, &["node", "status"]);
    assert!(!status.contains("not saved"), "{status}");
    lbd::stop(&mut running).unwrap();
}
