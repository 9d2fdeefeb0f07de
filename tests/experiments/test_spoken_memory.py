"""The spoken-memory benchmark (moshi_ttt/experiments/spoken): generated files keep the spec, answers are
aligned in Moshi's channel, train and eval are disjoint, the trainer reads the files, generation is
deterministic, bad specs are refused, and the scorer's outcomes and bins are right.

Two short train and two short eval conversations are generated once for the module (espeak-ng, < 2 s).
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from moshi_ttt.experiments.spoken import generate, score
from moshi_ttt.experiments.spoken.spec import (
    COLOURS,
    EVAL_VOICES,
    MOSHI_VOICE,
    NUMBERS,
    TRAIN_VOICES,
    ConversationSpec,
    Question,
    fact_text,
    filler_sentences,
    forbidden_in,
)
from moshi_ttt.testing.speech import SAMPLE_RATE, SpeechUnavailable

SPEC = ConversationSpec(facts=3, duration_s=25.0, min_distance_s=2.0, max_distance_s=15.0)
SEED = 7
TOL = 1.5 / SAMPLE_RATE  # times are whole samples rounded to 1 µs


def _write(out: Path, split: str, seed: int = SEED, n: int = 2) -> Path:
    try:
        return generate.write_set(out, split, n, seed, SPEC, progress=False)
    except SpeechUnavailable as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("spoken")
    return {split: _write(out, split) for split in ("train", "eval")}


def _convs(manifest: Path) -> list[tuple[Path, dict]]:
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    return [(manifest.parent / e["path"], json.loads((manifest.parent / e["path"]).with_suffix(".json").read_text()))
            for e in lines]


def _stereo(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, SAMPLE_RATE)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2).T  # [2, n]: left, right


def _samples(t: float) -> int:
    return round(t * SAMPLE_RATE)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_generated_conversations_keep_the_spec(sets, split):
    for wav, doc in _convs(sets[split]):
        sm = doc["spoken_memory"]
        assert ConversationSpec.from_dict(sm["spec"]) == SPEC
        utts = sm["utterances"]
        facts = {u["colour"]: u for u in utts if u["kind"] == "fact"}
        assert len(facts) == len([u for u in utts if u["kind"] == "fact"]) == SPEC.facts  # one fact per colour
        asked = [q["colour"] for q in sm["questions"]]
        assert sorted(asked) == sorted(facts)  # each colour asked exactly once, only colours with a fact
        for q in map(Question.from_dict, sm["questions"]):
            f = facts[q.colour]
            assert (q.fact_start, q.fact_end) == (f["start"], f["end"])
            assert q.q_start >= f["end"] and q.answer == f["number"] == f["text"].split()[-1]
            assert q.distance >= SPEC.min_distance_s
            said = [u for u in utts if u["kind"] == "question" and u["colour"] == q.colour]
            assert [(u["start"], u["end"]) for u in said] == [(q.q_start, q.q_end)]
        assert [u["start"] for u in utts] == sorted(u["start"] for u in utts)
        assert utts[0]["start"] >= SPEC.pause_s[0] - TOL
        for a, b in zip(utts, utts[1:]):
            gap = b["start"] - a["end"]
            lo, hi = SPEC.answer_delay_s if b["kind"] == "answer" else SPEC.pause_s
            assert lo - TOL <= gap <= hi + TOL, (a, b)  # no overlap, pauses in range
            assert (b["kind"] == "answer") == (a["kind"] == "question")  # Moshi answers each question, then only
        assert abs(sm["duration"] - _stereo(wav).shape[1] / SAMPLE_RATE) < TOL
        assert sm["duration"] >= SPEC.duration_s and utts[-1]["end"] <= sm["duration"]


def test_answers_are_aligned_in_moshi_channel(sets):
    for wav, doc in _convs(sets["train"]) + _convs(sets["eval"]):
        pcm = _stereo(wav)
        questions = doc["spoken_memory"]["questions"]
        align = doc["alignments"]
        assert len(align) == len(questions) == SPEC.facts
        moshi = np.zeros(pcm.shape[1], dtype=bool)
        for (word, (start, end), speaker), q in zip(align, questions):
            assert word == q["answer"] and speaker == "SPEAKER_MAIN" and word in NUMBERS
            assert SPEC.answer_delay_s[0] - TOL <= start - q["q_end"] <= SPEC.answer_delay_s[1] + TOL
            a, b = _samples(start), _samples(end)
            assert end - start > 0.15 and np.abs(pcm[0, a:b].astype(float)).mean() > 300  # Moshi speaks
            assert np.abs(pcm[0, a:a + 10]).max() > 0 and np.abs(pcm[0, b - 10:b]).max() > 0  # trimmed to speech
            assert not pcm[1, a:b].any()  # the user is silent meanwhile
            moshi[a:b] = True
        assert not pcm[0, ~moshi].any()  # Moshi's channel is silent outside the answers
        assert np.abs(pcm[1].astype(float)).mean() > 100  # the user speaks


def test_eval_voices_and_fillers_are_disjoint_from_training(sets):
    assert not set(TRAIN_VOICES) & set(EVAL_VOICES)
    assert MOSHI_VOICE not in TRAIN_VOICES + EVAL_VOICES
    train_f, eval_f = set(filler_sentences("train")), set(filler_sentences("eval"))
    assert not train_f & eval_f and len(eval_f) > 1000 and len(train_f) > 4 * 1000
    assert not [s for s in train_f | eval_f if forbidden_in(s)]
    for bad in ("the tired dog", "someone came", "go to bed", "a red kite", "nine", "she holds it", "boxes"):
        assert forbidden_in(bad), bad
    used = {}
    for split, voices, allowed in (("train", TRAIN_VOICES, train_f), ("eval", EVAL_VOICES, eval_f)):
        used[split] = set()
        for _, doc in _convs(sets[split]):
            sm = doc["spoken_memory"]
            assert sm["user_voice"] in voices and sm["moshi_voice"] == MOSHI_VOICE
            fillers = {u["text"] for u in sm["utterances"] if u["kind"] == "filler"}
            assert fillers and fillers <= allowed
            used[split] |= fillers
        meta = json.loads(sets[split].with_suffix(".meta.json").read_text())
        assert meta["user_voices"] == list(voices) and meta["seed"] == SEED and meta["split"] == split
    assert not used["train"] & used["eval"]


def test_files_load_in_the_training_data_reader(sets):
    from moshi_ttt.train.data import Dataset, read_alignments

    for manifest in sets.values():
        ds = Dataset(manifest, segment_frames=125, min_segment_frames=1, main_speaker="SPEAKER_MAIN")
        convs = _convs(manifest)
        assert len(ds.recordings) == len(convs) and len(ds) >= len(convs) * 2
        for rec, (wav, doc) in zip(ds.recordings, convs):
            answers = [q["answer"] for q in doc["spoken_memory"]["questions"]]
            assert [w.text for w in rec.words] == answers
            assert {w.speaker for w in rec.words} == {"SPEAKER_MAIN"}
            assert read_alignments(wav.with_suffix(".json"), "test") == rec.words
            assert rec.num_frames == -(-_stereo(wav).shape[1] // 1920)


def test_a_listening_set_transcribes_the_user_after_each_fact_and_question(sets, tmp_path):
    from moshi_ttt.train.data import Dataset

    with pytest.raises(ValueError, match="n_conversations=3: must be an integer in 1..2"):
        generate.write_listening_set(sets["train"], tmp_path / "listen", 3)
    manifest = generate.write_listening_set(sets["train"], tmp_path / "listen", 1)
    convs = _convs(manifest)
    assert len(convs) == 1 and manifest.name == "train.jsonl"
    (wav, doc), (src_wav, src) = convs[0], _convs(sets["train"])[0]
    assert wav.read_bytes() == src_wav.read_bytes()  # the same audio
    said = [u for u in src["spoken_memory"]["utterances"] if u["kind"] in ("fact", "question")]
    assert len(said) == 2 * SPEC.facts and len(doc["alignments"]) == len(said)
    for (text, (start, end), speaker), u in zip(doc["alignments"], said):
        assert text == u["text"] and speaker == "SPEAKER_MAIN"
        assert start == pytest.approx(u["end"] + generate.LISTEN_LAG_S, abs=1e-6)  # heard before transcribed
        assert end - start == pytest.approx(u["end"] - u["start"], abs=1e-5)
    rec = Dataset(manifest, segment_frames=400, min_segment_frames=1, main_speaker="SPEAKER_MAIN").recordings[0]
    assert [w.text for w in rec.words] == [u["text"] for u in said]  # the trainer reads it as Moshi's text


def test_a_cross_set_cuts_each_conversation_after_its_last_fact(sets, tmp_path):
    """Part A holds every fact, part B the questions still due; A + B is the user's channel; B's timed text is
    scored in the whole conversation's time."""
    from moshi_ttt.experiments.spoken import cross

    path = cross.write_cross_set(sets["eval"], tmp_path / "cross")
    rows = json.loads(path.read_text())
    assert rows and len(rows) <= len(_convs(sets["eval"]))
    for row in rows:
        wav = sets["eval"].parent / "eval" / f"{row['conversation']}.wav"
        rec = json.loads(wav.with_suffix(".json").read_text())["spoken_memory"]
        facts = [u for u in rec["utterances"] if u["kind"] == "fact"]
        later = [u for u in rec["utterances"] if u["start"] >= row["cut"]]
        assert max(f["end"] for f in facts) < row["cut"] <= later[0]["start"]  # between two utterances
        assert (row["cut"] * 12.5) == pytest.approx(round(row["cut"] * 12.5))  # a frame boundary
        user = _stereo(wav)[1]
        a, b = (_stereo_mono(tmp_path / "cross" / part / wav.name) for part in ("a", "b"))
        assert len(a) == _samples(row["cut"]) and len(a) + len(b) == len(user)
        assert np.abs(np.concatenate([a, b]).astype(int) - user).max() <= 1  # (float32 and back to int16)
        qs = cross.b_questions(row)
        assert qs and [q.q_start for q in qs] == [q["q_start"] for q in rec["questions"] if q["q_start"] >= row["cut"]]
        timed = tmp_path / "t.json"
        timed.write_text(json.dumps({"words": [{"word": qs[0].answer, "time": qs[0].q_end - row["cut"] + 0.4}]}))
        assert score.score_conversation(qs[:1], cross.shifted(timed, row["cut"]))[0].outcome == "right"


