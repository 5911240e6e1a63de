//! The configuration loader (`lb_userspace::config::Config::parse`, what
//! `lbd --config` and a restart read): any text gives a `Config` or a
//! `ConfigError` naming a place in it, never a panic; and a configuration
//! that loads keeps the promises the rest of lbd builds on (map sizes it can
//! create, VIPs and backends within them, backends the control API would
//! accept too, bounded durations).
#![no_main]

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::maglev;
use lb_userspace::{
    config::{Config, MAX_DURATION, MAX_WEIGHT, VipSpec, check_backend},
    dataplane,
};
use libfuzzer_sys::fuzz_target;

fn check(c: &Config) {
    let s = &c.sizes;
    maglev::check_ring_size(s.ring_size).expect("a ring size the builder takes");
    assert!(s.flow_cache_slots.is_power_of_two());
    dataplane::map_sizes(s).expect("map sizes lbd can create");
    assert!(c.vips.len() <= s.max_vips as usize);
    let backends: usize = c.vips.iter().map(|v| v.backends.len()).sum();
    // Backend id 0 means none.
    assert!(backends < s.max_backends as usize);
    for d in [c.udp_timeout, c.tcp_idle_timeout, c.second_chance_window] {
        assert!(!d.is_zero() && d <= MAX_DURATION, "{d:?}");
    }
    let mut specs = BTreeSet::new();
    for v in &c.vips {
        assert!(specs.insert(v.spec), "{} twice", v.spec);
        let printed = v.spec.to_string();
        assert_eq!(printed.parse::<VipSpec>(), Ok(v.spec), "{printed}");
        let hc = &v.health_check;
        assert!(hc.timeout <= hc.interval && !hc.timeout.is_zero());
        assert!((1..=100).contains(&hc.rise) && (1..=100).contains(&hc.fall));
        let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
        for b in &v.backends {
            assert!(b.weight <= MAX_WEIGHT);
            check_backend(&v.spec, v.mode, b.addr, b.weight, c.encap_sources(), &seen)
                .expect("a backend the control API would take");
            seen.insert(b.addr);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // lbd reads the file as UTF-8 and refuses anything else before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let got = Config::parse("lb.toml", text);
    match &got {
        Ok(c) => check(c),
        Err(e) => {
            assert_eq!(e.file, "lb.toml");
            assert!(e.line >= 1 && e.column >= 1, "{e}");
            assert!(e.line <= text.lines().count() + 1, "{e}");
            assert!(e.to_string().starts_with("lb.toml:"));
        }
    }
    assert_eq!(
        Config::parse("lb.toml", text),
        got,
        "parsing is a function of the text"
    );
});
