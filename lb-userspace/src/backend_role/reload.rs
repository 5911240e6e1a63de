//! A reload's changes, all or nothing: what differs between the running
//! configuration and the file is computed first ([`Plan::between`]), then
//! applied step by step ([`apply`]), each step recorded so that a failure
//! undoes the ones before it in reverse. A failed reload leaves `lo`, the
//! state file and the maps as they were; the caller then keeps its old
//! configuration.
//!
//! The order keeps every VIP consistent while it changes: a VIP is local
//! before packets for it are decapsulated, and stops being decapsulated
//! before it stops being local.

use std::net::IpAddr;

use anyhow::Result;

use super::config::BackendConfig;

/// What a reload changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// VIPs to serve, in the file's order.
    pub added: Vec<IpAddr>,
    /// VIPs no longer served, in the old file's order.
    pub removed: Vec<IpAddr>,
    /// `[old, new]` GUE port, when it changes.
    pub gue_port: Option<[u16; 2]>,
}

impl Plan {
    pub fn between(old: &BackendConfig, new: &BackendConfig) -> Plan {
        Plan {
            added: new
                .vips
                .iter()
                .filter(|v| !old.vips.contains(v))
                .copied()
                .collect(),
            removed: old
                .vips
                .iter()
                .filter(|v| !new.vips.contains(v))
                .copied()
                .collect(),
            gue_port: (new.gue_port != old.gue_port).then_some([old.gue_port, new.gue_port]),
        }
    }
}

/// What a reload changes, on the host or (in tests) a stand-in.
pub trait Target {
    /// Puts on `lo` those of `vips` that are not local yet, recording them
    /// in the state file first; returns those it added. On failure it has
    /// added none (it undoes its own partial work).
    async fn put_on_lo(&mut self, vips: &[IpAddr]) -> Result<Vec<IpAddr>>;
    /// Removes those of `vips` this lbd added from `lo` and from the
    /// state; failures are logged and leave the address recorded.
    async fn take_off_lo(&mut self, vips: &[IpAddr]);
    /// Serves `vip`; false: it was served already.
    fn add_vip(&mut self, vip: IpAddr) -> Result<bool>;
    /// Stops serving `vip`; false: it was not served.
    fn remove_vip(&mut self, vip: IpAddr) -> Result<bool>;
    fn set_gue_port(&mut self, port: u16) -> Result<()>;
}

/// One change made, to undo.
#[derive(Debug)]
enum Done {
    OnLo(Vec<IpAddr>),
    Served(IpAddr),
    GuePort(u16),
    Unserved(IpAddr),
}

/// Applies `plan`: everything, or (on an error) nothing, the error saying
/// which. Taking removed VIPs off `lo` comes last and cannot fail the
/// reload (an address left there stays recorded for the teardown).
pub async fn apply<T: Target>(t: &mut T, plan: &Plan) -> Result<(), String> {
    let mut done = Vec::new();
    if let Err(e) = steps(t, plan, &mut done).await {
        let mut undo_errors = Vec::new();
        while let Some(step) = done.pop() {
            let undone = match step {
                Done::Unserved(vip) => t.add_vip(vip).map(drop),
                Done::GuePort(old) => t.set_gue_port(old),
                Done::Served(vip) => t.remove_vip(vip).map(drop),
                Done::OnLo(added) => {
                    t.take_off_lo(&added).await;
                    Ok(())
                }
            };
            if let Err(e) = undone {
                undo_errors.push(format!("{e:#}"));
            }
        }
        return Err(if undo_errors.is_empty() {
            format!("{e:#}; everything this reload had changed was undone: nothing was changed")
        } else {
            format!(
                "{e:#}; undoing what this reload had changed failed too: {}",
                undo_errors.join("; ")
            )
        });
    }
    t.take_off_lo(&plan.removed).await;
    Ok(())
}

