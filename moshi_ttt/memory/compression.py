"""How a conversation's memory is stored, torch-free (the web process of `serve` checks `--memory-format`
without loading the model): `FORMS`, the stored forms of one layer's delta, and `Compression`, the
`--memory-format` asked for. `moshi_ttt.ttt.layer_memory` encodes and decodes them.
"""

from __future__ import annotations

import dataclasses

FORMS = ("dense", "factors", "bf16", "rank")


@dataclasses.dataclass(frozen=True)
class Compression:
    """`--memory-format`: kind "exact" | "bf16" | "rank" (then `rank` R ≥ 1)."""

    kind: str = "exact"
    rank: int | None = None

    @classmethod
    def parse(cls, text: str) -> Compression:
        """"exact", "bf16" or "rank:R" (R a positive integer); anything else is a ValueError naming it."""
        t = str(text).strip().lower()
        if t in ("exact", "bf16"):
            return cls(t)
        if t.startswith("rank:") and t[5:].isdigit() and int(t[5:]) >= 1:
            return cls("rank", int(t[5:]))
        raise ValueError(f"invalid memory format {text!r}: expected 'exact', 'bf16' or 'rank:R' with R >= 1")

    def __str__(self) -> str:
        return f"rank:{self.rank}" if self.kind == "rank" else self.kind
