"""moshi-finetune's data format → Moshi's 17-stream training codes.

Manifest: a `.jsonl`, one `{"path": "a.wav", "duration": 83.2}` per line (relative paths are taken
relative to the manifest's folder). Each WAV is stereo — left = Moshi (the main speaker), right = the
user — with a sibling `a.json` holding `{"alignments": [[word, [start, end], speaker], ...]}` (seconds).

A recording is cut into consecutive segments of `segment_frames` Mimi frames; each segment is tokenised
as moshi-finetune's `InterleavedTokenizer` does with `Interleaver(keep_main_only=True)`:
  stream 0     text of the main speaker's words whose start falls in the segment: each word's
               SentencePiece tokens from the frame of its start, the pad id elsewhere, and the
               end-of-padding id (0 for Moshi) on the frame right before a word's first token;
  streams 1-8  Mimi codes of the left channel (Moshi), streams 9-16 of the right channel (user).
Frames past the end of the audio (a shorter last segment) hold moshi's zero token (-1) in every
stream: no input embedding, and masked out of the loss by `LMModel.forward`.

Every problem with the user's files raises `DataError` naming the file (and manifest line / entry).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing as tp
from collections import deque
from functools import reduce
from pathlib import Path

import numpy as np
import torch

from moshi_ttt.models.streams import FRAME_RATE, SAMPLE_RATE
from moshi_ttt.train.code_cache import CodeCache


class DataError(ValueError):
    """A training file is missing, malformed or of the wrong kind."""


@dataclasses.dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float
    speaker: str


@dataclasses.dataclass(frozen=True)
class Recording:
    path: Path
    where: str  # "manifest.jsonl:3", for error messages
    num_frames: int  # Mimi frames covering the whole file
    words: tuple[Word, ...]


@dataclasses.dataclass(frozen=True)
class Segment:
    recording: int  # index into Dataset.recordings
    start_frame: int
    real_frames: int  # frames with audio (the rest, up to segment_frames, is zero-token padding)


# -- reading and validating files -------------------------------------------------------------------

def read_manifest(path: str | Path) -> list[tuple[Path, float, str]]:
    """(audio path, declared duration, "manifest:line") per non-empty line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data manifest not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise DataError(f"{where}: expected {{\"path\": ..., \"duration\": ...}}, got {line.strip()!r}")
        dur = entry.get("duration")
        if isinstance(dur, bool) or not isinstance(dur, (int, float)) or not math.isfinite(dur) or dur <= 0:
            raise DataError(f"{where}: 'duration' must be a positive number of seconds, got {dur!r}")
        audio = Path(entry["path"])
        if not audio.is_absolute():
            audio = path.parent / audio
        out.append((audio, float(dur), where))
    if not out:
        raise DataError(f"data manifest {path} lists no audio files")
    return out


def probe_stereo(path: Path, where: str) -> float:
    """Duration in seconds of a stereo audio file; DataError if missing, unreadable or not stereo."""
    import sphn

    if not path.exists():
        raise DataError(f"{where}: audio file not found: {path}")
    try:
        reader = sphn.FileReader(str(path))
    except Exception as e:  # sphn raises ValueError with the decoder's message
        raise DataError(f"{where}: {path} is not a readable audio file ({e})") from None
    if reader.channels != 2:
        raise DataError(f"{where}: {path} has {reader.channels} channel(s); expected a stereo file "
                        "(left = Moshi / main speaker, right = user)")
    if not reader.duration_sec > 0:
        raise DataError(f"{where}: {path} has no audio samples")
    return float(reader.duration_sec)


def read_alignments(path: Path, where: str) -> tuple[Word, ...]:
    """The `alignments` of a moshi-finetune `.json`, sorted by start time.

    Words with end <= start are dropped (as moshi-finetune does); anything structurally wrong is an error.
    """
    if not path.exists():
        raise DataError(f"{where}: alignment file not found: {path} (each WAV needs a sibling .json with "
                        "{\"alignments\": [[word, [start, end], speaker], ...]})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed alignment JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise DataError(f"{path}: malformed alignment JSON: expected an object with an \"alignments\" list, "
                        f"got {_short(data)}")
    words = []
    for i, a in enumerate(data["alignments"]):
        ok = (isinstance(a, (list, tuple)) and len(a) == 3 and isinstance(a[0], str) and isinstance(a[2], str)
              and isinstance(a[1], (list, tuple)) and len(a[1]) == 2
              and all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in a[1]))
        if not ok:
            raise DataError(f"{path}: malformed alignment JSON: alignments[{i}] = {_short(a)}; expected "
                            "[word, [start_sec, end_sec], speaker]")
        w = Word(a[0], float(a[1][0]), float(a[1][1]), a[2])
        if w.end > w.start:
            words.append(w)
    return tuple(sorted(words, key=lambda w: w.start))


