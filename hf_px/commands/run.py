"""hf-px run CONFIG: the whole pipeline from one YAML/JSON file, resumable, one folder per stage.

Every config key is also a flag (--prune.sparsity 0.8; values are read as YAML, so null, true and lists work).
hf-px prune and hf-px finetune are this pipeline with some stages off; their flags are names for these keys.
--help lists the everyday keys, --help-all every key.

examples:
  hf-px run scripts/configs/tiny-smoke.yaml --output-dir runs/smoke
  hf-px run scripts/configs/minilm-rotten-tomatoes.yaml --prune.sparsity 0.9 --force
  accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml -m hf_px run scripts/configs/tiny-smoke.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

from .flags import default_text, key_default, key_help, off_section, quiet_progress

HELP = "the whole pipeline from a YAML/JSON config (resumable, one folder per stage)"

# The keys `hf-px run --help` shows; --help-all shows every key. Every key is a flag either way.
EVERYDAY = (
    "model.name_or_path", "model.task", "model.num_labels", "model.tokenizer",
    "data.dataset", "data.dataset_config", "data.text_column", "data.label_column", "data.max_train_samples",
    "data.max_eval_samples", "data.per_class", "data.max_length",
    "pcn.variance", "pcn.width",
    "prune.method", "prune.sparsity", "prune.rounds", "prune.source",
    "teacher.checkpoint",
    "finetune.epochs", "finetune.learning_rate", "finetune.batch_size", "finetune.peft",
    "distill.temperature", "distill.alpha",
    "evaluate.metrics",
    "output.output_dir", "output.format", "output.model_dir", "output.overwrite",
    "push.enabled", "push.hub_model_id", "push.private",
    "report.plots",
)


class _HelpAll(argparse.Action):
    """``--help-all``: show the hidden keys' help too, print, exit (as ``--help`` does)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        for action in parser._actions:
            if getattr(action, "full_help", None) is not None:
                action.help = action.full_help
        parser.print_help()
        parser.exit()


def _section_title(section: str) -> str:
    if off_section(f"{section}.x"):
        return f"{section} (config section, off unless the file has it; any --{section}.KEY VALUE switches it on)"
    return f"{section} (config section; --{section}.KEY VALUE overrides the file)"


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from ..pipeline.config import SECTIONS, option_fields, section_fields

    options = option_fields()
    for section in SECTIONS:
        g = p.add_argument_group(_section_title(section))
        keys = [f"{section}.{f.name}" for f in section_fields(section)]
        for key in keys + (list(options) if section == "prune" else []):
            methods = [m for m, _ in options.get(key, ())]  # a method option names its methods
            text = (f"({', '.join(methods)}) " if methods else "") + key_help(key)
            default = default_text(key, key_default(key))
            full = f"{text} ({default})" if default else text
            action = g.add_argument(f"--{key}", dest=f"key:{key}", default=argparse.SUPPRESS, metavar="VALUE",
                                    help=full.replace("%", "%%"))
            action.full_help = action.help
            if key not in EVERYDAY:  # still a flag; --help-all shows it
                action.help = argparse.SUPPRESS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="%(prog)s [-h] [--help-all] CONFIG [--output-dir DIR] [--force] [--check] "
                       "[--target-speedup X] [--SECTION.KEY VALUE ...] [--set KEY=VALUE ...]")
    p.add_argument("config", help="YAML or JSON run config (examples: scripts/configs/*.yaml).")
    p.add_argument("--help-all", action=_HelpAll, help="show every config key, not only the everyday ones, and exit.")
    p.add_argument("--output-dir", default=None, help="run folder; same as --output.output_dir.")
    p.add_argument("--force", action="store_true", help="redo every stage, even complete ones.")
    p.add_argument("--target-speedup", type=float, default=None, metavar="X",
                   help="the fast preset: shrink the model (blocks removed, narrower FFNs) until it runs X times as "
                   "fast as dense on this CPU (sets the speed section's target_speedup and switches the section on).")
    p.add_argument("--verbose", action="store_true",
                   help="show transformers' and datasets' own logs and progress bars (hidden by default).")
    p.add_argument("--check", action="store_true", help="validate the config and inputs, write nothing, exit.")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars.")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set prune.sparsity=0.8 (repeatable).")
    add_config_flags(p)
    p.set_defaults(func=run)


def _value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import ConfigError

    out = {k[4:]: _value(v) for k, v in vars(args).items() if k.startswith("key:")}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. prune.sparsity=0.8), got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = _value(value)
    if args.output_dir is not None:
        out["output.output_dir"] = args.output_dir
    if getattr(args, "target_speedup", None) is not None:
        out["speed.target_speedup"] = args.target_speedup
    return out


def run(args: argparse.Namespace) -> int:
    from ..pipeline import RunConfig
    from ..pipeline import run as run_pipeline
    from ..pipeline.checks import check_run

    if args.no_progress:
        quiet_progress()
    overrides = overrides_from_args(args)
    if args.check:
        plan = check_run(RunConfig.from_file(args.config, overrides))
        print(f"config OK: task {plan.task}, {len(plan.train)} training examples, "
              f"{len(plan.eval) if plan.eval is not None else 0} evaluation examples; nothing written.")
        return 0
    try:
        result = run_pipeline(args.config, force=args.force, progress=not args.no_progress, overrides=overrides,
                              verbose=args.verbose)
    except KeyboardInterrupt:  # the pipeline said which stages are kept and how to resume
        return 130
    if not result.is_main_process:
        return 0
    summary = ", ".join(f"{k}={v}" for k, v in result.stages.items())
    print(f"[hf-px run] finished: {summary}")
    if result.metrics:
        print("[hf-px run] metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
    print(f"[hf-px run] report: {result.output_dir / 'report.md'}; model: {result.model_dir}")
    return 0
