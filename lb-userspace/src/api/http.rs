//! What lbd's servers take from hyper and give back: a request read whole
//! within the body cap, and complete answers. hyper does the framing; the
//! limits hyper cannot know about are here.

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{
    StatusCode,
    body::{Body, Bytes, Incoming},
    header::{self, HeaderValue},
    http::request::Parts,
};

/// Largest request head (request line and headers); hyper answers 431 past it.
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body; answered 413 past it.
pub const MAX_BODY: usize = 64 * 1024;

/// A control request as the handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query).
    pub path: String,
    pub body: Vec<u8>,
}

/// Why a request was not read: the status to answer and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub why: String,
}

/// An answer whose body is in memory.
pub type Answer = hyper::Response<Full<Bytes>>;

/// Reads the body of `req` up to [`MAX_BODY`]; an announced length over the
/// cap is refused before a byte of the body is read.
pub async fn read_whole(req: hyper::Request<Incoming>) -> Result<(Parts, Bytes), Refusal> {
    let (parts, body) = req.into_parts();
    let announced = body.size_hint().lower();
    if announced > MAX_BODY as u64 {
        return Err(too_large(Some(announced)));
    }
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok((parts, collected.to_bytes())),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large(None)),
        Err(e) => Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            why: format!("reading the request body: {e}"),
        }),
    }
}

fn too_large(announced: Option<u64>) -> Refusal {
    let size = announced.map_or_else(|| "a body".to_owned(), |n| format!("a body of {n} bytes"));
    Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        why: format!("{size} is over the {MAX_BODY}-byte limit"),
    }
}

impl Request {
    pub fn new(parts: &Parts, body: Bytes) -> Self {
        // An authority-form target (`CONNECT lbd:80`) has no path; kept as
        // sent, so that a refusal names what was asked for.
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |p| p.as_str().to_owned());
        Request {
            method: parts.method.as_str().to_owned(),
            path,
            body: body.to_vec(),
        }
    }
}

/// A JSON answer.
pub fn json(status: u16, body: &serde_json::Value) -> Answer {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    answer(status, "application/json", bytes.into())
}

/// A Prometheus exposition (or a plain-text refusal on that listener).
pub fn text(status: u16, body: String) -> Answer {
    answer(
        status,
        "text/plain; version=0.0.4; charset=utf-8",
        body.into(),
    )
}

fn answer(status: u16, content_type: &'static str, body: Bytes) -> Answer {
    let mut a = hyper::Response::new(Full::new(body));
    // The handler's statuses are all valid; anything else is our bug, and
    // a 500 says so better than a panic.
    *a.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    a.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_kept_whole() {
        let (parts, ()) = hyper::Request::builder()
            .method("POST")
            .uri("/v1/backends/add?x=1")
            .body(())
            .unwrap()
            .into_parts();
        let r = Request::new(&parts, Bytes::from_static(b"{}"));
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.body.as_slice()),
            ("POST", "/v1/backends/add?x=1", &b"{}"[..])
        );
    }

    /// Found by the `http` fuzz target: a target without a path reached the
    /// handler as an empty path ("no such endpoint: ").
    #[test]
    fn a_target_without_a_path_is_kept_as_sent() {
        for target in ["lbd:80", "*"] {
            let (parts, ()) = hyper::Request::builder()
                .method("CONNECT")
                .uri(target)
                .body(())
                .unwrap()
                .into_parts();
            assert_eq!(Request::new(&parts, Bytes::new()).path, target);
        }
    }

    #[test]
    fn answers_carry_their_type_and_status() {
        let a = json(409, &serde_json::json!({"error": "no"}));
        assert_eq!(a.status(), 409);
        assert_eq!(a.headers()[header::CONTENT_TYPE], "application/json");
        let a = text(200, "x 1\n".into());
        assert!(
            a.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        assert_eq!(json(1000, &serde_json::Value::Null).status(), 500);
    }
}
