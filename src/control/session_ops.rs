//! The session ops, one method each: `session.open`, `session.state`, `session.close`,
//! `session.delete` (`session.list` is one line in the dispatcher). The sessions themselves
//! live in [`crate::session`]; their catalog records in [`super::persist`].

use serde_json::{json, Value};

use super::args::{SessionDeleteArgs, SessionOpenArgs, SessionStateArgs};
use super::protocol::ApiError;
use super::Server;
use crate::error::ErrorCode;
use crate::session::{context_warning, ContextWarning, SessionState};

impl Server {
    /// `session.open`.
    pub(super) fn op_session_open(&self, a: SessionOpenArgs) -> Result<Value, ApiError> {
        let s = self
            .sessions
            .open(&a.session, a.max_context)
            .map_err(ApiError::from)?;
        Ok(json!({"session": s}))
    }

    /// `session.state`: generation flag, token count, what the engine holds, a transition.
    pub(super) fn op_session_state(&self, a: SessionStateArgs) -> Result<Value, ApiError> {
        let id = a.session.as_str();
        let mut s = self
            .sessions
            .set_generating(id, a.generating, a.tokens)
            .map_err(ApiError::from)?;
        if let Some(held) = a.held {
            self.sessions.set_held(id, held).map_err(ApiError::from)?;
            s = self.sessions.get(id).map_err(ApiError::from)?;
        }
        if let Some(to) = a.state {
            s = self.sessions.transition(id, to).map_err(ApiError::from)?;
        }
        let warning = context_warning(s.tokens, s.max_context);
        if warning != ContextWarning::Ok {
            crate::log::warn(&format!(
                "session {id:?} at {}/{} tokens ({warning:?})",
                s.tokens,
                s.max_context.unwrap_or(0)
            ));
        }
        Ok(json!({"session": s, "context_warning": warning}))
    }

    /// `session.close`: the session expires.
    pub(super) fn op_session_close(&self, id: &str) -> Result<Value, ApiError> {
        let s = self
            .sessions
            .transition(id, SessionState::Expired)
            .map_err(ApiError::from)?;
        Ok(json!({"session": s}))
    }

    /// `session.delete`: refused while the session has windows, unless `cascade`.
    pub(super) fn op_session_delete(&self, a: SessionDeleteArgs) -> Result<Value, ApiError> {
        let id = a.session.as_str();
        let windows: Vec<String> = self
            .store
            .list()
            .map_err(ApiError::from)?
            .into_iter()
            .filter(|w| w.session == id)
            .map(|w| w.name)
            .collect();
        let known = self.sessions.get(id).is_ok();
        if !known && windows.is_empty() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("session {id:?} not found"),
            ));
        }
        if !windows.is_empty() && !a.cascade {
            return Err(ApiError::new(
                ErrorCode::SessionHasWindows,
                format!(
                    "session {id:?} has {} window(s) ({}); delete them first or pass cascade=true",
                    windows.len(),
                    windows.join(", ")
                ),
            ));
        }
        for w in &windows {
            self.store.delete_window(w, None).map_err(ApiError::from)?;
        }
        if known {
            self.sessions
                .transition(id, SessionState::Deleted)
                .map_err(ApiError::from)?;
        }
        Ok(json!({"session": id, "windows_deleted": windows}))
    }
}
