"""The stage-2 variants of the spoken-memory experiment: what each trains, with which window, and its name in the
tables (docs/spoken-memory.md, "The experiment")."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
    """A stage-2 model: what trains, the attention window (frames; None = the experiment's W) and whether TTT
    layers (configs/spoken_memory_ttt.yaml) are added to the stage-1 model; `label` names it in the tables."""

    trainable: str
    ttt: bool
    context: int | None = None
    lr: float = 1e-3
    seeds: int = 3
    label: str = ""
    text_padding_weight: float | None = None  # None: the stage-2 setting (Settings.stage2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the floor and the ceiling fine-tune every weight (the strongest baselines: the base may learn to carry facts
# forward through its layers); TTT trains its target parameters only, as a Moshi-7B user would.
VARIANTS = {
    "floor": Variant("full", ttt=False, lr=3e-4, label="floor: no TTT, window W"),
    "ceiling": Variant("full", ttt=False, context=800, lr=3e-4, label="ceiling: no TTT, window ≥ the conversation"),
    "ttt": Variant("ttt", ttt=True, label="**TTT, window W**"),
    "ttt_w4": Variant("ttt", ttt=True, context=30, seeds=2, label="TTT, window W/4"),
    # the fallback the plan names when TTT alone falls short: rank-16 LoRA adapters on every Linear of the base
    # train with the TTT parameters (docs/spoken-memory.md, "What was tried")
    "ttt_lora": Variant("ttt+lora", ttt=True, seeds=1, label="TTT + LoRA, window W"),
    # TTT at the learning rate of the 7B recipe (example.yaml: 1e-4) instead of 1e-3, at which TTT's training loss
    # rose for 100 steps before it came back (docs/spoken-memory.md, "What was tried")
    "ttt_lr1e-4": Variant("ttt", ttt=True, lr=1e-4, seeds=1, label="TTT, window W, lr 1e-4"),
    # TTT layers added and every weight trained, as the floor is: the base can learn the keys Z that a fold writes
    # under and reads with, which `trainable: ttt` leaves as the stage-1 model computes them (the key probes of
    # probe.py; docs/spoken-memory.md, "What was tried")
    "ttt_full": Variant("full", ttt=True, lr=3e-4, seeds=1, label="TTT + full fine-tune, window W"),
    # the answers' share of the loss: with text_padding_weight 0 the text loss is the mean over the answer tokens
    # alone (4 a conversation) instead of over every frame's padding too (text loss 0.008 against the audio's 0.23
    # at the end of ttt_full), the floor beside it with the same loss
    "ttt_full_answers": Variant("full", ttt=True, lr=3e-4, seeds=1, text_padding_weight=0.0,
                                label="TTT + full fine-tune, answers' loss only, window W"),
    "floor_answers": Variant("full", ttt=False, lr=3e-4, seeds=1, text_padding_weight=0.0,
                             label="floor, answers' loss only: no TTT, window W"),
}
