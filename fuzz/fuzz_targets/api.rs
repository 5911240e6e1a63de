//! What lbd decodes from a control API request before the controller sees
//! it (hyper does the HTTP framing): the request as the handler takes it
//! (`api::http::Request`), the JSON bodies (`BackendRequest`,
//! `VipRequest`, `ExplainRequest`, `DebugRequest`) and the checks
//! `api::handler` applies to their fields: the VIP syntax (`VipSpec`, also
//! `lbctl`'s and the configuration's), backend and client addresses, the
//! health check syntax (`controller::parse_check`) and the backend rules
//! (`config::check_backend`). Never a panic; a VIP that parses prints and
//! parses back to itself; every refusal says what was expected.
#![no_main]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use hyper::body::Bytes;
use lb_userspace::{
    api::{BackendRequest, DebugRequest, DiffRequest, ExplainRequest, VipRequest, http::Request},
    config::{CheckKind, EncapSources, ForwardMode, VipSpec, check_backend, vip::is_unicast},
    controller::parse_check,
};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};

/// A VIP as `parse_vip` in the handler reads it.
fn vip(s: &str) -> Option<VipSpec> {
    match s.parse::<VipSpec>() {
        Ok(v) => {
            assert!(is_unicast(v.addr) && !v.addr.is_loopback(), "{v}");
            assert_eq!(v.to_string().parse::<VipSpec>(), Ok(v), "{s:?}");
            let json = serde_json::to_string(&v).expect("a VIP serialises");
            assert_eq!(serde_json::from_str::<VipSpec>(&json).ok(), Some(v));
            Some(v)
        }
        Err(e) => {
            assert!(e.to_string().contains("expected ADDRESS:PORT/PROTO"), "{e}");
            None
        }
    }
}

fn check(s: &str) {
    match parse_check(s) {
        Ok(hc) => match hc.kind {
            CheckKind::None => assert_eq!(s, "none"),
            CheckKind::Tcp => assert_eq!(s, "tcp"),
            CheckKind::Http { path, .. } => assert_eq!(format!("http:{path}"), s),
            CheckKind::Udp { .. } => panic!("{s:?} made a UDP check"),
        },
        Err(e) => assert!(e.contains("expected none, tcp or http:/PATH"), "{e}"),
    }
}

/// Every backend rule, for every mode and ipip source configuration.
fn backend_rules(vip: &VipSpec, addr: IpAddr, weight: u32) {
    let existing = BTreeSet::from([addr]);
    for mode in [ForwardMode::Ipip, ForwardMode::L2dsr] {
        for encap in [
            EncapSources::default(),
            EncapSources {
                v4: Some(Ipv4Addr::new(198, 18, 0, 2)),
                v6: Some(Ipv6Addr::LOCALHOST),
            },
        ] {
            let _ = check_backend(vip, mode, addr, weight, encap, &BTreeSet::new());
            assert!(check_backend(vip, mode, addr, weight, encap, &existing).is_err());
        }
    }
}

/// A body decodes as `handler::body` decodes it, and what lbctl would
/// encode for it decodes the same.
fn body<T: Serialize + DeserializeOwned>(data: &[u8]) -> Option<T> {
    let t: T = serde_json::from_slice(data).ok()?;
    let again = serde_json::to_vec(&t).expect("a decoded body encodes");
    let back: T = serde_json::from_slice(&again).expect("an encoded body decodes");
    assert_eq!(
        serde_json::to_value(&back).ok(),
        serde_json::to_value(&t).ok()
    );
    Some(t)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    vip(&text);
    check(&text);

    if let Some(b) = body::<BackendRequest>(data)
        && let (Some(v), Ok(addr)) = (vip(&b.vip), b.backend.parse::<IpAddr>())
    {
        backend_rules(&v, addr, b.weight.unwrap_or(100));
    }
    // `set-weight --over`: any text is a duration within bounds or an error.
    if let Some(over) = body::<BackendRequest>(data).and_then(|b| b.over)
        && let Ok(d) = lb_userspace::config::parse_duration(&over)
    {
        assert!(d <= lb_userspace::config::MAX_DURATION, "{over:?} -> {d:?}");
    }
    let _ = body::<DiffRequest>(data);
    if let Some(r) = body::<VipRequest>(data) {
        vip(&r.vip);
        check(r.check.as_deref().unwrap_or("tcp"));
    }
    if let Some(e) = body::<ExplainRequest>(data) {
        vip(&e.vip);
        let _ = e.client.parse::<SocketAddr>();
    }
    let _ = body::<DebugRequest>(data);

    // The request line's method and target, then the body.
    let mut parts = data.splitn(3, |&b| b == b' ');
    let (method, target, rest) = (parts.next(), parts.next(), parts.next());
    if let (Some(method), Some(target)) = (method, target)
        && let Ok(req) = hyper::Request::builder()
            .method(method)
            .uri(target)
            .body(())
    {
        let (head, ()) = req.into_parts();
        let body = Bytes::copy_from_slice(rest.unwrap_or_default());
        let r = Request::new(&head, body.clone());
        assert_eq!(r.method, head.method.as_str());
        assert!(head.uri.to_string().ends_with(&r.path) || r.path == head.uri.path());
        assert_eq!(r.body, body);
    }
});
