"""PX on a small BatchNorm CNN: which BatchNorm statistics (``PXOptions.bn``) prune better, ``running`` or ``batch``.

Run:  .venv/bin/python scripts/bench_px_bn.py [--seeds 0 1 2] [--sparsities 0.9 0.95] [--head fc --merge]
Prints a table and writes results/px_bn.json (docs/px.md §4 quotes it); ``--merge`` keeps the records of other
settings already in that file (e.g. a ``--head fc`` run added to the default one).

No image data set is reachable offline, so the task is synthetic: 10 classes of 16x16 images, each class a
prototype of random strokes, every example the prototype shifted by up to 2 pixels, rescaled, mixed with a
fainter prototype of another class and Gaussian noise. Two regimes, both with 10 calibration examples per class:

* ``transfer`` (the PX paper's setting, where running statistics mean something): a conv-BN-ReLU net is trained
  dense on a source task (other prototypes), gets a fresh classifier, is pruned on the target task and fine-tuned;
* ``init``: pruned at initialisation (running statistics still 0 and 1) and trained from scratch.

Everything else is the library's default PX (100 rounds, min_density_ratio 0.1); the head is pure (prunable,
unit weights in the A pass: the default) or, with ``--head fc``, raw (``head_modules=["fc"]``, the reference's).
``--arch flatten`` feeds the classifier the flattened last feature map instead of its global average: with the
average, a one-example train-mode BatchNorm right before it makes the B pass's output exactly β, so ``bn=batch``
gives every conv weight a zero (rounding-noise) score; the flattened map is the case without that degeneracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hf_px
from hf_px.pruning.masks import apply_masks

SIZE = 16


def prototypes(seed: int, classes: int = 10, strokes: int = 4) -> torch.Tensor:
    """One smooth random-stroke image per class: short line segments of random sign, blurred."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    out = torch.zeros(classes, SIZE, SIZE)
    for c in range(classes):
        for _ in range(strokes):
            x0, y0 = (torch.rand(2, generator=g) * (SIZE - 6) + 3).tolist()
            angle = float(torch.rand(1, generator=g)) * torch.pi
            length = 3 + float(torch.rand(1, generator=g)) * 5
            sign = 1.0 if float(torch.rand(1, generator=g)) < 0.7 else -1.0
            for t in torch.linspace(-length / 2, length / 2, 12).tolist():
                cx, cy = x0 + t * torch.cos(torch.tensor(angle)), y0 + t * torch.sin(torch.tensor(angle))
                out[c] += sign * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 1.5) / 4
    return out / out.flatten(1).norm(dim=1).view(-1, 1, 1) * SIZE / 4


