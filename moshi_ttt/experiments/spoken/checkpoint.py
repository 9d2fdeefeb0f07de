"""The spoken-memory experiment's checkpoint folder: Kyutai's layout (config.json, model.safetensors, Mimi,
tokenizer) with the architecture of configs/spoken_memory.yaml, the shipped demo codec (trained Mimi, 4
codebooks per channel) and a 64-piece SentencePiece tokenizer in which each number word is one piece (`▁seven`),
so that Moshi's answer is one text token. Its LM weights are random: stage 1 trains them (`model.init: random`).
"""

from __future__ import annotations

from pathlib import Path

from moshi_ttt.experiments.spoken.spec import COLOURS, NUMBERS, fact_text, filler_sentences, question_text

ARCHITECTURE = "spoken_memory"  # configs/spoken_memory.yaml
TOKENIZER_NAME = "tokenizer_spoken.model"


def build_tokenizer(out_dir: str | Path, vocab_size: int = 64) -> Path:
    """A SentencePiece unigram model (ids 0..3 = unk, <s>, </s>, pad as Kyutai's) trained on the benchmark's
    training text, the nine number words forced to single pieces. Deterministic; reused if present."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / TOKENIZER_NAME
    if model.exists():
        return model
    lines = [x for c in COLOURS for n in NUMBERS for x in (fact_text(c, n), question_text(c), n)]
    lines += list(filler_sentences("train")[:300])
    corpus = out_dir / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(lines * 3) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(model.with_suffix("")), vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
        user_defined_symbols=[f"▁{n}" for n in NUMBERS])
    corpus.unlink()
    return model


def make_repo(out_dir: str | Path, seed: int = 0, architecture: str = ARCHITECTURE) -> Path:
    """The checkpoint folder (random LM weights of `seed`, demo codec, the spoken tokenizer) of `architecture` (a
    shipped config name or a YAML with `lm` and `ttt` sections). Built once: an existing folder is reused."""
    from moshi_ttt.models import demo
    from moshi_ttt.utils.io import atomic_dir

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    codec, _ = demo.shipped_demo_weights()
    with atomic_dir(out) as tmp:
        tok = build_tokenizer(tmp)
        demo.make_local_repo(tmp, config=architecture, seed=seed, demo_weights=(codec, None), tokenizer=tok)
    return out
