"""Does Moshi remember? The spoken-memory experiment at Moshi's proportions (docs/spoken-memory.md).

Stage 1 — a stand-in for pretrained Moshi: the architecture of configs/spoken_memory.yaml (window W = 120 frames,
9.6 s), the demo codec, trained with `moshi-ttt train` in two phases, once: listening (from random init,
`model.init: random`, `trainable: full`: its text stream transcribes the user's facts and questions), then the
task from that model (short conversations whose every question is inside W; Moshi says the answers).

Stage 2 — the recipe under test, on long conversations (≥ 5·W, facts asked from inside W out to ≥ 4·W later),
same data and steps for every variant (see VARIANTS).

Everything big (data, checkpoints) lives in WORK (default $MOSHI_TTT_CACHE/spoken_memory, resumable: each stage
and run skips what is done); the small records (per run: settings, timings, the recall summaries) go to
OUT/runs/*.json, from which OUT/results.json, the plot and the tables are regenerated.

    python -m moshi_ttt.experiments.spoken.experiment --out docs/spoken_memory [--work DIR] [--only stage1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from moshi_ttt.experiments.spoken.spec import ConversationSpec
from moshi_ttt.experiments.spoken.variants import VARIANTS, Variant
from moshi_ttt.models.streams import FRAME_RATE
from moshi_ttt.utils.io import atomic_write


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """One generated set: `n` conversations of `spec`, generator seed `seed`."""

    n: int
    seed: int
    spec: ConversationSpec

    def to_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "spec": self.spec.to_dict()}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch: int
    lr: float
    warmup: int
    segment_frames: int
    min_segment_frames: int | None = None
    text_padding_weight: float = 0.5
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# One speaking rate and pitch for every user (the voices still vary, and eval's are held out), and 20000 short
# conversations: the first stage-1 models memorised their 1500 and 4000 training conversations instead of
# learning to listen (docs/spoken-memory.md, "What was tried").
SIMPLE_AUDIO = {"rate_wpm": (175, 175), "pitch": (50, 50)}
STAGE1_SPEC = ConversationSpec(facts=2, duration_s=10.0, min_distance_s=1.5, max_distance_s=4.5, **SIMPLE_AUDIO)
# ≥ 5 windows long, facts asked from inside the window out to ≥ 4 windows later (W = 9.6 s)
STAGE2_SPEC = ConversationSpec(facts=4, duration_s=48.0, min_distance_s=1.5, max_distance_s=40.0, **SIMPLE_AUDIO)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the experiment's runs depend on (a cached stage or run is reused only if its settings are equal)."""

    window: int = 120
    stage1_train: DataSettings = DataSettings(20000, 100, STAGE1_SPEC)
    stage1_eval: DataSettings = DataSettings(100, 101, STAGE1_SPEC)
    stage1_val: DataSettings = DataSettings(50, 102, STAGE1_SPEC)  # training voices, new conversations
    listen_n: int = 6000  # the first conversations of stage1_train, transcribed (generate.write_listening_set)
    listen: TrainSettings = TrainSettings(steps=2000, batch=16, lr=1e-3, warmup=100, segment_frames=200,
                                          min_segment_frames=100, weight_decay=0.1)
    stage1: TrainSettings = TrainSettings(steps=1500, batch=16, lr=5e-4, warmup=100, segment_frames=200,
                                          min_segment_frames=100, weight_decay=0.1)
    repo_seed: int = 0
    stage1_seed: int = 0
    stage2_train: DataSettings = DataSettings(400, 200, STAGE2_SPEC)
    stage2_eval: tuple[tuple[int, DataSettings], ...] = (
        (4, DataSettings(40, 201, STAGE2_SPEC)),
        (2, DataSettings(40, 202, dataclasses.replace(STAGE2_SPEC, facts=2))),
        (8, DataSettings(40, 203, dataclasses.replace(STAGE2_SPEC, facts=8))))
    stage2: TrainSettings = TrainSettings(steps=400, batch=8, lr=1e-3, warmup=40, segment_frames=640,
                                          min_segment_frames=320)
    stage2_val: DataSettings = DataSettings(40, 204, STAGE2_SPEC)  # training voices, new conversations
    probed: tuple[str, ...] = ("stage1", "floor_seed0", "ttt_lora_seed0", "ttt_full_seed0",  # runs the probes read
                               "ttt_full_answers_seed0")
    probe_fit_voices: int = 8  # of the 12 training voices: the probes fit on these and test on the others
    ttt_config: str = "spoken_memory_ttt"
    architecture: str = "spoken_memory"
    variants: tuple[tuple[str, Variant], ...] = tuple(VARIANTS.items())
    cross: tuple[tuple[str, int], ...] = (("ttt", 2),)  # across conversations: (variant, seeds), main eval set
    eval_batch: int = 40

    @property
    def window_s(self) -> float:
        return self.window / FRAME_RATE


