"""The engine interface (`server/core/engine_api.py`) is declared once and implemented with the same signatures by
the in-process `Engine` and the model worker's proxy `WorkerEngine`."""

import inspect

import pytest
from moshi_ttt.server.core.engine_api import ServingEngine
from moshi_ttt.server.link.remote import WorkerEngine
from moshi_ttt.server.step.engine import Engine

METHODS = [name for name, v in vars(ServingEngine).items()
           if not name.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))]


def _shape(fn) -> list[tuple[str, inspect._ParameterKind, object]]:
    """Parameter names, kinds and defaults (the annotations name each implementation's slot type)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_the_interface_is_what_the_web_side_uses():
    assert sorted(METHODS) == ["active_count", "alive", "claim", "close", "memory_fingerprint", "oldest_wait",
                               "push", "queued_frames", "release", "restore_memory", "save_memory"]


@pytest.mark.parametrize("impl", [Engine, WorkerEngine])
@pytest.mark.parametrize("name", METHODS)
def test_each_engine_implements_it_with_the_same_signature(impl, name):
    declared = vars(ServingEngine)[name]
    if isinstance(declared, property):  # a property, or an attribute the constructor sets
        assert isinstance(getattr(impl, name, None), property) or f"self.{name} =" in inspect.getsource(impl), name
        return
    made = getattr(impl, name)
    assert _shape(made) == _shape(declared), name
    assert inspect.iscoroutinefunction(made) == inspect.iscoroutinefunction(declared), name
