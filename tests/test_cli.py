"""The command line over the library: flags are names for config keys, HfPxError is one line, bugs show tracebacks."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from test_cli_prune import csv_data, tiny_ckpt  # noqa: F401 - fixtures

import hf_px
from hf_px.cli import build_parser, main
from hf_px.commands import finetune as finetune_cmd
from hf_px.commands import prune as prune_cmd
from hf_px.commands.flags import arg_docs, translate
from hf_px.modeling import Task, resolve_task, task_of
from hf_px.pipeline.config import SECTIONS, TASKS, all_keys


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _documented(key: str) -> str:
    """The config field's own ``Args:`` entry, read independently of the command line's lookup."""
    if key.startswith("prune.options."):
        from hf_px.pruning.scoring import SCORERS

        name = key.rsplit(".", 1)[1]
        return next(arg_docs(c.options_class)[name] for c in SCORERS.values()
                    if name in {f.name for f in dataclasses.fields(c.options_class)})
    section, name = key.split(".", 1)
    return arg_docs(SECTIONS[section][0])[name]


@pytest.mark.parametrize("module", [prune_cmd, finetune_cmd], ids=["prune", "finetune"])
def test_every_flag_is_a_config_key_with_that_fields_help(module):
    command = module.__name__.rsplit(".", 1)[1]
    parser = _subparser(command)
    valid = set(all_keys())
    actions = {s: a for a in parser._actions for s in a.option_strings}
    assert set(actions) == {f.name for f in module.FLAGS} | {"-h", "--help", "--no-progress"}
    for f in module.FLAGS:
        assert set(f.keys) <= valid, f.name
        documented = _documented(f.keys[0])
        assert documented and actions[f.name].help == documented, f.name


def test_every_config_key_is_a_run_flag():
    run_flags = {s for a in _subparser("run")._actions for s in a.option_strings}
    assert {f"--{k}" for k in all_keys()} <= run_flags


def test_flag_values_become_config_overrides(tmp_path):
    from hf_px.commands.flags import overrides

    args = _subparser("finetune").parse_args(["--model", "m", "--dataset", "d", "--output-dir", str(tmp_path),
                                              "--seed", "3", "--no-merge", "--metrics", "accuracy", "f1"])
    assert overrides(args, finetune_cmd.FLAGS) == {
        "model.name_or_path": "m", "data.dataset": "d", "finetune.output_dir": str(tmp_path), "finetune.seed": 3,
        "data.seed": 3, "finetune.merge_lora": False, "evaluate.metrics": ["accuracy", "f1"]}


def test_messages_in_config_keys_are_shown_with_flags():
    flags = prune_cmd.FLAGS + finetune_cmd.FLAGS
    assert translate("remap them, or set model.num_labels: 8 if those classes exist", flags) == \
        "remap them, or set --num-labels 8 if those classes exist"
    assert translate("Convert them, or set model.allow_pickle: true if you trust it.", flags) == \
        "Convert them, or pass --allow-pickle if you trust it."
    assert translate("set finetune.resume: false or choose another finetune.output_dir.", flags) == \
        "drop --resume or choose another --output-dir."
    # file names and keys the command has no flag for stay as they are
    assert translate("out/model.safetensors; set report.plots: true", flags) == \
        "out/model.safetensors; set report.plots: true"


def test_library_errors_name_config_keys_and_the_cli_names_flags(tiny_ckpt, csv_data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "hf_px.json").write_text("{}")
    config = {"model": {"name_or_path": str(tiny_ckpt)}, "data": {"dataset": str(csv_data), "text_column": "review"},
              "finetune": None, "output": {"output_dir": str(tmp_path / "run"), "model_dir": str(out)}}
    with pytest.raises(hf_px.HfPxError) as info:
        hf_px.run(config, progress=False)
    library = str(info.value)
    assert "output.model_dir" in library and "set output.overwrite: true to replace it" in library
    assert "--" not in library
    assert main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--output-dir", str(out)]) == 2
    cli = capsys.readouterr().err.strip()
    assert cli.startswith(f"hf-px prune: error: --output-dir {out} already holds") and "pass --overwrite" in cli
    assert "output.model_dir" not in cli and "output.overwrite" not in cli


def test_a_bug_shows_its_traceback_and_is_not_exit_2(tiny_ckpt, csv_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    from hf_px.pipeline import table

    def broken(ctx, tmp, summary):
        raise KeyError("an internal bug")

    stages = tuple(dataclasses.replace(s, work=broken) if s.name == "calibrate" else s for s in table.STAGES)
    monkeypatch.setattr(table, "STAGES", stages)
    rc = main(["prune", "--model", str(tiny_ckpt), "--dataset", str(csv_data), "--text-column", "review",
               "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "KeyError: 'an internal bug'" in err
    assert "internal error" in err and "hf-px prune: error:" not in err


def test_debug_shows_the_traceback_of_an_input_error(tmp_path, capsys):
    argv = ["prune", "--model", str(tmp_path / "missing"), "--dataset", "builtin:rotten_tomatoes",
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    quiet = capsys.readouterr().err
    assert "Traceback" not in quiet and quiet.count("\n") == 1
    assert main(["--debug", *argv]) == 2
    loud = capsys.readouterr().err
    assert "Traceback (most recent call last)" in loud and "ConfigError" in loud
    assert loud.strip().splitlines()[-1] == quiet.strip()


def test_one_task_enum_for_the_cli_the_run_config_and_the_loader():
    from transformers import BertConfig, GPT2Config, ViTConfig

    assert TASKS == ("auto", *(t.value for t in Task))
    for module in (prune_cmd, finetune_cmd):
        task = next(a for a in _subparser(module.__name__.rsplit(".", 1)[1])._actions if a.dest == "task")
        assert tuple(task.choices) == TASKS
    assert task_of(GPT2Config(architectures=["GPT2LMHeadModel"])) is Task.CAUSAL_LM
    assert task_of(BertConfig(architectures=["BertForSequenceClassification"])) is Task.SEQUENCE_CLASSIFICATION
    assert task_of(BertConfig(architectures=["BertModel"])) is Task.FEATURES
    # auto: a bare trunk gets its family's head (ViT: images) or a sequence-classification one
    assert resolve_task("auto", ViTConfig(architectures=["ViTModel"])) is Task.IMAGE_CLASSIFICATION
    assert resolve_task("auto", BertConfig(architectures=["BertForMaskedLM"])) is Task.SEQUENCE_CLASSIFICATION
    assert Task.CAUSAL_LM.pipeline_tag == "text-generation" and f"{Task.CAUSAL_LM}" == "causal-lm"
