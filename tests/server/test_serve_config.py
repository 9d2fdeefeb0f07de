"""`ServeConfig` (server/core/config.py): built once from the parsed serve flags (`serve.serve_config`), frozen,
picklable (it goes to the model worker), and every invalid value is a ValueError naming the flag and the value."""

import argparse
import dataclasses
import math
import pickle

import pytest
from moshi_ttt.server.core.config import ServeConfig
from moshi_ttt.server.serve import add_args, serve_config

from moshi_ttt.flags import CheckpointFlags
from moshi_ttt.utils.validate import InvalidField


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_args(p)
    return p


def _config(*argv: str) -> ServeConfig:
    return serve_config(_parser().parse_args(list(argv)))


def test_every_flag_is_a_field_and_every_field_a_flag():
    args = vars(_parser().parse_args([]))
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    checkpoint = {f.name for f in dataclasses.fields(CheckpointFlags)}
    assert set(args) == (fields - {"checkpoint", "memory_store_default"}) | checkpoint


def test_a_round_trip_from_flags():
    cfg = _config("--host", "0.0.0.0", "--port", "0", "--max-delay", "5", "--max-conversations", "3",
                  "--allowed-origins", "https://a.example", "https://b.example", "--trusted-proxies", "10.0.0.0/8",
                  "--hf-repo", "/ckpt", "--ttt-config", "tiny", "--no-fuse-lora", "--context", "40",
                  "--ttt-state-dtype", "bfloat16", "--temp", "0", "--top-k", "5", "--workers", "0",
                  "--memory-store", "/tmp/store", "--memory-format", "rank:4", "--step-delay-ms", "100",
                  "--fail-step", "3", "--agent-port", "9000", "--no-per-ip-limits")
    assert (cfg.host, cfg.port, cfg.max_delay, cfg.max_conversations) == ("0.0.0.0", 0, 5.0, 3)
    assert cfg.allowed_origins == ("https://a.example", "https://b.example")
    assert cfg.trusted_proxies == ("10.0.0.0/8",)
    assert cfg.checkpoint == CheckpointFlags(hf_repo="/ckpt", ttt_config="tiny")
    assert (cfg.fuse_lora, cfg.context, cfg.ttt_state_dtype, cfg.temp, cfg.top_k, cfg.workers) == \
        (False, 40, "bfloat16", 0.0, 5, 0)
    assert (cfg.memory_store, cfg.memory_store_default, cfg.memory_format) == ("/tmp/store", False, "rank:4")
    assert (cfg.step_delay_ms, cfg.fail_step, cfg.agent_port, cfg.no_per_ip_limits) == (100.0, 3, 9000, True)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # what the model worker receives
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_conversations = 4  # type: ignore[misc]


def test_the_defaults_are_the_flags():
    cfg = _config()
    assert (cfg.max_conversations, cfg.workers, cfg.memory_store, cfg.memory_store_default) == (4, 1, None, False)
    assert cfg.checkpoint == CheckpointFlags() and cfg.allowed_origins == cfg.trusted_proxies == ()
    assert _config("--demo", "--cache-dir", "/tmp/c").memory_store == "/tmp/c/memories"  # --demo's default store


@pytest.mark.parametrize("field,value,message", [
    ("max_conversations", 0, "--max-conversations must be >= 1, got 0"),
    ("max_conversations", 2.5, "--max-conversations must be an integer, got 2.5"),
    ("max_message_bytes", 100, "--max-message-bytes must be >= 1024, got 100"),
    ("max_delay", 0.0, "--max-delay must be > 0 seconds, got 0.0"),
    ("admit_lag", -1.0, "--admit-lag must be > 0 seconds, got -1.0"),
    ("gil_switch_ms", 0.0, r"--gil-switch-ms must be in \(0, 100\], got 0.0"),
    ("gil_switch_ms", 101.0, r"--gil-switch-ms must be in \(0, 100\], got 101.0"),
    ("max_bytes_per_s", math.nan, "--max-bytes-per-s must be a finite number, got nan"),
    ("port", 70000, "--port must be <= 65535, got 70000"),
    ("agent_port", -1, "--agent-port must be >= 0, got -1"),
    ("host", "", "--host must be a non-empty string, got ''"),
    ("start_burst", 0, "--start-burst must be >= 1, got 0"),
    ("ban_window", 0.0, "--ban-window must be > 0 seconds, got 0.0"),
    ("max_conversations_per_ip", -1, "--max-conversations-per-ip must be >= 0, got -1"),
    ("allowed_origins", ["https://a.example"], r"--allowed-origins must be a tuple of non-empty strings, got \["),
    ("trusted_proxies", ("",), "--trusted-proxies must be a tuple of non-empty strings, got \\(''"),
    ("context", 0, "--context must be >= 1 frames, got 0"),
    ("ttt_state_dtype", "float16", "--ttt-state-dtype must be one of .*, got 'float16'"),
    ("top_k", -1, "--top-k must be >= 0, got -1"),
    ("temp", math.inf, "--temp must be a finite number, got inf"),
    ("workers", 2, r"--workers must be one of \(0, 1\), got 2"),
    ("threads", -1, "--threads must be >= 0, got -1"),
    ("log_level", "loud", "--log-level must be one of .*, got 'loud'"),
    ("idle_timeout", -1.0, "--idle-timeout must be >= 0 seconds, got -1.0"),
    ("telemetry_interval", -1.0, "--telemetry-interval must be >= 0 seconds, got -1.0"),
    ("fail_step", -1, "--fail-step must be >= 0, got -1"),
    ("half", 1, "--half must be true or false, got 1"),
    ("checkpoint", "demo", "--checkpoint must be a CheckpointFlags, got 'demo'"),
    ("memory_ttl", 0.0, "--memory-ttl must be > 0 days, got 0.0"),
    ("memory_save_every", -1, "--memory-save-every must be >= 0 chunks, got -1"),
    ("memory_max_bytes", -5, "--memory-max-bytes must be >= 0, got -5"),
    ("memory_format", "rank:0", "invalid memory format 'rank:0'"),
])
def test_a_bad_value_names_its_flag_and_value(field, value, message):
    with pytest.raises(ValueError, match=message) as e:
        dataclasses.replace(_config(), **{field: value})
    if isinstance(e.value, InvalidField):
        assert (e.value.field, e.value.value) == (field, value)
        assert pickle.loads(pickle.dumps(e.value)).args == e.value.args  # a worker's error crosses the pipe


def test_a_bad_flag_fails_at_construction_from_the_flags():
    for argv, message in ((["--max-conversations", "0"], "--max-conversations must be >= 1, got 0"),
                          (["--gil-switch-ms", "500"], r"--gil-switch-ms must be in \(0, 100\], got 500.0"),
                          (["--memory-store", "/s", "--memory-ttl", "-2"], "--memory-ttl must be > 0 days, got -2.0")):
        with pytest.raises(ValueError, match=message):
            _config(*argv)


def test_the_api_key_is_never_in_an_error():
    with pytest.raises(ValueError) as e:
        dataclasses.replace(_config(), api_key=b"secret-bytes")
    assert "secret" not in str(e.value) and "--api-key" in str(e.value)
