"""The engine-worker side of cwm, without vLLM: registers KV tensors (CUDA IPC handles on a GPU,
this process's memory on the CPU), keeps the registration alive across cwm restarts, and runs
freezes and (prefix) thaws. CwmConnector's worker half is built on it; scripts/e2e_model.py
uses it directly on a GPU machine where vLLM is not installed."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .client import Client, CwmError, CwmUnavailable

#: How long a freeze answered BUSY (another freeze of its session, or cwm's --max-ops) keeps
#: retrying before it is reported failed.
BUSY_WAIT_S = 60.0
from .layout import cuda_ipc_region, describe, layout_request

# Under "vllm." so vLLM's logging configuration (format, level) applies inside vLLM.
logger = logging.getLogger("vllm.cwm_connector")


@dataclass
class LoadSpec:
    """Restore window blocks ``first_block ..`` into ``block_ids`` for a request."""

    req_id: str
    window: str
    tokens: list[int]
    first_block: int
    block_ids: list[int]
    session: str | None = None
    salt: str | None = None  # the request's own namespace salt (connector.request_salt)


@dataclass
class SaveSpec:
    """Freeze a finished request's blocks as a window."""

    req_id: str
    window: str
    tokens: list[int]
    block_ids: list[int]
    session: str | None = None
    replace: bool = False
    salt: str | None = None  # the request's own namespace salt (connector.request_salt)
    cls: str | None = None  # "unnamed" for automatic saves (evictable); None: pinned
    ttl: int | None = None  # seconds until the window expires
    auto: bool = False  # an automatic save: a window of that name already stored is success


def salted(salt: str | None) -> dict:
    """The ``salt`` field of a request, when it has one."""
    return {"salt": salt} if salt else {}


class Once:
    """Logs a failure once per cause until the next success."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def fail(self, cause: str, msg: str, *args: Any) -> None:
        with self._lock:
            if cause in self._seen:
                return
            self._seen.add(cause)
        logger.warning(msg, *args)

    def ok(self) -> None:
        with self._lock:
            if self._seen:
                logger.info("cwm: operations succeed again")
            self._seen.clear()


def cause(e: BaseException) -> str:
    return e.code if isinstance(e, CwmError) else type(e).__name__


def allow_ptrace_by(pid: int) -> None:
    """Where Yama restricts ptrace (scope 1), let cwm's process (and only it) read and write
    this process's memory with process_vm_readv/writev."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            if f.read().strip() != "1":
                return
    except OSError:
        return
    PR_SET_PTRACER = 0x59616D61
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PTRACER, ctypes.c_ulong(pid), 0, 0, 0) != 0:
        logger.warning("cwm: prctl(PR_SET_PTRACER, %d) failed: errno %d", pid, ctypes.get_errno())


def peer_pid(client: Client) -> int | None:
    s = client._sock
    if s is None:
        return None
    try:
        cred = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]
    except OSError:
        return None


