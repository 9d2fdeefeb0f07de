"""TTT configuration: one validated dataclass per concern, loadable from dicts / YAML / JSON.

`TTTConfig` configures one In-Place TTT gated MLP (`moshi_ttt.modules.gating.TTTGating`); `TTTModelConfig` says which
layers of Moshi's main transformer get one. Every invalid value raises `ValueError` naming the field
and the value, at construction time.
"""

from __future__ import annotations

import dataclasses
import json
import typing as tp
from importlib import resources
from pathlib import Path

from moshi_ttt.utils.validate import Checks, is_int, is_number

INIT_MODES = ("zero", "ntp")
TARGET_SOURCES = ("x0", "mlp_input")
STATE_DTYPES = ("float32", "bfloat16")
ROUNDINGS = ("nearest", "stochastic")
# How the streaming state is stored, not what was trained: a checkpoint's TTT config may differ in these.
STATE_FIELDS = ("state_dtype", "state_rounding", "rounding_seed")

_check = Checks("TTT config")
_bad = _check.error


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """In-Place TTT hyper-parameters of one gated MLP.

    chunk_size: C, frames per fast-weight update (256 frames = 20.48 s at 12.5 Hz).
    lr: η, the fast-weight learning rate; W⁽ⁱ⁺¹⁾ = W⁽ⁱ⁾ + η·clip(ΔW_i).
    kernel_size: K, taps of the depthwise Conv1D producing the target.
    future_frames: how many of the K taps look ahead (K=5, 2 ⇒ centred). Always < K. The conv never
        crosses a chunk edge, so looking ahead inside a chunk leaks no future into earlier updates.
    init: "zero" (conv = 0 ⇒ V̂ = 0 ⇒ exactly the base MLP) or "ntp" (W_target = I, the kernel picks
        frame t+1 for frame t: the paper's next-token target; needs future_frames ≥ 1).
    target: "x0" (token embeddings, the sum fed to the transformer) or "mlp_input" (the layer's own
        normalised MLP input).
    use_conv: ablation switch; False ⇒ V̂ = src · W_target (no temporal conv, no conv parameter).
    use_target_proj: ablation switch; False ⇒ W_target fixed to I (no parameter).
    clip_norm: τ, Frobenius clip of each ΔW (None = off, the default; the paper clips at inference
        only, and a tiny τ makes TTT numerically inert unless trained with it).
    state_dtype: dtype of the streaming fast weight W⁽ⁱ⁾. "float32" (the default; fp64 for fp64
        models): an fp32 master plus an apply copy in the model dtype. "bfloat16": W⁽ⁱ⁾ is one bf16
        tensor, the one applied (bf16 models), and each fold adds its fp32 ΔW to it and rounds once.
        The parallel path (training, prefill) is unaffected.
    state_rounding: how a bf16 fold rounds W⁽ⁱ⁾ + ΔW: "stochastic" (unbiased, the default: round to
        nearest drops every entry of ΔW under half an ulp of W, docs/capacity.md) or "nearest".
    rounding_seed: seed of the stochastic rounding; the noise of a conversation's k-th fold depends
        only on (seed, k), so a conversation replays bitwise whatever its slot.
    """

    chunk_size: int = 256
    lr: float = 1e-3
    kernel_size: int = 5
    future_frames: int = 2
    init: str = "zero"
    target: str = "x0"
    use_conv: bool = True
    use_target_proj: bool = True
    clip_norm: float | None = None
    state_dtype: str = "float32"
    state_rounding: str = "stochastic"
    rounding_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("chunk_size", "kernel_size", "future_frames"):
            _check.number(name, getattr(self, name), integer=True)
        _check.number("chunk_size", self.chunk_size, integer=True, lo=0, lo_open=True)
        _check.number("kernel_size", self.kernel_size, integer=True, lo=1)
        if self.kernel_size > self.chunk_size:
            raise _bad("kernel_size", self.kernel_size, f"must be <= chunk_size={self.chunk_size}")
        if not 0 <= self.future_frames < self.kernel_size:
            raise _bad("future_frames", self.future_frames,
                       f"must be in [0, kernel_size={self.kernel_size})")
        _check.number("lr", self.lr)
        _check.choice("init", self.init, INIT_MODES)
        _check.choice("target", self.target, TARGET_SOURCES)
        for name in ("use_conv", "use_target_proj"):
            _check.flag(name, getattr(self, name))
        _check.choice("state_dtype", self.state_dtype, STATE_DTYPES)
        _check.choice("state_rounding", self.state_rounding, ROUNDINGS)
        _check.number("rounding_seed", self.rounding_seed, integer=True, lo=0)
        c = self.clip_norm
        if c is not None and not (is_number(c) and c > 0):
            raise _bad("clip_norm", c, "must be a finite number > 0, or null to disable")
        if self.init == "zero" and not (self.use_conv or self.use_target_proj):
            raise _bad("init", self.init, "needs a conv or a W_target to zero (use_conv and use_target_proj "
                       "are both false, so V̂ = src cannot start at 0)")
        if self.init == "ntp" and self.use_conv and self.future_frames < 1:
            raise _bad("future_frames", self.future_frames, "init='ntp' needs at least 1 future frame")

    @property
    def past_frames(self) -> int:
        return self.kernel_size - 1 - self.future_frames

    def with_state(self, **state: tp.Any) -> TTTConfig:
        """This config with the non-None `STATE_FIELDS` in `state` replaced (validated)."""
        bad = sorted(set(state) - set(STATE_FIELDS))
        if bad:
            raise ValueError(f"invalid TTT config: {bad} are not state fields {STATE_FIELDS}")
        return dataclasses.replace(self, **{k: v for k, v in state.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: tp.Mapping[str, tp.Any]) -> TTTConfig:
        return _check.build(cls, d, "ttt.layer")


@dataclasses.dataclass(frozen=True)
class TTTModelConfig:
    """Which main-transformer layers get TTT, and with what `TTTConfig`.

    layers: explicit list of layer indices, or None to use every `every`-th layer from `start`.
    """

    layer: TTTConfig = dataclasses.field(default_factory=TTTConfig)
    layers: tuple[int, ...] | None = None
    every: int = 6
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.layer, TTTConfig):
            raise _bad("layer", self.layer, "must be a TTTConfig")
        for name in ("every", "start"):
            _check.number(name, getattr(self, name), integer=True)
        _check.number("every", self.every, integer=True, lo=1)
        _check.number("start", self.start, integer=True, lo=0)
        if self.layers is not None:
            layers = tuple(self.layers)
            for i in layers:
                if not is_int(i) or i < 0:
                    raise _bad("layers", list(layers), f"entry {i!r} is not a layer index >= 0")
            if len(set(layers)) != len(layers):
                raise _bad("layers", list(layers), "has duplicates")
            object.__setattr__(self, "layers", tuple(sorted(layers)))

    def layer_indices(self, num_layers: int) -> list[int]:
        """The TTT layer indices for a transformer of `num_layers` layers (errors if out of range)."""
        if self.layers is None:
            return list(range(self.start, num_layers, self.every))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise ValueError(f"invalid TTT config: layers={list(self.layers)!r}: indices {bad} are out of "
                             f"range for a transformer with {num_layers} layers")
        return list(self.layers)

    def to_dict(self) -> dict:
        return {"layers": None if self.layers is None else list(self.layers), "every": self.every,
                "start": self.start, "layer": self.layer.to_dict()}

    @classmethod
    def from_dict(cls, d: tp.Mapping[str, tp.Any]) -> TTTModelConfig:
        if not isinstance(d, tp.Mapping):
            raise ValueError(f"invalid TTT config: expected a mapping, got {type(d).__name__}: {d!r}")
        d = dict(d)
        layer = TTTConfig.from_dict(d.pop("layer", {}) or {})
        return _check.build(cls, d, "ttt", layer=layer)

    @classmethod
    def load(cls, path: str | Path) -> TTTModelConfig:
        """Reads a YAML or JSON file; a top-level `ttt:` key is accepted too."""
        path = Path(path)
        data = read_config_file(path)
        if isinstance(data, dict) and "ttt" in data:
            data = data["ttt"]
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def read_config_file(path: str | Path) -> tp.Any:
    """Parses a config file: JSON if it ends in .json, else YAML. Every failure (missing, unreadable,
    not UTF-8, a syntax error) is a one-line ValueError that starts with the file's path."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        bad = f"byte 0x{e.object[e.start]:02x} at offset {e.start}"
        raise ValueError(f"{path}: not a UTF-8 text file ({bad})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None


# -- shipped configs (`configs/`, installed as package data `moshi_ttt.configs`) --------------------------


def shipped_configs() -> dict[str, Path]:
    """Name → path of every shipped config (`configs/*.yaml`, installed as `moshi_ttt.configs`)."""
    root = resources.files("moshi_ttt.configs")
    return {e.name[:-5]: Path(str(e)) for e in root.iterdir() if e.name.endswith(".yaml")}


def config_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a shipped config ("tiny", "moshi7b_ttt")."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise FileNotFoundError(f"no config file {str(name_or_path)!r} (and no shipped config of that name: "
                            f"{sorted(shipped)})")


def load_lm_and_ttt(name_or_path: str | Path) -> tuple[dict | None, TTTModelConfig]:
    """Reads a YAML with an optional `lm` section (moshi LMModel kwargs) and a `ttt` section."""
    path = config_path(name_or_path)
    data = read_config_file(path)
    if not isinstance(data, dict) or "ttt" not in data:
        raise ValueError(f"{path}: expected a mapping with a 'ttt' section")
    unknown = sorted(set(data) - {"lm", "ttt"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; expected 'lm' and 'ttt'")
    try:
        ttt = TTTModelConfig.from_dict(data["ttt"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    lm = data.get("lm")
    if lm is not None and not isinstance(lm, dict):
        raise ValueError(f"{path}: 'lm' must be a mapping of LMModel kwargs")
    return lm, ttt


def load_ttt_config(name_or_path: str | Path) -> TTTModelConfig:
    """The TTT section of a YAML/JSON file (a top-level `ttt:` key or the mapping itself) or of a
    shipped config name. Any error raises ValueError naming the file."""
    return TTTModelConfig.load(config_path(name_or_path))
