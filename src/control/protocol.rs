//! Wire types of the control protocol: request parsing with typed errors, error codes, field
//! accessors that say which field is wrong and why. docs/PROTOCOL.md describes the same.

use serde_json::{json, Value};

use crate::error::ErrorCode;
use crate::pipeline::PipelineError;
use crate::store::StoreError;

/// Protocol version reported by `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// An error answered on the wire: a stable upper-case code and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Stable code (VALIDATION, NOT_FOUND, …).
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// An error with a code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A VALIDATION error.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Validation, message)
    }

    /// An INTERNAL error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl From<crate::session::SessionError> for ApiError {
    fn from(e: crate::session::SessionError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        Self::new(e.code(), e.to_string())
    }
}

/// A parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Echoed in every response line (any JSON value; null when absent).
    pub id: Value,
    /// Operation name.
    pub op: String,
    /// Optional idempotency key.
    pub idempotency_key: Option<String>,
    /// The whole request object (op-specific fields).
    pub args: Value,
}

/// Parses one request line. On error, returns the id when it could be read (else null).
pub fn parse(line: &[u8]) -> Result<Request, (Value, ApiError)> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        (
            Value::Null,
            ApiError::new(
                ErrorCode::Validation,
                format!("malformed JSON: {e}; send one JSON object per line"),
            ),
        )
    })?;
    let Value::Object(ref o) = v else {
        return Err((
            Value::Null,
            ApiError::validation("a request must be a JSON object"),
        ));
    };
    let id = o.get("id").cloned().unwrap_or(Value::Null);
    let op = match o.get("op") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err((id, ApiError::validation("field op must be a string"))),
        None => return Err((id, ApiError::validation("missing field op"))),
    };
    let idempotency_key = match o.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
        Some(_) => {
            return Err((
                id,
                ApiError::validation("idempotency_key must be a string of 1 to 256 bytes"),
            ))
        }
    };
    Ok(Request {
        id,
        op,
        idempotency_key,
        args: v,
    })
}

/// The seed edge case an error answers, for `cwm_edge_case_total`.
#[must_use]
pub fn edge_case_of(e: &ApiError) -> Option<&'static str> {
    let m = e.message.as_str();
    Some(match e.code {
        ErrorCode::SessionAlreadyFrozen => "EC-001",
        ErrorCode::Busy if m.contains("being frozen") => "EC-001",
        ErrorCode::InvalidStateTransition if m.contains("generation is in progress") => "EC-003",
        ErrorCode::InvalidStateTransition => "EC-030",
        // EC-004: KV of other inputs refused (other tokens; another model, adapter or salt).
        ErrorCode::TokenMismatch | ErrorCode::NamespaceMismatch => "EC-004",
        ErrorCode::ConcurrentModification => "EC-005",
        ErrorCode::QuotaExceeded => "EC-020",
        ErrorCode::NoSpace => "EC-052",
        ErrorCode::TooManySessions => "EC-021",
        ErrorCode::InsufficientMemory => "EC-022",
        ErrorCode::SessionHasWindows => "EC-031",
        ErrorCode::Interrupted => "EC-040",
        ErrorCode::Timeout => "EC-041",
        ErrorCode::Corruption => "EC-050",
        ErrorCode::Validation if m.contains("EC-010") => "EC-010",
        ErrorCode::Validation if m.contains("EC-014") => "EC-014",
        ErrorCode::Validation
            if m.contains("characters long") || m.contains("must not be empty") =>
        {
            "EC-012"
        }
        ErrorCode::Validation if m.contains("only ASCII letters") => "EC-013",
        _ => return None,
    })
}

/// One error response line.
#[must_use]
pub fn error_line(id: &Value, e: &ApiError) -> String {
    json!({"id": id, "ok": false, "final": true, "error": {"code": e.code.as_str(), "message": e.message}})
        .to_string()
}

/// A required string field.
pub fn str_field<'a>(a: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    match a.get(name) {
        Some(Value::String(s)) => short(name, s),
        Some(_) => Err(ApiError::validation(format!(
            "field {name} must be a string"
        ))),
        None => Err(ApiError::validation(format!("missing field {name}"))),
    }
}

/// Longest string field (bytes): they are identifiers — engine, session, window, model,
/// salt, state — kept in memory and written to the log (a session id of 16 MiB would be both).
pub const MAX_STR_FIELD: usize = 1024;

/// `s`, unless longer than [`MAX_STR_FIELD`].
fn short<'a>(name: &str, s: &'a str) -> Result<&'a str, ApiError> {
    if s.len() > MAX_STR_FIELD {
        return Err(ApiError::validation(format!(
            "field {name} is {} bytes; at most {MAX_STR_FIELD}",
            s.len()
        )));
    }
    Ok(s)
}

/// An optional string field.
pub fn opt_str(a: &Value, name: &str) -> Result<Option<String>, ApiError> {
    match a.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => short(name, s).map(|s| Some(s.to_string())),
        Some(_) => Err(ApiError::validation(format!(
            "field {name} must be a string"
        ))),
    }
}

/// An optional unsigned integer field.
pub fn opt_u64(a: &Value, name: &str) -> Result<Option<u64>, ApiError> {
    match a.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::validation(format!("field {name} must be a non-negative integer"))
        }),
    }
}

/// A required list of unsigned integers.
pub fn u64_list(a: &Value, name: &str) -> Result<Vec<u64>, ApiError> {
    let Some(Value::Array(items)) = a.get(name) else {
        return Err(ApiError::validation(format!(
            "field {name} must be a list of non-negative integers"
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64().ok_or_else(|| {
                ApiError::validation(format!("{name}[{i}] must be a non-negative integer"))
            })
        })
        .collect()
}

/// A required list of token ids (u32).
pub fn u32_list(a: &Value, name: &str) -> Result<Vec<u32>, ApiError> {
    u64_list(a, name)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            u32::try_from(v).map_err(|_| {
                ApiError::validation(format!("{name}[{i}] = {v} does not fit in 32 bits"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_inputs_are_typed_errors() {
        assert_eq!(parse(b"{not json").unwrap_err().1.code, "VALIDATION");
        assert_eq!(parse(b"[1,2]").unwrap_err().1.code, "VALIDATION");
        let (id, e) = parse(br#"{"id": 5, "op": 7}"#).unwrap_err();
        assert_eq!(
            (id, e.message.as_str()),
            (json!(5), "field op must be a string")
        );
        assert!(parse(br#"{"id": 1}"#)
            .unwrap_err()
            .1
            .message
            .contains("missing field op"));
        let r = parse(br#"{"id": "x", "op": "hello", "idempotency_key": "k"}"#).unwrap();
        assert_eq!(
            (r.op.as_str(), r.idempotency_key.as_deref()),
            ("hello", Some("k"))
        );
        let a = json!({"ids": [1, -2], "t": [4294967296u64], "s": 3});
        assert!(u64_list(&a, "ids").unwrap_err().message.contains("ids[1]"));
        assert!(u32_list(&a, "t").unwrap_err().message.contains("32 bits"));
        assert!(str_field(&a, "s")
            .unwrap_err()
            .message
            .contains("must be a string"));
    }
}