def _stereo_mono(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getframerate()) == (1, SAMPLE_RATE)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def test_generation_is_deterministic_in_the_seed(sets, tmp_path):
    root = sets["train"].parent
    _write(tmp_path / "again", "train")
    _write(tmp_path / "other", "train", seed=SEED + 1)
    files = ["train.jsonl", "train.meta.json", *(f"train/conv_0000{i}.{x}" for i in (0, 1) for x in ("wav", "json"))]
    assert sorted(files) == sorted(p.relative_to(tmp_path / "again").as_posix()
                                   for p in (tmp_path / "again").rglob("*") if p.is_file())
    for n in files:
        assert (tmp_path / "again" / n).read_bytes() == (root / n).read_bytes(), n
    for n in ("train/conv_00000.wav", "train/conv_00001.json", "train.meta.json"):
        assert (tmp_path / "other" / n).read_bytes() != (root / n).read_bytes(), n


def test_a_larger_set_keeps_the_conversations_already_written(sets, tmp_path):
    """Growing a set (same seed and spec) reuses the files on disk and writes the same manifest as a fresh one."""
    import shutil

    shutil.copytree(sets["train"].parent, tmp_path / "grown")
    stamp = (tmp_path / "grown" / "train" / "conv_00001.wav").stat().st_mtime_ns
    _write(tmp_path / "grown", "train", n=3)
    _write(tmp_path / "fresh", "train", n=3)
    assert (tmp_path / "grown" / "train" / "conv_00001.wav").stat().st_mtime_ns == stamp
    for n in ("train.jsonl", "train/conv_00002.json", "train/conv_00001.wav"):
        assert (tmp_path / "grown" / n).read_bytes() == (tmp_path / "fresh" / n).read_bytes(), n
    (tmp_path / "grown" / "train" / "conv_00000.json").write_text("{trunc")  # a torn write: generated again
    _write(tmp_path / "grown", "train", n=3)
    assert (tmp_path / "grown" / "train" / "conv_00000.json").read_bytes() == \
        (tmp_path / "fresh" / "train" / "conv_00000.json").read_bytes()


