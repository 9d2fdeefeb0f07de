"""The command-line flags that `infer`, `serve`, `train` and `memory` share, torch-free (the web process of
`serve` reads them without loading the model): the checkpoint flags (`CheckpointFlags`, the one owner of
their names), the attention window's help, and the memory store flags. `runtime` turns them into a model.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass, field, fields

from moshi_ttt.utils.validate import Checks

_check = Checks("checkpoint flags")


def _flag(help: str, moshi: bool = True) -> tp.Any:
    """A path-valued flag; `moshi`: one of moshi's own checkpoint flags (refused with `demo`)."""
    return field(default=None, metadata={"help": help, "moshi": moshi})


@dataclass(frozen=True)
class CheckpointFlags:
    """Where the model comes from: moshi's checkpoint flags, the TTT ones, and `demo` (the tiny echo
    checkpoint built and cached by `models.demo.demo_repo`; excludes moshi's flags). The one owner of these
    names: `add_checkpoint_args` makes the `infer` / `serve` flags from the fields (`--hf-repo` ...) and the
    training YAML's `model:` section is this dataclass (`hf_repo:` ...)."""

    hf_repo: str | None = _flag("Hugging Face repo id or local folder in Kyutai's layout (default: moshi's "
                                "default repo)")
    moshi_weight: str | None = _flag("local Moshi weights (overrides the repo's)")
    mimi_weight: str | None = _flag("local Mimi weights (overrides the repo's)")
    tokenizer: str | None = _flag("local SentencePiece text tokenizer (overrides the repo's)")
    config_path: str | None = _flag("config.json to use instead of the repo's")
    lora_weight: str | None = _flag("LoRA weights (the config must have 'lora': true)")
    ttt_config: str | None = _flag("TTT config: a YAML/JSON file (a 'ttt' section or the TTT mapping itself) or "
                                   "a shipped config name (tiny, demo_ttt, moshi7b_ttt); must agree with the "
                                   "config stored with the TTT weights", moshi=False)
    ttt_weights: str | None = _flag("TTT safetensors written by `moshi-ttt train` / checkpoint.save_ttt",
                                    moshi=False)
    demo: bool = False

    def __post_init__(self) -> None:
        for name in PATH_FLAGS:
            _check.path(name, getattr(self, name))
        _check.flag("demo", self.demo)

    @classmethod
    def from_args(cls, args: tp.Any) -> CheckpointFlags:
        """From an argparse namespace (or any object) with these attribute names; missing ones are None."""
        return cls(**{f: getattr(args, f, None) for f in PATH_FLAGS}, demo=bool(getattr(args, "demo", False)))


PATH_FLAGS = tuple(f.name for f in fields(CheckpointFlags) if f.name != "demo")
MOSHI_FLAGS = tuple(f.name for f in fields(CheckpointFlags) if f.metadata.get("moshi"))


def add_checkpoint_args(g, demo_help: str) -> None:
    """The `CheckpointFlags` as command-line flags (`--hf-repo` ...; `--demo` with the command's `demo_help`),
    on an argparse parser or group. `CheckpointFlags.from_args` reads them back."""
    for f in fields(CheckpointFlags):
        name = "--" + f.name.replace("_", "-")
        if f.name == "demo":
            g.add_argument(name, action="store_true", help=demo_help)
        else:
            g.add_argument(name, help=f.metadata["help"])


CONTEXT_HELP = ("attention window of the main transformer in frames (12.5 per second): the KV cache holds this "
                "many frames. Default: the checkpoint's config.json `context`, which `moshi-ttt train` sets to the "
                "window it trained with")


# -- the memory store flags (`moshi-ttt memory`, `serve`) ------------------------------------------------------

def add_store_args(parser, default_dir: str | None = None, required: bool | None = None) -> None:
    """--memory-store, --memory-ttl (days), --memory-max-bytes, --memory-quota-memories / -bytes: shared by the
    commands that use a memory store. `required` (default: when there is no `default_dir`)."""
    from moshi_ttt.memory import store

    parser.add_argument("--memory-store", default=default_dir,
                        required=default_dir is None if required is None else required,
                        help="where the encrypted conversation memories are: a directory, or s3://bucket/prefix "
                             "(credentials and endpoint from the AWS environment variables, e.g. AWS_ENDPOINT_URL)")
    parser.add_argument("--memory-ttl", type=float, default=30.0,
                        help="days a memory lives after its last save (default 30)")
    parser.add_argument("--memory-max-bytes", type=int, default=None,
                        help="bound on the store's bytes: new memories are refused beyond it, nothing is evicted "
                             "(default: a directory's free disk less 10%% of the disk; 1 TiB on S3)")
    parser.add_argument("--memory-quota-memories", type=int, default=store.QUOTA_MEMORIES,
                        help="memories one owner (client address group, API key) may hold "
                             f"(default {store.QUOTA_MEMORIES})")
    parser.add_argument("--memory-quota-bytes", type=int, default=store.QUOTA_BYTES,
                        help=f"bytes one owner may hold (default {store.QUOTA_BYTES})")


def store_of(args: tp.Any):
    """`moshi_ttt.memory.store.open_store` of the flags of `add_store_args` (days → seconds)."""
    from moshi_ttt.memory import store

    return store.open_store(args.memory_store, ttl=args.memory_ttl * store.DAY, max_bytes=args.memory_max_bytes,
                            quota_memories=args.memory_quota_memories, quota_bytes=args.memory_quota_bytes)
