//! The control API: HTTP/1.1 + JSON over a unix socket (mode 0600, so root
//! only). One request per connection; `lbctl` is its client.

pub mod client;
pub mod handler;
pub mod http;
pub mod server;
pub mod types;

pub use types::{
    AnnounceTarget, BackendRemoved, BackendState, BackendStatus, DebugSwitched, Explanation,
    NodeStatus, TeardownStarted, VipNodeStatus, VipRemoved, VipStatus,
};

use serde::{Deserialize, Serialize};

/// Body of the backend commands.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRequest {
    pub vip: String,
    pub backend: String,
    #[serde(default)]
    pub weight: Option<u32>,
    /// `weight` only: reach it in steps over this long (`"60s"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over: Option<String>,
    /// Fleet mode: make the change only if the fleet's desired state is
    /// still at this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_revision: Option<i64>,
}

/// Body of `POST /v1/vips/add` and `/v1/vips/remove`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipRequest {
    pub vip: String,
    /// `ipip` or `l2dsr` (add only).
    #[serde(default)]
    pub mode: Option<String>,
    /// `none`, `tcp` or `http:/PATH` (add only; default `tcp`).
    #[serde(default)]
    pub check: Option<String>,
    /// Fleet mode: as in [`BackendRequest::if_revision`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_revision: Option<i64>,
}

/// Body of `POST /v1/explain`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    pub vip: String,
    pub client: String,
    /// Ask about a new connection (a SYN) rather than a packet mid-stream.
    #[serde(default)]
    pub syn: bool,
}

/// Body of `POST /v1/diff`: a configuration file lbd reads (an absolute
/// path: lbd's working directory is not the caller's).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffRequest {
    pub file: String,
}

/// Body of `POST /v1/debug`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugRequest {
    pub enabled: bool,
}

/// Every error answer: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
