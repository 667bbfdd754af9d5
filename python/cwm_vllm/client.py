"""A client of cwm's control protocol (docs/PROTOCOL.md): newline-delimited JSON over a Unix
socket. Standard library only. Every error code the server sends has its own exception class,
so callers can ``except NotFound`` rather than compare strings."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
from typing import Any, Callable, Iterator


class CwmError(Exception):
    """An error answered by cwm (``code`` is the wire code, e.g. ``NOT_FOUND``)."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None, response: dict | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.response = response or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.args[0]}"


class CwmUnavailable(CwmError):
    """cwm could not be reached (no socket, refused, connection lost)."""

    code = "UNREACHABLE"


def _error_class(code: str) -> type[CwmError]:
    name = "".join(p.capitalize() for p in code.lower().split("_"))
    return type(name, (CwmError,), {"code": code, "__doc__": f"cwm answered {code}."})


#: Exception class per wire error code (docs/PROTOCOL.md, "Error codes").
ERRORS: dict[str, type[CwmError]] = {
    c: _error_class(c)
    for c in (
        "VALIDATION", "UNKNOWN_OP", "NOT_FOUND", "ALREADY_EXISTS", "CONCURRENT_MODIFICATION",
        "QUOTA_EXCEEDED", "NO_SPACE", "CORRUPTION", "LAYOUT_MISMATCH", "TOKEN_MISMATCH",
        "NAMESPACE_MISMATCH",
        "INSUFFICIENT_MEMORY", "INTERRUPTED", "PERMISSION_DENIED", "BUSY",
        "SESSION_ALREADY_FROZEN", "INVALID_STATE_TRANSITION", "TOO_MANY_SESSIONS",
        "SESSION_HAS_WINDOWS", "TIMEOUT", "UNAVAILABLE", "IO_ERROR", "INTERNAL",
    )
}
globals().update({cls.__name__: cls for cls in ERRORS.values()})
NotFound = ERRORS["NOT_FOUND"]
Busy = ERRORS["BUSY"]
Corruption = ERRORS["CORRUPTION"]
Validation = ERRORS["VALIDATION"]
TokenMismatch = ERRORS["TOKEN_MISMATCH"]
NamespaceMismatch = ERRORS["NAMESPACE_MISMATCH"]
AlreadyExists = ERRORS["ALREADY_EXISTS"]


def default_socket() -> str:
    """The socket `cwm serve` listens on by default ($CWM_SOCKET, else
    $XDG_RUNTIME_DIR/cwm.sock, else /run/cwm/cwm.sock)."""
    if os.environ.get("CWM_SOCKET"):
        return os.environ["CWM_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "cwm.sock")
    return "/run/cwm/cwm.sock"


class Client:
    """One connection to `cwm serve`. Thread-safe: calls are serialised on the connection
    (open one client per thread for parallel operations). Reconnects on the next call after
    the connection was lost; ``on_connect`` runs on every new connection (the connector
    re-registers its engine there)."""

    def __init__(
        self,
        path: str | None = None,
        timeout: float | None = 30.0,
        on_connect: Callable[["Client"], None] | None = None,
    ):
        self.path = path or default_socket()
        self.timeout = timeout
        self.on_connect = on_connect
        self._sock: socket.socket | None = None
        self._file = None
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._in_connect = False

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        with self._lock:
            if self._sock is not None:
                return
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                raise CwmUnavailable(f"cannot reach cwm at {self.path}: {e}") from e
            self._sock = s
            self._file = s.makefile("rb")
            if self.on_connect is not None and not self._in_connect:
                self._in_connect = True
                try:
                    self.on_connect(self)
                except BaseException:
                    self.close()
                    raise
                finally:
                    self._in_connect = False

    def close(self) -> None:
        with self._lock:
            for x in (self._file, self._sock):
                try:
                    if x is not None:
                        x.close()
                except OSError:
                    pass
            self._sock = None
            self._file = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------
    def stream(self, op: str, **fields: Any) -> Iterator[dict]:
        """Sends one request and yields every response line (progress lines, then the final
        one). Raises the error class of an error answer."""
        with self._lock:
            self.connect()
            assert self._sock is not None and self._file is not None
            req = {"id": next(self._ids), "op": op}
            req.update({k: v for k, v in fields.items() if v is not None})
            try:
                self._sock.sendall(json.dumps(req, separators=(",", ":")).encode() + b"\n")
                while True:
                    line = self._file.readline()
                    if not line:
                        raise CwmUnavailable("cwm closed the connection")
                    msg = json.loads(line)
                    if not msg.get("ok", False):
                        err = msg.get("error") or {}
                        code = err.get("code", "INTERNAL")
                        cls = ERRORS.get(code, CwmError)
                        raise cls(err.get("message", "unknown error"), code, msg)
                    yield msg
                    if msg.get("final", True):
                        return
            except CwmUnavailable:
                self.close()
                raise
            except (OSError, ValueError) as e:
                self.close()
                raise CwmUnavailable(f"connection to cwm lost: {e}") from e

    def call(self, op: str, **fields: Any) -> dict:
        """Sends one request and returns the final response line."""
        last: dict = {}
        for msg in self.stream(op, **fields):
            last = msg
        return last

    # -- conveniences -------------------------------------------------------------------------
    def hello(self) -> dict:
        return self.call("hello")

    def health(self) -> dict:
        return self.call("health")

    def lookup(self, engine: str, tokens: list[int], **kw: Any) -> dict:
        return self.call("lookup", engine=engine, tokens=list(tokens), **kw)

    def freeze(self, engine: str, window: str, tokens: list[int], block_ids: list[int],
               on_captured: Callable[[dict], None] | None = None, **kw: Any) -> dict:
        """Freezes and returns the final (``durable``) line; ``on_captured`` runs as soon as
        cwm says the blocks were read (the engine may reuse them from then on)."""
        last: dict = {}
        for msg in self.stream("freeze", engine=engine, window=window, tokens=list(tokens),
                               block_ids=list(block_ids), **kw):
            if msg.get("status") == "captured" and on_captured is not None:
                on_captured(msg)
            last = msg
        return last

    def thaw(self, engine: str, block_ids: list[int], window: str | None = None, **kw: Any) -> dict:
        return self.call("thaw", engine=engine, window=window, block_ids=list(block_ids), **kw)

    def list(self, **kw: Any) -> dict:
        return self.call("list", **kw)

    def stat(self, window: str) -> dict:
        return self.call("stat", window=window)["window"]

    def delete(self, window: str, **kw: Any) -> dict:
        return self.call("delete", window=window, **kw)

    def metrics(self) -> str:
        return self.call("metrics")["text"]
