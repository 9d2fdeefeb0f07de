"""moshi-ttt: In-Place Test-Time Training inside Kyutai's Moshi.

The public API, imported lazily (`import moshi_ttt` stays cheap: torch loads on first use):
    TTTConfig, TTTModelConfig   the layer / model TTT configs (`moshi_ttt.ttt.config`)
    TTTGating                   the gated MLP with fast weights (`moshi_ttt.modules.gating`)
    TTTLMModel, TTTLMGen        moshi's LMModel / LMGen with TTT (`moshi_ttt.models.lm`)
    load_ttt_moshi              a Kyutai checkpoint with TTT layers added (`moshi_ttt.models.loaders`)
"""

from __future__ import annotations

import importlib
import typing as tp

_API = {
    "TTTConfig": "moshi_ttt.ttt.config",
    "TTTModelConfig": "moshi_ttt.ttt.config",
    "TTTGating": "moshi_ttt.modules.gating",
    "TTTLMModel": "moshi_ttt.models.lm",
    "TTTLMGen": "moshi_ttt.models.lm",
    "load_ttt_moshi": "moshi_ttt.models.loaders",
}
__all__ = list(_API)


def __getattr__(name: str) -> tp.Any:
    if name not in _API:
        raise AttributeError(f"module 'moshi_ttt' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
