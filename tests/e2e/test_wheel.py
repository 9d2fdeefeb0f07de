"""The wheel users install. `pip wheel . --no-deps` (on a copy of the sources: the build writes build/ and
*.egg-info next to them) holds one top-level package, `moshi_ttt`, with the shipped configs and the web client.
Installed non-editable into a fresh venv outside the repository, run from a folder outside it,
`moshi-ttt serve --demo` answers /health and `moshi-ttt infer --demo` writes its output.

The fresh venv gets the heavy dependencies (torch, moshi, ...) through a .pth path line to this interpreter's
site-packages, instead of a 7 GB install. Path lines do not run the .pth files of the folders they add, so the
editable install of the repository there stays inert: the test checks `moshi_ttt` is imported from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest
import sphn

from moshi_ttt.models import demo

from support import audio_match
from support.launcher import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
WHEEL_ECHO_MIN = 0.45  # the installed demo echoes its input (measured 0.70: docs/demo.md)
SOURCES = ("pyproject.toml", "README.md", "moshi_ttt", "server", "configs")
pytestmark = pytest.mark.wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list(out.glob("moshi_ttt-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_holds_one_package_with_configs_and_web_client(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"moshi_ttt"}, top
    configs = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert configs >= {"moshi7b_ttt.yaml", "tiny.yaml", "demo_ttt.yaml"}
    assert {n.split("/")[-1] for n in names if n.startswith("moshi_ttt/configs/") and n.endswith(".yaml")} == configs
    static = {p.name for p in (ROOT / "server" / "web" / "static").iterdir() if p.is_file()}
    assert "index.html" in static
    assert {n.split("/")[-1] for n in names if n.startswith("moshi_ttt/server/web/static/")} == static
    assert "moshi_ttt/server/web/app.py" in names and "moshi_ttt/train/example.yaml" in names
    assert {f"moshi_ttt/models/demo_assets/{p.name}" for p in demo.DEMO_WEIGHTS} <= set(names)  # the trained demo


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """(bin folder of a fresh venv with the wheel installed non-editable, environment to run it in)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # this interpreter's site folders (a venv's own, plus any its .pth files add): the heavy dependencies
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    assert sysconfig.get_paths()["purelib"] in ours
    (purelib / "zz_dependencies.pth").write_text("".join(p + "\n" for p in ours))
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env_dir / "bin", env


def test_installed_package_is_the_wheels(installed, tmp_path):
    bin_dir, env = installed
    out = subprocess.run([str(bin_dir / "python"), "-c", "import json, moshi_ttt, moshi_ttt.server.web.app as a, "
                          "moshi_ttt.ttt.config as c; print(json.dumps([moshi_ttt.__file__, str(a.DEFAULT_STATIC), "
                          "sorted(c.shipped_configs())]))"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    init, static, configs = json.loads(out.stdout)
    assert Path(init).is_relative_to(bin_dir.parent) and not Path(init).is_relative_to(ROOT), init
    assert (Path(static) / "index.html").is_file() and Path(static).is_relative_to(bin_dir.parent), static
    assert {"moshi7b_ttt", "tiny", "demo_ttt"} <= set(configs), configs


def test_installed_serve_demo_answers_health(installed, tmp_path):
    bin_dir, env = installed
    srv = ServeProcess(tmp_path, ["--max-conversations", "1"], command=[str(bin_dir / "moshi-ttt")], env=env,
                       cwd=tmp_path)
    with srv:
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            health = json.loads(r.read())
        assert health["status"] == "ok" and health["demo"] and health["ttt_layers"] == [0, 2], health
        with urllib.request.urlopen(srv.url + "/", timeout=10) as r:
            assert b"moshi-ttt" in r.read()
    assert srv.returncode == 0, srv.log_tail()


def test_installed_infer_demo_writes_its_output(installed, speech, tmp_path):
    bin_dir, env = installed
    infile = shutil.copy(speech.wav("b"), tmp_path / "in.wav")
    proc = subprocess.run([str(bin_dir / "moshi-ttt"), "infer", "--demo", "--ttt-config", "demo_ttt", "in.wav",
                           "out.wav"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pcm, sr = sphn.read(str(tmp_path / "out.wav"))
    pcm_in = sphn.read(str(infile), sample_rate=24000)[0][0]
    assert sr == 24000 and abs(pcm.shape[-1] - len(pcm_in)) < 1920 and abs(pcm).max() > 0
    # the shipped weights came with the wheel: the reply is the input's echo (figures: docs/demo.md)
    echo = audio_match.delayed_mel_correlation(pcm[0], pcm_in, demo.ECHO_OUTPUT_FRAMES * 1920)
    print(f"installed infer --demo: echo {echo:.3f}")
    assert echo >= WHEEL_ECHO_MIN, echo
    tel = json.loads((tmp_path / "out.ttt.json").read_text())
    assert tel["ttt_layers"] == [0, 2] and tel["chunk_size"] == 16  # demo_ttt's section, read from the wheel
    assert (tmp_path / "out.txt").is_file()
