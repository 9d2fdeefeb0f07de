"""Small, deterministic stand-ins for Kyutai's assets, built locally (no download):
a SentencePiece text tokenizer, a reduced-size Mimi config, and a complete local checkpoint folder in
Kyutai's Hugging Face repo layout (config.json + model.safetensors + Mimi + tokenizer).

The tests' checkpoints (`make_local_repo`) have random weights: the speech such a model produces is not
meaningful; the point is exercising the real formats and code paths. The `--demo` checkpoint (`demo_repo`)
takes the trained weights shipped in `DEMO_ASSETS` (`shipped_demo_weights`; refused if missing): a reduced Mimi
trained on espeak-ng speech (scripts/train_demo_codec.py) and an echo LM whose audio repeats the user's
`ECHO_OUTPUT_FRAMES` frames later (scripts/train_demo_lm.py). Status and figures: docs/demo.md.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import sentencepiece as spm
import torch
from moshi.models import loaders
from safetensors.torch import load_file, save_file

from moshi_ttt.models.lm import build_ttt_lm
from moshi_ttt.models.loaders import moshi_private
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.ttt.config import TTTModelConfig, load_lm_and_ttt, load_ttt_config
from moshi_ttt.utils.cache import cache_dir
from moshi_ttt.utils.io import atomic_dir, atomic_write

_CORPUS = """hello there how are you today
I am fine thank you and you
the weather is nice and the sun is out
tell me a story about a cat and a dog
what time is it now please
memory is what lets a model remember the whole conversation
test time training updates fast weights every chunk
moshi speaks and listens at the same time
""".strip().splitlines()


def build_tokenizer(out_dir: str | Path, vocab_size: int = 64) -> Path:
    """Trains a tiny SentencePiece model (ids 0..3 = unk, <s>, </s>, pad as Kyutai's). Deterministic."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer_tiny"
    model = prefix.with_suffix(".model")
    if model.exists():
        return model
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(_CORPUS * 4) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, seed_sentencepiece_size=1000,
        minloglevel=2)
    return model


def tiny_mimi_config() -> dict:
    """Mimi with the real architecture at reduced size: SEANet 8 filters, latent 128, 1-layer 128-wide
    transformers, 8 codebooks of 2048 — every stage of Mimi's encode/decode runs, cheap enough for the
    demo to keep real time with margin on 2 CPU cores (a step is dominated by per-op overhead, so
    fewer layers matter more than width)."""
    cfg = moshi_private().mimi_config
    cfg["seanet"].update(n_filters=8, dimension=128)
    cfg["quantizer"].update(dimension=64, n_q=8, input_dimension=128, output_dimension=128)
    cfg["transformer"].update(d_model=128, num_heads=4, num_layers=1, dim_feedforward=256,
                              input_dimension=128, output_dimensions=[128])
    return cfg


def _varied_audio(seconds: float, seed: int, sample_rate: int) -> torch.Tensor:
    """Deterministic audio whose spectrum changes every 120 ms (tones, glides, noise bursts, silence),
    [1, 1, N]: material for fitting the random Mimi's codebooks."""
    gen = torch.Generator().manual_seed(seed)
    seg = int(0.12 * sample_rate)
    t = torch.arange(seg) / sample_rate
    parts = []
    for _ in range(int(seconds / 0.12)):
        f0, f1 = 80 + 2500 * torch.rand(2, generator=gen)
        phase = 2 * torch.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
        x = torch.sin(phase) + 0.5 * torch.sin(2.7 * phase) * torch.rand(1, generator=gen)
        x = x + torch.randn(seg, generator=gen) * torch.rand(1, generator=gen) ** 2
        parts.append(0.3 * torch.rand(1, generator=gen) * x)
    return torch.cat(parts)[None, None]


@torch.no_grad()
def fit_codebooks(mimi, pcm: torch.Tensor) -> None:
    """Initialises a random Mimi's codebooks with moshi's own k-means on `pcm` [1, 1, N] latents.

    A freshly built Mimi has all-zero codebooks and encodes any audio to code 0; fitted codebooks give
    codes that follow the audio, so tests and the demo exercise real, varying token streams."""
    latent = mimi._encode_to_unquantized_latent(pcm)
    mimi.quantizer.train()
    for _ in range(mimi.quantizer.total_codebooks):  # one RVQ level initialises per pass
        mimi.quantizer(latent, mimi.frame_rate)
    mimi.eval()