@pytest.mark.parametrize("field,value", [
    ("facts", 0), ("facts", 9), ("facts", 2.5), ("duration_s", -1.0), ("duration_s", 5.0), ("min_distance_s", 0.0),
    ("max_distance_s", 1.0), ("pause_s", (1.0, 0.3)), ("pause_s", (0.3,)), ("rate_wpm", (175.0, 175)),
    ("rate_wpm", (50, 60)), ("pitch", (0, 120)), ("answer_delay_s", (-0.1, 0.5)), ("duration_s", float("nan")),
])
def test_invalid_spec_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}".replace("(", r"\(").replace(")", r"\)")):
        ConversationSpec(**{field: value})


def test_the_generate_command_refuses_bad_values(tmp_path, capsys):
    for args, named in ((["--facts", "9"], "facts=9"), (["--rate", "40"], "rate_wpm=(40, 40)"),
                        (["--pause", "1", "2", "3"], "--pause"), (["--n", "0"], "--n=0")):
        with pytest.raises(SystemExit) as e:
            generate.main(["--out", str(tmp_path), "--split", "train", "--n", "1", *args, "--no-progress"])
        assert e.value.code == 2 and named in capsys.readouterr().err, args
    assert not list(tmp_path.iterdir())
    assert fact_text("red", "seven") == "the red box holds seven" and len(COLOURS) == 8 and len(NUMBERS) == 9


