"""The install: one import root that no other distribution provides, commands registered by entry
points, imports that point one way, and the package working next to everything our extras pull in
(transformers >= 5.25 depends on Hugging Face's `kernels`, once the name of one of our folders),
from any working directory.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, entry_points, packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "moe_runtime"
DIST = "moe-runtime"
ROOT = "moe_runtime"


def _installed() -> bool:
    try:
        distribution(DIST)
    except PackageNotFoundError:
        return False
    return True


needs_install = pytest.mark.skipif(not _installed(), reason="moe-runtime is not installed in this environment "
                                                            "(bash scripts/install.sh dev)")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@needs_install
def test_our_top_level_names_are_ours_alone():
    """Fails if any installed distribution also provides a top-level import name of ours."""
    owners = packages_distributions()
    ours = {name for name, dists in owners.items() if DIST in {_norm(d) for d in dists}}
    assert ours == {ROOT}, f"moe-runtime provides top-level names {sorted(ours)}; expected only {ROOT!r}"
    for name in ours:
        others = sorted({d for d in owners[name] if _norm(d) != DIST})
        assert not others, f"top-level name {name!r} is also provided by {others}: one would shadow the other"


def test_the_checkout_has_one_package_root():
    """Only moe_runtime/ is a package at the top of the checkout (tests/ is not installed)."""
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {ROOT, "tests"}, packages
    assert {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()} == {"core", "kernels", "cluster", "offload"}


def _pyproject_table(group: str) -> dict[str, str]:
    from moe_runtime.core.config import tomllib  # tomli on Python 3.10
    with open(REPO / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"]["entry-points"][group])


@pytest.mark.parametrize("group", ["moe_runtime.commands", "moe_runtime.command_options"])
def test_entry_points_are_declared_installed_and_load(group):
    from moe_runtime.core.cli import declared_entry_points
    declared = _pyproject_table(group)
    assert declared_entry_points(group) == declared
    if _installed():
        assert {ep.name: ep.value for ep in entry_points(group=group)} == declared, "reinstall: metadata is stale"
    for target in declared.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr)), target


def test_every_command_comes_from_an_entry_point():
    from moe_runtime.core.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(_pyproject_table("moe_runtime.commands"))
    assert {"--workers", "--ep", "--storage"} <= set(sub.choices["train"]._option_string_actions)


# ------------------------------------------------------------------------------------ import graph
def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _import_graph() -> dict[str, set[str]]:
    """module -> our modules it imports anywhere in its text (top level or inside a function)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names]
            for name in names:
                if name.split(".")[0] != ROOT:
                    continue
                target = resolve(name)
                assert target is not None, f"{f}: imports {name}, which is not a module of {ROOT}"
                if target != m:
                    graph[m].add(target)
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def test_imports_point_one_way():
    """kernels <- core <- cluster, offload; nothing imports upward, cluster and offload not each other."""
    allowed = {"kernels": {"kernels"}, "core": {"core", "kernels"}, "cluster": {"cluster", "core", "kernels"},
               "offload": {"offload", "core", "kernels"}, "root": {"root", "core"}, "__main__": {"core"}}
    bad = sorted(f"{m} -> {t}" for m, ts in _import_graph().items() for t in ts
                 if _part(t) not in allowed[_part(m)])
    assert not bad, "imports against the layer rule:\n" + "\n".join(bad)


def test_no_import_cycles():
    """No module imports (even lazily) a module that imports it back, directly or around a circle:
    CLI modules import the library, never the reverse."""
    graph = _import_graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


# ------------------------------------------------------------------ next to transformers, from anywhere
def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@needs_install
@pytest.mark.parametrize("where", ["outside", "checkout"])
def test_transformers_and_moe_runtime_in_one_process(where, tmp_path):
    pytest.importorskip("transformers")
    code = ("from transformers import MixtralForCausalLM, MixtralConfig\n"
            "import torch, moe_runtime\n"
            "from moe_runtime import Trainer, load_model\n"
            "from moe_runtime.offload import enable_expert_cache\n"
            "from moe_runtime import kernels\n"
            "x = torch.randn(4, 8); idx = torch.tensor([[0], [1], [0], [1]])\n"
            "print(kernels.sort_by_expert(idx, 2)[1].tolist())\n"
            "print(moe_runtime.__file__)\n"
            "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)\n")
    r = _run(code, tmp_path if where == "outside" else REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    counts, ours, hf_kernels = r.stdout.split("\n")[:3]
    assert counts == "[2, 2]"
    assert Path(ours).resolve().is_relative_to(REPO) or "site-packages" in ours
    if hf_kernels != "None":  # Hugging Face's package, never a folder of ours
        assert not Path(hf_kernels).resolve().is_relative_to(PKG), hf_kernels


@needs_install
@pytest.mark.parametrize("where", ["outside", "checkout"])
def test_moe_command_runs_from_any_directory(where, tmp_path):
    """The console script (train, then eval and trace simulate on what it wrote) outside the checkout and
    at its root; a run directory in tmp_path either way."""
    moe = Path(sys.executable).parent / "moe"
    if not moe.exists():
        pytest.skip(f"no console script at {moe}")
    cwd = tmp_path if where == "outside" else REPO
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def moe_cmd(*args: str) -> str:
        r = subprocess.run([str(moe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"moe {' '.join(args)}: {r.stderr[-3000:]}"
        return r.stdout

    moe_cmd("train", "--max-steps", "2", "--eval-interval", "2", "--ckpt-interval", "2", "--batch-size", "2",
            "--seq-len", "32", "--out", str(run_dir), "--no-progress")
    trace = tmp_path / "trace.msgpack"
    moe_cmd("trace", "record", "--checkpoint", str(run_dir), "--out", str(trace), "--max-new-tokens", "4")
    assert "lru" in moe_cmd("trace", "simulate", str(trace), "--capacities", "25%")
    assert "policy default" in moe_cmd("generate", "--checkpoint", str(run_dir), "--gpu-expert-slots", "4", "--prompt", "def ",
                              "--max-new-tokens", "4", "--device", "cpu")


def test_scripts_do_not_shadow_installed_modules():
    """bench/ and examples/ run as scripts, so their folder is sys.path[0]: a file there named like an
    installed top-level module (bench/kernels.py vs Hugging Face's `kernels`) would replace it."""
    installed = set(packages_distributions()) | set(getattr(sys, "stdlib_module_names", ()))
    clashes = sorted(str(f.relative_to(REPO)) for folder in ("bench", "examples") for f in (REPO / folder).glob("*.py")
                     if f.stem in installed)
    assert not clashes, f"these scripts shadow installed modules when run: {clashes}"
