//! `lbctl sysctl apply` then `restore`, inside the LB's namespace, puts every
//! value back exactly; keys that namespace lacks are reported, not fatal.

use lb_tests::{Topology, lbctl_path};
use serde_json::Value;

fn rows(t: &Topology, role: &str) -> Vec<Value> {
    let lbctl = lbctl_path().unwrap();
    let out = t
        .exec(
            t.lb().ns(),
            &[
                lbctl.to_str().unwrap(),
                "sysctl",
                "show",
                "--role",
                role,
                "--json",
            ],
        )
        .unwrap();
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn apply_and_restore_round_trip_for_both_roles() {
    let t = Topology::new(1).unwrap();
    let lbctl = lbctl_path().unwrap();
    let lbctl = lbctl.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("{}-sysctl", t.id()));
    for role in ["lb", "backend"] {
        let backup = dir.join(format!("{role}.json"));
        let backup = backup.to_str().unwrap();
        let before = rows(&t, role);
        assert!(
            before.iter().any(|r| r["current"].is_string()),
            "{before:?}"
        );
        t.exec(
            t.lb().ns(),
            &[lbctl, "sysctl", "apply", "--role", role, "--backup", backup],
        )
        .unwrap();
        let applied = rows(&t, role);
        for r in &applied {
            if r["current"].is_string() {
                assert_eq!(r["ok"], true, "{role}: {r}");
            }
        }
        assert_ne!(before, applied, "{role}: apply changed something");
        t.exec(
            t.lb().ns(),
            &[
                lbctl, "sysctl", "restore", "--role", role, "--backup", backup,
            ],
        )
        .unwrap();
        assert_eq!(
            rows(&t, role),
            before,
            "{role}: restore put everything back"
        );
        // Nothing to restore twice.
        assert!(
            t.exec(
                t.lb().ns(),
                &[
                    lbctl, "sysctl", "restore", "--role", role, "--backup", backup
                ]
            )
            .is_err()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