def sample(protos: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples: shifted, rescaled prototypes plus a faint other-class prototype and noise."""
    g = torch.Generator().manual_seed(seed)
    classes = protos.shape[0]
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    other = (y + torch.randint(1, classes, (n,), generator=g)) % classes
    x = torch.empty(n, 1, SIZE, SIZE)
    shifts = torch.randint(-2, 3, (n, 4), generator=g).tolist()
    amp = 0.7 + 0.6 * torch.rand(n, generator=g)
    for i in range(n):
        main = torch.roll(protos[y[i]], shifts=(shifts[i][0], shifts[i][1]), dims=(0, 1))
        faint = torch.roll(protos[other[i]], shifts=(shifts[i][2], shifts[i][3]), dims=(0, 1))
        x[i, 0] = amp[i] * main + 0.3 * faint
    x += 0.4 * torch.randn(x.shape, generator=g)
    return x, y


class Net(nn.Module):
    """conv-BN-ReLU x3 (32, 64, 128 channels; the last two stride 2), then global average pooling (``gap``) or
    the flattened 4x4 map (``flatten``), then the classifier."""

    def __init__(self, classes: int = 10, arch: str = "gap") -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(64, 128, 3, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1) if arch == "gap" else nn.Flatten()
        self.fc = nn.Linear(128 if arch == "gap" else 128 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float,
          masks: dict | None = None) -> None:
    """Adam with cosine decay; pruned weights are zeroed again after every step, so the masks hold."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if masks is not None:
                apply_masks(model, masks)
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def calibration(x: torch.Tensor, y: torch.Tensor, per_class: int) -> list[torch.Tensor]:
    """The first ``per_class`` training examples of each class, as one batch (labels are never used)."""
    idx = torch.cat([torch.nonzero(y == c).squeeze(1)[:per_class] for c in range(int(y.max()) + 1)])
    return [x[idx]]


def run(args: argparse.Namespace) -> dict:
    records = []
    for seed in args.seeds:
        target_protos = prototypes(1000 + seed)
        xtr, ytr = sample(target_protos, args.train, seed=10 * seed + 1)
        xte, yte = sample(target_protos, args.test, seed=10 * seed + 2)
        calib = calibration(xtr, ytr, args.per_class)
        starts = {}
        if "transfer" in args.regimes:
            torch.manual_seed(seed)
            source = Net(arch=args.arch)
            xs, ys = sample(prototypes(2000 + seed), args.train, seed=10 * seed + 3)
            train(source, xs, ys, args.pretrain_epochs, seed, lr=2e-3)
            source.fc = nn.Linear(source.fc.in_features, 10)  # a fresh classifier for the target task, as in transfer learning
            starts["transfer"] = (source, args.finetune_epochs, 1e-3)
            if args.head == "pure":  # the dense baseline does not depend on the head rule: measured once
                dense = Net(arch=args.arch)
                dense.load_state_dict(source.state_dict())
                train(dense, xtr, ytr, args.finetune_epochs, seed, lr=1e-3)
                records.append({"regime": "transfer", "arch": args.arch, "head": "pure", "seed": seed, "sparsity": 0.0, "bn": "dense",
                                "accuracy": accuracy(dense, xte, yte)})
        if "init" in args.regimes:
            torch.manual_seed(seed)
            starts["init"] = (Net(arch=args.arch), args.scratch_epochs, 2e-3)
        for regime, (start, epochs, lr) in starts.items():
            for sparsity in args.sparsities:
                for bn in ("running", "batch"):
                    model = Net(arch=args.arch)
                    model.load_state_dict(start.state_dict())
                    t0 = time.perf_counter()
                    options = {"bn": bn, "head_modules": ["fc"] if args.head == "fc" else []}
                    result = hf_px.prune(model, calib, hf_px.PruneConfig(
                        method="px", sparsity=sparsity, rounds=args.rounds, options=options), progress=False)
                    prune_s = time.perf_counter() - t0
                    at_prune = accuracy(model, xte, yte)
                    train(model, xtr, ytr, epochs, seed, lr=lr, masks=result.masks)
                    rec = {"regime": regime, "arch": args.arch, "head": args.head, "seed": seed, "sparsity": sparsity, "bn": bn,
                           "accuracy": accuracy(model, xte, yte), "accuracy_at_prune": at_prune,
                           "achieved_sparsity": result.report["achieved_sparsity"], "prune_s": prune_s,
                           "layer_density": {r["name"]: r["density"] for r in result.report["layers"]}}
                    records.append(rec)
                    print(f"{regime:8s} {args.arch:7s} head {args.head:4s} seed {seed} sparsity {sparsity:.2f} bn={bn:7s} "
                          f"accuracy {rec['accuracy']:.4f}", flush=True)
    return {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "merge")}, "records": records,
            "machine": platform.machine(), "threads": torch.get_num_threads()}


def _key(r: dict) -> tuple:
    return r["regime"], r.get("arch", "gap"), r.get("head", "pure"), r["sparsity"], r["bn"]


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    for key in sorted({_key(r) for r in records}):
        acc = [r["accuracy"] for r in records if _key(r) == key]
        rows.append({**dict(zip(("regime", "arch", "head", "sparsity", "bn"), key, strict=True)), "seeds": len(acc),
                     "mean": statistics.fmean(acc), "std": statistics.pstdev(acc), "accuracies": acc})
    return rows


def table(summary: list[dict]) -> str:
    lines = [f"{'regime':9s} {'arch':7s} {'head':5s} {'sparsity':>8s} {'bn':8s} {'mean acc':>9s} {'std':>7s}  per seed"]
    for r in summary:
        per = " ".join(f"{a:.3f}" for a in r["accuracies"])
        lines.append(f"{r['regime']:9s} {r['arch']:7s} {r['head']:5s} {r['sparsity']:8.2f} {r['bn']:8s} "
                     f"{r['mean']:9.4f} {r['std']:7.4f}  {per}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--regimes", nargs="+", default=["transfer", "init"], choices=["transfer", "init"])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--scratch-epochs", type=int, default=8)
    parser.add_argument("--head", default="pure", choices=["pure", "fc"])
    parser.add_argument("--arch", default="gap", choices=["gap", "flatten"])
    parser.add_argument("--out", default="results/px_bn.json")
    parser.add_argument("--merge", action="store_true", help="keep the other settings' records already in --out")
    args = parser.parse_args(argv)
    out = run(args)
    path = Path(args.out)
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        mine = {(_key(r), r["seed"]) for r in out["records"]}
        kept = [{**r, "arch": r.get("arch", "gap"), "head": r.get("head", "pure")} for r in old["records"]
                if (_key(r), r["seed"]) not in mine]
        out["records"] = kept + out["records"]
        out["runs"] = [*old.get("runs", [old.get("settings")]), out.pop("settings")]
    else:
        out["runs"] = [out.pop("settings")]
    out["summary"] = summarise(out["records"])
    print(table(out["summary"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
