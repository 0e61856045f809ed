"""scripts/bench_speed.py on a tiny BERT: record fields, one side-by-side measurement per shape, resuming, table.

No assertion is about timing itself: a tiny model's milliseconds are noise. What is checked is where every
number comes from.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from tiny_models import load_script, tiny, toy_sentiment_split, toy_word_tokenizer

SHAPES = [(1, 8), (2, 16)]
ALL = ["dense", "px90", "px90-csr", "pcn50", "pcn25", "pcn50-px80", "blocks", "blocks-top", "pcn25-top1", "fast",
       "fast-hidden", "fast-teacher", "fast-teacher-hidden", "fast-teacher-e3", "fast-teacher-e5",
       "fast-teacher-hidden-e3"]


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_speed")


@pytest.fixture(scope="module")
def tokenizer():
    return toy_word_tokenizer()


_split = toy_sentiment_split


def _pretrained(seed: int):
    return tiny("bert", seed=seed)  # 2 blocks, hidden 32, FFN 64


def _args(bench, folder: Path, *extra: str):
    return bench.parse_args([
        "--shapes", ",".join(f"{b}x{t}" for b, t in SHAPES), "--runs", "2", "--steps", "2", "--batch-size", "8",
        "--max-length", "16", "--per-class", "4", "--rounds", "2", "--remove-blocks", "1", "--recipe", "toy",
        "--plan-shapes", "1x16,4x16", "--plan-runs", "1", "--fast-sparsity", "0.5",
        "--work-dir", str(folder / "work"), "--out", str(folder / "speed.json"), *extra])


class Spy:
    """Wraps measure_latency: which models each call timed, and what it returned."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, models, inputs, **kwargs):
        res = self.real(models, inputs, **kwargs)
        self.calls.append({"names": list(models), "shape": tuple(inputs["input_ids"].shape), "kwargs": kwargs,
                           "result": res})
        return res


@pytest.fixture(scope="module")
def run(bench, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed")
    args = _args(bench, folder)
    spy = Spy(bench.measure_latency)
    mp = pytest.MonkeyPatch()
    mp.setattr(bench, "measure_latency", spy)
    try:
        with warnings.catch_warnings():  # a tiny model on a busy machine may miss 2x: plan_speed says so
            warnings.filterwarnings("ignore", message="no candidate reached")
            records = bench.run_all(args, "toy", (_split(48, 0), _split(24, 1)), tokenizer, _pretrained,
                                    "in-memory")
    finally:
        mp.undo()
    return {"args": args, "records": records, "spy": spy, "folder": folder}


def test_every_config_and_shape_has_a_full_record(run):
    records = run["records"]
    assert sorted((r["config"], r["batch"], r["tokens"]) for r in records) == sorted(
        (c, b, t) for c in ALL for b, t in SHAPES)
    for r in records:
        for key in ("config", "batch", "tokens", "dense_ms", "ms", "speedup", "accuracy", "dense_accuracy",
                    "retained", "threads", "load_average", "runs", "timing_id", "num_blocks", "ffn_width",
                    "sparsity", "params", "nonzero_params", "recipe", "recipe_id"):
            assert key in r, (r["config"], key)
        assert r["threads"] == 1 and r["runs"] == 2
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["retained"] == pytest.approx(r["accuracy"] / r["dense_accuracy"])
    assert len({r["dense_accuracy"] for r in records}) == 1  # one teacher for all
    assert json.loads(Path(run["args"].out).read_text()) == json.loads(json.dumps(records))


def test_structure_of_each_config(run):
    by = {r["config"]: r for r in run["records"] if (r["batch"], r["tokens"]) == SHAPES[0]}
    assert (by["dense"]["num_blocks"], by["dense"]["ffn_width"], by["dense"]["sparsity"]) == (2, 64, 0.0)
    assert by["px90"]["sparsity"] == pytest.approx(0.9, abs=0.02) and by["px90"]["ffn_width"] == 64
    assert (by["pcn50"]["ffn_width"], by["pcn25"]["ffn_width"]) == (32, 16)
    assert by["pcn50"]["sparsity"] == 0.0
    assert by["pcn50-px80"]["ffn_width"] == 32 and by["pcn50-px80"]["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert by["blocks"]["num_blocks"] == 1 and by["blocks"]["removed"] == [by["blocks"]["block_ranking"][0]["block"]]
    fast = by["fast"]
    assert fast["plan"]["target_speedup"] == 2.0 and "met" in fast["plan"]
    assert fast["num_blocks"] == 2 - fast["plan"]["blocks_removed"] and fast["ffn_width"] == fast["plan"]["ffn_width"]
    assert fast["sparsity"] == pytest.approx(0.5, abs=0.02) and fast["px_sparsity"] == 0.5
    # sparse kernels run px90's weights: same accuracy, and the kernel choice made at that shape is recorded
    csr = [r for r in run["records"] if r["config"] == "px90-csr"]
    assert all(r["accuracy"] == by["px90"]["accuracy"] and r["accuracy_from"] == "px90" for r in csr)
    assert all(set(r["kernels"]) >= {"sparse_layers", "linear_layers", "reverted"} for r in csr)
    assert all(r["distill"] == ("logits + hidden" if "hidden" in c else "logits") for c, r in by.items() if c != "dense")
    hidden = by["fast-hidden"]  # planned again (timing on a tiny model is noise), then distilled block by block
    assert hidden["distill"] == "logits + hidden" and hidden["hidden_weight"] == 1.0
    assert hidden["num_blocks"] == 2 - hidden["plan"]["blocks_removed"] >= 1


def test_ratios_come_from_one_side_by_side_call_per_shape(run):
    calls = run["spy"].calls
    assert [c["shape"] for c in calls] == SHAPES  # one call per shape, nothing else timed
    for call in calls:
        assert call["names"][0] == "dense" and sorted(call["names"]) == sorted(ALL)
        assert call["kwargs"]["reference"] == "dense" and call["kwargs"]["runs"] == 2
        res = call["result"]
        rows = [r for r in run["records"] if (r["batch"], r["tokens"]) == call["shape"]]
        assert len({r["timing_id"] for r in rows}) == 1
        for r in rows:
            assert r["dense_ms"] == res.ms["dense"] and r["ms"] == res.ms[r["config"]]
            assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])


