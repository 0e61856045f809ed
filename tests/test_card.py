"""The model card says only what is true and public: Hub ids, known licenses and metrics, what was applied."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from hf_px.export.card import HUB_METRICS, REPO_PLACEHOLDER, build_card

ROOT = Path(__file__).resolve().parents[1]
MINILM_HUB = "sentence-transformers/all-MiniLM-L6-v2"
RT_HUB = "cornell-movie-review-data/rotten_tomatoes"


def report(sparsity: float = 0.8, method: str = "px", **extra) -> dict:
    layers = [{"name": f"bert.encoder.layer.{i}.output.dense.weight", "shape": [32, 64], "numel": 2048,
               "density": 1 - sparsity} for i in range(2)]
    return {"method": method, "target_sparsity": sparsity, "achieved_sparsity": sparsity, "rounds": 5,
            "layers": layers, "calibration": {"num_batches": 2, "num_examples": 20, "class_counts": {"0": 10, "1": 10},
                                              "dataset": "builtin:rotten_tomatoes", "train_examples": 200,
                                              "eval_examples": 100}, **extra}


def reloaded(card: ModelCard) -> ModelCard:
    """The card as the Hub reads it back from README.md."""
    return ModelCard(str(card))


def test_builtin_names_become_hub_ids_with_the_base_license():
    card = reloaded(build_card(report(), base_model="builtin:minilm", dataset="builtin:rotten_tomatoes",
                               metrics={"eval_loss": 0.6, "eval_accuracy": 0.8}, pipeline_tag="text-classification"))
    data = card.data.to_dict()
    assert data["base_model"] == MINILM_HUB and data["license"] == "apache-2.0"
    assert data["datasets"] == [RT_HUB]
    assert "builtin:" not in str(card).split("---")[1]  # no hf-px-only names in the metadata


def test_builtin_data_without_a_hub_original_and_local_data_are_left_out(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\na,0\n")
    for dataset in ("builtin:tweets", str(csv), "reviews.parquet"):
        card = build_card(report(calibration={}), base_model="org/base", dataset=dataset,
                          metrics={"eval_accuracy": 0.8}, pipeline_tag="text-classification")
        assert card.data.datasets is None and card.data.eval_results is None, dataset
    card = build_card(report(calibration={}), base_model="org/base", dataset="glue", dataset_config="sst2",
                      metrics={"eval_accuracy": 0.8}, pipeline_tag="text-classification")
    assert card.data.datasets == ["glue"] and card.data.eval_results[0].dataset_config == "sst2"


def test_no_local_path_anywhere_in_the_card(tmp_path):
    base = tmp_path / "my-base-model"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# base\n")
    data = tmp_path / "private" / "reviews.csv"
    data.parent.mkdir()
    data.write_text("text,label\na,0\n")
    r = report(calibration={"dataset": str(data), "num_examples": 20})
    r["finetune"] = {"epochs": 1, "output_dir": str(tmp_path / "ft"), "teacher": str(tmp_path / "teacher")}
    r["pcn"] = {"config": {"mode": "structured"}, "source": str(base), "layers": []}
    for fmt in ("dense", "sparse"):
        card = build_card(r, base_model=str(base), dataset=str(data), metrics={"eval_accuracy": 0.8},
                          format=fmt, pipeline_tag="text-classification",
                          plots=[("density", "plots/density.png")])
        text = str(card)
        assert str(tmp_path) not in text and "my-base-model" not in text and "reviews.csv" not in text, text
        assert card.data.base_model is None and card.data.datasets is None
        assert card.data.license == "mit"  # the local base's card license is carried over
        assert "a local checkpoint" in card.text and "local data (not on the Hub)" in card.text
        assert "![density](plots/density.png)" in card.text  # paths inside the repo stay


def test_base_model_hub_id_from_the_hub_cache_and_from_an_earlier_hf_px_save(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--bert-tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert build_card(report(), base_model=str(snapshot)).data.base_model == "org/bert-tiny"
    earlier = tmp_path / "pruned-before"
    earlier.mkdir()
    (earlier / "hf_px.json").write_text("{}")
    (earlier / "README.md").write_text(f"---\nbase_model: {MINILM_HUB}\nlicense: apache-2.0\n---\n")
    card = build_card(report(), base_model=str(earlier))
    assert card.data.base_model == MINILM_HUB and card.data.license == "apache-2.0"
    # a random model has no base on the Hub; an unknown Hub model keeps its id, license unknown
    assert build_card(report(), base_model="from_config:bert").data.base_model is None
    hub = build_card(report(), base_model="org/other")
    assert hub.data.base_model == "org/other" and hub.data.license is None
    assert build_card(report(), base_model="org/other", license="mit").data.license == "mit"


def test_model_index_is_valid_and_uses_hub_metric_types():
    metrics = {"eval_loss": 0.61, "eval_accuracy": 0.8, "eval_f1": 0.75, "eval_runtime": 3.2}
    card = reloaded(build_card(report(), base_model="builtin:minilm", dataset="builtin:rotten_tomatoes",
                               metrics=metrics, pipeline_tag="text-classification", repo_id="me/minilm-px80"))
    results = card.data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == {"accuracy": 0.8, "f1": 0.75}
    assert all(r.metric_type in HUB_METRICS and r.dataset_type == RT_HUB for r in results)
    assert all(r.task_type == "text-classification" for r in results)
    # numbers measured on hf-px's split of a packaged copy say so, in the index and in the text
    assert {r.dataset_name for r in results} == {"rotten_tomatoes (hf-px built-in copy, own split)"}
    assert "`builtin:rotten_tomatoes` (hf-px's own seeded split of a packaged copy; Hub original:" in card.text
    # huggingface_hub's own parser and writer agree with what the card holds
    index = card.data.to_dict()["model-index"]
    name, parsed = model_index_to_eval_results(index)
    assert name == "minilm-px80" and eval_results_to_model_index(name, parsed) == index
    assert "eval_accuracy" not in str(card).split("---")[1] and card.data.metrics == ["accuracy", "f1"]
    # the text keeps every number, named by what it measures
    assert "| accuracy | 0.8 |" in card.text and "| loss | 0.61 |" in card.text


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"report": report(method="px")}, ["pruned", "sparse", "px", "hf-px"]),
    ({"report": report(method="magnitude")}, ["pruned", "sparse", "hf-px"]),
    ({"report": report(pcn={"config": {"mode": "structured"}, "layers": []})}, ["pruned", "sparse", "px", "pcn", "hf-px"]),
    ({"report": {"method": "none (not pruned)", "layers": [], "finetune": {"epochs": 1}}}, ["hf-px"]),
    ({"report": {"method": "none (not pruned)", "layers": []}, "format": "sparse"}, ["sparse", "hf-px"]),
    ({"report": report(finetune={"distill": {"alpha": 0.5}, "peft": "lora"})},
     ["pruned", "sparse", "px", "distillation", "lora", "hf-px"]),
], ids=["px", "magnitude", "pcn", "dense-unpruned", "sparse-unpruned", "distill-lora"])
def test_tags_name_only_what_was_applied(kwargs, expected):
    assert build_card(**kwargs).data.tags == expected


def test_unpruned_card_has_no_pruning_section():
    card = build_card({"method": "none (not pruned)", "layers": [], "finetune": {"epochs": 1}},
                      base_model="builtin:minilm")
    assert "## Pruning" not in card.text and "Per-layer density" not in card.text
    assert f"`{MINILM_HUB}` fine-tuned with hf-px (not pruned)." in card.text


def test_load_snippet_uses_the_pushed_repo_or_a_marked_placeholder():
    pushed = build_card(report(), pipeline_tag="text-classification", repo_id="me/tiny-px")
    assert 'AutoModelForSequenceClassification.from_pretrained("me/tiny-px")' in pushed.text
    assert REPO_PLACEHOLDER not in pushed.text and "placeholder" not in pushed.text
    assert pushed.data.model_name == "tiny-px"
    local = build_card(report(), pipeline_tag="text-classification")
    assert f'from_pretrained("{REPO_PLACEHOLDER}")  # placeholder' in local.text
    assert f"`{REPO_PLACEHOLDER}` is a placeholder" in local.text


def test_calibration_table_has_no_training_or_evaluation_sizes():
    text = build_card(report(), base_model="builtin:minilm").text
    calibration = text.split("### Calibration data")[1].split("###")[0]
    assert "num_examples | 20" in calibration and RT_HUB in calibration
    assert "train_examples" not in text and "eval_examples" not in text


def test_sparse_format_card_says_how_to_install_and_load_it():
    card = reloaded(build_card(report(), base_model="builtin:minilm", format="sparse",
                               pipeline_tag="text-classification", repo_id="me/tiny-px"))
    assert "pip install hf-px" in card.text and 'hf_px.load("me/tiny-px")' in card.text
    assert card.data.library_name == "hf-px" and "from_pretrained" not in card.text.split("## How to load")[1][:300]
    dense = build_card(report(), format="dense", pipeline_tag="text-classification")
    assert dense.data.library_name == "transformers" and "pip install hf-px" not in dense.text


def test_pcn_projection_needs_hf_px_even_in_the_dense_format():
    card = build_card(report(pcn={"config": {"mode": "projection"}, "layers": []}), format="dense",
                      pipeline_tag="text-classification")
    assert card.data.library_name == "hf-px" and "import hf_px.pcn" in card.text and "pip install hf-px" in card.text


def test_dense_baseline_table_is_kept():
    baseline = [{"metric": "eval_accuracy", "dense": 0.8, "value": 0.72, "retained": 0.9},
                {"metric": "eval_loss", "dense": 0.5, "value": 0.6, "retained": None}]
    text = build_card(report(), metrics={"eval_accuracy": 0.72, "eval_loss": 0.6}, baseline=baseline,
                      dataset="builtin:rotten_tomatoes").text
    assert "| metric | dense model | this model | share of dense kept |" in text
    assert "| accuracy | 0.8 | 0.72 | 90.0% |" in text and "| loss | 0.5 | 0.6 | - |" in text


# ---------------------------------------------------------------------------------------------- packaging
def test_the_template_is_package_data_that_ships_in_the_wheel():
    """What hf_px reads from beside its code at run time is matched by pyproject's package-data (the wheel
    install in .ci/run proves it end to end)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package = ROOT / "hf_px"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["hf_px"]
    data_files = [p.relative_to(package).as_posix() for p in package.rglob("*")
                  if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts
                  and not (p.suffix == ".py" and (p.parent / "__init__.py").exists())]
    assert data_files, "hf_px reads no data files?"
    for rel in data_files:
        assert any(fnmatch(rel, pattern) for pattern in patterns), f"{rel} is not in the wheel's package-data"
    assert resources.files("hf_px.export").joinpath("templates/default.md").is_file()
    assert not (ROOT / "model_cards").exists()  # one template, inside the package