def data_set(work: Path, name: str, split: str, d: DataSettings, progress: bool = True) -> Path:
    """The manifest of set `name`/`split`, generated unless it exists with these settings."""
    from moshi_ttt.experiments.spoken.generate import write_set

    manifest = work / "data" / name / f"{split}.jsonl"
    meta = manifest.with_suffix(".meta.json")
    if manifest.exists() and meta.exists():
        m = json.loads(meta.read_text())
        spec = json.loads(json.dumps(d.spec.to_dict()))
        if (m.get("seed"), m.get("spec"), m.get("n_conversations")) == (d.seed, spec, d.n):
            return manifest
    t = time.time()
    out = write_set(manifest.parent, split, d.n, d.seed, d.spec, progress=progress)
    manifest.with_suffix(".seconds.json").write_text(json.dumps({"generate_s": time.time() - t}) + "\n")
    return out


def train_run(run_dir: Path, cfg: dict) -> Path:
    """`moshi-ttt train` of the config dict (in this process; resumes from the run's last checkpoint); returns
    the export folder."""
    from moshi_ttt.train.config import TrainConfig
    from moshi_ttt.train.loop import train

    export = run_dir / "export"
    done = run_dir / "done.json"
    if done.exists() and json.loads(done.read_text()).get("config") == cfg:
        return export
    run_dir.mkdir(parents=True, exist_ok=True)
    t = time.time()
    train(TrainConfig.from_dict({**cfg, "run_dir": str(run_dir)}))
    atomic_write(done, lambda tmp: tmp.write_text(json.dumps({"config": cfg, "seconds": time.time() - t}) + "\n"))
    return export


def _full_config(model: dict, manifest: Path, t: TrainSettings, seed: int) -> dict:
    """A `trainable: full` stage-1 phase's config."""
    return {"model": model, "data": {"train": str(manifest), "segment_frames": t.segment_frames,
                                     "min_segment_frames": t.min_segment_frames},
            "trainable": "full", "batch_size": t.batch, "max_steps": t.steps,
            "optim": {"lr": t.lr, "warmup_steps": t.warmup, "schedule": "cosine", "min_lr_ratio": 0.1,
                      "weight_decay": t.weight_decay},
            "text_padding_weight": t.text_padding_weight, "seed": seed, "ckpt_every": 100,
            "keep_checkpoints": 2, "log_every": 10, "dtype": "float32"}


def listen_config(work: Path, s: Settings) -> dict:
    """Stage 1's listening phase: random init, the text stream transcribes the user."""
    from moshi_ttt.experiments.spoken.checkpoint import make_repo
    from moshi_ttt.experiments.spoken.generate import write_listening_set

    repo = make_repo(work / "repo", seed=s.repo_seed, architecture=s.architecture)
    source = data_set(work, "stage1", "train", s.stage1_train)
    manifest = write_listening_set(source, work / "data" / "stage1_listen", s.listen_n)
    return _full_config({"hf_repo": str(repo), "init": "random", "context": s.window}, manifest, s.listen,
                        s.stage1_seed)


def stage1_config(work: Path, s: Settings) -> dict:
    """Stage 1's task phase: from the listening phase's export, Moshi answers."""
    listened = train_run(work / "runs" / "listen", listen_config(work, s))
    manifest = data_set(work, "stage1", "train", s.stage1_train)
    return _full_config({"hf_repo": str(listened), "context": s.window}, manifest, s.stage1, s.stage1_seed)


def stage1(work: Path, s: Settings) -> Path:
    """The stand-in for pretrained Moshi: its export folder."""
    return train_run(work / "runs" / "stage1", stage1_config(work, s))


