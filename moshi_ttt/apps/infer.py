"""`moshi-ttt infer`: offline WAV → WAV + transcript + TTT telemetry, like `python -m moshi.run_inference`.

The input is read and resampled to Mimi's 24 kHz with sphn, downmixed to mono, zero-padded to whole
1920-sample frames and streamed frame by frame: Mimi encode → `TTTLMGen` (moshi's `LMGen`, folding
per chunk) on the TTT model → Mimi decode. As moshi's server does, Mimi's streaming state is reset
after the very first encoded frame (that frame carries the encoder's left-padding artefact; its codes
are still fed to the LM).
`LMGen` emits nothing during its first `max_delay` steps, so `max_delay` frames of silence are fed after
the input: the output has exactly as many frames as the padded input.

Outputs: the WAV, a transcript (SentencePiece pieces, "▁" → space, text ids 0 and 3 skipped), the timed text
beside it (`out.text.json`: each text token and word with its frame and time, see `timed_text`) and a
telemetry JSON (see `_telemetry_doc`). User errors (missing or unreadable files, bad configs, broken
checkpoints) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moshi_ttt.flags import CONTEXT_HELP, add_checkpoint_args
from moshi_ttt.models.streams import SAMPLE_RATE, TEXT_PADDING_IDS, words_of

EXIT_USER_ERROR = 2

_telemetry_doc = """\
telemetry JSON: frames (LM steps = input frames + the LM's max delay), input_frames, chunk_size, context (the
attention window in frames), batch_size, ttt_layers, sample_every, seconds (wall), audio_seconds (per
conversation), realtime_speed (audio seconds / wall seconds per conversation, > 1 is faster than real time),
ms_per_frame, for an input folder "items" (per item: infile, input_frames, outfile, transcript, timed_text),
and per TTT layer ("layers": {"<index>": ...}) the final per-item lists updates / clips / skipped plus the time
series drift (‖W − W⁽⁰⁾‖_F) and last_delta_norm (‖ΔW‖_F of the last completed chunk), one entry per sample (a
list over batch items) at the LM steps in series_frames. With --memory or --save-memory, "memory": loaded (the
memory's header), start (per layer: drift, delta_sum = Σ ΔW, updates of item 0 as it starts) and end (the saved
memory's header and the same per-layer stats); for an input folder, "memory": {"items": [the same, per item]}."""


class UserError(Exception):
    """A problem with the command line or the user's files: reported in one line, exit code 2."""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Offline inference: stream a WAV through Mimi → LMGen (TTT-Moshi) → Mimi and write "
                          "the answer WAV, its transcript and the TTT telemetry.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _telemetry_doc
    parser.add_argument("infile", help="input audio (any sample rate / channels: resampled to 24 kHz mono), or a "
                                       "folder: each audio file in it is a conversation of its own, stepped in "
                                       "batches of --batch-size (default 16)")
    parser.add_argument("outfile", help="output WAV (24 kHz mono, as many 80 ms frames as the input), or for an input "
                                        "folder the output folder (NAME.wav, .txt, .text.json per input NAME, and "
                                        "batch_K.ttt.json per batch)")
    parser.add_argument("--transcript", help="transcript text file (default: OUTFILE with .txt); its timed text (each "
                                             "token and word with its frame and time) goes beside it, as .text.json")
    parser.add_argument("--telemetry", help="telemetry JSON (default: OUTFILE with .ttt.json)")
    g = parser.add_argument_group("checkpoint")
    add_checkpoint_args(g, demo_help="no checkpoint: the tiny echo demo checkpoint of `serve --demo` "
                                     "(the LM of configs/tiny.yaml with configs/demo_ttt.yaml's TTT section, as it was "
                                     "trained, or --ttt-config's), built "
                                     "once in $MOSHI_TTT_CACHE or ~/.cache/moshi_ttt")
    r = parser.add_argument_group("run")
    r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    r.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="LM dtype (default: float32 on cpu, bfloat16 on cuda)")
    r.add_argument("--context", type=int, default=None, metavar="FRAMES", help=CONTEXT_HELP)
    r.add_argument("--batch-size", type=int, default=None,
                   help="run the input as N independent conversations in one batch (default 1); with N > 1 every "
                        "item is written, with suffix _i (out_0.wav, out_0.txt, ...); the telemetry file holds "
                        "per-item lists. With an input folder: how many of its files are stepped together "
                        "(default 16)")
    r.add_argument("--seed", type=int, default=4242, help="random seed for sampling (default 4242, as moshi)")
    r.add_argument("--temp", type=float, default=None, help="audio sampling temperature (LMGen default 0.8)")
    r.add_argument("--temp-text", type=float, default=None, help="text sampling temperature (LMGen default 0.7)")
    r.add_argument("--cfg-coef", type=float, default=1.0, help="classifier-free guidance coefficient "
                                                                "(needs a conditioned model)")
    r.add_argument("--telemetry-every", type=int, default=0, metavar="N",
                   help="sample the drift series every N LM steps (default: every chunk boundary)")
    m = parser.add_argument_group("memory (docs/memory.md)")
    m.add_argument("--memory", metavar="M.safetensors",
                   help="start from this conversation memory (every batch item), not from W⁽⁰⁾; with an input "
                        "folder, a folder of memories: each input NAME starts from NAME.safetensors in it")
    m.add_argument("--save-memory", metavar="M.safetensors",
                   help="save the conversation's memory at the end (every frame heard; --batch-size 1); with an "
                        "input folder, a folder: each input NAME's memory goes to NAME.safetensors in it, taken "
                        "when that conversation ends (its frames and the LM's delay: what it would save alone)")
    m.add_argument("--memory-format", default="exact", help="exact (default), bf16 or rank:R (lossy)")