def test_card_round_trips_through_readme(tmp_path):
    card = build_card(report(), base_model="builtin:minilm", dataset="builtin:rotten_tomatoes",
                      metrics={"eval_accuracy": 0.8}, pipeline_tag="text-classification")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == card.data.to_dict()
    assert json.loads(json.dumps(loaded.data.to_dict()))["base_model"] == MINILM_HUB


def test_a_speed_planned_model_shows_its_measured_latency():
    speed = {"target_speedup": 2.0, "shapes": [
        {"batch": 1, "tokens": 32, "dense_ms": 10.0, "ms": 4.0, "speedup": 2.5, "threads": 1},
        {"batch": 32, "tokens": 64, "dense_ms": 300.0, "ms": 150.0, "speedup": 2.0, "threads": 1}]}
    shrink = {"blocks_removed": 1, "num_blocks": 6, "ffn_width": 384, "ffn_fraction": 0.25}
    text = str(build_card({"method": "none (not pruned)", "layers": [], "speed": speed, "shrink": shrink},
                          base_model="builtin:minilm"))
    assert "## Speed" in text and "1 of 6 blocks removed" in text and "FFN width 384 (25.0% of the original)" in text
    assert "| 1 x 32 | 10.00 | 4.00 | 2.50x |" in text and "| 32 x 64 | 300.00 | 150.00 | 2.00x |" in text
    assert "## Speed" not in str(build_card({"method": "none (not pruned)", "layers": []}, base_model="builtin:minilm"))
    assert "below the target" not in text and "no candidate reached" not in text