def stage2_config(work: Path, s: Settings, name: str, v: Variant, seed: int) -> dict:
    """The `moshi-ttt train` config of variant `name`, seed `seed`, on the stage-2 training set."""
    base = stage1(work, s)
    manifest = data_set(work, "stage2", "train", s.stage2_train)
    t = s.stage2
    model = {"hf_repo": str(base), "context": v.context or s.window}
    if v.ttt:
        from moshi_ttt.ttt.config import config_path

        model["ttt_config"] = str(config_path(s.ttt_config))
    return {"model": model,
            "data": {"train": str(manifest), "segment_frames": t.segment_frames,
                     "min_segment_frames": t.min_segment_frames},
            "trainable": v.trainable, "batch_size": t.batch, "max_steps": t.steps,
            "optim": {"lr": v.lr, "warmup_steps": t.warmup, "schedule": "cosine", "min_lr_ratio": 0.1,
                      "weight_decay": t.weight_decay},
            "text_padding_weight": t.text_padding_weight if v.text_padding_weight is None else v.text_padding_weight,
            "seed": seed, "ckpt_every": 50, "keep_checkpoints": 1,
            "log_every": 10, "dtype": "float32"}


def bins(s: Settings) -> list[float]:
    """Distance bin edges (s): quarter and half window, then whole windows out to 4 W."""
    w = s.window_s
    return [0.0, w / 4, w / 2, w, 2 * w, 3 * w, 4 * w]


def infer_args(s: Settings, export: Path, seed: int) -> list[str]:
    """`moshi-ttt infer`'s flags for every evaluation: the export, greedy, `s.eval_batch` conversations at once."""
    return ["--hf-repo", str(export), "--temp", "0", "--temp-text", "0", "--seed", str(seed),
            "--batch-size", str(s.eval_batch)]


def evaluate(work: Path, s: Settings, export: Path, tag: str, facts: int, seed: int) -> dict:
    """Recall of the export on the stage-2 eval set with `facts` facts, through `moshi-ttt infer` (greedy)."""
    from moshi_ttt.experiments.spoken.evaluate import evaluate_set

    d = dict(s.stage2_eval)[facts]
    manifest = eval_set(work, facts, d)
    summary = evaluate_set(manifest, work / "evals" / tag / f"facts{facts}", infer_args(s, export, seed), s.window_s,
                           bins(s))
    return summary


def eval_set(work: Path, facts: int, d: DataSettings) -> Path:
    """The held-out (eval split) set of `facts` facts per conversation."""
    return data_set(work, f"stage2_eval{facts}", "eval", d)


def run_cross(work: Path, out: Path, s: Settings, name: str, seed: int) -> dict:
    """Variant `name`'s seed-`seed` model across conversations (cross.py) on the main eval set's conversations cut
    after their last fact; the record goes to OUT/cross/. The run must be trained (run_variant) first."""
    from moshi_ttt.experiments.spoken.cross import evaluate_cross, write_cross_set

    facts, d = s.stage2_eval[0]
    cross_dir = work / "data" / f"cross{facts}"
    if not (cross_dir / "cross.json").exists():
        write_cross_set(eval_set(work, facts, d), cross_dir)
    run = run_path(out, name, seed)
    if not run.exists():
        raise FileNotFoundError(f"{run}: variant {name!r} seed {seed} is not trained and evaluated yet")
    path = out / "cross" / f"{name}_seed{seed}.json"
    trained = json.loads(run.read_text())["config"]
    if path.exists() and json.loads(path.read_text()).get("config") == trained:
        return json.loads(path.read_text())
    export = work / "runs" / f"{name}_seed{seed}" / "export"
    results = work / "evals" / f"cross_{name}_seed{seed}"
    shutil.rmtree(results, ignore_errors=True)  # outputs of an earlier model
    t = time.time()
    summary = evaluate_cross(cross_dir, results, infer_args(s, export, seed), s.window_s, bins(s))
    rec = {"variant": name, "seed": seed, "config": trained, "facts": facts, "eval_seconds": time.time() - t,
           **{k: _small(summary[k]) for k in ("memory", "fresh")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(rec, indent=1) + "\n"))
    return rec


