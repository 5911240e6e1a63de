//! Kernel-test support: the real object, run with BPF_PROG_TEST_RUN on
//! crafted frames. Each case is a row: frame in, verdict, frame out, counter
//! deltas.
// Each kernel test binary includes this module and uses a different subset.
#![allow(dead_code)]

use std::collections::BTreeMap;

use aya::{Ebpf, programs::TestRun, programs::TestRunOptions};
use lb_userspace::{dataplane, stats};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub struct Harness {
    pub ebpf: Ebpf,
}

pub struct RunOutput {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

/// Keeps this test thread on CPU 0: the flow cache is
/// per CPU, and BPF_PROG_TEST_RUN runs on the caller's CPU, so a thread that
/// migrated between runs would see different per-CPU state.
fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0
        );
    }
}

impl Harness {
    pub fn load() -> Self {
        pin_to_cpu0();
        let ebpf = dataplane::load_balancer().expect("load balancer object (are we root?)");
        Harness { ebpf }
    }

    pub fn load_with(sizes: &dataplane::MapSizes) -> Self {
        pin_to_cpu0();
        let ebpf =
            dataplane::load_balancer_with(sizes).expect("load balancer object (are we root?)");
        Harness { ebpf }
    }

    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        stats::global_counters(&self.ebpf).expect("read counters")
    }

    pub fn run(&mut self, frame: &[u8]) -> RunOutput {
        self.run_program(dataplane::BALANCER_PROGRAM, frame)
    }

    pub fn run_program(&mut self, name: &str, frame: &[u8]) -> RunOutput {
        let prog = dataplane::program_mut(&mut self.ebpf, name).unwrap();
        if prog.fd().is_err() {
            prog.load().expect("verify program");
        }
        // Room for encapsulation headers added in front of the frame.
        let mut out = vec![0u8; frame.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        RunOutput {
            verdict: res.return_value,
            frame: out,
        }
    }
}

/// Counter deltas between two snapshots, zero entries left out.
pub fn delta(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d != 0).then_some((*k, d))
        })
        .collect()
}