# ---- the scorer --------------------------------------------------------------------------------------------

def _q(colour: str, answer: str, fact_end: float, q_end: float) -> Question:
    return Question(colour, answer, fact_end - 1, fact_end, q_end - 1, q_end, q_end + 0.3, q_end + 0.7,
                    round(q_end - fact_end, 6))


def _tt(*words: tuple[str, float]) -> dict:
    return {"frame_rate": 12.5, "words": [{"word": w, "frame": round(t * 12.5), "time": t} for w, t in words],
            "tokens": []}


def test_the_scorer_outcomes():
    qs = [_q("red", "seven", 5.0, 10.0), _q("blue", "two", 12.0, 20.0), _q("pink", "nine", 3.0, 30.0),
          _q("white", "four", 1.0, 40.0)]
    timed = _tt(("seven", 9.6), ("▁Seven,", 10.4),  # a word before q_end is ignored; "▁Seven," is "seven"
                ("three", 20.8), ("two", 21.0),  # the first word decides: wrong
                ("nine", 33.2),  # 3.2 s after the question: late
                )  # nothing after 40 s: missing
    res = score.score_conversation(qs, timed)
    assert [r.outcome for r in res] == ["right", "wrong", "late", "missing"]
    assert (res[0].word, res[0].time, res[1].word, res[3].word) == ("seven", 10.4, "three", None)
    assert score.score_conversation(qs[2:3], timed, max_latency_s=3.5)[0].outcome == "right"
    assert score.score_conversation(qs[:1], _tt(("seven", 13.0)))[0].outcome == "right"  # exactly 3 s: in time
    assert score.score_conversation(qs[:1], _tt(("...", 10.1), ("7", 10.2)))[0].outcome == "right"
    assert score.normalise_word("▁Hello!") == "hello" and score.normalise_word("▁") == ""
    with pytest.raises(ValueError, match=r"words\[0\]"):
        score.timed_words({"words": [{"word": "x"}]})


def test_the_scorer_bins_and_window_counts(tmp_path):
    w = 10.0  # distances: 2, 8 (inside), 10, 15, 25, 31 (beyond)
    c1 = [_q("red", "one", 8.0, 10.0), _q("blue", "two", 2.0, 10.0), _q("pink", "three", 10.0, 20.0)]
    c2 = [_q("red", "four", 5.0, 20.0), _q("blue", "five", 5.0, 30.0), _q("black", "six", 9.0, 40.0)]
    t1 = _tt(("one", 10.1), ("three", 23.5))  # blue (d=8) hears "one" first: wrong; pink (d=10): late
    t2 = _tt(("four", 20.2), ("five", 30.3), ("six", 40.5))
    (tmp_path / "t2.json").write_text(json.dumps(t2))
    s = score.score_set([(c1, t1), (c2, tmp_path / "t2.json")], window_s=w, bins=[0, 5, 10, 20])
    assert (s["n"], s["right"], s["wrong"], s["late"], s["missing"]) == (6, 4, 1, 1, 0)
    assert s["recall"] == pytest.approx(4 / 6) and s["conversations"] == 2 and len(s["questions"]) == 6
    assert (s["inside"]["n"], s["inside"]["right"], s["inside"]["wrong"]) == (2, 1, 1)
    assert (s["beyond"]["n"], s["beyond"]["right"], s["beyond"]["late"]) == (4, 3, 1)
    assert s["beyond"]["recall"] == pytest.approx(0.75) and s["inside"]["recall"] == pytest.approx(0.5)
    got = [(b["lo"], b["hi"], b["n"], b["right"]) for b in s["bins"]]
    assert got == [(0, 5, 1, 1), (5, 10, 1, 0), (10, 20, 2, 1), (20, None, 2, 2)]
    assert [b["recall"] for b in s["bins"]] == [1.0, 0.0, 0.5, 1.0]
    default = score.score_set([(c1, t1), (c2, t2)], window_s=w)["bins"]
    assert [(b["lo"], b["hi"], b["n"]) for b in default] == [(0, 10.0, 2), (10.0, 20.0, 2), (20.0, 30.0, 1),
                                                              (30.0, None, 1)]
    empty = score.summarise([], window_s=w, bins=[0, 10])
    assert empty["recall"] is None and empty["bins"][0]["n"] == 0
    with pytest.raises(ValueError, match="bins"):
        score.summarise([], window_s=w, bins=[0, 10, 5])


