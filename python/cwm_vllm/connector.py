"""CwmConnector: vLLM's KV connector (``KVConnectorBase_V1``) backed by cwm.

Load it with::

    kv_transfer_config={"kv_connector": "CwmConnector",
                        "kv_connector_module_path": "cwm_vllm.connector",
                        "kv_role": "kv_both",
                        "kv_load_failure_policy": "recompute",
                        "kv_connector_extra_config": {"socket": "/run/cwm/cwm.sock"}}

Per request (``kv_transfer_params``, e.g. ``SamplingParams(extra_args={"kv_transfer_params":
...})`` or the OpenAI server's ``kv_transfer_params`` field)::

    {"cwm": {"freeze_as": "window-name", "session": "s1", "replace": true}}  # freeze when done
    {"cwm": {"thaw": "window-name"}}   # restore the prompt's prefix from that window

The finished request's ``kv_transfer_params`` say what became of them (README, "With vLLM")::

    {"cwm": {"window": "window-name", "tokens": 165, "status": "pending"}}
    {"cwm": {"window": "w", "tokens": 165, "status": "refused", "error": "ALREADY_EXISTS",
             "thaw": {"window": "other", "status": "thawed", "tokens": 128}}}

Any prompt whose prefix is stored (in any window of the same model and layout) is served from
cwm without asking. Extra config keys: ``socket`` (default $CWM_SOCKET or cwm's default),
``salt`` (namespace salt), ``prefill_tokens_per_s`` (the engine's prefill rate: a number,
``"measure"`` (default: measured from the engine's own steps) or ``"off"``; a stored prefix whose
estimated thaw is slower than recomputing it is recomputed, with a debug log line), ``timeout_s`` (per control call, default 30),
``lookup_timeout_s`` (the scheduler's lookups, default 1), ``model_id`` (the namespace of
stored blocks; default: a digest of the model's config and weights with its dtype — see
:func:`namespace`),
``load`` (false turns loading off), ``save`` (``"named"``, the default: only requests with
``freeze_as``; ``"all"``: every finished request's full blocks too, as unnamed windows that cwm
may evict under its budget, opted out per request with ``{"cwm": {"save": false}}``; false:
off). ``{"cwm": {..., "ttl": seconds}}`` gives the saved window an expiry.

If cwm is down or answers an error, vLLM keeps serving: loads are reported failed (vLLM
recomputes with ``kv_load_failure_policy="recompute"``), freezes are refused (``UNREACHABLE``)
or dropped, each failure is logged once per cause, and the connector reconnects (and
re-registers) when cwm is back.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .client import Client, CwmError, CwmUnavailable
from .layout import LayoutError, layer_order
from .worker import CwmWorker, LoadSpec, Once, SaveSpec, salted

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm." so vLLM's logging configuration (format, level) applies.
logger = logging.getLogger("vllm.cwm_connector")


def _trace(what: str, *args: Any) -> None:
    """Debug log of the load path with a monotonic timestamp (VLLM_LOGGING_LEVEL=DEBUG)."""
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("cwm trace %.4f " + what, time.monotonic(), *args)

#: vLLM versions this connector was written and tested against.
SUPPORTED_VLLM = ">=0.32,<0.33"

__all__ = ["CwmConnector", "CwmConnectorMetadata", "LoadSpec", "SaveSpec", "SUPPORTED_VLLM"]

#: The code of a freeze or thaw refused because cwm could not be reached (the client library's
#: CwmUnavailable: no socket, refused, timed out, connection lost). Not a wire code: cwm's own
#: UNAVAILABLE means it answered (no CUDA driver, or draining at shutdown).
UNREACHABLE = CwmUnavailable.code


@dataclass
class CwmConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


def cwm_params(request: Any) -> dict:
    """The ``cwm`` part of a request's ``kv_transfer_params`` (empty when absent)."""
    p = getattr(request, "kv_transfer_params", None) or {}
    c = p.get("cwm") if isinstance(p, dict) else None
    return c if isinstance(c, dict) else {}


def has_embeds(request: Any) -> bool:
    """Whether the prompt comes (partly) as embeddings: its KV is not a function of token ids,
    so cwm neither stores nor restores it."""
    return getattr(request, "prompt_embeds", None) is not None


