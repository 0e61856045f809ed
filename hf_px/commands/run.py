"""``hf-px run CONFIG``: the whole pipeline from one YAML/JSON file, resumable, one folder per stage.

Every config key is also a flag (``--prune.sparsity 0.8``; values are read as YAML, so ``null``, ``true`` and
lists work). ``hf-px prune`` / ``hf-px finetune`` are this pipeline with some stages off; their flags are names
for these keys (``hf_px.commands.flags``).

examples:
  hf-px run scripts/configs/tiny-smoke.yaml --output.output_dir runs/smoke
  hf-px run scripts/configs/minilm-rotten-tomatoes.yaml --prune.sparsity 0.9 --force
  accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml -m hf_px run scripts/configs/tiny-smoke.yaml
"""

from __future__ import annotations

import argparse
from typing import Any

from .flags import key_default, key_help, quiet_progress


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from ..pipeline.config import SECTIONS, option_fields, section_fields

    for section in SECTIONS:
        g = p.add_argument_group(f"{section} (config section; --{section}.KEY VALUE overrides the file)")
        keys = [f"{section}.{f.name}" for f in section_fields(section)]
        for key in keys + (list(option_fields()) if section == "prune" else []):
            methods = [m for m, _ in option_fields().get(key, ())]  # a method option names its methods
            text = (f"({', '.join(methods)}) " if methods else "") + key_help(key)
            g.add_argument(f"--{key}", dest=f"key:{key}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{text} (default: {key_default(key)!r})".replace("%", "%%"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline from a YAML/JSON config (resumable, one folder per stage)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML or JSON run config (examples: scripts/configs/*.yaml).")
    p.add_argument("--output-dir", default=None, help="run folder; same as --output.output_dir.")
    p.add_argument("--force", action="store_true", help="redo every stage, even complete ones.")
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
        result = run_pipeline(args.config, force=args.force, progress=not args.no_progress, overrides=overrides)
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
