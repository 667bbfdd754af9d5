//! Each op's arguments as a typed struct, parsed once from the request object with the
//! field accessors of [`super::protocol`] (so every malformed field gets the same VALIDATION
//! message whichever op carries it). docs/PROTOCOL.md lists the fields per op.

use serde_json::Value;

use super::protocol::{self, opt_str, opt_u64, str_field, u32_list, u64_list, ApiError};
use crate::store::{Class, Replace, Retention};

/// An optional boolean field (null counts as absent).
fn opt_bool(a: &Value, name: &str) -> Result<Option<bool>, ApiError> {
    match a.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::validation(format!(
            "field {name} must be a boolean"
        ))),
    }
}

/// A list field parsed only when the request carries it (null included: then it must be a
/// list, as when it is required).
fn present<T>(
    a: &Value,
    name: &str,
    parse: fn(&Value, &str) -> Result<T, ApiError>,
) -> Result<Option<T>, ApiError> {
    a.get(name).map(|_| parse(a, name)).transpose()
}

/// `freeze`.
pub(super) struct FreezeArgs {
    pub window: String,
    pub session: Option<String>,
    pub engine: Option<String>,
    /// Given by the request (else what the session holds).
    pub tokens: Option<Vec<u32>>,
    pub block_ids: Option<Vec<u64>>,
    pub replace: Replace,
    pub salt: Option<String>,
    pub retention: Retention,
}

/// `class` ("pinned" | "unnamed", default pinned) and `ttl` (seconds from now, > 0) of a
/// `freeze`.
fn retention(a: &Value) -> Result<Retention, ApiError> {
    let class = match a.get("class") {
        None | Some(Value::Null) => Class::Pinned,
        Some(v) => serde_json::from_value::<Class>(v.clone()).map_err(|_| {
            ApiError::validation(format!("class must be \"pinned\" or \"unnamed\", not {v}"))
        })?,
    };
    let expires_unix_ms = match opt_u64(a, "ttl")? {
        None => None,
        Some(0) => return Err(ApiError::validation("ttl must be at least 1 second")),
        Some(t) => Some(expiry(t)?),
    };
    Ok(Retention {
        class,
        expires_unix_ms,
    })
}

/// The expiry `seconds` from now (ms since the Unix epoch).
pub(super) fn expiry(seconds: u64) -> Result<i64, ApiError> {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .and_then(|ms| crate::clock::now_unix_ms().checked_add(ms))
        .ok_or_else(|| ApiError::validation(format!("ttl {seconds} s is too large")))
}

impl FreezeArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        let replace = match a.get("replace") {
            None | Some(Value::Bool(false)) | Some(Value::Null) => Replace::No,
            Some(Value::Bool(true)) => Replace::Any,
            Some(v) => Replace::IfVersion(v.as_u64().ok_or_else(|| {
                ApiError::validation("replace must be a boolean or a version number")
            })?),
        };
        Ok(Self {
            session: opt_str(a, "session")?,
            engine: opt_str(a, "engine")?,
            tokens: present(a, "tokens", u32_list)?,
            block_ids: present(a, "block_ids", u64_list)?,
            replace,
            window: str_field(a, "window")?.to_string(),
            salt: opt_str(a, "salt")?,
            retention: retention(a)?,
        })
    }
}

/// `pin`, `unpin` and `ttl`: a window, its expected version, and for `ttl` the seconds from
/// now (0: no expiry).
pub(super) struct RetainArgs {
    pub window: String,
    pub expected_version: Option<u64>,
    pub seconds: Option<u64>,
}

impl RetainArgs {
    pub fn parse(a: &Value, needs_seconds: bool) -> Result<Self, ApiError> {
        let seconds = opt_u64(a, "seconds")?;
        if needs_seconds && seconds.is_none() {
            return Err(ApiError::validation(
                "missing field seconds (the TTL from now; 0 removes it)",
            ));
        }
        Ok(Self {
            window: str_field(a, "window")?.to_string(),
            expected_version: opt_u64(a, "expected_version")?,
            seconds,
        })
    }
}

/// `thaw`.
pub(super) struct ThawArgs {
    /// None: the window holding the longest stored prefix of `tokens`.
    pub window: Option<String>,
    pub session: Option<String>,
    pub engine: Option<String>,
    /// Given by the request (else what the session holds).
    pub block_ids: Option<Vec<u64>>,
    /// The tokens the engine holds for this prefix, checked against the window.
    pub tokens: Option<Vec<u32>>,
    pub prefix: bool,
    pub first_block: usize,
    pub salt: Option<String>,
    pub timeout_ms: Option<u64>,
}