def request_salt(request: Any) -> str | None:
    """What besides its tokens makes a request's KV its own: its LoRA adapter (name and
    weights), a tenant's ``cache_salt``, its multimodal inputs (content hashes and placeholder
    positions: the placeholder tokens are the same for every image). None for a plain
    request. A request with a salt stores and finds blocks only under that salt, and cwm
    refuses to thaw a window frozen under another (NAMESPACE_MISMATCH)."""
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        path = str(getattr(lora, "lora_path", "") or "")
        parts.append(f"lora={getattr(lora, 'lora_name', '')}:{_adapter_digest(path) or path}")
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(f"salt={salt}")
    for f in getattr(request, "mm_features", None) or []:
        pos = getattr(f, "mm_position", None)
        parts.append(f"{getattr(f, 'modality', 'mm')}="
                     f"{getattr(f, 'mm_hash', None) or getattr(f, 'identifier', '')}"
                     f"@{getattr(pos, 'offset', '?')}+{getattr(pos, 'length', '?')}")
    if not parts:
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


_ADAPTERS: dict[tuple, str | None] = {}


def _adapter_digest(path: str) -> str | None:
    """weights_digest of a LoRA adapter directory, cached while none of its files changes
    (size and modification time of each: an adapter retrained in place rewrites its files
    without touching the directory's own time)."""
    try:
        files = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                             for e in os.scandir(path) if e.is_file()))
    except OSError:
        return None
    key = (path, files)
    if key not in _ADAPTERS:
        if len(_ADAPTERS) > 256:
            _ADAPTERS.clear()
        _ADAPTERS[key] = weights_digest(path)
    return _ADAPTERS[key]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLE = 4 << 10


def weights_digest(path: str) -> str | None:
    """A digest of a local model directory's config and weights, read sparsely: config.json
    whole; of each safetensors file its header (every tensor's name, dtype, shape, offsets)
    and 4 KiB from the middle of every tensor — so a fine-tune, or a LoRA merged into some
    matrices, changes it; of other weight files their size and 64 evenly spaced 4 KiB
    samples. A few MiB for a large model. Equal for the same files wherever they are. None
    when the directory holds no weight file or one cannot be read."""
    try:
        names = sorted(os.listdir(path))
        weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)
                   and os.path.isfile(os.path.join(path, n))]
        if not weights:
            return None
        h = hashlib.sha256(b"cwm-weights-v2\0")
        if "config.json" in names:
            with open(os.path.join(path, "config.json"), "rb") as fh:
                h.update(fh.read())
        for n in weights:
            f = os.path.join(path, n)
            size = os.path.getsize(f)
            h.update(f"\0{n}\0{size}\0".encode())
            with open(f, "rb") as fh:
                for off in _sample_offsets(fh, n, size):
                    fh.seek(off)
                    h.update(fh.read(SAMPLE))
        return h.hexdigest()[:24]
    except Exception:  # noqa: BLE001 - broken link, unreadable or malformed file: no digest
        return None


