"""The docs cannot drift: every generated block and figure (`moshi_ttt.docs_gen`, `make docs`) equals what
its JSON file generates, `make docs` on the committed tree changes nothing, and every path, `moshi-ttt` flag and
`moshi_ttt.*` name the docs mention exists. The planted tests show the check catches what it must."""

import json
import shutil
from pathlib import Path

import pytest

from moshi_ttt import docs_gen

ROOT = docs_gen.ROOT


def _copy(tmp_path: Path) -> Path:
    """README.md and docs/ copied (they get changed), everything else linked."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "README.md", root / "README.md")
    shutil.copytree(ROOT / "docs", root / "docs")
    for entry in ROOT.iterdir():
        if not (root / entry.name).exists() and not entry.name.startswith((".git", ".venv")):
            (root / entry.name).symlink_to(entry)
    return root


def test_the_committed_docs_are_current_and_name_only_what_exists():
    assert docs_gen.problems(ROOT) == []


def test_make_docs_on_the_committed_tree_changes_nothing(tmp_path):
    root = _copy(tmp_path)
    before = {p.relative_to(root): p.read_text() for p in docs_gen.doc_files(root)}
    assert any("<!--fig:" in t for t in before.values()) and any(":start -->" in t for t in before.values())
    docs_gen.write(root)
    after = {p.relative_to(root): p.read_text() for p in docs_gen.doc_files(root)}
    assert [p for p in before if before[p] != after[p]] == []


def test_a_planted_stale_figure_is_caught_and_regenerated(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    span = "<!--fig:demo.echo-->"
    start = text.index(span) + len(span)
    readme.write_text(text[:start] + "0.99" + text[text.index("<!--/fig-->", start):])
    assert any(p.startswith("README.md: figure demo.echo reads '0.99'") for p in docs_gen.stale(root))
    docs_gen.write(root)
    assert readme.read_text() == text  # regenerated from its JSON

    # the other way round: a new measurement makes the committed text stale
    bench = root / "docs" / "bench_quick.json"
    res = json.loads(bench.read_text())
    res["server_realtime_speed_1"] = 0.5
    bench.write_text(json.dumps(res))
    found = docs_gen.stale(root)
    assert ("README.md: block key-figures differs from docs/bench_quick.json, docs/memory_experiment/results.json"
            in found)
    assert any(p.startswith("docs/serving.md: figure quick.speed_1 reads") for p in found), found


def test_planted_dead_references_are_caught(tmp_path):
    root = _copy(tmp_path)
    doc = root / "docs" / "cost.md"
    doc.write_text(doc.read_text() + "\nSee [the old run](bench_old.json), `docs/bench_old.json`, "
                   "`moshi_ttt.apps.bench.no_such_section`, `moshi_ttt.apps.bench.aggregate` and "
                   "`moshi-ttt bench --quick --no-such-flag`; `--not-a-flag` too.\n")
    found = docs_gen.dead_references(root)
    assert found == ["docs/cost.md: link to bench_old.json, which does not exist",
                     "docs/cost.md: path docs/bench_old.json, which does not exist",
                     "docs/cost.md: moshi_ttt.apps.bench.no_such_section, which is no module or name of the package",
                     "docs/cost.md: moshi-ttt bench --no-such-flag, which is no flag of moshi-ttt bench",
                     "docs/cost.md: --not-a-flag, which is no flag of moshi-ttt"]


def test_an_unknown_block_or_figure_name_is_refused(tmp_path):
    root = _copy(tmp_path)
    doc = root / "docs" / "cost.md"
    doc.write_text(doc.read_text() + "\n<!--fig:no.such-->1<!--/fig-->\n")
    with pytest.raises(KeyError, match="docs/cost.md: figure 'no.such' is not in"):
        docs_gen.generate(root)


def test_a_repeated_bench_shows_its_median_spread_and_load():
    d = {"r": 1.065, "spread": {"r": [1.05, 1.08]}, "when": "2026-12-07T19:00:00+00:00", "machine": "m",
         "loadavg": {"before": [0.31, 0.2, 0.1], "after": [1.9, 1.0, 0.5]}, "repeats": 3}
    assert docs_gen.ratio(d, "r") == "1.065× (1.050–1.080)"
    assert docs_gen.measured(d) == "2026-12-07T19:00:00+00:00 on m, 1-minute load 0.31 → 1.90, 3 runs"
    assert docs_gen.ratio({"r": 1.065}, "r") == "1.065×"  # one run: no range
