//! The wire's error codes, defined once. Every layer's error enum maps onto an [`ErrorCode`]
//! (`StoreError::code`, `PipelineError::code`, …); the server writes it as `error.code`, the
//! metrics count edge cases by it, the CLI derives its exit status from it, and the Python
//! client's exception table is tested against [`ErrorCode::ALL`] (tests/error_codes.rs).
//! docs/PROTOCOL.md ("Error codes") says what each means.

use std::fmt;

macro_rules! codes {
    ($($(#[$doc:meta])* $v:ident = $s:literal),+ $(,)?) => {
        /// A stable, upper-case error code of the control protocol.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $v,)+
        }

        impl ErrorCode {
            /// Every code, in the order docs/PROTOCOL.md lists them.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$v,)+];

            /// The code as it is written on the wire.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$v => $s,)+
                }
            }

            /// The code a wire string names, if any.
            #[must_use]
            pub fn from_wire(s: &str) -> Option<Self> {
                match s {
                    $($s => Some(ErrorCode::$v),)+
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// Malformed JSON, missing or mistyped fields, bad names, out-of-range block ids.
    Validation = "VALIDATION",
    /// An op the server does not know.
    UnknownOp = "UNKNOWN_OP",
    /// No such window, session or engine.
    NotFound = "NOT_FOUND",
    /// The name exists and the request did not ask to replace it.
    AlreadyExists = "ALREADY_EXISTS",
    /// The window changed since the generation the request expected.
    ConcurrentModification = "CONCURRENT_MODIFICATION",
    /// The store's byte budget would be exceeded.
    QuotaExceeded = "QUOTA_EXCEEDED",
    /// The file system is full.
    NoSpace = "NO_SPACE",
    /// Stored bytes failed their checksum.
    Corruption = "CORRUPTION",
    /// The window's layout cannot be scattered into the engine's.
    LayoutMismatch = "LAYOUT_MISMATCH",
    /// The engine's tokens differ from the window's.
    TokenMismatch = "TOKEN_MISMATCH",
    /// The window was frozen by another model or under another salt.
    NamespaceMismatch = "NAMESPACE_MISMATCH",
    /// Not enough host memory for the request.
    InsufficientMemory = "INSUFFICIENT_MEMORY",
    /// The engine's memory went away, or the requester hung up.
    Interrupted = "INTERRUPTED",
    /// The caller may not do this.
    PermissionDenied = "PERMISSION_DENIED",
    /// Something else holds what the request needs; retry later.
    Busy = "BUSY",
    /// The session is frozen already.
    SessionAlreadyFrozen = "SESSION_ALREADY_FROZEN",
    /// The session cannot go to the requested state from its current one.
    InvalidStateTransition = "INVALID_STATE_TRANSITION",
    /// The session limit is reached.
    TooManySessions = "TOO_MANY_SESSIONS",
    /// The session still has windows (delete with cascade).
    SessionHasWindows = "SESSION_HAS_WINDOWS",
    /// The request ran past its deadline.
    Timeout = "TIMEOUT",
    /// A needed facility is missing (no CUDA driver, no engine after a restart).
    Unavailable = "UNAVAILABLE",
    /// The operating system refused an I/O.
    IoError = "IO_ERROR",
    /// A bug or an invariant broken inside cwm.
    Internal = "INTERNAL",
}

impl ErrorCode {
    /// The CLI's exit status for a request that failed with this code: 2 invalid input,
    /// 3 not found, 4 busy or conflicting, 1 anything else.
    #[must_use]
    pub const fn exit_status(self) -> u8 {
        match self {
            ErrorCode::Validation
            | ErrorCode::UnknownOp
            | ErrorCode::LayoutMismatch
            | ErrorCode::TokenMismatch
            | ErrorCode::NamespaceMismatch => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::Busy
            | ErrorCode::SessionAlreadyFrozen
            | ErrorCode::ConcurrentModification
            | ErrorCode::AlreadyExists => 4,
            _ => 1,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn every_code_round_trips_through_its_wire_string() {
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(c.as_str()), Some(c));
            assert_eq!(c.to_string(), c.as_str());
        }
        assert_eq!(ErrorCode::from_wire("UNREACHABLE"), None);
    }

    #[test]
    fn exit_statuses_follow_the_protocol_document() {
        assert_eq!(ErrorCode::Validation.exit_status(), 2);
        assert_eq!(ErrorCode::NotFound.exit_status(), 3);
        assert_eq!(ErrorCode::Busy.exit_status(), 4);
        assert_eq!(ErrorCode::Corruption.exit_status(), 1);
    }
}
