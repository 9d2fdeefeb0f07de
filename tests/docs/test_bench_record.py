"""`moshi-ttt bench --repeats N --out FILE`: the JSON file the docs are generated from records when, on what
machine and under what load it was measured, and the spread over the repeats (here on the cheapest timed
section, `layer --quick`, about a second per repeat; no timing is asserted)."""

import argparse
import json

import pytest

from moshi_ttt.apps import bench


def test_aggregate_takes_the_median_and_keeps_the_spread():
    runs = [{"r": 1.0, "n": 3, "m": "x"}, {"r": 3.0, "n": 3, "m": "x"}, {"r": 1.5, "n": 4, "m": "x"}]
    out = bench.aggregate(runs)
    assert out["r"] == 1.5 and out["spread"]["r"] == [1.0, 3.0]
    assert out["m"] == "x" and out["repeats"] == 3
    assert out["n"] == 4 and out["per_run"] == {"n": [3, 3, 4]}  # a count that moved is not hidden
    with pytest.raises(ValueError, match="no runs"):
        bench.aggregate([])


def test_repeats_write_when_where_load_and_spread(tmp_path):
    p = argparse.ArgumentParser()
    bench.add_args(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--quick", "--sections", "layer", "--repeats", "2", "--out", str(out)])
    assert bench.run(args) == 0
    res = json.loads(out.read_text())
    assert res["repeats"] == 2 and res["sections"] == ["layer"] and res["machine"]
    assert res["when"].endswith("+00:00")  # UTC
    assert len(res["loadavg"]["before"]) == len(res["loadavg"]["after"]) == 3
    lo, hi = res["spread"]["layer_stream_ratio_median"]
    assert lo <= res["layer_stream_ratio_median"] <= hi
    assert "layer_chunk" not in res["spread"]  # a shape, not a measurement


def test_repeats_below_one_is_refused():
    p = argparse.ArgumentParser()
    bench.add_args(p)
    with pytest.raises(SystemExit, match="--repeats 0"):
        bench.run(p.parse_args(["--sections", "layer", "--repeats", "0"]))
