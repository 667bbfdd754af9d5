"""Test helpers: the cwm binary, a `cwm serve` child, real vLLM runs in child processes, and
on-disk corruption of a stored block."""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CWM = Path(os.environ.get("CWM_BIN", ROOT / "target" / "release" / "cwm"))
HERE = Path(__file__).resolve().parent


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG(SIGKILL): no orphan daemons or engines if the test process dies.
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM's CPU backend keeps one more CPU out of its OpenMP threads when a KV connector is
    # configured (vllm/utils/ompmultiprocessing.py): runs with and without cwm would compute on
    # different thread counts, and so differ in the last bits of their logprobs. The same
    # reservation for every run keeps them comparable (vllm_run.py reports what each used).
    e.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    return e


class Cwm:
    """`cwm serve` on a data directory, restartable."""

    def __init__(self, workdir: Path, capacity: str = "1GiB", segment_size: str = "64MiB",
                 extra: tuple[str, ...] = ()):
        self.capacity, self.segment_size, self.extra = capacity, segment_size, list(extra)
        self.data = workdir / "data"
        self.sock = workdir / "sock" / "cwm.sock"
        self.log = workdir / "cwm.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Cwm":
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(CWM), "serve", "--data-dir", str(self.data), "--socket", str(self.sock),
             "--capacity", self.capacity, "--segment-size", self.segment_size, *self.extra],
            stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        for _ in range(200):
            if self.sock.exists() and self.cli("health", check=False).returncode == 0:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"cwm serve exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("cwm serve did not come up")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(CWM), *args, "--socket", str(self.sock)],
                              capture_output=True, text=True, check=check)

    def windows(self) -> dict[str, dict]:
        out = json.loads(self.cli("ls", "--json").stdout)
        return {w["name"]: w for w in out["windows"]}

    def metric(self, name: str) -> float:
        series = json.loads(self.cli("metrics", "--json").stdout)  # {series: value}
        return sum(float(v) for k, v in series.items()
                   if k == name or k.startswith(name + "{"))


class RedisCluster:
    """A one-node Redis Cluster (Debian's redis-server, no persistence) on a free loopback port
    below the ephemeral range, holding every slot; stopped by `stop`."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = self._free_port()
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def _free_port() -> int:
        import socket
        for p in random.Random(os.getpid()).sample(range(12000, 21990), 2000):
            ok = True
            for q in (p, p + 10000):  # the node and its cluster bus
                with socket.socket() as s:
                    try:
                        s.bind(("127.0.0.1", q))
                    except OSError:
                        ok = False
            if ok:
                return p
        raise RuntimeError("no free port for redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, check=True).stdout

    def start(self) -> "RedisCluster":
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--cluster-enabled",
             "yes", "--cluster-config-file", str(self.dir / "nodes.conf"), "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--cluster-node-timeout", "1000"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        for _ in range(200):
            try:
                if "PONG" in self.cli("PING"):
                    break
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.05)
        self.cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        for _ in range(200):
            if "cluster_state:ok" in self.cli("CLUSTER", "INFO"):
                return self
            time.sleep(0.05)
        raise RuntimeError("redis cluster did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


def run_vllm(workdir: Path, name: str, job: dict, timeout: float = 600,
             extra_env: dict | None = None) -> list[dict]:
    """Runs vllm_run.py in a fresh process (a fresh engine) and returns its results."""
    jf, of, lf = (workdir / f"{name}.job.json", workdir / f"{name}.out.json", workdir / f"{name}.log")
    jf.write_text(json.dumps(job))
    e = env()
    e.update(extra_env or {})
    with open(lf, "wb") as log:
        p = subprocess.run([sys.executable, str(HERE / "vllm_run.py"), str(jf), str(of)],
                           stdout=log, stderr=subprocess.STDOUT, env=e, timeout=timeout,
                           preexec_fn=_die_with_parent)
    if p.returncode != 0:
        raise RuntimeError(f"vLLM run {name} failed ({p.returncode}): {lf.read_text()[-4000:]}")
    return json.loads(of.read_text())["results"]


def cpu_binding(workdir: Path, name: str) -> list[dict]:
    """The threads and CPUs each engine worker of run `name` computed on (vllm_run.py)."""
    return json.loads((workdir / f"{name}.out.json").read_text())["workers"]


def block_records(data: Path) -> list[tuple[Path, int, int]]:
    """(segment file, offset of the payload, payload length) of every block record, in log
    order (docs/FORMAT.md: segment header at 0 and, from segment format 2, its copy at 4096;
    records from 8192 (4096 in format 1); 64-byte record headers)."""
    out = []
    for seg in sorted(data.glob("segment-*.log")):
        with open(seg, "rb") as f:
            (version,) = struct.unpack_from("<H", f.read(16), 8)
            off = 8192 if version >= 2 else 4096
            while True:
                f.seek(off)
                h = f.read(64)
                if len(h) < 64 or h[:4] != b"CWMR":
                    break
                kind = h[6]
                (plen,) = struct.unpack_from("<Q", h, 32)
                inline = plen <= 4032
                if kind == 1:
                    out.append((seg, off + (64 if inline else 4096), plen))
                off += 4096 if inline else 4096 + -(-plen // 4096) * 4096
    return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))
        f.flush()
        os.fsync(f.fileno())


def tokens(seed: int, n: int) -> list[int]:
    """`n` pseudo-random token ids (3..999) from `seed`: a prompt no other seed shares."""
    r = random.Random(seed)
    return [r.randrange(3, 1000) for _ in range(n)]


def same(got: dict, want: dict, what: str) -> None:
    """Two vLLM results computed alike: the same token ids and the same logprobs, exactly."""
    assert got["token_ids"] == want["token_ids"], f"{what}: token ids differ"
    assert got["logprobs"] == want["logprobs"], f"{what}: logprobs differ"