def test_a_speed_card_says_where_the_target_was_missed():
    speed = {"target_speedup": 2.0, "shapes": [
        {"batch": 1, "tokens": 32, "dense_ms": 10.0, "ms": 4.0, "speedup": 2.5, "threads": 1},
        {"batch": 32, "tokens": 64, "dense_ms": 300.0, "ms": 200.0, "speedup": 1.5, "threads": 1}]}
    shrink = {"blocks_removed": 2, "num_blocks": 6, "ffn_width": 384, "ffn_fraction": 0.25, "target_met": False}
    text = str(build_card({"method": "none (not pruned)", "layers": [], "speed": speed, "shrink": shrink},
                          base_model="builtin:minilm"))
    assert "no candidate reached it on that machine" in text
    assert "measured below the target at 32 x 64" in text and "below the target at 1 x 32" not in text


def test_a_shrunk_unpruned_model_says_what_was_done_and_is_tagged_for_it():
    shrink = {"blocks_removed": 2, "num_blocks": 6, "ffn_width": 576, "ffn_fraction": 0.375}
    card = build_card({"method": "none (not pruned)", "layers": [], "shrink": shrink,
                       "speed": {"target_speedup": 2.0, "shapes": []}}, base_model="builtin:minilm")
    text = str(card)
    assert "not pruned" not in text
    assert "2 of 6 blocks removed and FFN width cut to 576 (dense weights, no unstructured sparsity)" in text
    assert {"pcn", "layer-pruning"} <= set(card.data.tags) and "sparse" not in card.data.tags
    plain = build_card({"method": "none (not pruned)", "layers": []}, base_model="builtin:minilm")
    assert "not pruned" in str(plain) and "layer-pruning" not in plain.data.tags
