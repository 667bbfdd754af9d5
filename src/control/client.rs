//! A small blocking client of the control protocol (the `cwm` CLI and tests use it).

use crate::error::ErrorCode;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

/// A connection to `cwm serve`.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    /// Connects to the socket.
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        let s = UnixStream::connect(path)?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            next_id: 1,
        })
    }

    /// Sends a raw line (tests send malformed input with it).
    pub fn send_raw(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(line)?;
        self.writer.write_all(b"\n")
    }

    /// Reads one response line.
    pub fn read_line(&mut self) -> std::io::Result<Value> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        serde_json::from_str(&l)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Sends a request (an `id` is added when absent) and returns every response line, the
    /// final one last.
    pub fn call(&mut self, mut req: Value) -> std::io::Result<Vec<Value>> {
        if req.get("id").is_none() {
            req["id"] = Value::from(self.next_id);
            self.next_id += 1;
        }
        self.send_raw(req.to_string().as_bytes())?;
        let mut out = Vec::new();
        loop {
            let v = self.read_line()?;
            let fin = v.get("final").and_then(Value::as_bool).unwrap_or(true);
            out.push(v);
            if fin {
                return Ok(out);
            }
        }
    }

    /// Like [`Client::call`] but returns only the final line.
    pub fn call_final(&mut self, req: Value) -> std::io::Result<Value> {
        self.call(req)?
            .pop()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no response"))
    }
}

/// Exit code for a final response: 0 ok, 2 invalid input, 3 not found, 4 busy or conflicting,
/// 1 anything else.
#[must_use]
pub fn exit_code(resp: &Value) -> i32 {
    if resp.get("ok").and_then(Value::as_bool) == Some(true) {
        return 0;
    }
    resp.pointer("/error/code")
        .and_then(Value::as_str)
        .and_then(ErrorCode::from_wire)
        .map_or(1, |c| i32::from(c.exit_status()))
}
