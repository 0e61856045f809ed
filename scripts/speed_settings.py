"""bench_speed's settings: the configurations it compares, its command line, and the keys that name the cached
model folders (a recipe setting changes the folder, so a changed recipe never reuses a model trained with another).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import bench_recovery as recovery

# name -> what is done to the pretrained model, in this order: plan (fast preset), blocks, pcn, px
CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {},
    "px90": {"px": 0.9},
    "px90-csr": {"same_as": "px90", "kernels": "auto"},
    "pcn50": {"pcn": 0.5},
    "pcn25": {"pcn": 0.25},
    "pcn50-px80": {"pcn": 0.5, "px": 0.8},
    "blocks": {"blocks": True},
    "blocks-top": {"blocks": True, "order": "top"},
    "pcn25-top1": {"pcn": 0.25, "blocks": 1, "order": "top"},
    "fast": {"plan": True, "px": "fast"},
    "fast-hidden": {"plan": True, "px": "fast", "hidden": True},
    "fast-teacher": {"plan": True, "px": "fast", "source": "teacher"},
    "fast-teacher-hidden": {"plan": True, "px": "fast", "source": "teacher", "hidden": True},
    "fast-teacher-e3": {"plan": True, "px": "fast", "source": "teacher", "epochs": 3},
    "fast-teacher-e5": {"plan": True, "px": "fast", "source": "teacher", "epochs": 5},
    "fast-teacher-hidden-e3": {"plan": True, "px": "fast", "source": "teacher", "hidden": True, "epochs": 3},
}
DEFAULT_SHAPES = "1x32,1x128,32x64"
# the recipe settings a configuration's accuracy depends on: a change gives a new model folder
RECIPE_KEYS = ("model", "train_size", "eval_size", "epochs", "steps", "lr", "batch_size", "max_length", "per_class",
               "rounds", "temperature", "alpha", "seed", "remove_blocks", "fast_target", "fast_sparsity",
               "plan_shapes", "plan_runs", "plan_blocks", "plan_ffn", "pcn_examples", "hidden_weight")
# the settings only one configuration depends on: they name its own folder, so changing the fast preset does not
# retrain the others
PLAN_KEYS = ("fast_target", "fast_sparsity", "plan_shapes", "plan_runs", "plan_blocks", "plan_ffn", "pcn_examples")
# left out of a folder's name while unset, so the folders made before they existed still match
UNSET_SKIPPED = ("plan_blocks", "plan_ffn", "pcn_examples")
OWN_KEYS = {"blocks": ("remove_blocks",), "blocks-top": ("remove_blocks",),
            **{name: PLAN_KEYS + (("hidden_weight",) if spec.get("hidden") else ())
               for name, spec in CONFIGS.items() if spec.get("plan")}}
TIMING_KEYS = ("dense_ms", "ms", "speedup", "threads", "load_average", "runs", "timing_id")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of BATCHxTOKENS shapes to time")
    p.add_argument("--runs", type=int, default=15, help="interleaved timing rounds per shape (the median counts)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for training and timing")
    p.add_argument("--retime", action="store_true",
                   help="time again even when --out already has timings of every selected configuration")
    p.add_argument("--recipe", default="demo-e1", help="name of the recipe, stored in every record")
    p.add_argument("--model", default=recovery.PACKAGED, help="model folder or Hub id (default: the packaged MiniLM)")
    p.add_argument("--seed", type=int, default=0, help="head init, calibration sample, data order")
    recovery.add_recipe_arguments(p)
    p.add_argument("--hidden-weight", type=float, default=1.0,
                   help="the *-hidden configurations: weight of matching every kept block's output to the teacher "
                        "block it was (MSE), on top of the logits")
    p.add_argument("--remove-blocks", type=int, default=3, help="blocks removed by the 'blocks' configuration")
    p.add_argument("--fast-target", type=float, default=2.0, help="the fast preset's target speed-up")
    p.add_argument("--fast-sparsity", type=float, default=0.0,
                   help="PX sparsity after the fast preset's plan (default 0: with dense kernels it buys no speed, "
                   "and 50%% cost 0.8 points on one seed)")
    p.add_argument("--plan-shapes", default="",
                   help="shapes the fast preset plans for (default: SpeedConfig's own, 1x32, 1x128 and 32x64)")
    p.add_argument("--plan-runs", type=int, default=None, help="timing rounds per planned candidate "
                   "(default: SpeedConfig's own)")
    p.add_argument("--plan-blocks", type=int, default=None,
                   help="the fast preset removes this many blocks instead of planning it (with --plan-ffn: the "
                        "same shape on every seed, whatever the machine's load)")
    p.add_argument("--plan-ffn", type=float, default=None,
                   help="the fast preset's FFN width as a fraction of the original, instead of planning it")
    p.add_argument("--pcn-examples", type=int, default=None,
                   help="the fast preset narrows the FFNs from a PCA of this many training examples (hf-px run "
                        "draws at least 2 tokens per FFN unit); default: the pruning calibration sample")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: every configuration on 64 examples, 2 steps, 2 PX rounds, 2 timing runs "
                   "(records go to WORK_DIR/speed-quick.json unless --out is given)")
    p.add_argument("--work-dir", default="results/recovery-work",
                   help="bench_recovery's teacher cache; the fine-tuned configurations go to WORK_DIR/speed/")
    p.add_argument("--out", default=None, help="records (default results/speed.json)")
    p.add_argument("--summary-only", action="store_true", help="print the table from --out, run nothing")
    return p


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    args = build_parser(description).parse_args(argv)
    if args.quick:
        args.train_size, args.eval_size, args.steps, args.rounds, args.per_class = 64, 64, 2, 2, 4
        args.runs, args.plan_runs, args.recipe = 2, 1, "quick"
    if args.out is None:
        args.out = str(Path(args.work_dir) / "speed-quick.json") if args.quick else "results/speed.json"
    unknown = [c for c in config_list(args) if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    parse_shapes(args.shapes)
    return args


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [(int(b), int(t)) for b, _, t in (s.strip().partition("x") for s in text.split(",") if s.strip())]
    except ValueError:
        raise SystemExit(f"shapes must look like 1x32,32x64; got {text!r}") from None
    if not shapes or any(b < 1 or t < 1 for b, t in shapes):
        raise SystemExit(f"shapes must be positive BATCHxTOKENS pairs; got {text!r}")
    return shapes


def config_list(args: argparse.Namespace) -> list[str]:
    return [c for c in args.configs.split(",") if c]


def recipe_params(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in RECIPE_KEYS}


def recipe_id(args: argparse.Namespace, teacher_folder: Path | str) -> str:
    # the teacher is part of the recipe: a student distilled from another teacher is another result
    own = {k for keys in OWN_KEYS.values() for k in keys}
    common = {k: v for k, v in recipe_params(args).items() if k not in own}
    blob = json.dumps([common, Path(teacher_folder).name], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def recovery_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_recovery's namespace with this run's recipe, so its teacher cache key and fine-tuning match."""
    rargs = recovery.build_parser().parse_args([])
    for key in ("model", "train_size", "eval_size", "epochs", "steps", "lr", "batch_size", "max_length",
                "per_class", "rounds", "temperature", "alpha", "threads", "work_dir"):
        setattr(rargs, key, getattr(args, key))
    return rargs


def model_dir(args: argparse.Namespace, dataset: str, rid: str, name: str) -> Path:
    own = {k: getattr(args, k) for k in OWN_KEYS.get(name, ())
           if k not in UNSET_SKIPPED or getattr(args, k) is not None}
    tag = f"-{hashlib.sha1(json.dumps(own, sort_keys=True).encode()).hexdigest()[:8]}" if own else ""
    return Path(args.work_dir) / "speed" / f"{dataset}-seed{args.seed}-{rid}" / f"{name}{tag}"


def speed_config(args: argparse.Namespace) -> Any:
    from hf_px.speed.plan import SpeedConfig

    kwargs: dict[str, Any] = {"target_speedup": args.fast_target}
    if args.plan_shapes:
        kwargs["shapes"] = tuple(parse_shapes(args.plan_shapes))
    if args.plan_runs is not None:
        kwargs["runs"] = args.plan_runs
    if args.plan_blocks is not None:
        kwargs["blocks_removed"] = args.plan_blocks
    if args.plan_ffn is not None:
        kwargs["ffn_fraction"] = args.plan_ffn
    return SpeedConfig(**kwargs)