def test_rerun_skips_trained_configs_and_timing(bench, run, tokenizer, monkeypatch, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(run["folder"], folder)  # the other tests keep the first run's files
    trained, timed = [], []
    monkeypatch.setattr(bench, "run_config", lambda *a, **k: trained.append(a[0]))
    monkeypatch.setattr(bench, "measure_latency", lambda *a, **k: timed.append(a))
    splits = (_split(48, 0), _split(24, 1))
    records = bench.run_all(_args(bench, folder), "toy", splits, tokenizer, _pretrained, "in-memory")
    assert trained == [] and timed == []  # nothing to train, every shape already timed
    assert records == run["records"]

    spy = Spy(run["spy"].real)
    monkeypatch.setattr(bench, "measure_latency", spy)
    args = _args(bench, folder, "--retime", "--configs", "px90,pcn50")
    again = bench.run_all(args, "toy", splits, tokenizer, _pretrained, "in-memory")
    assert trained == [] and [sorted(c["names"]) for c in spy.calls] == [["dense", "pcn50", "px90"]] * len(SHAPES)
    saved = json.loads(Path(args.out).read_text())
    assert len(saved) == len(ALL) * len(SHAPES)  # the configurations not re-timed keep their records
    new_ids = {r["timing_id"] for r in again if r["config"] in ("dense", "px90", "pcn50")}
    old_ids = {r["timing_id"] for r in again if r["config"] == "pcn25"}
    assert len(new_ids) == 1 and new_ids != old_ids


def test_stopped_run_keeps_finished_configs(bench, tokenizer, tmp_path, monkeypatch):
    args = _args(bench, tmp_path, "--configs", "pcn50,pcn25")
    real = bench.run_config
    done = []

    def stop_on_second(name, *a, **k):
        if done:
            raise KeyboardInterrupt
        done.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(bench, "run_config", stop_on_second)
    splits = (_split(48, 0), _split(24, 1))
    with pytest.raises(KeyboardInterrupt):
        bench.run_all(args, "toy", splits, tokenizer, _pretrained, "in-memory")
    saved = json.loads(Path(args.out).read_text())
    assert {(r["config"], r["ms"]) for r in saved} == {("pcn50", None)}  # its accuracy, not yet timed
    assert len(saved) == len(SHAPES)

    monkeypatch.setattr(bench, "run_config", lambda name, *a, **k: done.append(name) or real(name, *a, **k))
    records = bench.run_all(args, "toy", splits, tokenizer, _pretrained, "in-memory")
    assert done == ["pcn50", "pcn25"]  # the resumed run trained only the missing one
    assert sorted({r["config"] for r in records}) == ["dense", "pcn25", "pcn50"]
    assert all(r["ms"] is not None for r in records)


def test_summary_table(bench, run, capsys):
    text = bench.summary(run["records"])
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(lines) == 2 + len(ALL)
    assert "1x8 (latency)" in lines[0] and "2x16 (throughput)" in lines[0]
    assert "fast preset" in text and "1 of 2 blocks removed" in text and "1.00x" in text
    bench.main(["--summary-only", "--out", run["args"].out])
    assert capsys.readouterr().out.strip() == text


def test_bad_arguments(bench, tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        bench.parse_args(["--configs", "px90,nope"])
    with pytest.raises(SystemExit, match="shapes"):
        bench.parse_args(["--shapes", "1by32"])
    quick = bench.parse_args(["--quick", "--work-dir", str(tmp_path)])
    assert quick.out == str(tmp_path / "speed-quick.json") and quick.steps == 2 and quick.recipe == "quick"