def test_the_score_command_on_a_generated_set(sets, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    n = 0
    for i, (wav, doc) in enumerate(_convs(sets["eval"])):
        qs = doc["spoken_memory"]["questions"]
        # a perfect Moshi on conversation 0 (its answer at its aligned start); a silent one on conversation 1
        words = [(q["answer"], q["answer_start"]) for q in qs] if i == 0 else []
        n += len(words)
        (results / f"{wav.stem}.text.json").write_text(json.dumps(_tt(*words)))
    assert score.main(["--manifest", str(sets["eval"]), "--results", str(results), "--window-s", "9.6",
                       "--out", str(tmp_path / "s.json")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["n"], s["right"], s["missing"]) == (2 * SPEC.facts, n, SPEC.facts) and "questions" not in s
    assert s["inside"]["n"] + s["beyond"]["n"] == s["n"] == sum(b["n"] for b in s["bins"])
    assert len(json.loads((tmp_path / "s.json").read_text())["questions"]) == 2 * SPEC.facts
    (results / "conv_00001.text.json").unlink()
    with pytest.raises(SystemExit):
        score.main(["--manifest", str(sets["eval"]), "--results", str(results), "--window-s", "9.6"])
    assert "conv_00001.text.json" in capsys.readouterr().err


@pytest.mark.slow  # a `moshi-ttt infer` of the demo, ~6 s
def test_evaluation_runs_infer_on_the_user_channel_and_scores_it(sets, tmp_path):
    """evaluate_set: infer hears the right (user) channel only, the timed text it writes is what is scored, one
    result per question, and a second call reuses the finished conversations."""
    import sphn

    from moshi_ttt.experiments.spoken import evaluate

    manifest = sets["eval"]
    wav, truth = _convs(manifest)[0]
    user = evaluate.user_channel(wav, tmp_path / "user.wav")
    mono, _ = sphn.read(str(user), sample_rate=SAMPLE_RATE)
    stereo = _stereo(wav).astype(np.float32) / 32768
    assert mono.shape == (1, stereo.shape[1])
    assert np.abs(mono[0] - stereo[1]).max() < 1e-3 and np.abs(mono[0] - stereo[0]).max() > 0.1

    results = tmp_path / "results"
    summary = evaluate.evaluate_set(manifest, results, ["--demo", "--seed", "1"], window_s=5.12)
    n_questions = sum(len(c["spoken_memory"]["questions"]) for _, c in _convs(manifest))
    assert len(summary["questions"]) == n_questions == summary["n"]
    assert summary["conversations"] == 2 and summary["infer_args"] == ["--demo", "--seed", "1"]
    timed = json.loads((results / f"{wav.stem}.text.json").read_text())
    expected = score.score_conversation(truth, timed)
    assert [r.to_dict() for r in expected] == [
        {k: v for k, v in q.items() if k != "conversation"} for q in summary["questions"] if q["conversation"] == 0]
    assert not (results / "input").exists()
    assert json.loads((results / "batch_0.ttt.json").read_text())["batch_size"] == 2
    stamp = (results / f"{wav.stem}.text.json").stat().st_mtime_ns
    again = evaluate.evaluate_set(manifest, results, ["--demo"], window_s=5.12)
    assert again["questions"] == summary["questions"]
    assert (results / f"{wav.stem}.text.json").stat().st_mtime_ns == stamp
