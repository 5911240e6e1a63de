//! The README is for operators: every `lbctl` example it shows runs against
//! a live lbd, and every command and flag it names exists.

use std::{collections::BTreeSet, net::IpAddr, path::Path, process::Command};

use lb_tests::{Topology, addressing, lbctl_path, lbd, lbd_path};
use lb_userspace::dataplane::AttachMode;

const README: &str = include_str!("../../README.md");

/// The fenced block after the sentence announcing the tested examples.
fn examples() -> Vec<String> {
    let start = README
        .find("Examples (a test runs this block")
        .expect("examples paragraph");
    let block = &README[start..];
    let open = block.find("```sh\n").expect("example block") + 6;
    let close = block[open..].find("```").expect("block end") + open;
    block[open..close]
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn every_lbctl_example_runs_against_a_live_lbd() {
    let t = Topology::new(3).unwrap();
    let _servers = t.start_servers(80, 53).unwrap();
    let _fabric = lb_tests::fabric::prepare(&t, AttachMode::Generic).unwrap();
    let vip: IpAddr = addressing::vip_v4(1).into();
    t.add_vip_on_backends(vip).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-readme", t.id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("lb.toml");
    std::fs::write(
        &config,
        format!(
            "{pre}\
             [[vip]]\naddress = \"{vip}:80/tcp\"\nmode = \"ipip\"\n\
             [vip.health_check]\ntype = \"tcp\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\
             [[vip.backend]]\naddress = \"{b0}\"\n[[vip.backend]]\naddress = \"{b1}\"\n",
            pre = lbd::Preamble::default().render(&t, &dir),
            b0 = t.backend(0).ipv4(),
            b1 = t.backend(1).ipv4(),
        ),
    )
    .unwrap();
    let (mut lbd, _) = lbd::start(&t, &config).unwrap();

    let examples = examples();
    assert!(examples.len() >= 10, "{examples:?}");
    for line in &examples {
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("lbctl"), "{line}");
        let args: Vec<&str> = words.collect();
        let out = Command::new(lbctl_path().unwrap())
            .arg("--socket")
            .arg(dir.join("lbd.sock"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README example `{line}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lbd::stop(&mut lbd).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn help_ok(bin: &Path, args: &[&str]) -> bool {
    Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_command_and_flag_named_in_the_readme_exists() {
    // Commands as written in code: after a backtick or at the start of a
    // line (code blocks), not in prose or headings.
    let words = |prefix: &str| -> BTreeSet<String> {
        README
            .match_indices(prefix)
            .filter(|(i, _)| *i == 0 || matches!(README.as_bytes()[i - 1], b'`' | b'\n'))
            .filter_map(|(i, _)| {
                let rest = &README[i + prefix.len()..];
                let w: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                    .collect();
                (!w.is_empty()).then_some(w)
            })
            .collect()
    };
    let lbctl = lbctl_path().unwrap();
    let subcommands = words("lbctl ");
    assert!(subcommands.len() >= 12, "{subcommands:?}");
    for sub in &subcommands {
        assert!(
            help_ok(&lbctl, &[sub]),
            "README names `lbctl {sub}`, which does not exist"
        );
    }
    for (parent, sub) in [
        ("vip", "add"),
        ("vip", "remove"),
        ("vip", "list"),
        ("sysctl", "show"),
        ("sysctl", "apply"),
        ("sysctl", "restore"),
    ] {
        assert!(help_ok(&lbctl, &[parent, sub]), "lbctl {parent} {sub}");
    }
    let lbd_help = String::from_utf8(
        Command::new(lbd_path().unwrap())
            .arg("--help")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for flag in words("lbd --") {
        assert!(
            lbd_help.contains(&format!("--{flag}")),
            "README names `lbd --{flag}`, which lbd does not take"
        );
    }
    let xtask = lbd_path().unwrap().with_file_name("xtask");
    if xtask.exists() {
        for sub in words("cargo xtask ") {
            assert!(
                help_ok(&xtask, &[&sub]),
                "README names `cargo xtask {sub}`, which does not exist"
            );
        }
    }
}