def run_probes(work: Path, out: Path, s: Settings) -> list[dict]:
    """probe.py on the stage-1 model (the stage-2 training set: 1581 facts; it never trained on them) and on each
    trained run of `s.probed` (the stage-2 validation set); records to OUT/probes/, redone when a run changed."""
    from moshi_ttt.experiments.spoken import probe

    jobs = [("stage1", "stage2_train", data_set(work, "stage2", "train", s.stage2_train))]
    val = data_set(work, "stage2_val", "train", s.stage2_val)
    jobs += [(run, "stage2_val", val) for run in s.probed]
    recs = []
    for run, set_name, manifest in jobs:
        done = work / "runs" / run / "done.json"
        if not done.exists():
            continue
        cfg = _portable(json.loads(done.read_text())["config"], work)
        path = out / "probes" / f"{run}_{set_name}.json"
        if path.exists() and json.loads(path.read_text()).get("config") == cfg:
            recs.append(json.loads(path.read_text()))
            continue
        t = time.time()
        res = _portable(probe.run(work / "runs" / run / "export", manifest, probe.OFFSETS, s.probe_fit_voices, 0,
                                     s.stage2.segment_frames, s.stage2.min_segment_frames), work)
        rec = {"run": run, "set": set_name, "config": cfg, "seconds": time.time() - t, **res}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, rec=rec: tmp.write_text(json.dumps(rec, indent=1) + "\n"))
        recs.append(rec)
    return recs


def run_path(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / f"{name}_seed{seed}.json"


def run_variant(work: Path, out: Path, s: Settings, name: str, v: Variant, seed: int) -> dict:
    """Trains (or reuses) one stage-2 run and evaluates it on every eval set; the record goes to OUT/runs/."""
    cfg = stage2_config(work, s, name, v, seed)
    path = run_path(out, name, seed)
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("config") == json.loads(json.dumps(_portable(cfg, work))):
            return rec
    run_dir = work / "runs" / f"{name}_seed{seed}"
    export = train_run(run_dir, cfg)
    train_s = json.loads((run_dir / "done.json").read_text())["seconds"]
    shutil.rmtree(work / "evals" / f"{name}_seed{seed}", ignore_errors=True)  # outputs of an earlier model
    t = time.time()
    evals = {str(f): _small(evaluate(work, s, export, f"{name}_seed{seed}", f, seed)) for f, _ in s.stage2_eval}
    rec = {"variant": name, "seed": seed, "variant_settings": v.to_dict(), "config": _portable(cfg, work),
           "window": v.context or s.window, "train_seconds": train_s, "eval_seconds": time.time() - t,
           "evals": evals, "metrics_tail": _metrics_tail(run_dir)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(rec, indent=1) + "\n"))
    return rec


def _portable(cfg: dict, work: Path) -> dict:
    """The config with WORK's absolute path written as $WORK (records compare across machines)."""
    return json.loads(json.dumps(cfg).replace(str(work), "$WORK"))


def _small(summary: dict) -> dict:
    """A summary without its per-question list's bulk: each question keeps distance and outcome."""
    return {**{k: v for k, v in summary.items() if k != "questions"},
            "questions": [[q["conversation"], round(q["distance"], 3), q["outcome"]] for q in summary["questions"]]}


def _metrics_tail(run_dir: Path, n: int = 5) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[-n:]
    keep = ("step", "loss", "text_loss", "audio_loss", "grad_norm", "ttt_grad_norm", "fast_drift")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, lines)]


def prepare_data(work: Path, s: Settings) -> None:
    """The evaluation and validation sets generated, and the stage-2 training set with its codes in the code cache
    (encoded once for every variant and seed: the first run would otherwise spend its first epoch in the codec).
    Stage 1 generates its own training set and encodes it in its first epoch."""
    import torch

    from moshi_ttt import runtime
    from moshi_ttt.experiments.spoken.checkpoint import make_repo
    from moshi_ttt.train.data import Dataset, TokenIds
    from moshi_ttt.train.loop import code_cache

    data_set(work, "stage1", "eval", s.stage1_eval)
    data_set(work, "stage1_val", "train", s.stage1_val)
    for f, d in s.stage2_eval:
        eval_set(work, f, d)
    manifest = data_set(work, "stage2", "train", s.stage2_train)
    repo = make_repo(work / "repo", seed=s.repo_seed, architecture=s.architecture)
    pieces = runtime.load(runtime.CheckpointFlags(hf_repo=str(repo)), torch.device("cpu"), torch.float32)
    ids = TokenIds.of(pieces.lm)
    t = s.stage2
    ds = Dataset(manifest, t.segment_frames, t.min_segment_frames, "SPEAKER_MAIN",
                 code_cache=code_cache("auto", pieces, ids, FRAME_RATE))
    from tqdm import tqdm

    t = time.time()
    for i in tqdm(range(len(ds)), desc="stage-2 codes", unit="segment", file=sys.stderr, mininterval=10):
        ds.codes(i, pieces.mimi, pieces.tokenizer, ids)
    if ds.code_cache.misses:
        manifest.with_suffix(".codes.json").write_text(json.dumps({"encode_s": time.time() - t}) + "\n")