impl ThawArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        let tokens = match a.get("tokens") {
            None | Some(Value::Null) => None,
            Some(_) => Some(u32_list(a, "tokens")?),
        };
        Ok(Self {
            session: opt_str(a, "session")?,
            engine: opt_str(a, "engine")?,
            block_ids: present(a, "block_ids", u64_list)?,
            tokens,
            prefix: opt_bool(a, "prefix")?.unwrap_or(false),
            salt: opt_str(a, "salt")?,
            window: opt_str(a, "window")?,
            first_block: opt_u64(a, "first_block")?.unwrap_or(0) as usize,
            timeout_ms: opt_u64(a, "timeout_ms")?,
        })
    }
}

/// `lookup`.
pub(super) struct LookupArgs {
    pub engine: String,
    pub tokens: Vec<u32>,
    pub prefill_tokens_per_s: Option<f64>,
    pub salt: Option<String>,
    /// Only this window counts.
    pub window: Option<String>,
}

impl LookupArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        let engine = str_field(a, "engine")?.to_string();
        let tokens = u32_list(a, "tokens")?;
        let prefill_tokens_per_s = match a.get("prefill_tokens_per_s") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_f64()
                    .ok_or_else(|| ApiError::validation("prefill_tokens_per_s must be a number"))?,
            ),
        };
        Ok(Self {
            engine,
            tokens,
            prefill_tokens_per_s,
            salt: opt_str(a, "salt")?,
            window: opt_str(a, "window")?,
        })
    }
}

/// `list`.
pub(super) struct ListArgs {
    pub offset: usize,
    pub limit: usize,
    pub session: Option<String>,
}

impl ListArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        Ok(Self {
            offset: opt_u64(a, "offset")?.unwrap_or(0) as usize,
            limit: opt_u64(a, "limit")?.unwrap_or(1000).min(10_000) as usize,
            session: opt_str(a, "session")?,
        })
    }
}

/// `delete`.
pub(super) struct DeleteArgs {
    pub window: String,
    pub expected_version: Option<u64>,
}

impl DeleteArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        Ok(Self {
            window: str_field(a, "window")?.to_string(),
            expected_version: opt_u64(a, "expected_version")?,
        })
    }
}

/// One required string field: `stat`'s window, `unregister`'s engine, `session.close`'s
/// session.
pub(super) fn name(a: &Value, field: &str) -> Result<String, ApiError> {
    Ok(str_field(a, field)?.to_string())
}

/// `session.open`.
pub(super) struct SessionOpenArgs {
    pub session: String,
    pub max_context: Option<u64>,
}

impl SessionOpenArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        Ok(Self {
            session: str_field(a, "session")?.to_string(),
            max_context: opt_u64(a, "max_context")?,
        })
    }
}

/// `session.state`.
pub(super) struct SessionStateArgs {
    pub session: String,
    pub generating: Option<bool>,
    pub tokens: Option<u64>,
    /// What the engine holds for the session: (engine, token ids, block ids).
    pub held: Option<(String, Vec<u32>, Vec<u64>)>,
    pub state: Option<crate::session::SessionState>,
}

impl SessionStateArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        let session = str_field(a, "session")?.to_string();
        let generating = opt_bool(a, "generating")?;
        let tokens = opt_u64(a, "tokens")?;
        let held = match opt_str(a, "engine")? {
            Some(engine) => Some((engine, u32_list(a, "token_ids")?, u64_list(a, "block_ids")?)),
            None => None,
        };
        let state = match opt_str(a, "state")? {
            Some(to) => Some(crate::session::SessionState::parse(&to).ok_or_else(|| {
                ApiError::validation("state must be ACTIVE, FROZEN, THAWED, EXPIRED or DELETED")
            })?),
            None => None,
        };
        Ok(Self {
            session,
            generating,
            tokens,
            held,
            state,
        })
    }
}

/// `session.delete`.
pub(super) struct SessionDeleteArgs {
    pub session: String,
    pub cascade: bool,
}

impl SessionDeleteArgs {
    pub fn parse(a: &Value) -> Result<Self, ApiError> {
        Ok(Self {
            session: str_field(a, "session")?.to_string(),
            cascade: a.get("cascade").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// The error of a list field a request must give (none given, nothing held instead).
pub(super) fn missing_list(name: &str) -> ApiError {
    protocol::u64_list(&Value::Null, name)
        .err()
        .unwrap_or_else(|| ApiError::validation(format!("missing field {name}")))
}
