"""`moshi-ttt train CONFIG.yaml` (and `python -m moshi_ttt.train CONFIG.yaml` for torchrun).

Single process:   moshi-ttt train CONFIG.yaml   (see moshi_ttt/train/example.yaml)
Data parallel:    torchrun --nproc-per-node N -m moshi_ttt.train CONFIG.yaml   (NCCL on CUDA, gloo on CPU;
                  `parallel:` in the YAML picks DDP or FSDP2)
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USER_ERROR = 2

_epilog = """\
The YAML holds run_dir, model (hf_repo, ttt_config, ttt_weights, ...), data (train: a moshi-finetune .jsonl,
segment_frames > ttt chunk_size, main_speaker), optim, trainable (ttt | ttt+lora | ttt+wdown | full),
batch_size (global), max_steps, parallel (auto | ddp | fsdp, for torchrun) and the other keys documented in
moshi_ttt/train/config.py.
Outputs in run_dir: metrics.jsonl (one line per step), checkpoints/step_N/ (resumable; resume: auto picks the
latest), export/ (config.json + ttt.safetensors [+ lora.safetensors / model.safetensors]):
  moshi-ttt infer in.wav out.wav --hf-repo RUN/export --ttt-weights RUN/export/ttt.safetensors"""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.description = "TTT-aware finetuning of Moshi on stereo conversation audio (moshi-finetune's data format)."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _epilog
    parser.add_argument("config", help="training YAML")
    parser.add_argument("--max-steps", type=int, default=None, help="override max_steps")
    parser.add_argument("--run-dir", default=None, help="override run_dir")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def load_config(args: argparse.Namespace):
    import dataclasses

    from moshi_ttt.train.config import TrainConfig

    cfg = TrainConfig.load(args.config)
    over = {}
    if args.max_steps is not None:
        over["max_steps"] = args.max_steps
    if args.run_dir is not None:
        over["run_dir"] = args.run_dir
    if args.no_progress:
        over["progress"] = False
    return dataclasses.replace(cfg, **over) if over else cfg


def run(args: argparse.Namespace) -> int:
    from moshi_ttt.models.loaders import CheckpointError
    from moshi_ttt.train.loop import train
    from moshi_ttt.utils.logs import log_to_stderr

    log_to_stderr("moshi-ttt train")
    try:
        cfg = load_config(args)
        summary = train(cfg)
    except (ValueError, CheckpointError, FileNotFoundError) as e:  # DataError is a ValueError
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"moshi-ttt train: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: summary[k] for k in ("step", "export", "metrics")}), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    import os

    if not os.path.exists("/dev/nvidia0"):  # as moshi_ttt.apps.commands: torch.compile only helps on CUDA
        os.environ.setdefault("NO_TORCH_COMPILE", "1")
    parser = argparse.ArgumentParser(prog="python -m moshi_ttt.train")
    add_args(parser)
    return run(parser.parse_args(argv))
