"""The 17-stream training codes of each recording, kept on disk across runs: a recording is encoded by the
codec once, whatever the number of runs, seeds and variants trained on it (moshi-finetune encodes every
epoch of every run).

An entry is one recording: `<root>/<key[:2]>/<key>.safetensors` holding `codes` [n_segments, 1 + n_q, T] int32
and `starts` [n_segments] int64 (the segments' first frames). The key is a sha256 of everything the codes
depend on: the codec (Mimi's weights bytes, its config, the codebooks used), the text tokenizer's bytes and
special ids, the audio and alignment files' bytes, and the segmenting (segment_frames, min_segment_frames,
main speaker, frame rate). Changing any of them misses the cache; nothing is ever invalidated in place.
Entries are written atomically, so concurrent ranks or runs writing the same entry are safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import typing as tp
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moshi_ttt.utils.io import atomic_write

log = logging.getLogger("moshi_ttt.train")

FORMAT = 1  # bump when the codes of a recording change meaning (tokenisation, layout)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(obj: tp.Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class CodeCache:
    """Codes of recordings under `root`, for one codec + tokenizer (`codec_id`)."""

    def __init__(self, root: str | Path, codec_id: str):
        self.root = Path(root)
        self.codec_id = codec_id
        self.hits = 0
        self.misses = 0

    @staticmethod
    def codec_id_of(mimi_weights: str | Path, mimi_config: dict | None, num_codebooks: int,
                    tokenizer: str | Path, ids: tp.Any, frame_rate: float) -> str:
        """What the codes depend on besides the recording: Mimi's weights bytes and config, the codebooks used,
        the tokenizer's bytes, the special text ids (a `TokenIds`) and the frame rate."""
        return _digest({"format": FORMAT, "mimi": file_digest(mimi_weights), "mimi_config": mimi_config,
                        "codebooks": num_codebooks, "tokenizer": file_digest(tokenizer), "ids": repr(ids),
                        "frame_rate": frame_rate})

    def key(self, audio: Path, alignment: Path, segmenting: dict) -> str:
        return _digest({"codec": self.codec_id, "audio": file_digest(audio), "alignment": file_digest(alignment),
                        "segmenting": segmenting})

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[int, torch.Tensor] | None:
        """{start frame: codes [1 + n_q, T] int32} of the recording, or None if not cached (or unreadable)."""
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            t = load_file(str(path))
            out = {int(s): c for s, c in zip(t["starts"].tolist(), t["codes"], strict=True)}
        except Exception as e:  # a damaged entry is a miss; the re-encoded codes replace it
            log.warning("code cache entry %s is unreadable (%s): encoding the recording again", path, e)
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, codes: dict[int, torch.Tensor]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        starts = sorted(codes)
        tensors = {"starts": torch.tensor(starts, dtype=torch.int64),
                   "codes": torch.stack([codes[s].to(torch.int32) for s in starts]).contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