def run(args: argparse.Namespace) -> int:
    from moshi_ttt.models.loaders import CheckpointError
    from moshi_ttt.utils.logs import log_to_stderr

    log_to_stderr("moshi-ttt infer")
    try:
        if Path(args.infile).is_dir():
            return _run_folder(args)
        setup = _prepare(args)
    except (UserError, CheckpointError, OSError, ValueError) as e:
        _fail(e)
        return EXIT_USER_ERROR
    _infer(args, **setup)
    return 0


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")
FOLDER_BATCH = 16


def _run_folder(args: argparse.Namespace) -> int:
    """An input folder: its audio files (sorted by name) in batches of --batch-size conversations, each item
    with its own KV cache and fast weights, shorter ones padded with silence (their outputs cut to their own
    length); outputs in the output folder."""
    from moshi_ttt import runtime
    from moshi_ttt.models.generation import condition_tensors, lm_gen_kwargs
    from moshi_ttt.utils.device import pick_device, pick_dtype

    folder, out = Path(args.infile), Path(args.outfile)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise UserError(f"input folder {folder} holds no audio file ({', '.join(AUDIO_SUFFIXES)})")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out}: with an input folder the output must be a folder, not a file")
    if args.transcript or args.telemetry:
        raise UserError("--transcript and --telemetry take one conversation: not with an input folder")
    B = args.batch_size or FOLDER_BATCH
    if B < 1:
        raise UserError(f"--batch-size must be >= 1, got {B}")
    if args.telemetry_every < 0:
        raise UserError(f"--telemetry-every must be >= 0, got {args.telemetry_every}")
    comp, loads, saves = _folder_memory(args, files)
    pcms = [read_audio(f) for f in files]
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    pieces = runtime.load(runtime.CheckpointFlags.from_args(args), device, dtype, context=args.context)
    if pieces.lm.dep_q == 0:
        raise UserError("this model generates no audio (dep_q = 0): offline speech inference needs dep_q > 0")
    gen = lm_gen_kwargs(pieces.info, temp=args.temp, temp_text=args.temp_text)
    plan = _check_memory(pieces.lm, comp=comp)
    if saves:
        saves[0].parent.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(files), B):
        group = files[k:k + B]
        conditions = condition_tensors(pieces.info, pieces.lm, len(group), args.cfg_coef, gen)
        memory = None
        if plan is not None:
            loaded = [_load_memory(p) for p in loads[k:k + B]] if loads else [None] * len(group)
            memory = dict(plan, loaded=_checked(loaded, plan["fp"]),
                          save={b: p for b, p in enumerate(saves[k:k + B])} if saves else {}, folder=True)
        _infer(args, pieces.lm, pieces.mimi, pieces.tokenizer, gen, conditions, pcms[k:k + B], device, dtype,
               [out / f"{f.stem}.wav" for f in group], [out / f"{f.stem}.txt" for f in group],
               out / f"batch_{k // B}.ttt.json", memory=memory, infiles=group)
    return 0