DEMO_ASSETS = Path(__file__).with_name("demo_assets")  # trained demo weights (package data)
# the spoken-memory experiment's TTT model (TTT at window W, seed 0) with one of its held-out conversations:
# a `--hf-repo` folder (moshi_ttt/experiments/spoken/bundle.py, docs/spoken-memory.md)
SPOKEN_MEMORY_MODEL = DEMO_ASSETS / "spoken_memory"


def half_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with float32 tensors stored as float16 (the shipped demo weights: half the bytes)."""
    return {k: (v.half() if v.dtype == torch.float32 else v).detach().contiguous() for k, v in state.items()}


def float_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with float16 tensors back in float32 (inverse of `half_state` up to its rounding)."""
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}


MIMI_RECIPE = 2  # bump when the tiny Mimi recipe changes (invalidates cached weights)


@functools.lru_cache(maxsize=4)
def random_mimi_state(seed: int) -> dict[str, torch.Tensor]:
    """The tests' random Mimi (the demo's too when no trained weights ship): codebooks fitted on varied
    audio, cached on disk (deterministic given the seed and recipe; `MIMI_RECIPE` names the recipe)."""
    path = cache_dir() / f"tiny_mimi_seed{seed}_r{MIMI_RECIPE}.safetensors"
    if path.exists():
        return load_file(str(path))
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed + 1)
    mimi = loaders.get_mimi(None, mimi_config=tiny_mimi_config())
    fit_codebooks(mimi, _varied_audio(10.0, seed, mimi.sample_rate))
    torch.random.set_rng_state(rng)
    state = {k: v.contiguous() for k, v in mimi.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return state


DEMO_VERSION = 5  # bump when the demo checkpoint recipe changes (invalidates the cache)

# The `--demo` LM is configs/tiny.yaml (the tests' model) with these changes: 4 Moshi + 4 user audio
# codebooks instead of 8 + 8 (Moshi's delays: text and each side's semantic codebook 0, acoustic ones 1),
# to keep `make demo` real time on 2 cores (docs/design.md, "Demo checkpoint"). Every code path is the same.
DEMO_LM_OVERRIDES = {"n_q": 8, "dep_q": 4, "delays": [0, 0, 1, 1, 1, 0, 1, 1, 1]}
DEMO_TTT_CONFIG = "demo_ttt"  # the TTT section the echo LM was trained with (configs/demo_ttt.yaml)
ECHO_FRAMES = 12  # the echo LM's delay in its training sequences (0.96 s, inside tiny's 64-frame context)
# The delay heard at the output: LMGen never emits Moshi's frame 0 (it holds the initial token), so the
# first output frame is Moshi's frame 1 and the echo comes one frame sooner (0.88 s).
ECHO_OUTPUT_FRAMES = ECHO_FRAMES - 1
DEMO_WEIGHTS = (DEMO_ASSETS / "mimi.safetensors", DEMO_ASSETS / "echo_lm.safetensors")


def shipped_demo_weights() -> tuple[Path, Path]:
    """`DEMO_WEIGHTS`, both shipped with the package; FileNotFoundError naming the missing ones (a demo
    with random weights would be a buzz, not an echo: never a silent fallback)."""
    missing = [str(p) for p in DEMO_WEIGHTS if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the demo's trained weights are missing: {', '.join(missing)} (package data of "
                                f"moshi_ttt; reinstall, or rebuild them with scripts/train_demo_codec.py and "
                                f"scripts/train_demo_lm.py)")
    return DEMO_WEIGHTS


def demo_repo(ttt: TTTModelConfig | None = None, cache_root: str | Path | None = None) -> Path:
    """The `--demo` checkpoint folder (`make_local_repo` of configs/tiny.yaml with `DEMO_LM_OVERRIDES`, the TTT
    section `ttt`, by default `DEMO_TTT_CONFIG`'s, the one the echo LM was trained with, and the
    `shipped_demo_weights()`), built once per TTT config and weights in `cache_root` (default `cache_dir()`)
    and reused."""
    import hashlib

    root = Path(cache_root) if cache_root is not None else cache_dir()
    weights = shipped_demo_weights()
    ttt = ttt if ttt is not None else load_ttt_config(DEMO_TTT_CONFIG)
    key = {"v": DEMO_VERSION, "config": "tiny", "lm": DEMO_LM_OVERRIDES, "ttt": ttt.to_dict(),
           "weights": [hashlib.sha1(p.read_bytes()).hexdigest() for p in weights]}
    key = json.dumps(key, sort_keys=True)
    folder = root / f"demo-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / "config.json").exists():
        return folder
    with atomic_dir(folder) as tmp:  # built concurrently by another process: theirs is kept
        make_local_repo(tmp, config="tiny", ttt=ttt, lm_overrides=DEMO_LM_OVERRIDES, demo_weights=weights)
    return folder


def make_local_repo(out_dir: str | Path, config: str = "tiny", seed: int = 0,
                    ttt: TTTModelConfig | None = None, ttt_in_weights: bool = True,
                    ttt_in_config: bool = True, lm_overrides: dict | None = None,
                    demo_weights: tuple[str | Path, str | Path | None] | None = None,
                    tokenizer: str | Path | None = None) -> Path:
    """Writes a Kyutai-style checkpoint folder: config.json (with a "ttt" section), model.safetensors
    (base + TTT tensors), a Mimi checkpoint + its config, and a SentencePiece tokenizer.

    Load it with `CheckpointInfo.from_hf_repo(..., config_path=out/"config.json", moshi_weights=...)`
    or `moshi_ttt.models.loaders.checkpoint_info(str(folder))`. Deterministic given `seed`. `lm_overrides`
    replace LMModel kwargs of `config` (Mimi then uses max(dep_q, n_q − dep_q) of its codebooks, as
    moshi's loader decides). `demo_weights` = (Mimi file, LM file or None): trained float16 weights instead
    of random ones; the LM file's tensors replace those of the same name and shape (a TTT config with other
    layers or sizes keeps its fresh TTT tensors). `tokenizer`: a SentencePiece model file copied in instead of
    the tiny one `build_tokenizer` trains.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_kwargs, ttt_default = load_lm_and_ttt(config)
    lm_kwargs = {**lm_kwargs, **(lm_overrides or {})}
    ttt = ttt or ttt_default
    torch.manual_seed(seed)
    model = build_ttt_lm(lm_kwargs, ttt)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if ttt_in_weights or TTT_KEY not in k}
    if demo_weights is None:
        mimi_state = random_mimi_state(seed)
    else:
        mimi_state = float_state(load_file(str(demo_weights[0])))
        if demo_weights[1] is not None:
            trained = float_state(load_file(str(demo_weights[1])))
            state = {k: trained[k] if k in trained and trained[k].shape == v.shape else v for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"))
    mimi_cfg = tiny_mimi_config()
    save_file(mimi_state, str(out / "mimi.safetensors"))
    (out / "mimi_config.json").write_text(json.dumps(mimi_cfg, indent=1))
    if tokenizer is None:
        tok = build_tokenizer(out)
    else:
        tok = out / Path(tokenizer).name
        tok.write_bytes(Path(tokenizer).read_bytes())
    raw = {"moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
           "mimi_config_name": "mimi_config.json", "tokenizer_name": tok.name, "model_type": "moshi",
           "lm_gen_config": {}, **lm_kwargs}
    if ttt_in_config:
        raw["ttt"] = ttt.to_dict()
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    return out


def install_in_hf_cache(folder: str | Path, repo_id: str, cache_dir: str | Path,
                        revision: str = "0" * 40) -> Path:
    """Places `folder`'s files in a huggingface_hub cache as repo `repo_id` (refs/main → revision), so
    `hf_hub_download(repo_id, ...)` resolves them offline exactly as for a downloaded Kyutai repo."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    for f in Path(folder).iterdir():
        if f.is_file():
            (snap / f.name).write_bytes(f.read_bytes())
    return snap
