//! The exit-code policy against fake lbds: one that is absent, one that
//! hangs up, one that answers with a given status and body.

use std::{
    io::{Read, Write},
    os::unix::net::UnixListener,
    path::PathBuf,
    thread::JoinHandle,
};

use super::*;

const VIP: &str = "198.18.100.1:80/tcp";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lbctl-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Reads one request (head and `Content-Length` body).
fn read_request(s: &mut impl Read) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if body.len() >= len || n == 0 {
                return text;
            }
        }
        if n == 0 {
            return text;
        }
    }
}

/// A fake lbd that takes one request and answers `status` with `body`
/// (`None`: hangs up without answering). Joining it gives the request.
fn fake_lbd(name: &str, answer: Option<(u16, &'static str)>) -> (Lbctl, JoinHandle<String>) {
    let socket = scratch(name).join("lbd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let served = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let request = read_request(&mut s);
        if let Some((status, body)) = answer {
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
        request
    });
    (Lbctl::new(socket, false), served)
}

#[test]
fn bad_arguments_are_usage_errors_and_nothing_is_sent() {
    // Nothing listens here: an attempt to send would be "unreachable".
    let lbctl = Lbctl::new(scratch("usage").join("none.sock"), false);
    let cases: Vec<(Result<(), CliError>, &str)> = vec![
        (
            lbctl.add_backend("198.18.100.1:80", "198.18.0.22", 100),
            "no /tcp or /udp",
        ),
        (
            lbctl.add_backend(VIP, "198.18.0.999", 100),
            "not an IP address",
        ),
        (lbctl.drain(VIP, "nope", true), "not an IP address"),
        (
            lbctl.set_weight("x", "198.18.0.22", 1, None),
            "no /tcp or /udp",
        ),
        (lbctl.explain(VIP, "198.18.0.10", true), "ADDRESS:PORT"),
        (lbctl.stats(0.0), "greater than 0 and at most 3600"),
        (lbctl.stats(7200.0), "(got 7200)"),
        (
            lbctl.vip_add(VIP, "nat", "tcp"),
            "expected ipip, gue or l2dsr",
        ),
        (
            lbctl.vip_add(VIP, "ipip", "icmp"),
            "expected none, tcp or http",
        ),
        (lbctl.vip_remove("198.18.100.1"), "no /tcp or /udp"),
    ];
    for (i, (result, why)) in cases.into_iter().enumerate() {
        let e = result.unwrap_err();
        assert!(matches!(e, CliError::Usage(_)), "case {i}: {e:?}");
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains(why),
            "case {i}: {e} should say {why}"
        );
    }
}

#[test]
fn no_socket_is_unreachable() {
    let lbctl = Lbctl::new(scratch("absent").join("none.sock"), false);
    for result in [
        lbctl.list(),
        lbctl.teardown(),
        lbctl.top(),
        lbctl.stats(1.0),
    ] {
        let e = result.unwrap_err();
        assert!(matches!(e, CliError::Unreachable(_)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
        // The cause (the OS's words) is kept in the chain.
        let full = format!("{:#}", anyhow::Error::from(e));
        assert!(
            full.contains("cannot reach lbd") && full.contains("No such file"),
            "{full}"
        );
    }
}

#[test]
fn a_stale_socket_is_unreachable() {
    let socket = scratch("stale").join("lbd.sock");
    drop(UnixListener::bind(&socket).unwrap());
    let e = Lbctl::new(&socket, false).counters().unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e:?}");
}

#[test]
fn hanging_up_without_an_answer_is_unreachable() {
    let (lbctl, served) = fake_lbd("hangup", None);
    let e = lbctl.list().unwrap_err();
    served.join().unwrap();
    assert!(matches!(e, CliError::Unreachable(_)), "{e:?}");
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn a_refusal_exits_1_with_lbds_message() {
    let (lbctl, served) = fake_lbd(
        "refused",
        Some((
            404,
            r#"{"error":"no VIP 198.18.100.9:80/tcp is configured"}"#,
        )),
    );
    let e = lbctl
        .drain("198.18.100.9:80/tcp", "198.18.0.20", true)
        .unwrap_err();
    let request = served.join().unwrap();
    assert!(request.starts_with("POST /v1/backends/drain "), "{request}");
    assert_eq!(e.exit_code(), 1);
    assert_eq!(
        e.to_string(),
        "no VIP 198.18.100.9:80/tcp is configured (HTTP 404)"
    );
}

#[test]
fn a_change_applied_but_not_saved_exits_3() {
    let (lbctl, served) = fake_lbd(
        "not-saved",
        Some((
            507,
            r#"{"error":"applied to the data plane, not saved: state file /var/lib/lb/x.state.json: No space left on device"}"#,
        )),
    );
    let e = lbctl
        .drain("198.18.100.1:80/tcp", "198.18.0.20", true)
        .unwrap_err();
    served.join().unwrap();
    assert_eq!(e.exit_code(), 3);
    assert!(e.to_string().contains("not saved"), "{e}");
}

#[test]
fn a_refusal_without_an_error_body_still_exits_1() {
    let (lbctl, served) = fake_lbd("bare", Some((500, "[]")));
    let e = lbctl.list().unwrap_err();
    served.join().unwrap();
    assert!(matches!(e, CliError::Refused { status: 500, .. }), "{e:?}");
    assert_eq!(e.exit_code(), 1);
}

#[test]
fn an_answer_of_the_wrong_shape_is_a_failure_not_a_success() {
    let (lbctl, served) = fake_lbd("shape", Some((200, r#"{"vips": 3}"#)));
    let e = lbctl.list().unwrap_err();
    served.join().unwrap();
    assert!(matches!(e, CliError::Failed(_)), "{e:?}");
    assert_eq!(e.exit_code(), 1);
}

#[test]
fn explain_sends_the_typed_request_with_syn() {
    let answer = r#"{"vip":"198.18.100.1:80/tcp","client":"198.18.0.10:40000","packet":"syn",
        "verdict":"forward","backend":"198.18.0.21","backend_id":3,"backend_state":"up",
        "via":"ring_syn","reason":"new connection (SYN): the live ring"}"#;
    let (lbctl, served) = fake_lbd("explain", Some((200, answer)));
    lbctl.explain(VIP, "198.18.0.10:40000", true).unwrap();
    let request = served.join().unwrap();
    let body = request.split_once("\r\n\r\n").unwrap().1;
    let sent: ExplainRequest = serde_json::from_str(body).unwrap();
    assert_eq!(
        (sent.vip.as_str(), sent.client.as_str(), sent.syn),
        (VIP, "198.18.0.10:40000", true)
    );
}

#[test]
fn a_failed_local_operation_exits_1() {
    let dir = scratch("sysctl");
    let s = sysctl::Sysctl::at(crate::sysctl::Sysctls::new(dir.join("proc")), false);
    let e = s
        .restore(crate::sysctl::Role::Lb, Some(&dir.join("none.json")))
        .unwrap_err();
    assert!(matches!(e, CliError::Failed(_)), "{e:?}");
    assert_eq!(e.exit_code(), 1);
    assert!(e.to_string().contains("no backup"), "{e}");
}