def _folder_memory(args: argparse.Namespace, files: list[Path]) -> tuple:
    """(compression, memory paths to load per file or None, paths to save per file or None) of an input folder's
    --memory / --save-memory folders; refuses a missing memory or a file where a folder is due, up front."""
    if not (args.memory or args.save_memory):
        return None, None, None
    comp = _memory_args(args, one_conversation=False)["comp"]
    loads = saves = None
    if args.memory:
        src = Path(args.memory)
        if not src.is_dir():
            raise UserError(f"--memory {src}: with an input folder, give the folder of memories (NAME.safetensors "
                            "per input NAME)")
        loads = [src / f"{f.stem}.safetensors" for f in files]
        missing = [p.name for p in loads if not p.is_file()]
        if missing:
            raise UserError(f"--memory {src}: no memory for {len(missing)} input(s): {', '.join(missing[:5])}"
                            f"{' …' if len(missing) > 5 else ''}")
    if args.save_memory:
        dst = Path(args.save_memory)
        if dst.exists() and not dst.is_dir():
            raise UserError(f"--save-memory {dst}: with an input folder this must be a folder, not a file")
        saves = [dst / f"{f.stem}.safetensors" for f in files]
        check_outputs(saves)
    return comp, loads, saves


def _load_memory(path: Path):
    from moshi_ttt.models import memory_format as mf
    from moshi_ttt.models.lm_memory import MemoryRefused

    try:
        return mf.load(path)
    except (ValueError, MemoryRefused) as e:
        raise UserError(f"{path}: {e}") from None


def _checked(loaded: list, fp: str) -> list:
    """`loaded` (memories or None), each refused if another model made it."""
    for m in loaded:
        if m is not None and m.fingerprint != fp:
            raise UserError(_another_model(m.fingerprint, fp))
    return loaded


def _fail(e: BaseException) -> None:
    msg = " ".join(str(e).split()) or type(e).__name__
    print(f"moshi-ttt infer: error: {msg}", file=sys.stderr)


def _with_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(path.stem + suffix)


def output_paths(outfile: str | Path, batch_size: int, transcript: str | None = None,
                 telemetry: str | None = None) -> tuple[list[Path], list[Path], Path]:
    """WAV and transcript paths per batch item (suffix _i when batch_size > 1) and the telemetry path."""
    out = Path(outfile)
    txt = Path(transcript) if transcript else out.with_suffix(".txt")
    tel = Path(telemetry) if telemetry else out.with_suffix(".ttt.json")
    if batch_size == 1:
        return [out], [txt], tel
    wavs = [_with_suffix(out, f"_{i}{out.suffix}") for i in range(batch_size)]
    txts = [_with_suffix(txt, f"_{i}{txt.suffix}") for i in range(batch_size)]
    return wavs, txts, tel


