//! The packet parser (`lb_common::parse::parse`, the XDP program's first
//! step): any bytes give a `Parsed` or a parse counter, never a panic; a
//! `Parsed` agrees with a reading of the frame by byte offsets; and a frame
//! `testframe` builds from a description decoded from the same input
//! parses back to that description, padded or not, and fails cut short.
#![no_main]

use lb_common::{
    parse::{Parsed, parse},
    stats::Counter,
    testframe,
};
use lb_fuzz::{
    Reader,
    frames::{reference_parse, spec_from},
};
use libfuzzer_sys::fuzz_target;

fn check_offsets(f: &[u8], p: &Parsed) {
    assert!(p.l3_offset == 14 || p.l3_offset == 18, "{p:?}");
    let ip_header = p.l4_offset - p.l3_offset;
    if p.is_ipv6 {
        assert_eq!(ip_header, 40);
    } else {
        assert!(
            (20..=60).contains(&ip_header) && ip_header.is_multiple_of(4),
            "{p:?}"
        );
    }
    assert!(p.l4_offset <= f.len(), "L4 offset past the frame: {p:?}");
    if p.counter() == Counter::ParseOtherL4 {
        assert_eq!((p.src_port, p.dst_port, p.tcp_flags), (0, 0, 0));
    }
}

fuzz_target!(|data: &[u8]| {
    let got = parse(data);
    assert_eq!(got, reference_parse(data), "{} bytes", data.len());
    if let Ok(p) = &got {
        check_offsets(data, p);
    }

    let mut r = Reader::new(data);
    let built = spec_from(&mut r);
    let frame = testframe::build(&built.spec);
    assert_eq!(parse(frame.as_slice()), built.expect, "{:?}", built.spec);
    // Ethernet pads short frames; a datagram shorter than the frame is fine.
    let mut padded = frame.clone();
    padded.extend(std::iter::repeat_n(0, r.below(64)));
    assert_eq!(parse(padded.as_slice()), built.expect, "padded");
    let cut = r.u16() as usize % frame.len();
    assert!(
        parse(&frame[..cut]).is_err(),
        "cut at {cut} of {}",
        frame.len()
    );
});
