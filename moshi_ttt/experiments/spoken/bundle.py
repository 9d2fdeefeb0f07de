"""A trained spoken-memory model as one self-contained folder, with one of its evaluation conversations.

`bundle_export(export, dest)`: the files an export's config.json names (the base weights, TTT weights, Mimi, its
config, the tokenizer; absolute paths into the run cache) copied side by side into `dest`, names relative, so
that `--hf-repo DEST` loads on any machine. The base weights are stored in bfloat16 (the loader casts them to
the run's dtype), the codec in float16 where that is exact; the TTT weights stay as trained.

`bundle_conversation(wav, dest, until_s)`: the user's channel of an evaluation conversation as Ogg/Opus
(`conversation.ogg`, what a browser would send) and its questions (`conversation.json`, the generator's record),
optionally only its first `until_s` seconds.

    python -m moshi_ttt.experiments.spoken.bundle --export RUN/export --dest DIR --conversation conv_00007.wav \
        [--until-s 25.8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

CONVERSATION = "conversation.ogg"
TRUTH = "conversation.json"


def _write_compact(src: Path, out: Path, bf16: bool) -> None:
    """The safetensors `src` as `out`: float tensors in bfloat16 if `bf16` (lossy), else in float16 where that
    holds them exactly (the demo codec was trained and shipped in float16), else as they are."""
    import torch
    from safetensors.torch import load_file, save_file

    def compact(v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v
        if bf16:
            return v.to(torch.bfloat16)
        half = v.to(torch.float16)
        return half if torch.equal(half.to(v.dtype), v) else v

    save_file({k: compact(v).contiguous() for k, v in load_file(str(src)).items()}, str(out))


def bundle_export(export: str | Path, dest: str | Path) -> Path:
    """Copies the export folder `export` and every file its config.json names into `dest` (see module
    docstring); returns dest/config.json. A name that appears twice (two keys, one file) is copied once."""
    from moshi_ttt.models.loaders import TTT_NAME_KEY

    export, dest = Path(export), Path(dest)
    raw = json.loads((export / "config.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    taken: dict[str, Path] = {}
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", TTT_NAME_KEY, "lora_name"):
        name = raw.get(key)
        if name is None:
            continue
        src = (export / name).resolve()
        if not src.is_file():
            raise FileNotFoundError(f"{export}/config.json: {key} = {name!r} is not a file ({src})")
        target = src.name
        if target in taken and taken[target] != src:
            raise ValueError(f"{export}/config.json: two different files are named {target!r} "
                             f"({taken[target]}, {src})")
        taken[target] = src
        if src.suffix == ".safetensors" and key != TTT_NAME_KEY:
            _write_compact(src, dest / target, bf16=key == "moshi_name")
        else:
            shutil.copyfile(src, dest / target)
            if src.with_suffix(".json").is_file() and key == TTT_NAME_KEY:  # the TTT config, readable
                shutil.copyfile(src.with_suffix(".json"), dest / src.with_suffix(".json").name)
        raw[key] = target
    cfg = dest / "config.json"
    cfg.write_text(json.dumps(raw, indent=1) + "\n")
    return cfg


def bundle_conversation(wav: str | Path, dest: str | Path, until_s: float | None = None) -> Path:
    """The user channel of the stereo conversation `wav` as DEST/conversation.ogg, and its record (`wav` with
    the suffix .json) as DEST/conversation.json; returns the Ogg file. `until_s`: only the conversation's first
    `until_s` seconds, and in its record only the questions whose answer is due by then (q_end + MAX_LATENCY_S)
    and the answers said by then."""
    import numpy as np
    import sphn

    from moshi_ttt.experiments.spoken.evaluate import user_channel
    from moshi_ttt.experiments.spoken.spec import MAX_LATENCY_S
    from moshi_ttt.models.streams import SAMPLE_RATE

    wav, dest = Path(wav), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    mono = user_channel(wav, dest / "user.wav")
    pcm, _ = sphn.read(str(mono), sample_rate=SAMPLE_RATE)
    mono.unlink()
    record = json.loads(wav.with_suffix(".json").read_text())
    pcm = pcm[0]
    if until_s is not None:
        pcm = pcm[:round(until_s * SAMPLE_RATE)]
        sm = record["spoken_memory"]
        sm["questions"] = [q for q in sm["questions"] if q["q_end"] + MAX_LATENCY_S <= until_s]
        sm["duration"] = len(pcm) / SAMPLE_RATE
        record["alignments"] = [a for a in record["alignments"] if a[1][1] <= until_s]
        if not sm["questions"]:
            raise ValueError(f"{wav}: no question is due within its first {until_s} s")
    sphn.write_opus(str(dest / CONVERSATION), np.ascontiguousarray(pcm, dtype=np.float32), SAMPLE_RATE)
    (dest / TRUTH).write_text(json.dumps(record) + "\n")
    return dest / CONVERSATION


def read_conversation(folder: str | Path):
    """(pcm [T] float32 at 24 kHz, record dict) of a bundled conversation."""
    import sphn

    from moshi_ttt.models.streams import SAMPLE_RATE

    folder = Path(folder)
    pcm, rate = sphn.read_opus(str(folder / CONVERSATION))
    return sphn.resample(pcm[0], rate, SAMPLE_RATE), json.loads((folder / TRUTH).read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.bundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a training run's export folder")
    p.add_argument("--dest", required=True, help="the bundle folder (created)")
    p.add_argument("--conversation", default=None, help="a stereo evaluation conversation WAV to bundle with it")
    p.add_argument("--until-s", type=float, default=None, help="bundle only the conversation's first seconds")
    a = p.parse_args(argv)
    try:
        print(bundle_export(a.export, a.dest))
        if a.conversation:
            print(bundle_conversation(a.conversation, a.dest, a.until_s))
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