def check_outputs(paths: list[Path]) -> None:
    """Fails before the (long) run if an output cannot be written: a directory, or a parent that is a
    file or a folder without write permission. Missing parent folders are created later."""
    for p in paths:
        if p.is_dir():
            raise UserError(f"output {p} is a directory: give a file name (e.g. {p / 'reply.wav'})")
        parent = next((a for a in p.absolute().parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            raise UserError(f"output {p}: {parent} is a file, not a folder")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"output {p}: no permission to write in {parent}")


def read_audio(path: str | Path) -> np.ndarray:
    """Mono float32 PCM at 24 kHz (resampled by sphn, channels averaged)."""
    import sphn

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    if not path.is_file():
        raise UserError(f"input is not a file: {path}")
    try:
        pcm, _ = sphn.read(str(path), sample_rate=SAMPLE_RATE)
    except Exception as e:  # sphn raises ValueError / OSError with the decoder's message
        raise UserError(f"{path}: not a readable audio file ({e})") from None
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 2:
        pcm = pcm.mean(axis=0)
    if pcm.size == 0:
        raise UserError(f"{path}: the audio file has no samples")
    if not np.isfinite(pcm).all():
        raise UserError(f"{path}: the audio contains non-finite samples")
    return pcm


def _prepare(args: argparse.Namespace) -> dict:
    """Everything that can fail because of the user's input, before the (long) streaming loop."""
    from moshi_ttt import runtime
    from moshi_ttt.models.generation import condition_tensors, lm_gen_kwargs
    from moshi_ttt.utils.device import pick_device, pick_dtype

    if args.batch_size is None:
        args.batch_size = 1
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.telemetry_every < 0:
        raise UserError(f"--telemetry-every must be >= 0, got {args.telemetry_every}")
    memory_args = _memory_args(args)
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    wavs, txts, tel = output_paths(args.outfile, args.batch_size, args.transcript, args.telemetry)
    check_outputs([*wavs, *txts, *map(timed_text_path, txts), tel])
    pcm = read_audio(args.infile)
    pieces = runtime.load(runtime.CheckpointFlags.from_args(args), device, dtype, context=args.context)
    gen = lm_gen_kwargs(pieces.info, temp=args.temp, temp_text=args.temp_text)
    conditions = condition_tensors(pieces.info, pieces.lm, args.batch_size, args.cfg_coef, gen)
    if pieces.lm.dep_q == 0:
        raise UserError("this model generates no audio (dep_q = 0): offline speech inference needs dep_q > 0")
    memory = _check_memory(pieces.lm, **memory_args)
    if memory is not None:
        memory = dict(memory, loaded=[memory["loaded"]] * args.batch_size,
                      save={0: Path(args.save_memory)} if args.save_memory else {}, folder=False)
    for p in [*wavs, *txts, tel]:
        p.parent.mkdir(parents=True, exist_ok=True)
    return dict(memory=memory, model=pieces.lm, mimi=pieces.mimi, tokenizer=pieces.tokenizer, gen_kwargs=gen,
                conditions=conditions, pcms=[pcm] * args.batch_size, device=device, dtype=dtype, wavs=wavs, txts=txts,
                tel=tel)


def _memory_args(args, one_conversation: bool = True) -> dict:
    """{"loaded", "comp"} of --memory / --save-memory (loaded: only for one conversation); {} without them."""
    from moshi_ttt.memory.compression import Compression
    from moshi_ttt.models import memory_format as mf
    from moshi_ttt.models.lm_memory import MemoryRefused

    if not (args.memory or args.save_memory):
        return {}
    if args.cfg_coef != 1.0:
        raise UserError(f"--memory / --save-memory need --cfg-coef 1 (got {args.cfg_coef})")
    if not one_conversation:
        try:
            return {"loaded": None, "comp": Compression.parse(args.memory_format)}
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.save_memory and args.batch_size != 1:
        raise UserError(f"--save-memory saves one conversation: needs --batch-size 1, got {args.batch_size}")
    if args.save_memory:
        check_outputs([Path(args.save_memory)])
    try:
        comp = Compression.parse(args.memory_format)
        loaded = mf.load(args.memory) if args.memory else None
    except (ValueError, MemoryRefused) as e:
        raise UserError(str(e)) from None
    return {"loaded": loaded, "comp": comp}


def _check_memory(model, loaded=None, comp=None) -> dict | None:
    """The memory plan ({loaded, comp, fp}), or None; refuses a memory of another model up front."""
    from moshi_ttt.models import lm_memory as mem
    from moshi_ttt.models.lm import TTTLMModel

    if comp is None:
        return None
    if not isinstance(model, TTTLMModel):
        raise UserError("--memory / --save-memory need a model with TTT layers")
    fp = mem.fingerprint(model)
    if loaded is not None and loaded.fingerprint != fp:
        raise UserError(_another_model(loaded.fingerprint, fp))
    return {"loaded": loaded, "comp": comp, "fp": fp}


def _another_model(theirs: str, fp: str) -> str:
    return (f"--memory: this memory was made by another model or TTT config (fingerprint {theirs[:16]}…, this "
            f"model is {fp[:16]}…): refusing to load it")


def _memory_stats(layers) -> dict:
    """Per layer (str): drift ‖ΔW‖_F, the sum of ΔW's entries (a second fingerprint of the weights) and the
    updates, from `{layer: (delta [d, h], updates)}`."""
    return {str(i): {"drift": float(torch.linalg.matrix_norm(d.float())), "delta_sum": float(d.double().sum()),
                     "updates": int(u)} for i, (d, u) in sorted(layers.items())}


def _make_lm_gen(args, model, gen_kwargs: dict, conditions):
    from moshi_ttt.models.lm import make_lm_gen

    return make_lm_gen(model, cfg_coef=args.cfg_coef, condition_tensors=conditions, **gen_kwargs)


def _to_list(t: torch.Tensor, n: int) -> list:
    vals = t[:n].detach().float().cpu().tolist() if t.is_floating_point() else t[:n].cpu().tolist()
    return [v if not isinstance(v, float) or math.isfinite(v) else None for v in vals]


@torch.no_grad()
def _infer(args, model, mimi, tokenizer, gen_kwargs, conditions, pcms: list[np.ndarray], device, dtype, wavs, txts,
           tel, memory: dict | None = None, infiles: list[Path] | None = None) -> None:
    """Streams `pcms` (one per batch item, [n] each) as a batch of conversations and writes item b's outputs to
    wavs[b], txts[b] (+ timed text) and the batch's telemetry to `tel`. Items shorter than the longest hear
    silence after their end; their outputs are cut to their own number of frames."""
    import sphn
    from moshi.run_inference import seed_all
    from tqdm import tqdm

    B = len(pcms)
    seed_all(args.seed)
    lm_gen = _make_lm_gen(args, model, gen_kwargs, conditions)
    frame = mimi.frame_size
    n_items = [math.ceil(p.shape[0] / frame) for p in pcms]
    n_in = max(n_items)
    padded = np.zeros((B, 1, n_in * frame), dtype=np.float32)
    for b, p in enumerate(pcms):
        padded[b, 0, : p.shape[0]] = p
    x = torch.from_numpy(padded).to(device)
    chunk = model.ttt_config.layer.chunk_size
    every = args.telemetry_every or chunk
    layers = list(model.ttt_layer_indices)
    series: dict[int, dict[str, list]] = {i: {"drift": [], "last_delta_norm": []} for i in layers}
    series_frames: list[int] = []
    out_pcm: list[list[np.ndarray]] = [[] for _ in range(B)]
    text_ids: list[list[int]] = [[] for _ in range(B)]
    steps = 0

    def sample() -> None:
        series_frames.append(steps)
        for i, t in model.ttt_telemetry().items():
            series[i]["drift"].append(_to_list(t["drift"], B))
            series[i]["last_delta_norm"].append(_to_list(t["last_delta_norm"], B))

    n_steps = n_in + lm_gen.max_delay
    start = time.perf_counter()
    reports: list[dict] = []
    due: dict[int, list[int]] = {}  # LM step -> the items whose memory is saved after it
    if memory is not None:
        for b in memory["save"]:
            due.setdefault(n_items[b] + lm_gen.max_delay if memory["folder"] else n_steps, []).append(b)
    with mimi.streaming(B), lm_gen.streaming(B):
        if memory is not None:
            reports = _memory_start(model, B, memory)
        for f in tqdm(range(n_steps), desc="frames", unit="frame", file=sys.stderr, dynamic_ncols=True):
            if f < n_in:
                codes = mimi.encode(x[:, :, f * frame:(f + 1) * frame])
            else:  # flush the LM's delay with silence
                codes = mimi.encode(torch.zeros(B, 1, frame, device=device))
            if f == 0:
                mimi.reset_streaming()  # the first frame carries the encoder's left padding (as moshi's server)
            for c in range(codes.shape[-1]):
                tokens = lm_gen.step(codes[:, :, c:c + 1])
                steps += 1
                if layers and steps % every == 0:
                    sample()
                for b in due.get(steps, ()):
                    reports[b]["end"] = _memory_save(model, memory, b)
                if tokens is None:
                    continue
                audio = mimi.decode(tokens[:, 1:]).float().cpu().numpy()  # [B, 1, frame]
                for b in range(B):
                    out_pcm[b].append(audio[b, 0])
                    text_ids[b].append(int(tokens[b, 0, 0]))
        if layers and (not series_frames or series_frames[-1] != steps):
            sample()
        final = model.ttt_telemetry() if layers else {}
    memory_report = {} if memory is None else {"items": reports} if memory["folder"] else reports[0]
    elapsed = time.perf_counter() - start

    for b in range(B):
        pcm_b, ids_b = out_pcm[b][: n_items[b]], text_ids[b][: n_items[b]]
        sphn.write_wav(str(wavs[b]), np.concatenate(pcm_b) if pcm_b else np.zeros(0, np.float32),
                       sample_rate=mimi.sample_rate)
        txts[b].write_text(transcript(tokenizer, ids_b) + "\n")
        timed_text_path(txts[b]).write_text(json.dumps(timed_text(tokenizer, ids_b, mimi.frame_rate)) + "\n")
    audio_seconds = sum(p.shape[0] for p in pcms) / B / mimi.sample_rate
    items = {} if infiles is None else {"items": [
        {"infile": str(f), "input_frames": n, "outfile": str(w), "transcript": str(t),
         "timed_text": str(timed_text_path(t))} for f, n, w, t in zip(infiles, n_items, wavs, txts, strict=True)]}
    report = {
        "infile": str(args.infile), "outfiles": [str(w) for w in wavs], "transcripts": [str(t) for t in txts],
        "timed_text": [str(timed_text_path(t)) for t in txts], **items,
        "sample_rate": mimi.sample_rate, "frame_size": frame, "input_samples": int(max(p.shape[0] for p in pcms)),
        "input_frames": n_in, "output_frames": len(out_pcm[0]), "frames": steps,
        "chunk_size": chunk, "context": model.context, "batch_size": B, "ttt_layers": layers, "sample_every": every,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "seconds": elapsed, "audio_seconds": audio_seconds, "realtime_speed": audio_seconds / elapsed,
        "ms_per_frame": 1000 * elapsed / max(steps, 1),
        "series_frames": series_frames, **({"memory": memory_report} if memory_report else {}),
        "layers": {str(i): {"updates": _to_list(final[i]["updates"], B), "clips": _to_list(final[i]["clips"], B),
                            "skipped": _to_list(final[i]["skipped"], B), **series[i]} for i in layers},
    }
    tel.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {', '.join(map(str, wavs))} ({len(out_pcm[0])} frames), transcript {', '.join(map(str, txts))}, "
          f"telemetry {tel}; {steps} LM steps in {elapsed:.1f} s ({audio_seconds / elapsed:.2f}× real time)",
          file=sys.stderr)


