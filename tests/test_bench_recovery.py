"""scripts/bench_recovery.py: the cell records, resuming a stopped grid, the teacher cache and the summary table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from tiny_models import load_script, tiny, toy_sentiment_split, toy_word_tokenizer


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_recovery")


@pytest.fixture(scope="module")
def tokenizer():
    return toy_word_tokenizer()


_split = toy_sentiment_split


@pytest.fixture(scope="module")
def splits():
    return {"toy": (_split(48, 0), _split(24, 1))}


def _args(bench, tmp_path: Path, *extra: str):
    return bench.build_parser().parse_args([
        "--methods", "px,magnitude", "--sparsities", "0.5", "--seeds", "0", "--steps", "2", "--batch-size", "8",
        "--max-length", "16", "--per-class", "4", "--rounds", "2", "--recipe", "toy",
        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "recovery.json"), *extra])


def _pretrained(seed: int):
    return tiny("bert", seed=seed)


def test_cell_record_fields_and_retained(bench, tokenizer, splits, tmp_path):
    args = _args(bench, tmp_path, "--temperature", "3", "--alpha", "0.7", "--freeze-embeddings")
    data = splits["toy"]
    teacher, info = bench.get_teacher(args, "toy", "in-memory", 0, data, tokenizer, _pretrained)
    rec = bench.run_cell(args, "toy", "px", 0.5, 0, data, tokenizer, _pretrained, teacher, info)
    for key in ("dataset", "method", "sparsity", "seed", "recipe", "source", "accuracy", "dense_accuracy",
                "retained", "cpu_s", "wall_s", *bench.RECIPE_KEYS):
        assert key in rec, key
    assert (rec["dataset"], rec["method"], rec["sparsity"], rec["seed"], rec["recipe"], rec["source"]) == (
        "toy", "px", 0.5, 0, "toy", "pretrained")
    assert (rec["temperature"], rec["alpha"], rec["freeze_embeddings"], rec["steps"]) == (3.0, 0.7, True, 2)
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["dense_accuracy"] == info["dense_accuracy"] > 0
    assert rec["data_source"] == "in-memory"
    assert rec["retained"] == pytest.approx(rec["accuracy"] / rec["dense_accuracy"])
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert rec["cpu_s"] > 0 and rec["wall_s"] > 0
    json.dumps(rec)  # the record goes to a JSON file as it is


def test_prune_the_teacher_trains_a_copy(bench, tokenizer, splits, tmp_path):
    args = _args(bench, tmp_path, "--source", "teacher")
    data = splits["toy"]
    teacher, info = bench.get_teacher(args, "toy", "in-memory", 0, data, tokenizer, _pretrained)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    rec = bench.run_cell(args, "toy", "magnitude", 0.5, 0, data, tokenizer, _pretrained, teacher, info)
    assert rec["source"] == "teacher"
    assert all((p == before[n]).all() for n, p in teacher.named_parameters())  # the teacher itself is untouched


def test_stopped_grid_keeps_its_cells_and_resumes(bench, tokenizer, splits, tmp_path, monkeypatch):
    args = _args(bench, tmp_path)
    out = Path(args.out)
    real_cell, real_finetune = bench.run_cell, bench.finetune
    cells, finetunes = [], []

    def stop_after_first(*a, **k):
        if cells:
            raise KeyboardInterrupt  # the grid is stopped while its second cell runs
        cells.append(a[2])
        return real_cell(*a, **k)

    monkeypatch.setattr(bench, "run_cell", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        bench.run_grid(args, splits, tokenizer, _pretrained)
    saved = json.loads(out.read_text())
    assert [(r["method"], r["sparsity"]) for r in saved] == [("px", 0.5)]

    def counting_cell(*a, **k):
        cells.append(a[2])
        return real_cell(*a, **k)

    def counting_finetune(*a, **k):
        finetunes.append(k["config"] if "config" in k else a[3])
        return real_finetune(*a, **k)

    monkeypatch.setattr(bench, "run_cell", counting_cell)
    monkeypatch.setattr(bench, "finetune", counting_finetune)
    records = bench.run_grid(args, splits, tokenizer, _pretrained)
    assert cells == ["px", "magnitude"]  # the resumed run did only the missing cell
    assert len(finetunes) == 1 and finetunes[0].distill is not None  # and reused the cached teacher
    assert sorted(r["method"] for r in records) == ["magnitude", "px"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(records))
    assert len({r["dense_accuracy"] for r in records}) == 1  # both cells compare to the same teacher

    cells.clear()
    bench.run_grid(args, splits, tokenizer, _pretrained)
    assert cells == []  # a finished grid re-runs nothing


def test_recipe_name_cannot_change_meaning(bench, tmp_path):
    args = _args(bench, tmp_path)
    record = {"recipe": "toy", **bench.recipe_params(args)}
    bench.check_recipe([record], args)
    with pytest.raises(SystemExit, match="lr"):
        bench.check_recipe([{**record, "lr": 1e-3}], args)
    bench.check_recipe([{**record, "recipe": "other", "lr": 1e-3}], args)


def _rec(method: str, sparsity: float, seed: int, acc: float, dense: float) -> dict:
    return {"dataset": "rt", "source": "pretrained", "recipe": "r", "method": method, "sparsity": sparsity,
            "seed": seed, "accuracy": acc, "dense_accuracy": dense, "retained": acc / dense}


def _mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def test_summary_tables_mean_std_over_seeds(bench):
    dense = {0: 0.80, 1: 0.76}
    px = {0: (0.70, 0.64), 1: (0.72, 0.60)}  # seed: (80%, 90%)
    snip = {0: (0.66, 0.62), 1: (0.69, 0.58)}
    records = [_rec("px", sp, s, px[s][i], dense[s]) for s in (0, 1) for i, sp in enumerate((0.8, 0.9))]
    records += [_rec("snip", sp, s, snip[s][i], dense[s]) for s in (0, 1) for i, sp in enumerate((0.8, 0.9))]
    text = bench.summary(records)
    acc, kept = [part for part in text.split("### ") if part]
    rows = {line.split(" | ")[0].strip("| "): line for line in acc.splitlines() if line.startswith("| ")}
    assert rows["method"] == "| method | 80% | 90% |"
    want_dense = _mean_std(list(dense.values()))
    assert rows["dense"] == f"| dense | {want_dense} | {want_dense} |"
    px80, px90 = _mean_std([px[0][0], px[1][0]]), _mean_std([px[0][1], px[1][1]])
    assert rows["px"] == f"| px | **{px80}** | **{px90}** |"  # px is the better method in both columns
    assert rows["snip"] == f"| snip | {_mean_std([snip[0][0], snip[1][0]])} | {_mean_std([snip[0][1], snip[1][1]])} |"
    kept_rows = {line.split(" | ")[0].strip("| "): line for line in kept.splitlines() if line.startswith("| ")}
    assert kept_rows["dense"].split(" | ")[1] == "100.0 ± 0.0"
    want = _mean_std([px[s][0] / dense[s] for s in (0, 1)])
    assert kept_rows["px"].split(" | ")[1].strip("*") == want


def test_plot_panels_split_the_budgets(bench):
    small = [dict(_rec(m, 0.8, 0, 0.7, 0.8), recipe="demo-e1") for m in ("px", "snip")]
    small.append(dict(_rec("px", 0.8, 0, 0.75, 0.8), recipe="demo-e1-gradual", source="teacher"))
    large = [dict(_rec(m, 0.8, 0, 0.8, 0.85), recipe="full20k-e1-gradual", source="teacher") for m in ("px", "snip")]
    other = dict(_rec("px", 0.8, 0, 0.7, 0.8), recipe="someone-elses")
    rows = bench.plot_records(small + large + [other])
    by_panel: dict[str, set[str]] = {}
    for r in rows:
        by_panel.setdefault(r["panel"], set()).add(r["method"])
    assert by_panel == {  # the unlisted recipe is left out; variants get their own line, large-budget methods do not
        f"rt, {bench.SMALL}": {"dense", "px", "snip", "px teacher + gradual"},
        f"rt, {bench.LARGE}": {"dense", "px", "snip"},
    }
    dense_large = [r for r in rows if r["panel"].endswith(bench.LARGE) and r["method"] == "dense"]
    assert [r["accuracy"] for r in dense_large] == [0.85]


def test_dataset_sources(bench, tmp_path):
    assert bench.dataset_source("rt", "glue:sst2") == ("builtin:rotten_tomatoes", None)
    assert bench.dataset_source("sst2", "glue:sst2") == ("glue", "sst2")
    assert bench.dataset_source("sst2", str(tmp_path)) == (str(tmp_path), None)  # a local copy is read as it is
    with pytest.raises(SystemExit, match="unknown dataset"):
        bench.dataset_source("imdb", "glue:sst2")


def test_gradual_cell_reaches_the_sparsity_while_fine_tuning(bench, tokenizer, splits, tmp_path):
    args = _args(bench, tmp_path, "--schedule", "gradual", "--initial-sparsity", "0.2", "--gradual-every", "1",
                 "--gradual-end", "0.5", "--steps", "4")
    data = splits["toy"]
    teacher, info = bench.get_teacher(args, "toy", "in-memory", 0, data, tokenizer, _pretrained)
    rec = bench.run_cell(args, "toy", "px", 0.5, 0, data, tokenizer, _pretrained, teacher, info)
    assert (rec["schedule"], rec["initial_sparsity"], rec["gradual_every"], rec["gradual_end"]) == (
        "gradual", 0.2, 1, 0.5)
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(SystemExit, match="schedule"):  # a one-shot run cannot reuse the gradual recipe's name
        bench.check_recipe([{"recipe": "toy", **bench.recipe_params(args)}], _args(bench, tmp_path))
    old = {"recipe": "toy", **bench.recipe_params(_args(bench, tmp_path))}
    del old["schedule"]  # records written before --schedule existed count as one-shot
    bench.check_recipe([old], _args(bench, tmp_path))


def test_min_density_ratio_reaches_the_pruner_and_names_the_recipe(bench, tokenizer, splits, tmp_path, monkeypatch):
    args = _args(bench, tmp_path, "--min-density-ratio", "1")
    data = splits["toy"]
    teacher, info = bench.get_teacher(args, "toy", "in-memory", 0, data, tokenizer, _pretrained)
    seen, prune = [], bench.hf_px.prune
    monkeypatch.setattr(bench.hf_px, "prune", lambda model, batches, cfg, **kw: seen.append(cfg) or prune(
        model, batches, cfg, **kw))
    rec = bench.run_cell(args, "toy", "px", 0.5, 0, data, tokenizer, _pretrained, teacher, info)
    assert [c.min_density_ratio for c in seen] == [1.0] and rec["min_density_ratio"] == 1.0
    with pytest.raises(SystemExit, match="min_density_ratio"):
        bench.check_recipe([{"recipe": "toy", **bench.recipe_params(args)}], _args(bench, tmp_path))
    with pytest.raises(SystemExit, match="--min-density-ratio"):
        bench.grid(_args(bench, tmp_path, "--min-density-ratio", "1.5"))  # refused before any data is read
    old = {"recipe": "toy", **bench.recipe_params(_args(bench, tmp_path))}
    del old["min_density_ratio"]  # records written before the option existed were pruned with the default
    bench.check_recipe([old], _args(bench, tmp_path))