def run_pretrained(work: Path, out: Path, s: Settings) -> dict:
    """The stage-1 model as it is (window W, no TTT, no stage-2 training), on every eval set."""
    path = run_path(out, "pretrained", 0)
    export = stage1(work, s)
    cfg = _portable(stage1_config(work, s), work)
    if path.exists() and json.loads(path.read_text()).get("config") == cfg:
        return json.loads(path.read_text())
    for tag in ("pretrained", "stage1"):  # outputs of an earlier model
        shutil.rmtree(work / "evals" / tag, ignore_errors=True)
    t = time.time()
    evals = {str(f): _small(evaluate(work, s, export, "pretrained", f, 0)) for f, _ in s.stage2_eval}
    stage1_eval = _small(evaluate_stage1(work, s, export))
    seconds = sum(json.loads((work / "runs" / r / "done.json").read_text())["seconds"] for r in ("listen", "stage1"))
    rec = {"variant": "pretrained", "seed": 0, "config": cfg, "window": s.window, "train_seconds": seconds,
           "eval_seconds": time.time() - t, "evals": evals, "metrics_tail": _metrics_tail(work / "runs" / "stage1"),
           "stage1_eval": stage1_eval}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(rec, indent=1) + "\n"))
    return rec


def evaluate_stage1(work: Path, s: Settings, export: Path) -> dict:
    """Stage 1's own test: recall on held-out short conversations whose questions are all inside W."""
    from moshi_ttt.experiments.spoken.evaluate import evaluate_set

    manifest = data_set(work, "stage1", "eval", s.stage1_eval)
    return evaluate_set(manifest, work / "evals" / "stage1", infer_args(s, export, 0), s.window_s, bins(s))


