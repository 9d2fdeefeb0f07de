"""`python -m moshi_ttt.server` is `moshi-ttt serve` and `python -m moshi_ttt.infer` is `moshi-ttt infer`:
the same flags, with the same help, as the installed `moshi-ttt` command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ENV = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", COLUMNS="120")
SCRIPT = Path(sys.executable).with_name("moshi-ttt")  # the console script `pip install` writes


def _help(argv: list[str]) -> str:
    out = subprocess.run(argv + ["--help"], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _options(text: str) -> tuple[list[str], str]:
    """The flags named in a --help text, and the help from the `-h, --help` line on (what follows the usage
    and description: the option list, its groups and the epilog)."""
    start = text.index("  -h, --help")
    return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text[start:]))), text[start:]


@pytest.mark.slow  # CLI start-ups, ~3 s each
@pytest.mark.parametrize("module, command", [("moshi_ttt.server", "serve"), ("moshi_ttt.infer", "infer")])
def test_python_m_is_the_command(module, command):
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} missing: install the package (`pip install -e .`) to get the `moshi-ttt` command")
    flags_m, text_m = _options(_help([sys.executable, "-m", module]))
    flags_cmd, text_cmd = _options(_help([str(SCRIPT), command]))
    assert flags_m == flags_cmd
    assert text_m == text_cmd
    assert {"--hf-repo", "--ttt-config", "--ttt-weights", "--demo"} <= set(flags_m)
    if command == "serve":
        assert {"--host", "--port", "--max-conversations", "--api-key-file"} <= set(flags_m)