class CwmWorker:
    """One engine's KV cache registered with cwm."""

    def __init__(self, socket_path: str, engine: str, model: str, salt: str | None = None,
                 timeout: float = 30.0, once: Once | None = None, rank: int = 0):
        self.rank = rank
        self.socket = socket_path
        self.engine = engine
        # The namespace of this rank's blocks. Parallel ranks hold different slices (heads,
        # layers) of the same tokens' KV in tensors of the same shape, so with one namespace
        # their blocks would get the same keys and deduplicate into each other: rank k would
        # thaw rank 0's heads. Rank 0 keeps the model's own (the scheduler's lookups use it).
        self.model = model if rank == 0 else f"{model}#rank{rank}"
        self.salt = salt
        self.timeout = timeout
        self.once = once or Once()
        self.event = None
        self.register_req: dict | None = None
        self._reg: Client | None = None
        self._closed = threading.Event()
        self._keeper: threading.Thread | None = None

    def register(self, tensors: Sequence[Any], num_blocks: int, block_size: int, heads: int,
                 head: int, name: str | None = None) -> None:
        """Describes per-layer KV tensors (in layer order) and registers them, scoped to a
        connection this object keeps open. Raises LayoutError when they cannot be described;
        cwm being unreachable is logged and retried on the next operation."""
        d = describe(tensors, num_blocks)
        t0 = tensors[0]
        layout = layout_request(d, layers=len(tensors), block_size=block_size, heads=heads,
                                head=head,
                                name=name or f"{t0.device.type}:{tuple(t0.shape)}")
        if t0.device.type == "cuda":
            import torch

            self.event = torch.cuda.Event(interprocess=True)
            self.event.record()
            memory = {"cuda": {"tensors": [cuda_ipc_region(r) for r in d.regions],
                               "device": t0.device.index or 0,
                               "event": bytes(self.event.ipc_handle()).hex()}}
        else:
            memory = {"process": {"pid": os.getpid(),
                                  "tensors": [[r.base, r.nbytes] for r in d.regions]}}
        self.register_req = {"engine": self.engine, "model": self.model, "salt": self.salt,
                             "layout": layout, "memory": memory, "scope": "connection"}
        self._reg = Client(self.socket, timeout=self.timeout, on_connect=self._register)
        self.ensure_registered()

    def keep_registered(self, interval: float = 2.0) -> None:
        """Checks the registration every ``interval`` seconds in a background thread, so after
        a cwm restart the engine is registered again before the scheduler's next lookup needs
        it (not only at this worker's next load or freeze)."""
        if self._keeper is not None:
            return

        def run() -> None:
            while not self._closed.wait(interval):
                self.ensure_registered()

        self._keeper = threading.Thread(target=run, name="cwm-keeper", daemon=True)
        self._keeper.start()

    def _register(self, c: Client) -> None:
        pid = peer_pid(c)
        if pid:
            allow_ptrace_by(pid)
        assert self.register_req is not None
        r = c.call("register", **self.register_req)
        logger.info("cwm: registered engine %s (%d-byte blocks, %d pieces)", self.engine,
                    r.get("block_bytes", 0), len(self.register_req["layout"]["pieces"]))

    def ensure_registered(self) -> bool:
        """True when the engine is registered over a live connection (registering it again
        after cwm restarted)."""
        if self._reg is None:
            return False
        try:
            if self._reg.connected:
                self._reg.call("hello")  # raises CwmUnavailable when cwm went away
            else:
                self._reg.connect()
            return True
        except CwmUnavailable:
            try:
                self._reg.connect()
                return True
            except CwmError as e:
                self.once.fail(cause(e), "cwm: cannot register the KV cache (%s); serving without cwm", e)
        except CwmError as e:
            self.once.fail(cause(e), "cwm: cannot register the KV cache (%s); serving without cwm", e)
        return False

    def window_name(self, name: str) -> str:
        """The window this rank stores under ``name``: with tensor or pipeline parallelism every
        rank holds its own slice of the KV, frozen as its own window (rank 0 under the name
        itself, rank k under ``name--rk``); the scheduler looks prefixes up in rank 0's."""
        return name if self.rank == 0 else f"{name}--r{self.rank}"

    def record_event(self) -> None:
        """On a GPU: marks the end of this step's KV writes; cwm's gathers wait on it."""
        if self.event is not None:
            self.event.record()

    def load(self, spec: LoadSpec) -> tuple[list[int], dict]:
        """Thaws a window range into ``spec.block_ids``. Returns the block ids that were not
        restored (to recompute) and cwm's report. Never raises."""
        failed = list(spec.block_ids)
        rep: dict = {}
        try:
            if self.ensure_registered():
                # cwm stops at its deadline, before this client gives up: it never writes into
                # blocks this worker has already reported failed (vLLM may reuse them then).
                with Client(self.socket, timeout=self.timeout) as c:
                    r = c.thaw(self.engine, spec.block_ids, window=self.window_name(spec.window),
                               prefix=True, timeout_ms=max(1, int(self.timeout * 800)),
                               first_block=spec.first_block, tokens=spec.tokens,
                               session=spec.session, **salted(spec.salt))
                rep = r.get("report", {})
                restored = int(rep.get("blocks_restored", 0))
                failed = spec.block_ids[restored:]
                if rep.get("corruption"):
                    logger.warning(
                        "cwm: window %r: %s; %d of %d blocks restored, the rest is recomputed",
                        spec.window, rep["corruption"], restored, len(spec.block_ids))
                else:
                    self.once.ok()
                logger.info("cwm: request %s: %d blocks of window %r loaded in %.4f s",
                            spec.req_id, restored, spec.window, rep.get("loaded_secs", 0.0))
        except CwmError as e:
            self.once.fail(cause(e), "cwm: load of window %r failed (%s); recomputing", spec.window, e)
        except Exception as e:  # noqa: BLE001 - never take the engine down
            logger.exception("cwm: load of window %r failed unexpectedly: %s", spec.window, e)
        return failed, rep

    def save(self, spec: SaveSpec, on_captured: Callable[[], None] | None = None) -> dict | None:
        """Freezes blocks as a window; ``on_captured`` runs once cwm has read them. Returns the
        final answer, or None when the freeze failed (logged). Never raises."""
        try:
            if not self.ensure_registered():
                return None

            def freeze(c: Client) -> dict:
                kw: dict = {}
                if spec.cls:
                    kw["class"] = spec.cls
                if spec.ttl:
                    kw["ttl"] = int(spec.ttl)
                return c.freeze(self.engine, self.window_name(spec.window), spec.tokens,
                                spec.block_ids,
                                session=spec.session, replace=True if spec.replace else None,
                                on_captured=(lambda _m: on_captured()) if on_captured else None,
                                **salted(spec.salt), **kw)

            with Client(self.socket, timeout=max(self.timeout, 300.0)) as c:
                # BUSY (another freeze of this session still running — EC-001 — or --max-ops
                # freezes and thaws at once) means "retry when it finishes": the blocks are
                # held until this freeze ends, so it waits, backing off, up to BUSY_WAIT_S.
                deadline, pause, rethawed = time.monotonic() + BUSY_WAIT_S, 0.05, False
                while True:
                    try:
                        r = freeze(c)
                        break
                    except CwmError as e:
                        if e.code == "ALREADY_EXISTS" and spec.auto:
                            # The same tokens were saved before (the name is their digest).
                            if on_captured:
                                on_captured()
                            return {"window": {"name": spec.window}, "status": "stored"}
                        if e.code == "BUSY" and time.monotonic() + pause < deadline:
                            time.sleep(pause)
                            pause = min(pause * 2, 1.0)
                            continue
                        if e.code != "SESSION_ALREADY_FROZEN" or not spec.session or rethawed:
                            raise
                        # The conversation went on in the engine since the last freeze: it
                        # is live again, so the session is THAWED and can be frozen anew.
                        c.call("session.state", session=spec.session, state="THAWED")
                        rethawed = True
            w = r.get("window", {})
            logger.info("cwm: request %s frozen as %r v%s (%s tokens, durable)", spec.req_id,
                        w.get("name"), w.get("version"), w.get("num_tokens"))
            self.once.ok()
            return r
        except CwmError as e:
            self.once.fail(cause(e), "cwm: freeze of %r failed (%s)", spec.window, e)
        except Exception as e:  # noqa: BLE001 - never take the engine down
            logger.exception("cwm: freeze of %r failed unexpectedly: %s", spec.window, e)
        return None

    def close(self) -> None:
        self._closed.set()
        if self._reg is not None:
            self._reg.close()
