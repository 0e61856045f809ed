"""The command line over the library: flags are names for config keys, HfPxError is one line, bugs show tracebacks."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from test_cli_prune import csv_data, tiny_ckpt  # noqa: F401 - fixtures

import hf_px
from hf_px.cli import build_parser, main
from hf_px.commands import finetune as finetune_cmd
from hf_px.commands import prune as prune_cmd
from hf_px.commands.flags import CLI_HELP, arg_docs, key_help, plain_text, translate
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
    aliases = {a for f in module.FLAGS for a in f.aliases}
    assert set(actions) == {f.name for f in module.FLAGS} | aliases | {"-h", "--help", "--no-progress"}
    for f in module.FLAGS:
        assert set(f.keys) <= valid, f.name
        documented = _documented(f.keys[0])
        assert documented and actions[f.name].help == (f.help or key_help(f.keys[0])), f.name
        if not f.help and f.keys[0] not in CLI_HELP and f.keys[0] != "prune.method":
            assert actions[f.name].help == plain_text(documented), f.name  # the field's own words, as plain text


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


# ---------------------------------------------------------------------------------------------- start-up, help
def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (this one has torch loaded already) and return its stdout."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


HEAVY = ("torch", "transformers", "datasets", "hf_px.registry", "hf_px.pipeline", "hf_px.commands.prune",
         "hf_px.commands.run", "hf_px.commands.demo")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []], ids=["help", "version", "nothing"])
def test_top_level_help_and_version_import_nothing_heavy(argv):
    out = _run_python(
        "import contextlib, io, json, sys\n"
        "from hf_px.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as text:\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(json.dumps([text.getvalue(), [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    import json

    printed, loaded = json.loads(out)
    assert loaded == []
    if argv == ["--version"]:
        from importlib.metadata import version

        assert printed.strip() == f"hf-px {version('hf-px')}"
    else:
        assert all(name in printed for name in ("run", "prune", "finetune", "push", "demo"))


def test_a_command_imports_only_its_own_module():
    out = _run_python(
        "import sys\n"
        "from hf_px.cli import main\n"
        "try:\n"
        "    main(['push', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print([m for m in ('torch', 'hf_px.commands.prune', 'hf_px.commands.run') if m in sys.modules])\n")
    assert out.strip().splitlines()[-1] == "[]"


def test_the_static_command_list_matches_each_commands_own_help():
    from hf_px.cli import COMMANDS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    own = {a.dest: a.help for a in sub._choices_actions}
    assert own == {name: help_text for name, (_, help_text) in COMMANDS.items()}


def test_version_flag(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-px {version('hf-px')}"


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_run_help_shows_everyday_keys_and_help_all_every_key(capsys):
    from hf_px.commands.run import EVERYDAY

    assert set(EVERYDAY) <= set(all_keys())
    short, full = _help(["run", "--help"], capsys), _help(["run", "--help-all"], capsys)
    for key in all_keys():
        assert f"--{key} " in full or f"--{key}\n" in full, key
        assert (f"--{key} " in short or f"--{key}\n" in short) == (key in EVERYDAY), key
    assert "--help-all" in short
    # a hidden key is still a flag
    args = _subparser("run").parse_args(["c.yaml", "--finetune.lora_dropout", "0.2"])
    assert vars(args)["key:finetune.lora_dropout"] == "0.2"


# pointers into the source: a module path, a .py file, a docs page, a constant; reST markup
_CODE_POINTER = r"``|:\w+:`|\b[\w/]+\.py\b|\bdocs/|\bhf_px\.\w+\.\w+|\b(?!HF_)[A-Z][A-Z0-9]*_[A-Z0-9_]+\b"


def _all_help_texts() -> dict[str, str]:
    """flag -> help text of every command except the demo (run's hidden keys included)."""
    out = {}
    for command in ("run", "prune", "finetune", "push"):
        for action in _subparser(command)._actions:
            if getattr(action, "deprecated_alias", False) or not action.option_strings and action.dest == "help":
                continue
            text = getattr(action, "full_help", None) or action.help
            out[f"{command} {'/'.join(action.option_strings) or action.dest}"] = text
    return out


def test_every_help_text_is_plain_text_without_pointers_into_the_code():
    import re

    texts = _all_help_texts()
    assert len(texts) > len(all_keys())
    for where, text in texts.items():
        assert text and text != argparse.SUPPRESS and len(text.strip(" .")) > 5, where
        assert not re.search(_CODE_POINTER, text), (where, text)


def test_cli_wording_is_kept_only_for_real_keys_and_speaks_yaml():
    assert set(CLI_HELP) <= set(all_keys())
    assert plain_text("``x`` (None: off; :class:`~hf_px.GradualConfig`, True)") == "x (null: off; GradualConfig, true)"


def test_off_sections_say_their_defaults_apply_once_on(capsys):
    full = " ".join(_help(["run", "--help-all"], capsys).split())
    assert "(default 0.99 when pcn is on)" in full and "(default 2.0 when distill is on)" in full
    assert "(default 0.9)" in full  # prune is on by default: a plain default
    prune = " ".join(_help(["prune", "--help"], capsys).split())
    assert "[pcn.variance, default 0.99 when pcn is on]" in prune and "[prune.sparsity, default 0.9]" in prune


# ---------------------------------------------------------------------------------------------- one vocabulary
def test_a_flag_name_means_the_same_in_every_command():
    by_name: dict[str, set[str]] = {}
    for module in (prune_cmd, finetune_cmd):
        for f in module.FLAGS:
            by_name.setdefault(f.name, set()).add(f.keys[0])
    # --seed seeds what the command runs; --output-dir is where its result goes
    differ = {name for name, keys in by_name.items() if len(keys) > 1}
    assert differ == {"--seed", "--output-dir"}
    push = {s for a in _subparser("push")._actions for s in a.option_strings
            if not getattr(a, "deprecated_alias", False)}
    assert {"--hub-model-id", "--hub-private"} <= push
    assert {f.name for f in prune_cmd.PUSH} >= {"--hub-model-id", "--hub-private"}


def test_renamed_flags_still_work_hidden_with_a_deprecation_note(capsys, tmp_path):
    from hf_px.commands.flags import overrides

    args = _subparser("prune").parse_args(["--model", "m", "--output-dir", str(tmp_path), "--split", "dev",
                                           "--batch-size", "4", "--repo-id", "u/r", "--private"])
    assert overrides(args, prune_cmd.FLAGS) == {
        "model.name_or_path": "m", "output.model_dir": str(tmp_path), "data.train_split": "dev",
        "data.calibration_batch_size": 4, "push.hub_model_id": "u/r", "push.private": True}
    err = capsys.readouterr().err
    for old, new in (("--split", "--train-split"), ("--batch-size", "--calibration-batch-size"),
                     ("--repo-id", "--hub-model-id"), ("--private", "--hub-private")):
        assert f"{old} is deprecated; use {new}" in err
    push = _subparser("push").parse_args(["folder", "--repo-id", "u/r", "--private"])
    assert push.hub_model_id == "u/r" and push.hub_private is True
    for command in ("prune", "push"):
        text = _subparser(command).format_help()
        assert "--repo-id" not in text and "--private " not in text and "--split " not in text


def test_push_without_a_repo_is_a_one_line_error(tmp_path, capsys):
    assert main(["push", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("hf-px push: error: --hub-model-id is required: the Hub repo to "
                                               "upload to, e.g. user/minilm-px90.")


def test_misspelled_flags_are_never_pointed_at_a_deprecated_alias(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--model", "m", "--output-dir", str(tmp_path / "o"), "--privte"])
    err = capsys.readouterr().err
    assert "--hub-private instead of --privte" in err and "--private instead" not in err


# ---------------------------------------------------------------------------------------------- builtin:minilm
def test_builtin_names_resolve_in_one_place():
    from hf_px import builtin
    from hf_px.errors import ConfigError
    from hf_px.modeling import check_model_source

    path = builtin.resolve_model("builtin:minilm")
    assert (Path(path) / "config.json").is_file() and path == builtin.minilm_path()
    assert builtin.resolve_model("org/model") == "org/model" and builtin.resolve_model(None) is None
    assert builtin.hub_id("builtin:minilm") == builtin.hub_id(path) == "sentence-transformers/all-MiniLM-L6-v2"
    assert builtin.license_of("builtin:minilm") == "apache-2.0"
    check_model_source("builtin:minilm")  # checked as the folder it stands for
    with pytest.raises(ConfigError, match="unknown built-in model 'builtin:nope'; available: builtin:minilm"):
        builtin.resolve_model("builtin:nope")


@pytest.mark.slow
def test_load_model_and_processor_take_builtin_minilm():
    from hf_px.modeling import load_processor

    model = hf_px.load_model("builtin:minilm", "sequence-classification", num_labels=3)
    assert model.config.num_labels == 3 and model.config.model_type == "bert"
    assert load_processor("builtin:minilm")("a fine film")["input_ids"][0] == 101


@pytest.mark.slow
def test_prune_and_finetune_commands_take_builtin_minilm(tmp_path, capsys):
    small = ["--dataset", "builtin:rotten_tomatoes", "--max-length", "16", "--no-progress"]
    assert main(["prune", "--model", "builtin:minilm", "--method", "magnitude", "--sparsity", "0.5", "--rounds", "1",
                 "--per-class", "2", "--output-dir", str(tmp_path / "pruned"), *small]) == 0
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and str(tmp_path) not in card
    assert main(["finetune", "--model", "builtin:minilm", "--max-steps", "1", "--batch-size", "4",
                 "--max-train-samples", "8", "--max-eval-samples", "8", "--output-dir", str(tmp_path / "ft"),
                 *small]) == 0
    assert (tmp_path / "ft" / "model" / "model.safetensors").is_file()


def test_target_speedup_switches_the_speed_section_on():
    from hf_px.commands.run import overrides_from_args
    from hf_px.pipeline import RunConfig

    config = Path(__file__).resolve().parents[1] / "scripts" / "configs" / "minilm-rotten-tomatoes.yaml"
    args = _subparser("run").parse_args([str(config), "--target-speedup", "2.5"])
    cfg = RunConfig.from_file(args.config, overrides_from_args(args))
    assert cfg.speed is not None and cfg.speed.target_speedup == 2.5
    assert RunConfig.from_file(args.config).speed is None  # off unless asked for