def _memory_start(model, B: int, memory: dict) -> list[dict]:
    """Streaming, before the first step: item b resumed from `memory["loaded"][b]` (if any); the factor log on
    (a short conversation is stored as factors, in every format, up to that format's size). Returns per item
    the telemetry's `memory` entry: `loaded` (the header) and `start` (the fast weights as resumed)."""
    from moshi_ttt.models import lm_memory as mem

    mem.keep_factors(model, comp=memory["comp"])
    for b, m in enumerate(memory["loaded"][:B]):
        if m is not None:
            mem.resume(model, b, m, memory["fp"])
    states = {i: g.ttt_state() for i, g in model.ttt_gatings().items()}
    return [{"loaded": m.meta() if m is not None else None,
             "start": _memory_stats({i: (st.delta()[b], st.updates[b]) for i, st in states.items()})}
            for b, m in enumerate(memory["loaded"][:B])]


def _memory_save(model, memory: dict, item: int) -> dict:
    """Saves item `item`'s memory (every frame it heard, the last chunk closed) to `memory["save"][item]`; returns
    its `end` stats. A new conversation that heard nothing writes no file (its stats say `path` None)."""
    from moshi_ttt.models import lm_memory as mem
    from moshi_ttt.models import memory_format as mf

    path = memory["save"][item]
    m = mem.capture(model, item, memory["fp"], base=memory["loaded"][item])
    if m is None:
        print(f"--save-memory {path}: the conversation heard no frame, no memory saved", file=sys.stderr)
        return {"frames": 0, "path": None}
    mf.save(path, m, memory["comp"])
    return dict(m.meta(), path=str(path), compression=str(memory["comp"]),
                layers=_memory_stats({i: (lm.delta, lm.counters["updates"]) for i, lm in m.layers.items()}))


