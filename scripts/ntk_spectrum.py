"""Empirical NTK spectrum of the packaged MiniLM, dense vs each method's mask (the paper's spectrum claim).

Θ = J Jᵀ with J = ∂logits/∂θ over the prunable matrices, for ``--examples`` held-out sentences (all logits, so
Θ is (examples·labels) square). A pruned model's Θ uses its own (zeroed) weights and only its kept coordinates
(a pruned weight is frozen at zero, so its Jacobian column leaves the kernel). Every method prunes a fresh copy
of the same model with the same calibration batches. Reported: trace ratio tr Θ_m / tr Θ_dense, λ_max ratio,
the relative distance of the normalised spectra and ‖Θ_m − Θ‖_F / ‖Θ‖_F. Writes results/ntk_spectrum.json,
and a PNG of the eigenvalues when matplotlib is importable (skipped otherwise).

Run:  .venv/bin/python scripts/ntk_spectrum.py [--sparsity 0.8] [--rounds 3] [--methods px,magnitude,...]
      .venv/bin/python scripts/ntk_spectrum.py --model tiny     # random 2-layer BERT, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

import hf_px
from hf_px.builtin import minilm_path
from hf_px.data import calibration_batches, load_dataset_any
from hf_px.modeling import load_model, load_processor
from hf_px.pruning.report import format_table
from hf_px.pruning.targets import collect_targets


def empirical_ntk(model, inputs: dict, masks: dict | None) -> torch.Tensor:
    """J Jᵀ (float64) over the prunable weights, one backward per output; pruned coordinates excluded."""
    params = {t.param_name: t.param for t in collect_targets(model)}
    names = list(params)
    model.eval()
    with torch.enable_grad():
        logits = model(**inputs).logits
        flat = logits.flatten()
        rows = []
        for i in range(flat.numel()):
            grads = torch.autograd.grad(flat[i], [params[n] for n in names], retain_graph=i < flat.numel() - 1)
            parts = [g.flatten() if masks is None else g[masks[n]].flatten() for n, g in zip(names, grads, strict=True)]
            rows.append(torch.cat(parts).double())
    jac = torch.stack(rows)
    return jac @ jac.T


def compare(dense: torch.Tensor, other: torch.Tensor) -> dict:
    ev_d, ev_o = torch.linalg.eigvalsh(dense).flip(0), torch.linalg.eigvalsh(other).flip(0)
    shape = (ev_o / ev_o.sum() - ev_d / ev_d.sum()).norm() / (ev_d / ev_d.sum()).norm()
    return {"trace_ratio": float(other.trace() / dense.trace()), "lambda_max_ratio": float(ev_o[0] / ev_d[0]),
            "spectrum_shape_dist": float(shape), "kernel_rel_dist": float((other - dense).norm() / dense.norm()),
            "eigenvalues": ev_o.tolist()}


def build(kind: str):
    if kind == "tiny":
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=256, num_labels=2, attn_implementation="eager")
        return BertForSequenceClassification(cfg).eval()
    torch.manual_seed(0)  # the new classifier head
    return load_model(minilm_path(), "sequence-classification", num_labels=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    p.add_argument("--methods", default="px,magnitude,snip,grasp,synflow,wanda,random")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=4, help="held-out sentences in the kernel")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/ntk_spectrum.json")
    p.add_argument("--plot", default="results/ntk_spectrum.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_processor(minilm_path())
    dd = load_dataset_any("builtin:rotten_tomatoes")
    calib = calibration_batches(dd["train"], tok, per_class=args.per_class, batch_size=16, max_length=64)
    held = dd["test"].select(range(args.examples))
    inputs = dict(tok(list(held["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt"))

    base = build(args.model)
    dense = empirical_ntk(base, inputs, None)
    ev = torch.linalg.eigvalsh(dense).flip(0)
    results = {"model": args.model, "sparsity": args.sparsity, "rounds": args.rounds, "examples": args.examples,
               "dense": {"trace": float(dense.trace()), "eigenvalues": ev.tolist()}, "methods": {}}
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        model = copy.deepcopy(base)
        res = hf_px.prune(model, calib, hf_px.PruneConfig(method=method, sparsity=args.sparsity, rounds=args.rounds),
                          progress=False)
        stats = compare(dense, empirical_ntk(model, inputs, res.masks))
        results["methods"][method] = stats
        rows.append([method, f"{stats['trace_ratio']:.4f}", f"{stats['lambda_max_ratio']:.4f}",
                     f"{stats['spectrum_shape_dist']:.3f}", f"{stats['kernel_rel_dist']:.3f}"])
        print(f"  {method} done", flush=True)
    print(f"{args.model}, sparsity {args.sparsity}, {args.rounds} rounds, NTK on {args.examples} held-out sentences "
          f"x 2 logits; dense trace {float(dense.trace()):.4g}, load {os.getloadavg()[0]:.1f}")
    print(format_table(["method", "tr ratio", "λmax ratio", "spectrum shape dist", "‖ΔΘ‖/‖Θ‖"], rows))

    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, dest)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {dest}; matplotlib is not installed: plot skipped")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(ev.clamp_min(1e-12).tolist(), "k--o", label="dense")
    for method, stats in results["methods"].items():
        ax.semilogy([max(v, 1e-12) for v in stats["eigenvalues"]], marker=".", label=method)
    ax.set(xlabel="index", ylabel="NTK eigenvalue", title=f"sparsity {args.sparsity}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"wrote {dest} and {args.plot}")


if __name__ == "__main__":
    main()
