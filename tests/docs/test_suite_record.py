"""`-p moshi_ttt.testing.suite_record` writes the record the README's suite size and time are generated from
(docs/test_suite*.json, `make test SUITE_RECORD=...`), and nothing without MOSHI_TTT_SUITE_RECORD."""

import json
import os
import subprocess
import sys


def _pytest(tmp_path, env_extra):
    (tmp_path / "test_two.py").write_text("import pytest\n\ndef test_a():\n    pass\n\n"
                                          "@pytest.mark.skip\ndef test_b():\n    pass\n\n"
                                          "def test_c():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "MOSHI_TTT_SUITE_RECORD"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "moshi_ttt.testing.suite_record",
                           "-p", "no:cacheprovider", "-k", "not test_c", "test_two.py"],
                          cwd=tmp_path, env={**env, **env_extra}, capture_output=True, text=True, timeout=120)


def test_the_record_counts_the_run(tmp_path):
    out = tmp_path / "suite.json"
    r = _pytest(tmp_path, {"MOSHI_TTT_SUITE_RECORD": str(out)})
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(out.read_text())
    assert (rec["passed"], rec["skipped"], rec["deselected"], rec["failed"]) == (1, 1, 1, 0)
    assert rec["exit_status"] == 0 and rec["seconds"] >= 0 and rec["when"].endswith("+00:00")
    assert len(rec["loadavg"]["before"]) == len(rec["loadavg"]["after"]) == 3 and rec["machine"]


def test_no_record_without_the_variable(tmp_path):
    r = _pytest(tmp_path, {})
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".json"] == []
