"""Shipped configs (package data `moshi_ttt.configs`, `configs/` in the repository) and the combined
LM + TTT config file format."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .config import TTTModelConfig, read_config_file


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


def add_checkpoint_args(g) -> None:
    """The checkpoint flags shared by `infer` and `serve` (moshi's names, plus the TTT ones)."""
    g.add_argument("--hf-repo", help="Hugging Face repo id or local folder in Kyutai's layout "
                                     "(default: moshi's default repo)")
    g.add_argument("--moshi-weight", help="local Moshi weights (overrides the repo's)")
    g.add_argument("--mimi-weight", help="local Mimi weights (overrides the repo's)")
    g.add_argument("--tokenizer", help="local SentencePiece text tokenizer (overrides the repo's)")
    g.add_argument("--config-path", help="config.json to use instead of the repo's")
    g.add_argument("--lora-weight", help="LoRA weights (the config must have 'lora': true)")
    g.add_argument("--ttt-config", help="TTT config: a YAML/JSON file (a 'ttt' section or the TTT mapping itself) or "
                                        "a shipped config name (tiny, demo_ttt, moshi7b_ttt); must agree with the "
                                        "config stored with the TTT weights")
    g.add_argument("--ttt-weights", help="TTT safetensors written by `moshi-ttt train` / checkpoint.save_ttt")