def _short(x: tp.Any, n: int = 80) -> str:
    s = repr(x)
    return s if len(s) <= n else s[:n] + "…"


# -- text stream (moshi-finetune's Interleaver, keep_main_only=True) -----------------------------------

def tokenize_word(tokenizer, text: str) -> list[int]:
    """moshi-finetune's `tokenize(tokenizer, word.strip(), bos=False)`: newlines become the "\\n" piece."""
    nl = tokenizer.encode("\n")
    nl_piece = nl[-1] if nl else None
    parts = tokenizer.encode(text.strip().split("\n"))
    if nl_piece is None:
        return [t for p in parts for t in p]
    return reduce(lambda a, b: [*a, nl_piece, *b], parts)


def text_stream(words: tp.Sequence[tuple[list[int], float, float]], num_frames: int, frame_rate: float,
                text_padding: int, end_of_text_padding: int) -> list[int]:
    """`Interleaver.build_token_stream`: words are (tokens, start, end) relative to the segment start."""
    tokens = [text_padding] * num_frames
    i = 0
    stack: deque = deque()
    last_word_end = -1
    for t in range(num_frames):
        while i < len(words) and words[i][1] * frame_rate < t + 1:
            stack = deque(words[i][0])  # a new word replaces what is left of the previous one
            last_word_end = int(words[i][2] * frame_rate)
            i += 1
        if stack:
            if t > 0 and tokens[t - 1] == text_padding:
                tokens[t - 1] = end_of_text_padding
            tokens[t] = stack.popleft()
        elif t <= last_word_end:
            tokens[t] = text_padding
    return tokens


# -- the dataset --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The special ids of the model being trained."""

    text_padding: int
    end_of_text_padding: int
    zero: int  # moshi's zero_token_id (-1): no embedding, masked from the loss
    text_card: int
    n_q: int

    @classmethod
    def of(cls, model) -> TokenIds:
        return cls(model.text_padding_token_id, model.end_of_text_padding_id, model.zero_token_id,
                   model.text_card, model.n_q)


