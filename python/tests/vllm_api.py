"""vLLM's connector API, read from a release's wheel without installing or importing it.

A vLLM wheel is ~330 MB and importing vLLM needs its CUDA build; the few source files the
connector depends on are a few hundred KB. This module reads them straight out of the wheel on
PyPI with HTTP range requests (the zip's central directory, then each file's bytes), caches them
under ``~/.cache/cwm/vllm-api/<version>/``, and parses them with ``ast``.

``python3 vllm_api.py fetch 0.33.0 0.34.0`` fills the cache (scripts/test.sh does it);
``test_vllm_api.py`` uses the rest.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

INDEX = "https://pypi.org/pypi/vllm/json"
BASE = "vllm/distributed/kv_transfer/kv_connector/v1/base.py"
CONNECTOR = Path(__file__).resolve().parents[1] / "cwm_vllm" / "connector.py"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "cwm" / "vllm-api"


class _RangeFile:
    """A read-only, seekable file over HTTP range requests (what ``zipfile`` needs)."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.size + off
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        if n == 0 or self.pos >= self.size:
            return b""
        end = min(self.size, self.pos + n) - 1
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        for attempt in range(4):
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    if r.status != 206:
                        raise OSError(f"{self.url}: range request answered {r.status}, not 206")
                    data = r.read()
                break
            except OSError:
                if attempt == 3:
                    raise
                time.sleep(1 + attempt)
        self.pos += len(data)
        return data


def _wheel_url(version: str) -> tuple[str, int]:
    with urllib.request.urlopen(INDEX, timeout=60) as r:
        meta = json.load(r)
    files = meta["releases"].get(version) or []
    wheels = [f for f in files if f["filename"].endswith("manylinux_2_28_x86_64.whl")]
    if not wheels:
        raise LookupError(f"vLLM {version}: no x86_64 wheel on PyPI")
    return urllib.parse.urljoin(INDEX, wheels[0]["url"]), int(wheels[0]["size"])


def fetch(version: str, paths: list[str]) -> dict[str, Path]:
    """The cached copies of ``paths`` (paths inside the wheel) of vLLM ``version``, reading
    those not cached yet from the wheel. A path the wheel does not hold maps to a missing
    file (its absence is recorded, so it is not asked again)."""
    d = cache_dir() / version
    want = [p for p in paths if not (d / p).exists() and not (d / (p + ".absent")).exists()]
    if want:
        url, size = _wheel_url(version)
        z = zipfile.ZipFile(_RangeFile(url, size))  # type: ignore[arg-type]
        names = set(z.namelist())
        for p in want:
            out = d / p
            out.parent.mkdir(parents=True, exist_ok=True)
            if p in names:
                tmp = out.with_suffix(".part")
                tmp.write_bytes(z.read(p))
                tmp.replace(out)
            else:
                (d / (p + ".absent")).write_text("not in the wheel\n")
    return {p: d / p for p in paths}


def installed(paths: list[str]) -> dict[str, Path] | None:
    """The installed vLLM's copies of ``paths``, found without importing vLLM; None when vLLM
    is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).parent
    return {p: root / p for p in paths}


@dataclass
class Method:
    """One method's shape: how it is bound and its parameters."""

    name: str
    kind: str  # "instance", "classmethod", "staticmethod"
    abstract: bool
    params: list[tuple[str, bool]]  # (name, has a default), after self/cls
    varargs: bool
    varkw: bool
    kwonly: list[tuple[str, bool]] = field(default_factory=list)


def _method(f: ast.FunctionDef) -> Method:
    decos = {d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute) else ""
             for d in f.decorator_list}
    kind = ("classmethod" if "classmethod" in decos
            else "staticmethod" if "staticmethod" in decos else "instance")
    a = f.args
    pos = a.posonlyargs + a.args
    first_default = len(pos) - len(a.defaults)
    params = [(p.arg, i >= first_default) for i, p in enumerate(pos)]
    if kind != "staticmethod":
        params = params[1:]
    kwonly = [(p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return Method(f.name, kind, "abstractmethod" in decos, params, a.vararg is not None,
                  a.kwarg is not None, kwonly)


def methods(source: Path, cls: str) -> dict[str, Method]:
    """The methods class ``cls`` of ``source`` defines itself."""
    tree = ast.parse(source.read_text(), str(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {f.name: _method(f) for f in node.body
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    raise LookupError(f"{source}: no class {cls}")


def top_level_names(source: Path) -> set[str]:
    """Names a module defines at its top level (classes, functions, assignments, imports)."""
    tree = ast.parse(source.read_text(), str(source))
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for n in body:
            if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(n.name)
            elif isinstance(n, ast.Assign):
                out.update(t.id for t in n.targets if isinstance(t, ast.Name))
            elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                out.add(n.target.id)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, (ast.If, ast.Try)):
                visit(n.body)
                visit(n.orelse)
                for h in getattr(n, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return out


def vllm_imports(source: Path) -> list[tuple[str, str, str | None]]:
    """``(module file path in the wheel, name, enclosing function or None)`` for every
    ``from vllm… import`` of ``source``, at any depth (TYPE_CHECKING blocks and function bodies
    included)."""
    tree = ast.parse(source.read_text(), str(source))
    out: list[tuple[str, str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for n in ast.iter_child_nodes(node):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "vllm":
                path = n.module.replace(".", "/") + ".py"
                out.extend((path, a.name, func) for a in n.names)
            inner = n.name if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            visit(n, inner)

    visit(tree, None)
    return out


def module_file(files: dict[str, Path], path: str) -> Path | None:
    """The file that holds module ``path`` (``a/b.py`` or the package ``a/b/__init__.py``)."""
    for p in (path, path[:-3] + "/__init__.py"):
        f = files.get(p)
        if f is not None and f.exists():
            return f
    return None


def wanted_paths() -> list[str]:
    """Every file of vLLM the connector's checks read."""
    paths = [BASE]
    for mod in dict.fromkeys(m for m, _, _ in vllm_imports(CONNECTOR)):
        paths += [mod, mod[:-3] + "/__init__.py"]
    return paths


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "fetch":
        sys.exit("usage: vllm_api.py fetch VERSION...")
    for v in sys.argv[2:]:
        got = fetch(v, wanted_paths())
        print(f"vLLM {v}: {sum(p.exists() for p in got.values())} files in {cache_dir() / v}")