async fn steps<T: Target>(t: &mut T, plan: &Plan, done: &mut Vec<Done>) -> Result<()> {
    let added = t.put_on_lo(&plan.added).await?;
    done.push(Done::OnLo(added));
    for vip in &plan.added {
        if t.add_vip(*vip)? {
            done.push(Done::Served(*vip));
        }
    }
    if let Some([old, new]) = plan.gue_port {
        t.set_gue_port(new)?;
        done.push(Done::GuePort(old));
    }
    for vip in &plan.removed {
        if t.remove_vip(*vip)? {
            done.push(Done::Unserved(*vip));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use anyhow::bail;

    use super::*;

    /// A host and data plane in memory, failing at the `fail_at`th step.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Fake {
        lo: BTreeSet<IpAddr>,
        /// The state file's `lo_added`.
        recorded: BTreeSet<IpAddr>,
        served: BTreeSet<IpAddr>,
        port: u16,
        steps: usize,
        fail_at: Option<usize>,
    }

    impl Fake {
        fn step(&mut self, what: &str) -> Result<()> {
            self.steps += 1;
            if self.fail_at == Some(self.steps) {
                bail!("injected failure at step {} ({what})", self.steps);
            }
            Ok(())
        }

        /// What a reload must leave alone or change (the counters aside).
        fn seen(&self) -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>, BTreeSet<IpAddr>, u16) {
            (
                self.lo.clone(),
                self.recorded.clone(),
                self.served.clone(),
                self.port,
            )
        }
    }

    impl Target for Fake {
        async fn put_on_lo(&mut self, vips: &[IpAddr]) -> Result<Vec<IpAddr>> {
            self.step("put_on_lo")?;
            let missing: Vec<IpAddr> = vips
                .iter()
                .filter(|v| !self.lo.contains(v))
                .copied()
                .collect();
            self.lo.extend(&missing);
            self.recorded.extend(&missing);
            Ok(missing)
        }

        async fn take_off_lo(&mut self, vips: &[IpAddr]) {
            for v in vips {
                if self.recorded.remove(v) {
                    self.lo.remove(v);
                }
            }
        }

        fn add_vip(&mut self, vip: IpAddr) -> Result<bool> {
            self.step("add_vip")?;
            Ok(self.served.insert(vip))
        }

        fn remove_vip(&mut self, vip: IpAddr) -> Result<bool> {
            self.step("remove_vip")?;
            Ok(self.served.remove(&vip))
        }

        fn set_gue_port(&mut self, port: u16) -> Result<()> {
            self.step("set_gue_port")?;
            self.port = port;
            Ok(())
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn config(vips: &[&str], port: u16) -> BackendConfig {
        let list: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
        BackendConfig::parse(
            "b.toml",
            &format!(
                "role = \"backend\"\n[instance]\nname = \"web1\"\ninterface = \"eth0\"\n\
                 [decap]\ngue_port = {port}\nvips = [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap()
    }

    #[test]
    fn the_plan_is_what_differs() {
        let old = config(&["198.18.100.1", "198.18.100.2", "fd00::1"], 6080);
        let new = config(&["fd00::2", "198.18.100.2", "198.18.100.3"], 0);
        assert_eq!(
            Plan::between(&old, &new),
            Plan {
                added: vec![ip("fd00::2"), ip("198.18.100.3")],
                removed: vec![ip("198.18.100.1"), ip("fd00::1")],
                gue_port: Some([6080, 0]),
            }
        );
        assert_eq!(Plan::between(&old, &old), Plan::default());
    }

    /// Every step of a reload failing in turn: each time, lo, the state
    /// file and the maps are as before; with no failure, as planned.
    #[test]
    fn a_reload_that_fails_at_any_step_changes_nothing() {
        let (a, b, c, d) = (
            ip("198.18.100.1"),
            ip("198.18.100.2"),
            ip("198.18.100.3"),
            ip("fd00::4"),
        );
        // Served: a and b; a added to lo by lbd, b was there before.
        let before = Fake {
            lo: [a, b].into(),
            recorded: [a].into(),
            served: [a, b].into(),
            port: 6080,
            ..Fake::default()
        };
        let plan = Plan {
            added: vec![c, d],
            removed: vec![a, b],
            gue_port: Some([6080, 7000]),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // put_on_lo, add c, add d, port, remove a, remove b.
        let steps = 6;
        for fail_at in 1..=steps {
            let mut t = Fake {
                fail_at: Some(fail_at),
                ..before.clone()
            };
            let e = rt.block_on(apply(&mut t, &plan)).unwrap_err();
            assert!(e.contains("injected failure"), "{e}");
            assert!(e.contains("nothing was changed"), "{e}");
            assert_eq!(t.seen(), before.seen(), "failing at step {fail_at}");
        }
        let mut t = before.clone();
        rt.block_on(apply(&mut t, &plan)).unwrap();
        assert_eq!(t.steps, steps);
        assert_eq!(
            t.seen(),
            (
                // b stays on lo: it was there before lbd.
                [b, c, d].into(),
                [c, d].into(),
                [c, d].into(),
                7000
            )
        );
    }

    /// Undoing only undoes what this reload did: a VIP served already is
    /// not unserved, one not served is not served afterwards.
    #[test]
    fn undoing_leaves_what_was_already_so() {
        let (a, b) = (ip("198.18.100.1"), ip("198.18.100.2"));
        let before = Fake {
            lo: [a].into(),
            served: [a].into(),
            port: 6080,
            ..Fake::default()
        };
        // a is "added" though served already (an earlier lbd's map), b
        // "removed" though not served; then the port fails.
        let plan = Plan {
            added: vec![a],
            removed: vec![b],
            gue_port: Some([6080, 1]),
        };
        let mut t = Fake {
            fail_at: Some(3),
            ..before.clone()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(apply(&mut t, &plan)).unwrap_err();
        assert_eq!(t.seen(), before.seen());
    }
}
