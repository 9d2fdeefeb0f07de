"""The package's import layers (pyproject's import-linter contracts, run by `make lint`) hold, and breaking
them fails: an upward import in a copy of the tree breaks the contract."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
# grimp reads server/ as the top-level package `server`; the contracts' `installed_*` types
# (scripts/import_contracts.py) count imports spelled `moshi_ttt.server...` as the `server...` imports they are.
# Only these layers (above the server) may import it.
MAY_IMPORT_SERVER = ("moshi_ttt/apps/", "moshi_ttt/testing/", "moshi_ttt/experiments/")


def _lint(root: Path) -> subprocess.CompletedProcess:
    if not LINT.exists():
        pytest.fail(f"{LINT} missing: install the dev extras (import-linter)")
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)


def _copy_tree(dst: Path) -> Path:
    for name in ("moshi_ttt", "server", "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "scripts").mkdir()
    for name in ("pyproject.toml", "scripts/import_contracts.py"):
        shutil.copy(ROOT / name, dst / name)
    return dst


def test_import_contracts_are_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    contracts = (ROOT / "pyproject.toml").read_text().count("\n[[tool.importlinter.contracts]]\n")
    assert f"{contracts} kept, 0 broken" in out.stdout, out.stdout


@pytest.mark.parametrize("module,upward", [
    ("moshi_ttt/ttt/chunk.py", "from moshi_ttt.models import lm"),          # math importing a model
    ("moshi_ttt/models/lm.py", "from moshi_ttt import runtime"),            # a model importing app glue
    ("server/web/protocol.py", "from moshi_ttt.apps import infer"),          # the server importing an app
    # the server, from below, under its on-disk and its installed names
    ("moshi_ttt/ttt/stream.py", "import server.step.engine"),
    ("moshi_ttt/ttt/stream.py", "import moshi_ttt.server.step.engine"),
    ("moshi_ttt/ttt/stream.py", "from moshi_ttt.server.step import engine"),
    ("moshi_ttt/runtime.py", "from moshi_ttt.server.step.engine import Engine"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    _assert_planted_breaks(tmp_path, module, upward)


@pytest.mark.parametrize("module,line", [
    ("server/web/session.py", "import torch"),                                 # the web side importing torch
    ("server/web/app.py", "from moshi_ttt import runtime"),                   # ... through a module that does
    ("server/web/protocol.py", "from moshi_ttt.server.step import engine"),   # ... the model side, installed name
    ("server/link/remote.py", "from server.memory.slot_memory import SlotMemory"),  # ... the model side, on disk
])
def test_torch_on_the_web_side_breaks_the_contract(tmp_path, module, line):
    _assert_planted_breaks(tmp_path, module, line, contract="the web side of serve never imports torch")


@pytest.mark.parametrize("module,line", [
    ("moshi_ttt/memory/store.py", "import torch"),                            # the memory core importing torch
    ("moshi_ttt/memory/seal.py", "from moshi_ttt.models import lm_memory"),   # ... through a module that does
])
def test_torch_in_the_memory_core_breaks_the_contract(tmp_path, module, line):
    _assert_planted_breaks(tmp_path, module, line, contract="conversation memory's core")


@pytest.mark.parametrize("module,line,contract", [
    # a room importing one above it, under the server's on-disk and installed names
    ("server/core/events.py", "from server.web import session", "the server's rooms"),
    ("server/core/events.py", "from moshi_ttt.server.web import session", "the server's rooms"),
    ("server/step/engine.py", "import moshi_ttt.server.link.remote", "the server's rooms"),
    ("server/guards/limits.py", "from moshi_ttt.server.memory import memories", "the server's rooms"),
    # the web side reaching past the engine interface into the model's rooms
    ("server/web/agent.py", "from server.link import remote", "only through the engine interface"),
    ("server/web/session.py", "from moshi_ttt.server.link import messages", "only through the engine interface"),
])
def test_a_room_importing_upward_breaks_the_contract(tmp_path, module, line, contract):
    _assert_planted_breaks(tmp_path, module, line, contract=contract)


def _assert_planted_breaks(tmp_path: Path, module: str, line: str, contract: str = "") -> None:
    """`line` appended to `module` in a copy of the tree makes the lint fail, naming the module (and `contract`)."""
    root = _copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # noqa: E402,F401\n")
    out = _lint(root)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout and module.replace("/", ".").removesuffix(".py").split("moshi_ttt.")[-1] in \
        out.stdout, out.stdout
    broken = out.stdout[out.stdout.index("Broken contracts"):]
    assert contract in broken, out.stdout


def test_the_installed_names_are_the_packaging():
    """The contracts' `installed_names` are pyproject's package-dir renames (installed name != folder)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    roots = cfg["tool"]["importlinter"]["root_packages"]
    renamed = {f"{k}: {v}" for k, v in cfg["tool"]["setuptools"]["package-dir"].items() if k != v and v in roots}
    assert renamed == {"moshi_ttt.server: server"}
    for contract in cfg["tool"]["importlinter"]["contracts"]:
        assert set(contract["installed_names"]) == renamed, contract["name"]


def _imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_only_the_layers_above_the_server_import_it():
    offenders = []
    for path in sorted((ROOT / "moshi_ttt").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(MAY_IMPORT_SERVER):
            continue
        offenders += [f"{rel}: {m}" for m in _imports_of(path) if m == "moshi_ttt.server" or
                      m.startswith("moshi_ttt.server.")]
    assert not offenders, offenders


def test_the_server_is_imported_under_its_installed_name():
    """`server.X` and `moshi_ttt.server.X` would be two module objects for one file: only the latter is used."""
    offenders = []
    for folder in ("moshi_ttt", "server", "scripts", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in _imports_of(path)
                          if m == "server" or m.startswith("server.")]
    assert not offenders, offenders


def test_the_public_api_imports_lazily():
    code = ("import sys, moshi_ttt; assert 'torch' not in sys.modules, 'import moshi_ttt loaded torch'; "
            "print(sorted(moshi_ttt.__all__)); print(moshi_ttt.TTTLMGen.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    api, where = out.stdout.splitlines()
    assert api == str(sorted(["TTTConfig", "TTTModelConfig", "TTTGating", "TTTLMModel", "TTTLMGen",
                              "load_ttt_moshi"]))
    assert where == "moshi_ttt.models.lm"
