"""`serve --demo` logs where its TTT config came from: the demo checkpoint's config.json, or the explicit
`--ttt-config` (baked into the cached demo checkpoint, but still the flag the user gave)."""

import logging

import pytest

from support.observe import health


@pytest.mark.slow  # demo checkpoint builds, ~3 s each
@pytest.mark.parametrize("extra, layers, source", [
    ([], "TTT layers [0, 2] of 4 (chunk 16 frames)", "config.json's 'ttt' section"),
    (["--ttt-config", "moshi7b_ttt"], "TTT layers [0] of 4 (chunk 256 frames)", "--ttt-config moshi7b_ttt"),
])
def test_demo_logs_the_ttt_config_source(tmp_path_factory, caplog, extra, layers, source):
    from moshi_ttt.server.serve import BackgroundServer

    cache = tmp_path_factory.getbasetemp() / "demo_cache"  # one demo build per TTT config for both cases
    with caplog.at_level(logging.INFO, logger="moshi_ttt"):
        srv = BackgroundServer(["--demo", "--cache-dir", str(cache), "--port", "0", "--max-conversations", "1",
                                *extra])
    try:
        h = health(srv)
    finally:
        srv.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TTT layers [")]
    assert lines == [f"{layers}: {source}"], lines
    assert h["ttt_layers"] == ([0, 2] if not extra else [0])  # the config named is the one applied