def main(argv: list[str] | None = None) -> int:
    from moshi_ttt.models.demo import cache_dir

    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/spoken_memory", help="records, results, plot")
    p.add_argument("--work", default=None, help="data and checkpoints (default $MOSHI_TTT_CACHE/spoken_memory)")
    p.add_argument("--only", choices=["data", "listen", "stage1", "pretrained", "runs", "probes"], default=None,
                   help="stop after this part (default: everything, then the report)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"stage-2 variants to run (default all: {list(VARIANTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: each variant's)")
    p.add_argument("--doc", default=None, help="markdown file whose spoken-memory markers get the tables")
    p.add_argument("--readme", default=None, help="another one")
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else cache_dir() / "spoken_memory"
    out = Path(a.out)
    s = Settings()
    if a.only == "data":
        prepare_data(work, s)
        return 0
    if a.only == "listen":
        print(f"stage 1, listening: {train_run(work / 'runs' / 'listen', listen_config(work, s))}", file=sys.stderr)
        return 0
    export = stage1(work, s)
    print(f"stage 1: {export}", file=sys.stderr)
    if a.only == "stage1":
        return 0
    rec = run_pretrained(work, out, s)
    print(f"pretrained: stage-1 recall {rec['stage1_eval']['recall']:.3f}", file=sys.stderr)
    if a.only == "pretrained":
        return 0
    if a.only == "probes":
        _probes(work, out, s)
        return 0
    unknown = sorted(set(a.variants or ()) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    variants = dict(s.variants)
    order = a.variants or list(variants)  # in the order asked
    for seed in range(max(v.seeds for v in variants.values())):  # seed-major: a stop leaves whole seeds
        for name in order:
            v = variants[name]
            if seed >= v.seeds or (a.seeds and seed not in a.seeds):
                continue
            rec = run_variant(work, out, s, name, v, seed)
            e = rec["evals"][str(s.stage2_eval[0][0])]
            print(f"{name} seed {seed}: recall {e['recall']:.3f} (inside {e['inside']['recall']}, beyond "
                  f"{e['beyond']['recall']})", file=sys.stderr)
    for name, seeds in s.cross:
        if name not in order:
            continue
        for seed in range(seeds):
            if a.seeds and seed not in a.seeds:
                continue
            rec = run_cross(work, out, s, name, seed)
            print(f"{name} seed {seed} across conversations: recall {rec['memory']['recall']:.3f} with A's memory, "
                  f"{rec['fresh']['recall']:.3f} fresh", file=sys.stderr)
    if a.only == "runs":
        return 0
    if a.variants is None:
        _probes(work, out, s)
    from moshi_ttt.experiments.spoken import report

    report.write(out, Path(a.doc) if a.doc else None, Path(a.readme) if a.readme else None, stage_times(work))
    return 0


def _probes(work: Path, out: Path, s: Settings) -> None:
    for rec in run_probes(work, out, s):
        print(f"probes of {rec['run']} on {rec['set']}: oracle read " +
              " ".join(f"{k} {v['recall']:.3f}" for k, v in rec["read"].items()), file=sys.stderr)


def stage_times(work: Path) -> dict:
    """Seconds each one-off stage took when it ran: data generation per set, encoding, stage-1 training."""
    out = {}
    for p in sorted((work / "data").glob("*/*.seconds.json")):
        out[f"generate {p.parent.name}/{p.name.split('.')[0]}"] = json.loads(p.read_text())["generate_s"]
    for p in sorted((work / "data").glob("*/*.codes.json")):
        out[f"encode {p.parent.name}/{p.name.split('.')[0]}"] = json.loads(p.read_text())["encode_s"]
    for run, label in (("listen", "stage 1 training: listening"), ("stage1", "stage 1 training: the task")):
        done = work / "runs" / run / "done.json"
        if done.exists():
            out[label] = json.loads(done.read_text())["seconds"]
    return out


def answer_accuracy(lm, mimi, tokenizer, manifest: Path, segment_frames: int, batch: int = 16,
                    tokens: str = "first") -> dict:
    """Teacher-forced (parallel forward) diagnostic: the share of text frames where the text logits' argmax is
    the target, over the conversations of `manifest` cut into `segment_frames` segments. `tokens`: "first" =
    each word's first token (an answer), "numbers" = the number words' tokens (a listening set's transcripts:
    the facts' numbers). Not the benchmark's recall (which streams through `infer`): a cheap probe."""
    import torch

    from moshi_ttt.experiments.spoken.spec import NUMBERS
    from moshi_ttt.train.data import Dataset, TokenIds

    if tokens not in ("first", "numbers"):
        raise ValueError(f"tokens={tokens!r}: must be 'first' or 'numbers'")
    ids = TokenIds.of(lm)
    numbers = torch.tensor(sorted({t for n in NUMBERS for t in tokenizer.encode(n)}))
    ds = Dataset(manifest, segment_frames, 1, "SPEAKER_MAIN")
    pads = {ids.text_padding, ids.end_of_text_padding}
    hits = total = 0
    was = lm.training
    lm.eval()
    with torch.no_grad():
        for k in range(0, len(ds), batch):
            codes = ds.batch(range(k, min(k + batch, len(ds))), mimi, tokenizer, ids)
            logits = lm(codes).text_logits[:, 0]  # [B, T, card]
            text = codes[:, 0]
            is_answer = torch.zeros_like(text, dtype=torch.bool)
            is_answer[:, 1:] = (text[:, 1:] >= 0) & ~torch.isin(text[:, 1:], torch.tensor(sorted(pads)))
            is_answer[:, 1:] &= torch.isin(text[:, :-1], torch.tensor(sorted(pads)))  # a word's first token
            if tokens == "numbers":
                is_answer = torch.isin(text, numbers)
            hits += int((logits.argmax(-1)[is_answer] == text[is_answer]).sum())
            total += int(is_answer.sum())
    lm.train(was)
    return {"answers": total, "accuracy": hits / max(total, 1)}


def probe_checkpoint(work: Path, s: Settings, checkpoint: Path, manifest: Path | None = None,
                     tokens: str = "first") -> dict:
    """`answer_accuracy` of a stage-1 training checkpoint (its fp32 masters: every weight) on `manifest` (default:
    the stage-1 validation set: new conversations, training voices and fillers; never the eval set)."""
    import torch
    from safetensors.torch import load_file

    from moshi_ttt import runtime

    repo = work / "repo"
    info, name, flags = runtime.open_checkpoint(runtime.CheckpointFlags(hf_repo=str(repo)))
    ttt = runtime.resolve_ttt(info)
    pieces = runtime.load_pieces(info, ttt, torch.device("cpu"), torch.float32, load_weight=False)
    runtime.apply_context(pieces.lm, s.window, info, "probe", warn=False)
    pieces.lm.load_state_dict(load_file(str(checkpoint / "trainable.safetensors")), strict=True)
    manifest = manifest or data_set(work, "stage1_val", "train", s.stage1_val)
    return answer_accuracy(pieces.lm, pieces.mimi, pieces.tokenizer, manifest, s.stage1.segment_frames,
                           tokens=tokens)


if __name__ == "__main__":
    sys.exit(main())