def timed_text_path(transcript_path: Path) -> Path:
    """Where the timed text of a transcript goes: beside it, `out.txt` → `out.text.json`."""
    return transcript_path.with_suffix(".text.json")


def timed_text(tokenizer, ids: list[int], frame_rate: float) -> dict:
    """The text stream with its timing: `ids[k]` is the LM's output k, Moshi's frame k + 1 (LMGen never emits
    frame 0), and frame f covers the input's [f / frame_rate, (f + 1) / frame_rate) seconds. Padding ids are
    left out. `tokens`: {frame, time, id, piece} each; `words`: {word, frame, time} each, the transcript's
    whitespace-separated words (SentencePiece's "▁" is a space), each with the frame of its first piece."""
    tokens = [{"frame": k + 1, "time": (k + 1) / frame_rate, "id": i, "piece": tokenizer.id_to_piece(i)}
              for k, i in enumerate(ids) if i not in TEXT_PADDING_IDS]
    words = words_of((t["piece"], {"frame": t["frame"], "time": t["time"]}) for t in tokens)
    return {"frame_rate": frame_rate, "first_frame": 1, "frames": len(ids), "tokens": tokens, "words": words}


def transcript(tokenizer, ids: list[int]) -> str:
    """SentencePiece pieces joined, "▁" → space, the text padding ids (0 and 3) skipped."""
    return "".join(tokenizer.id_to_piece(i).replace("▁", " ") for i in ids if i not in TEXT_PADDING_IDS).strip()