def _sample_offsets(fh: Any, name: str, size: int) -> list[int]:
    """Where to sample a weight file: a safetensors file's header and the middle of each of
    its tensors; any other file at 64 evenly spaced places."""
    if name.endswith(".safetensors") and size >= 8:
        import json
        import struct

        fh.seek(0)
        (hlen,) = struct.unpack("<Q", fh.read(8))
        if 8 + hlen <= size:
            header = json.loads(fh.read(hlen))
            offs = list(range(0, 8 + hlen, SAMPLE))
            for k in sorted(header):
                if k == "__metadata__":
                    continue
                a, b = header[k]["data_offsets"]
                offs.append(8 + hlen + max(a, (a + b) // 2 - SAMPLE // 2))
            return offs
    return sorted({min(size - 1, i * size // 64) for i in range(64)} if size else {0})


def _hub_snapshot(repo: str, revision: str | None) -> str | None:
    """The local snapshot directory of a Hub model already downloaded, if any."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - not installed, not cached, not a repo id
        return None


def namespace(model: str, dtype: Any, model_id: str | None = None,
              revision: str | None = None) -> str:
    """The namespace an engine's blocks are stored and found under (with the KV layout and
    the salt, which cwm adds): ``model_id`` when given; else the digest of the model's weights
    (a local directory, or the local snapshot of a Hub id), so the same weights share blocks
    wherever they live and changed weights never meet stale KV; else the directory's real path,
    or the Hub id with its revision."""
    if model_id:
        return f"{model_id}:{dtype}"
    path = model if os.path.isdir(model) else _hub_snapshot(model, revision)
    if path:
        d = weights_digest(path)
        return f"weights-{d}:{dtype}" if d else f"{os.path.realpath(path)}:{dtype}"
    return f"{model}@{revision}:{dtype}" if revision else f"{model}:{dtype}"


class CwmConnector(KVConnectorBase_V1):
    """Named, durable, verifiable KV windows for vLLM through cwm."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "KVCacheConfig | None" = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = self._kv_transfer_config
        extra = lambda k, d=None: cfg.get_from_extra_config(k, d)  # noqa: E731
        from .client import default_socket

        self._socket: str = extra("socket") or default_socket()
        self._timeout = float(extra("timeout_s", 30.0))
        # The scheduler waits for lookups: a stalled cwm must not stall vLLM for long.
        self._lookup_timeout = float(extra("lookup_timeout_s", 1.0))
        self._salt = extra("salt")
        rate = extra("prefill_tokens_per_s", "measure")
        # A number, "measure" (the default: this engine's own prefill rate, measured from the
        # scheduler's steps) or "off" (always thaw what matches).
        self._measure = rate == "measure"
        self._prefill_rate = float(rate) if rate not in (None, "", "measure", "off") else None
        # Steps scheduled and not yet reported, oldest first: (scheduled at, tokens). With
        # asynchronous scheduling step N+1 is scheduled before step N's output comes back.
        self._steps: collections.deque[tuple[float, int]] = collections.deque(maxlen=2)
        self._steps_seen = 0
        self._load_on = bool(extra("load", True))
        # "named" (the default: only requests that name a window with freeze_as), "all" (also
        # every other finished request's full blocks, as unnamed, evictable windows), or
        # false (off). True means "named".
        save = extra("save", "named")
        self._save_mode = {True: "named", False: "off", None: "named"}.get(save, save)
        if self._save_mode not in ("named", "all", "off"):
            raise ValueError(f"cwm: save must be \"named\", \"all\" or false, not {save!r}")
        self._save_on = self._save_mode != "off"
        self._block_size = vllm_config.cache_config.block_size
        mc = vllm_config.model_config
        # The namespace of stored blocks (see `namespace`), computed where the worker
        # registers: by then the weights are on disk.
        self._model_args = (str(mc.model), mc.dtype, extra("model_id"),
                            getattr(mc, "revision", None))
        self._model: str | None = None
        self._engine_base = f"vllm-{cfg.engine_id}"
        self._once = Once()
        if getattr(cfg, "kv_load_failure_policy", "recompute") != "recompute":
            logger.warning(
                "cwm: kv_load_failure_policy is %r; set it to 'recompute' so a failed or "
                "corrupt load is recomputed instead of failing the request",
                cfg.kv_load_failure_policy,
            )
        # Scheduler side.
        self._client: Client | None = None
        self._down_until = 0.0
        self._backoff = 1.0
        # Requests whose load was queued and not yet reported finished: such a request must
        # not be frozen when it finishes (aborted while loading: its blocks are still being
        # written, and vLLM frees it when the load ends).
        self._loading: set[str] = set()
        # request id -> (window, tokens matched, tokens computed locally, request salt)
        self._matches: dict[str, tuple[str, int, int, str | None]] = {}
        # request id -> why its freeze_as would be refused, as checked when the request was
        # first seen: (error code or None, version of the window it replaces or None).
        self._freeze_checks: dict[str, tuple[str | None, int | None]] = {}
        # request id -> what became of the window its "thaw" names (its kv_transfer_params'
        # "thaw" part), and the blocks its load goes to (a failed block lowers "tokens").
        self._thaws: dict[str, dict[str, Any]] = {}
        self._thaw_blocks: dict[str, list[int]] = {}
        self._loads: list[LoadSpec] = []
        self._saves: list[SaveSpec] = []
        self.stats = {"lookups": 0, "matched_tokens": 0, "loads": 0, "saves": 0}
        # Worker side.
        self._worker: CwmWorker | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # Saves submitted and not yet reported; those cwm captured (or that failed); of those,
        # the ids vLLM has told this worker are finished (a send may only be reported then).
        self._saving: set[str] = set()
        self._sent: set[str] = set()
        self._finished_seen: set[str] = set()
        self._recved: set[str] = set()
        self._load_errors: set[int] = set()
        logger.info("cwm: connector (%s) on %s", role.name, self._socket)

    # ------------------------------------------------------------------ scheduler side
    def _scheduler_client(self) -> Client | None:
        if time.monotonic() < self._down_until:
            return None
        if self._client is None:
            self._client = Client(self._socket, timeout=self._lookup_timeout)
        return self._client

    def _call(self, fn):
        return self._ask(fn)[0]

    def _ask(self, fn, expected: tuple[str, ...] = ()) -> tuple[Any, str | None]:
        """``(fn(client), None)``, or ``(None, error code)``: UNREACHABLE while cwm cannot be
        reached (or is backed off from). Errors other than the ``expected`` codes are logged
        once per cause."""
        c = self._scheduler_client()
        if c is None:
            return None, UNREACHABLE
        retried = False
        while True:
            was_connected = c.connected
            try:
                out = fn(c)
                self._once.ok()
                self._backoff = 1.0
                return out, None
            except CwmUnavailable as e:
                if not retried and was_connected and not isinstance(e.__cause__, TimeoutError):
                    # A connection cwm closed (it restarted): once more, on a new one.
                    retried = True
                    continue
                # Back off (1 s, doubling up to 30 s): while cwm is unreachable or stalled,
                # requests are served without asking it, and a stalled cwm costs the scheduler
                # one lookup timeout per backoff period, not every other second.
                self._down_until = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, 30.0)
                self._once.fail("unreachable", "cwm: unreachable (%s); serving without it", e)
                return None, UNREACHABLE
            except CwmError as e:
                if e.code in expected:
                    self._once.ok()
                    self._backoff = 1.0
                else:
                    self._once.fail(e.code, "cwm: %s", e)
                return None, e.code
            except Exception as e:  # noqa: BLE001 - a lookup must never take the scheduler down
                logger.exception("cwm: lookup failed unexpectedly: %s", e)
                return None, "INTERNAL"

    def _check_freeze(self, name: str, replace: bool) -> tuple[str | None, int | None]:
        """Whether a freeze as ``name`` would be refused, asked of cwm (``stat``, within the
        lookup timeout): (error code or None, version of the window it would replace)."""
        w, code = self._ask(lambda c: c.stat(name), expected=("NOT_FOUND",))
        if code == "NOT_FOUND":
            return None, None
        if code is not None:
            return code, None  # UNREACHABLE, VALIDATION (a bad name), ...
        if not replace:
            return "ALREADY_EXISTS", None
        return None, w.get("version")

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = cwm_params(request)
        rid = request.request_id
        name = params.get("freeze_as")
        if name and self._save_on and rid not in self._freeze_checks:
            # A name that is taken (without "replace") is refused now, visibly, rather than
            # by cwm after the request has finished.
            self._freeze_checks[rid] = self._check_freeze(str(name),
                                                          bool(params.get("replace", False)))
        if not self._load_on or params.get("load") is False:
            return 0, False
        want = str(params["thaw"]) if params.get("thaw") else None
        if want:
            # Restored from the window: none yet (the prompt's prefix may be vLLM's own).
            self._thaws[rid] = {"window": want, "status": "thawed", "tokens": 0}
        if has_embeds(request):
            self._refuse_thaw(rid, "VALIDATION", "the prompt is given as embeddings")
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        bs = self._block_size
        # vLLM must compute at least the last prompt token itself.
        limit = (len(prompt) - 1) // bs * bs
        if limit <= num_computed_tokens:
            if want:  # nothing to restore from it; but it must exist
                self._check_thaw(rid, want, matched=True)
            return 0, False
        try:
            salt = request_salt(request)
        except Exception as e:  # noqa: BLE001 - an unreadable adapter: do not share its KV
            logger.warning("cwm: request %s: cannot salt its KV (%s); not loading it",
                           request.request_id, e)
            self._refuse_thaw(rid, "INTERNAL")
            return 0, False
        r, code = self._ask(
            lambda c: c.lookup(
                self._engine_base + "-r0",
                prompt[:limit],
                window=want,
                prefill_tokens_per_s=self._prefill_rate,
                **salted(salt),
            )
        )
        self.stats["lookups"] += 1
        _trace("lookup %s: %s tokens in %s, thaw wins %s (prefill rate %s)", request.request_id,
               (r or {}).get("tokens_matched"), (r or {}).get("window"),
               (r or {}).get("thaw_wins"), self._prefill_rate)
        if r is None:
            # (NOT_FOUND from a lookup: this engine is not registered, e.g. cwm just restarted.)
            self._refuse_thaw(rid, "UNAVAILABLE" if code == "NOT_FOUND" else code or UNREACHABLE)
            return 0, False
        matched = min(int(r.get("tokens_matched", 0)), limit) // bs * bs
        if want and matched == 0:
            self._check_thaw(rid, want, matched=False)
            return 0, False
        if matched <= num_computed_tokens or not r.get("window"):
            return 0, False
        # A window the request names is required: restored whatever the estimate says.
        if not r.get("thaw_wins", True) and not want:
            logger.debug(
                "cwm: request %s: recomputing %d tokens (%.4f s) beats thawing them (%.4f s)",
                request.request_id, matched, r.get("estimated_recompute_secs") or 0.0,
                r.get("estimated_thaw_secs") or 0.0,
            )
            return 0, False
        self._matches[request.request_id] = (r["window"], matched, num_computed_tokens, salt)
        logger.info(
            "cwm: request %s: %d prompt tokens matched in window %r (%d computed locally)",
            request.request_id, matched, r["window"], num_computed_tokens,
        )
        self.stats["matched_tokens"] += matched - num_computed_tokens
        _trace("matched %s", request.request_id)
        return matched - num_computed_tokens, True

    def _check_thaw(self, req_id: str, window: str, matched: bool) -> None:
        """Refuses a named window that does not exist (NOT_FOUND) or, when it matched none of
        the prompt, does not start with it (TOKEN_MISMATCH): a lookup does not tell these
        apart."""
        w, code = self._ask(lambda c: c.stat(window), expected=("NOT_FOUND",))
        if w is not None:
            if not matched:
                self._refuse_thaw(req_id, "TOKEN_MISMATCH", "it does not start with this prompt")
        elif code == "NOT_FOUND":
            self._refuse_thaw(req_id, code, "no such window")
        else:
            self._refuse_thaw(req_id, code or UNREACHABLE)

    def _refuse_thaw(self, req_id: str, code: str, why: str | None = None) -> None:
        """The window the request's "thaw" names is not used (``code`` says why)."""
        t = self._thaws.get(req_id)
        if t is None:
            return
        t.pop("tokens", None)
        t.update(status="refused", error=code)
        if why:
            logger.warning("cwm: request %s: window %r not thawed: %s (%s); recomputing",
                           req_id, t["window"], why, code)

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        m = self._matches.pop(request.request_id, None)
        if num_external_tokens <= 0 or m is None:
            return
        window, matched, computed, salt = m
        bs = self._block_size
        ids = list(blocks.get_block_ids()[0])
        first = computed // bs
        n = num_external_tokens // bs
        self._loading.add(request.request_id)
        thaw = self._thaws.get(request.request_id)
        if thaw is not None:
            thaw["tokens"] = n * bs
            self._thaw_blocks[request.request_id] = ids[first : first + n]
        self._loads.append(
            LoadSpec(
                req_id=request.request_id,
                window=window,
                tokens=list(request.prompt_token_ids or [])[: computed + num_external_tokens],
                first_block=first,
                block_ids=ids[first : first + n],
                # No session: restoring a stored prefix does not move a session's state (an
                # ACTIVE session may reuse another window's prefix); freezes keep it right.
                session=None,
                salt=salt,
            )
        )
        self.stats["loads"] += 1

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = CwmConnectorMetadata(loads=self._loads, saves=self._saves)
        if self._loads:
            _trace("metadata with %d loads", len(self._loads))
        self._loads, self._saves = [], []
        if self._measure:
            n = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
            self._steps.append((time.monotonic(), n))
        return meta

    #: Steps with at least this many tokens are prefill-dominated: they measure the rate.
    MEASURE_MIN_TOKENS = 64

    def update_connector_output(self, connector_output: Any) -> None:
        if self._steps:
            t0, n = self._steps.popleft()
            dt = time.monotonic() - t0
            if n >= self.MEASURE_MIN_TOKENS and dt > 0:
                self._steps_seen += 1
            if n >= self.MEASURE_MIN_TOKENS and dt > 0 and self._steps_seen > 1:
                # (The engine's first prefill step includes its warm-up: not a rate.)
                seen = n / dt
                old = self._prefill_rate
                self._prefill_rate = seen if old is None else 0.8 * old + 0.2 * seen
        bad = getattr(connector_output, "invalid_block_ids", None)
        if bad:
            # A load that failed from some block on (a corrupt block, cwm gone): the window's
            # tokens before it were restored, vLLM recomputes the rest.
            for req_id, ids in self._thaw_blocks.items():
                hit = next((i for i, b in enumerate(ids) if b in bad), None)
                if hit is not None and req_id in self._thaws:
                    t = self._thaws[req_id]
                    t["tokens"] = min(t.get("tokens", 0), hit * self._block_size)
        for req_id in getattr(connector_output, "finished_recving", None) or ():
            self._loading.discard(req_id)
            self._thaw_blocks.pop(req_id, None)
        super().update_connector_output(connector_output)

    # Hooks of newer vLLM releases (tests/test_vllm_api.py checks them against each release's
    # KVConnectorBase_V1). Under 0.32 they are never called.

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any) -> bool:
        """No (vLLM >= 0.33): cwm's daemon holds legacy CUDA IPC handles to the KV cache, which
        cannot export the memory sleep mode allocates, and must never read memory that sleep
        released."""
        return False

    @classmethod
    def kv_cache_access(cls, kv_transfer_config: Any) -> Any:
        """``LEGACY_IPC`` (vLLM >= 0.34): another process (the daemon) imports the KV cache
        through legacy CUDA IPC handles, so vLLM must not allocate the extensible KV cache."""
        from vllm.config.kv_transfer import KVCacheAccess  # noqa: PLC0415 - vLLM >= 0.34 only

        return KVCacheAccess.LEGACY_IPC

    def may_load_async(self, request: "Request") -> bool:
        """Whether this request may load asynchronously (vLLM >= 0.34): yes when it names a
        window to thaw (cheap: no lookup). Automatic prefix hits load as before."""
        p = cwm_params(request)
        return bool(self._load_on and p.get("thaw") and p.get("load") is not False)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        """The prefill rate lookups are decided with (configured or measured)."""
        return self._prefill_rate

    def request_finished(
        self,
        request: "Request",
        block_ids: list[int],
    ) -> tuple[bool, dict[str, Any] | None]:
        """Queues the freeze a ``freeze_as`` asks for. The returned ``kv_transfer_params`` say
        what became of it (``status``: ``pending``, handed to the worker, which freezes it after
        this returns; or ``refused`` with an ``error`` code) and of a window the request named
        to ``thaw``."""
        rid = request.request_id
        self._matches.pop(rid, None)
        self._thaw_blocks.pop(rid, None)
        out: dict[str, Any] = {}
        thaw = self._thaws.pop(rid, None)
        if thaw is not None:
            out["thaw"] = thaw
        check = self._freeze_checks.pop(rid, None)
        params = cwm_params(request)
        name = params.get("freeze_as")
        delay = False
        if name and self._save_on:
            delay, freeze = self._freeze(request, block_ids, params, str(name), check)
            out.update(freeze)
        elif self._save_mode == "all" and params.get("save") is not False:
            delay, freeze = self._save_auto(request, block_ids, params)
            out.update(freeze)
        return delay, ({"cwm": out} if out else None)

    def _save_auto(self, request: "Request", block_ids: list[int],
                   params: dict) -> tuple[bool, dict[str, Any]]:
        """``save: "all"``: the finished request's full blocks as an unnamed window (evictable)
        named by a digest of its tokens and namespace; blocks already stored (a shared prefix)
        are referenced, not written again."""
        bs = self._block_size
        n = min(int(request.num_computed_tokens), len(request.all_token_ids)) // bs * bs
        if (n == 0 or request.request_id in self._loading or has_embeds(request)
                or n // bs > len(block_ids)):
            return False, {}
        try:
            salt = request_salt(request)
        except Exception:  # noqa: BLE001 - not saved: its KV cannot be salted
            return False, {}
        toks = list(request.all_token_ids[:n])
        h = hashlib.sha256(f"{self._engine_base}\0{salt or ''}\0".encode())
        h.update(b"".join(int(t).to_bytes(4, "little") for t in toks))
        name = "auto-" + h.hexdigest()[:40]
        ttl = params.get("ttl")
        self._saves.append(SaveSpec(req_id=request.request_id, window=name, tokens=toks,
                                    block_ids=list(block_ids[: n // bs]), salt=salt,
                                    cls="unnamed", ttl=int(ttl) if ttl else None, auto=True))
        self.stats["saves"] += 1
        return True, {"window": name, "tokens": n, "status": "pending", "class": "unnamed"}

    def _freeze(self, request: "Request", block_ids: list[int], params: dict, name: str,
                check: tuple[str | None, int | None] | None) -> tuple[bool, dict[str, Any]]:
        # Tokens whose KV is in the cache (the last sampled token has none yet).
        n = min(int(request.num_computed_tokens), len(request.all_token_ids))

        def refused(code: str, why: str) -> tuple[bool, dict[str, Any]]:
            if code != UNREACHABLE:  # (unreachable: logged once per outage)
                logger.warning("cwm: request %s: %s; %r not frozen (%s)", request.request_id,
                               why, name, code)
            return False, {"window": name, "tokens": n, "status": "refused", "error": code}

        if request.request_id in self._loading:
            # Finished (aborted) while its KV was still loading: its blocks are still being
            # written, and vLLM frees the request as soon as the load ends (a freeze then
            # would read freed blocks and report a request vLLM no longer knows).
            return refused("INTERRUPTED", "finished while its KV was loading")
        if has_embeds(request):
            return refused("VALIDATION", "a prompt given as embeddings is not frozen (its KV "
                           "is not a function of token ids)")
        try:
            salt = request_salt(request)
        except Exception as e:  # noqa: BLE001 - never take the scheduler down
            return refused("INTERNAL", f"cannot salt its KV ({e})")
        nb = -(-n // self._block_size)
        if nb == 0 or nb > len(block_ids):
            return refused("VALIDATION", f"no KV to freeze ({n} tokens, {len(block_ids)} blocks)")
        replace = bool(params.get("replace", False))
        if check is None or check[0] == UNREACHABLE:
            # Not seen before (or cwm was unreachable then): ask now. While the connector
            # backs off from an unreachable cwm this answers at once.
            check = self._check_freeze(name, replace)
        code, replaces = check
        if code is not None:
            why = {"ALREADY_EXISTS": "the window exists (\"replace\": true overwrites it)",
                   UNREACHABLE: "cwm is unreachable"}.get(code, "cwm refuses the name")
            return refused(code, why)
        self._saves.append(
            SaveSpec(
                req_id=request.request_id,
                window=name,
                tokens=list(request.all_token_ids[:n]),
                block_ids=list(block_ids[:nb]),
                session=params.get("session"),
                replace=replace,
                salt=salt,
                ttl=int(params["ttl"]) if params.get("ttl") else None,
            )
        )
        self.stats["saves"] += 1
        out: dict[str, Any] = {"window": name, "tokens": n, "status": "pending"}
        if replaces is not None:
            out["replaces"] = replaces
        return True, out

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # One engine (and one window) per rank: tensor and pipeline parallel ranks each hold
        # a slice of the KV.
        # (Data-parallel engines are separate engines with their own engine ids.)
        try:
            from vllm.distributed.parallel_state import (
                get_pp_group,
                get_tensor_model_parallel_rank,
                get_tensor_model_parallel_world_size,
            )

            rank = (get_pp_group().rank_in_group * get_tensor_model_parallel_world_size()
                    + get_tensor_model_parallel_rank())
        except Exception:  # noqa: BLE001 - parallel state not initialised: one process
            rank = 0
        names = layer_order(list(kv_caches))
        tensors = [kv_caches[n] for n in names]
        mc = self._vllm_config.model_config
        kc = self._kv_cache_config
        num_blocks = kc.num_blocks if kc is not None else tensors[0].shape[0]
        if self._model is None:
            try:
                self._model = namespace(*self._model_args)
            except Exception as e:  # noqa: BLE001 - never keep the engine from starting
                logger.warning("cwm: cannot digest the model's weights (%s); using its name", e)
                self._model = f"{self._model_args[0]}:{self._model_args[1]}"

        if self._worker is not None:
            # Registered again (the KV cache was reallocated): the old registration goes.
            self._worker.close()
            self._worker = None
        w = CwmWorker(self._socket, f"{self._engine_base}-r{rank}", self._model, self._salt,
                      self._timeout, self._once, rank=rank)
        try:
            w.register(tensors, num_blocks, self._block_size,
                       heads=mc.get_num_kv_heads(self._vllm_config.parallel_config),
                       head=mc.get_head_size(),
                       name=f"vllm:{tensors[0].device.type}:{tuple(tensors[0].shape)}")
        except LayoutError as e:
            logger.error("cwm: cannot describe the KV cache (%s); cwm is off for this engine", e)
            return
        except Exception as e:  # noqa: BLE001 - e.g. memory CUDA IPC cannot export
            logger.error("cwm: cannot register the KV cache (%s); cwm is off for this engine", e)
            return
        self._worker = w
        w.keep_registered()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cwm")

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # The saves of this step are remembered now: with speculative decoding vLLM asks for
        # the finished transfers (get_finished, told which requests finished) before
        # wait_for_save runs, and a finished id not known to be saving would be dropped, its
        # blocks never freed.
        if isinstance(connector_metadata, CwmConnectorMetadata) and connector_metadata.saves:
            with self._lock:
                self._saving.update(s.req_id for s in connector_metadata.saves)

    def _meta(self) -> CwmConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        m = self._get_connector_metadata()
        return m if isinstance(m, CwmConnectorMetadata) else None

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        m = self._meta()
        if m is None or not m.loads:
            return
        if self._worker is not None:
            # The scatters wait on this: blocks freed by a request whose last step may still be
            # running on the GPU (async scheduling) are written only after that step.
            self._worker.record_event()
        for spec in m.loads:
            if self._pool is None or self._worker is None:
                self._load_done(spec, spec.block_ids)
                continue
            _trace("submit load %s", spec.req_id)
            self._pool.submit(self._run_load, spec)

    def _run_load(self, spec: LoadSpec) -> None:
        failed = list(spec.block_ids)
        try:
            assert self._worker is not None
            failed, _ = self._worker.load(spec)
        finally:
            self._load_done(spec, failed)

    def _load_done(self, spec: LoadSpec, failed: list[int]) -> None:
        # Errors before the request id: get_finished (called first in a step) never reports a
        # load whose failed blocks get_block_ids_with_load_errors would miss.
        with self._lock:
            self._load_errors.update(failed)
            self._recved.add(spec.req_id)
        _trace("load done %s", spec.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: the request waits until get_finished reports them

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: "AttentionMetadata",
        **kwargs: Any,
    ) -> None:
        return  # windows are frozen whole when the request finishes (wait_for_save)

    def wait_for_save(self) -> None:
        m = self._meta()
        if m is None or not m.saves:
            return
        if self._worker is not None:
            # The gathers wait on this: capture never reads KV the forward pass still writes.
            self._worker.record_event()
        for spec in m.saves:
            with self._lock:
                self._saving.add(spec.req_id)
            if self._pool is None or self._worker is None:
                self._save_done(spec.req_id)
                continue
            self._pool.submit(self._run_save, spec)

    def _run_save(self, spec: SaveSpec) -> None:
        done = False

        def release() -> None:  # once: at `captured`, or when the freeze failed
            nonlocal done
            if not done:
                done = True
                self._save_done(spec.req_id)

        try:
            assert self._worker is not None
            self._worker.save(spec, on_captured=release)
        finally:
            release()

    def _save_done(self, req_id: str) -> None:
        with self._lock:
            self._sent.add(req_id)

    def get_finished(
        self, finished_req_ids: set[str]
    ) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            # Only ids with a save in flight are remembered (no growth with every request).
            self._finished_seen |= set(finished_req_ids) & self._saving
            sent = self._sent & self._finished_seen
            self._sent -= sent
            self._finished_seen -= sent
            self._saving -= sent
            recved, self._recved = self._recved, set()
        if recved:
            _trace("loads reported finished: %s", sorted(recved))
        return (sent or None), (recved or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._worker is not None:
            self._worker.close()
        if self._client is not None:
            self._client.close()
