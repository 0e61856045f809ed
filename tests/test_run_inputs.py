"""Bad inputs to ``hf-px run``: each is refused before any model is loaded or any output folder is created,
with one line that names the problem and the fix. (Disk full and SIGINT are in test_run.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_checkpoint
from transformers import BertForSequenceClassification, GPT2Config

from hf_px.pipeline import ConfigError, RunConfig
from hf_px.pipeline import run as run_pipeline
from hf_px.pipeline.checks import check_run

pytestmark = pytest.mark.slow  # the tokenizer comes from the packaged MiniLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "bert")


def write_csv(path: Path, rows: list[tuple], header: str = "text,label") -> str:
    path.write_text(header + "\n" + "".join(",".join(str(x) for x in r) + "\n" for r in rows))
    return str(path)


GOOD_ROWS = [(f"a fine sentence number {i}", i % 2) for i in range(40)]


@pytest.fixture
def setup(tmp_path, checkpoint):
    """(config dict, model folder copy, output dir) for a config that passes every check."""
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    data = write_csv(tmp_path / "data.csv", GOOD_ROWS)
    out = tmp_path / "out"
    cfg = {"model": {"name_or_path": str(model)}, "data": {"dataset": data, "per_class": 4},
           "prune": {"sparsity": 0.5, "rounds": 1}, "finetune": {"max_steps": 1},
           "output": {"output_dir": str(out)}}
    return cfg, model, out


def refused(cfg: dict, match: str, out: Path) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        run_pipeline(cfg, progress=False)
    message = str(info.value)
    assert "\n" not in message, message
    assert not out.exists(), "a refused run must not create its output folder"
    return message


def test_the_base_config_passes_so_each_refusal_below_is_caused_by_its_change(setup):
    cfg, _, out = setup
    plan = check_run(RunConfig.from_dict(cfg))
    assert plan.num_labels == 2 and len(plan.train) == 40 and not out.exists()


def test_missing_model_folder(setup, tmp_path):
    cfg, _, out = setup
    cfg["model"]["name_or_path"] = str(tmp_path / "no-such-model")
    refused(cfg, "does not exist; pass a checkpoint folder or a Hub id", out)


def test_corrupt_config_json(setup):
    cfg, model, out = setup
    (model / "config.json").write_text('{"model_type": "bert", "hidden_size": 3')
    refused(cfg, "config.json is corrupt .*re-save the checkpoint", out)


def test_truncated_weights(setup):
    cfg, model, out = setup
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused(cfg, "model.safetensors is corrupt or truncated", out)


def test_config_of_a_different_architecture(setup):
    cfg, model, out = setup
    GPT2Config(n_embd=32, n_layer=2, n_head=2).to_json_file(model / "config.json")
    refused(cfg, "describes a gpt2 model, but the weights do not belong to it", out)


def test_config_with_edited_sizes(setup):
    cfg, model, out = setup
    raw = json.loads((model / "config.json").read_text())
    raw["intermediate_size"] = 128
    (model / "config.json").write_text(json.dumps(raw))
    refused(cfg, "config.json implies .*does not match the weights", out)


def test_tokenizer_missing(setup):
    cfg, model, out = setup
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    refused(cfg, "no tokenizer in .*set model.tokenizer", out)


def test_dataset_path_missing(setup, tmp_path):
    cfg, _, out = setup
    cfg["data"]["dataset"] = str(tmp_path / "missing.csv")
    refused(cfg, "dataset file not found", out)


def test_label_column_missing(setup):
    cfg, _, out = setup
    cfg["data"]["label_column"] = "sentiment"
    refused(cfg, "label column 'sentiment' not found; available columns: text, label. Choose one with "
                 "data.label_column", out)


def test_labels_all_one_class(setup, tmp_path):
    cfg, _, out = setup
    cfg["data"]["dataset"] = write_csv(tmp_path / "one.csv", [(f"text {i}", 1) for i in range(20)])
    refused(cfg, "holds a single class .*fix the data", out)


def test_non_integer_labels(setup, tmp_path):
    cfg, _, out = setup
    cfg["data"]["dataset"] = write_csv(tmp_path / "float.csv", [(f"text {i}", i / 10) for i in range(20)])
    refused(cfg, "not integer class ids; convert it to integers", out)


def test_negative_labels(setup, tmp_path):
    cfg, _, out = setup
    cfg["data"]["dataset"] = write_csv(tmp_path / "neg.csv", [(f"text {i}", i % 2 - 1) for i in range(20)])
    refused(cfg, "negative values", out)


def test_empty_text(setup, tmp_path):
    cfg, _, out = setup
    rows = GOOD_ROWS[:10] + [("", 0), ("  ", 1)] + GOOD_ROWS[10:20]
    cfg["data"]["dataset"] = write_csv(tmp_path / "empty.csv", rows)
    refused(cfg, "2 rows of the train split have empty 'text' .*data.drop_empty_text: true", out)
    cfg["data"]["drop_empty_text"] = True
    assert len(check_run(RunConfig.from_dict(cfg)).train) == 20


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_sparsity_out_of_range(setup, value):
    cfg, _, out = setup
    cfg["prune"]["sparsity"] = value
    refused(cfg, r"sparsity must be in \[0, 1\)", out)


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_pcn_variance_out_of_range(setup, value):
    cfg, _, out = setup
    cfg["pcn"] = {"variance": value}
    refused(cfg, r"variance must be in \(0, 1\]", out)


def test_rounds_zero(setup):
    cfg, _, out = setup
    cfg["prune"]["rounds"] = 0
    refused(cfg, "rounds must be an integer >= 1", out)


def test_output_dir_not_writable(setup, tmp_path):
    cfg, _, _ = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cfg["output"]["output_dir"] = str(blocker / "out")
    refused(cfg, "cannot be written .* is a file", blocker / "out")
    if Path("/proc").is_dir():  # writes fail there even for root, which os.access would let through
        cfg["output"]["output_dir"] = "/proc/hf-px-test-out"
        refused(cfg, "cannot be written", Path("/proc/hf-px-test-out"))


def test_output_dir_with_someone_elses_files(setup):
    cfg, _, out = setup
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not empty and holds no hf-px run"):
        run_pipeline(cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_pickle_checkpoint_is_refused_unless_allowed(setup, checkpoint):
    cfg, model, out = setup
    weights = BertForSequenceClassification.from_pretrained(checkpoint).state_dict()
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")  # the old pickle format: loading it can run code
    refused(cfg, "pickle weights .*model.allow_pickle: true", out)
    cfg["model"]["allow_pickle"] = True
    assert check_run(RunConfig.from_dict(cfg)).task == "sequence-classification"


def test_num_labels_smaller_than_the_data_needs(setup, tmp_path):
    cfg, _, out = setup
    cfg["data"]["dataset"] = write_csv(tmp_path / "three.csv", [(f"text {i}", i % 3) for i in range(30)])
    cfg["model"]["num_labels"] = 2
    refused(cfg, "model.num_labels is 2 but the labels .* need 3 classes; set model.num_labels: 3", out)


def test_trained_head_with_other_labels(setup, tmp_path):
    cfg, _, out = setup
    cfg["data"]["dataset"] = write_csv(tmp_path / "three.csv", [(f"text {i}", i % 3) for i in range(30)])
    refused(cfg, "head has 2 labels but the data have 3; set model.num_labels: 3", out)
    cfg["model"]["num_labels"] = 3  # asking for a new head is fine
    assert check_run(RunConfig.from_dict(cfg)).num_labels == 3


def test_wrong_value_types_and_unknown_model_type(setup):
    cfg, _, out = setup
    cfg["prune"]["sparsity"] = "high"
    refused(cfg, "prune.sparsity must be float, got 'high'", out)
    cfg["prune"]["sparsity"] = 0.5
    cfg["model"] = {"from_config": {"model_type": "bertt"}, "tokenizer": cfg["model"]["name_or_path"]}
    refused(cfg, "unknown model_type 'bertt'", out)


def test_causal_lm_needs_num_batches(setup, tmp_path):
    cfg, _, out = setup
    cfg["model"] = {"from_config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2},
                    "tokenizer": cfg["model"]["name_or_path"], "task": "causal-lm"}
    refused(cfg, "set data.num_batches", out)


def test_broken_yaml_and_missing_file_through_the_cli(tmp_path, capsys):
    from hf_px.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and err.count("\n") == 1
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