class Dataset:
    """Validated recordings cut into segments; `codes(i)` tokenises on first use and caches.

    All files are checked at construction (existence, stereo, alignment JSON), so a bad file fails the run
    before any training step. Audio is encoded lazily, one whole recording at a time (each segment
    encoded separately, as moshi-finetune does), on the device of `mimi`, and kept in memory for the run and
    in `code_cache` (if given) for the next runs.
    """

    def __init__(self, manifest: str | Path, segment_frames: int, min_segment_frames: int,
                 main_speaker: str, frame_rate: float = FRAME_RATE, code_cache: CodeCache | None = None):
        if segment_frames < 1:
            raise ValueError(f"segment_frames={segment_frames} must be >= 1")
        self.manifest = Path(manifest)
        self.segment_frames = segment_frames
        self.min_segment_frames = min_segment_frames
        self.main_speaker = main_speaker
        self.frame_rate = frame_rate
        self.code_cache = code_cache
        self.frame_size = int(round(SAMPLE_RATE / frame_rate))
        self.recordings: list[Recording] = []
        self.segments: list[Segment] = []
        for audio, _declared, where in read_manifest(self.manifest):
            dur = probe_stereo(audio, where)
            words = read_alignments(audio.with_suffix(".json"), where)
            n = math.ceil(round(dur * SAMPLE_RATE) / self.frame_size)
            r = len(self.recordings)
            self.recordings.append(Recording(audio, where, n, words))
            for start in range(0, n, segment_frames):
                real = min(segment_frames, n - start)
                if real >= min_segment_frames:
                    self.segments.append(Segment(r, start, real))
        if not self.segments:
            raise DataError(f"{self.manifest}: no segment with at least {min_segment_frames} frames "
                            f"({min_segment_frames / frame_rate:.2f} s) of audio: the recordings are too short")
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.segments)

    def fingerprint(self) -> str:
        """Identifies the segment list (checked on resume: the data order must mean the same segments)."""
        h = hashlib.sha256()
        for s in self.segments:
            h.update(f"{self.recordings[s.recording].path}|{s.start_frame}|{s.real_frames};".encode())
        return h.hexdigest()[:16]

    def codes(self, i: int, mimi, tokenizer, ids: TokenIds) -> torch.Tensor:
        """[17, segment_frames] int64 codes of segment i (CPU)."""
        if i not in self._cache:
            self._encode_recording(self.segments[i].recording, mimi, tokenizer, ids)
        return self._cache[i].long()

    def batch(self, indices: tp.Sequence[int], mimi, tokenizer, ids: TokenIds) -> torch.Tensor:
        return torch.stack([self.codes(i, mimi, tokenizer, ids) for i in indices])

    def _encode_recording(self, r: int, mimi, tokenizer, ids: TokenIds) -> None:
        """Fills the in-memory codes of recording r's segments: from the code cache if it has them, else
        encoded (and then cached)."""
        rec = self.recordings[r]
        key = None
        if self.code_cache is not None:
            key = self.code_cache.key(rec.path, rec.path.with_suffix(".json"), {
                "segment_frames": self.segment_frames, "min_segment_frames": self.min_segment_frames,
                "main_speaker": self.main_speaker, "frame_rate": self.frame_rate})
            cached = self.code_cache.get(key)
            mine = {seg.start_frame: i for i, seg in enumerate(self.segments) if seg.recording == r}
            if cached is not None and set(cached) == set(mine):
                for start, i in mine.items():
                    self._cache[i] = cached[start]
                return
        fresh = self._encode(r, mimi, tokenizer, ids)
        self._cache.update(fresh)
        if key is not None:
            self.code_cache.put(key, {self.segments[i].start_frame: c for i, c in fresh.items()})

    @torch.no_grad()
    def _encode(self, r: int, mimi, tokenizer, ids: TokenIds) -> dict[int, torch.Tensor]:
        """{segment index: codes [1 + n_q, segment_frames] int32} of recording r's segments, encoded by `mimi`."""
        import sphn

        rec = self.recordings[r]
        if ids.n_q % 2 or mimi.num_codebooks != ids.n_q // 2:
            raise ValueError(f"the model has n_q={ids.n_q} audio streams but Mimi gives {mimi.num_codebooks} "
                             "codebooks per channel (need n_q = 2 × Mimi codebooks)")
        try:
            pcm, _ = sphn.read(str(rec.path), sample_rate=SAMPLE_RATE)
        except Exception as e:
            raise DataError(f"{rec.where}: cannot read {rec.path} ({e})") from None
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 2 or pcm.shape[0] != 2:
            raise DataError(f"{rec.where}: {rec.path} decoded to shape {pcm.shape}; expected 2 channels")
        if not np.isfinite(pcm).all():
            raise DataError(f"{rec.where}: {rec.path} contains non-finite samples")
        tokenized = [(tokenize_word(tokenizer, w.text), w.start, w.end) for w in rec.words
                     if w.speaker == self.main_speaker]
        for toks, _, _ in tokenized:
            bad = [t for t in toks if not 0 <= t < ids.text_card]
            if bad:
                raise ValueError(f"text tokenizer gives ids {bad[:3]} outside the model's text_card={ids.text_card}")
        device = next(iter(mimi.parameters())).device
        T, F = self.segment_frames, self.frame_size
        out = {}
        for i, seg in enumerate(self.segments):
            if seg.recording != r:
                continue
            a = seg.start_frame * F
            chunk = np.zeros((2, seg.real_frames * F), dtype=np.float32)
            piece = pcm[:, a:a + seg.real_frames * F]
            chunk[:, :piece.shape[1]] = piece
            audio = mimi.encode(torch.from_numpy(chunk).to(device)[:, None])  # [2, K, frames]
            audio = audio[..., :seg.real_frames].reshape(-1, audio.shape[-1])  # [2K, real]
            if audio.shape[-1] != seg.real_frames:
                raise RuntimeError(f"Mimi returned {audio.shape[-1]} frames for {seg.real_frames} frames of audio")
            t0 = seg.start_frame / self.frame_rate
            t1 = t0 + T / self.frame_rate
            words = [(toks, s - t0, e - t0) for toks, s, e in tokenized if t0 <= s < t1]
            text = text_stream(words, seg.real_frames, self.frame_rate, ids.text_padding, ids.end_of_text_padding)
            codes = torch.full((1 + audio.shape[0], T), ids.zero, dtype=torch.int32)
            codes[0, :seg.real_frames] = torch.tensor(text, dtype=torch.int32)
            codes[1:, :seg.real_frames] = audio.cpu().to(torch.int32)
            out[i] = codes
        return out


# -- data order ---------------------------------------------------------------------------------------

class BatchOrder:
    """Which segments make up global batch `step`: a pure function of (seed, step), so resuming only needs
    the step. Epochs are concatenated permutations (seeded by seed and epoch); batches run across
    epoch boundaries. Rank r of W takes the r-th contiguous slice of the global batch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perms[epoch] = list(range(self.n))
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[int]:
        pos = step * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(pos, pos + self.batch_size)]

    def local_batch(self, step: int, rank: int, world_size: int) -> list[int]:
        if self.batch_size % world_size:
            raise ValueError(f"batch_size={self.batch_size} (the global batch) must be divisible by the number "
                             f"of processes ({world_size})")
        per = self.batch_size // world_size
        return self.global_batch(step)[rank * per:(rank + 1) * per]

    def state_dict(self) -> dict:
        return {"num_items": self.n, "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle}
