"""``report.json``, ``report.md``, the PNG plots and the model card of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import is_linear_like
from .context import random_init_config
from .stages import write_json_atomic

PLOTS = {
    "density": "per-layer density after pruning",
    "pcn_variance": "PCN: explained variance and width kept per layer",
    "curves": "fine-tuning: training loss and evaluation metrics",
    "sizes": "parameters, FLOPs and file size before and after",
}


def _linear_weights(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and is_linear_like(module):
            out.append(w)
    return out


def model_stats(model: nn.Module, folder: Path | None = None, meta: bool = False) -> dict[str, Any]:
    """Parameter and non-zero counts, matmul FLOPs per token (2 x non-zero Linear weights) and weight-file bytes.

    ``meta=True`` (a skeleton without weights) counts every weight as non-zero.
    """
    total = sum(p.numel() for p in model.parameters())
    lin = _linear_weights(model)
    if meta:
        nonzero, lin_nonzero = total, sum(w.numel() for w in lin)
    else:
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        lin_nonzero = sum(int(torch.count_nonzero(w)) for w in lin)
    stats: dict[str, Any] = {"params": total, "nonzero_params": nonzero, "flops_per_token": 2 * lin_nonzero,
                             "dense_flops_per_token": 2 * sum(w.numel() for w in lin)}
    if folder is not None:
        stats["file_bytes"] = weight_file_bytes(folder)
    return stats


def weight_file_bytes(folder: Path) -> int | None:
    files = [p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    return sum(p.stat().st_size for p in files) if files else None


def source_stats(ctx: Any) -> dict[str, Any]:
    """Stats of the starting checkpoint from a meta-device skeleton (no weights read)."""
    import transformers

    from ..modeling import CLASSIFICATION_TASKS

    plan = ctx.plan
    if ctx.cfg.model.from_config is not None:
        config, folder = random_init_config(ctx), None
    else:
        config = transformers.AutoConfig.from_pretrained(plan.model_path,
                                                         trust_remote_code=ctx.cfg.model.trust_remote_code,
                                                         gguf_file=ctx.cfg.model.gguf_file)
        folder = Path(plan.model_path) if Path(plan.model_path).is_dir() else None
        if plan.task in CLASSIFICATION_TASKS:
            config.num_labels = plan.num_labels
    with torch.device("meta"):
        skeleton = plan.task.auto_class.from_config(config, trust_remote_code=ctx.cfg.model.trust_remote_code)
    stats = model_stats(skeleton, meta=True)
    stats["file_bytes"] = (weight_file_bytes(folder) if folder else None) or 4 * stats["params"]
    return stats


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _history(ctx: Any) -> list[dict[str, Any]]:
    path = ctx.stage_path("finetune") / "metrics.jsonl"
    if not ctx.has("finetune") or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(ctx: Any) -> dict[str, Any]:
    """Every number the report shows, from the stages' folders."""
    out: dict[str, Any] = {"config": ctx.cfg.to_dict(), "stages": {}}
    for name, stage in ctx.stages.items():
        man = stage.manifest() or {}
        out["stages"][name] = {"folder": stage.path.name, "elapsed_s": man.get("elapsed_s"),
                               "summary": man.get("summary", {})}
    out["calibration"] = out["stages"].get("calibrate", {}).get("summary")
    out["pcn"] = _read(ctx.stage_path("pcn") / "pcn.json") if ctx.has("pcn") else None
    prune = _read(ctx.stage_path("prune") / "prune_report.json") if ctx.has("prune") else None
    if prune:
        prune = {k: prune.get(k) for k in ("method", "target_sparsity", "achieved_sparsity", "rounds",
                                           "prunable_params", "kept_params", "time_s", "layers")}
    saved_meta = _read(ctx.stage_path("save") / "model" / "hf_px.json") if ctx.has("save") else None
    final = ((saved_meta or {}).get("metadata") or {}).get("report") or {}
    if prune and final.get("gradual"):  # gradual pruning: the final masks are the save stage's, not 04-prune's
        prune.update({k: final[k] for k in ("target_sparsity", "achieved_sparsity", "kept_params", "layers")},
                     initial_sparsity=prune["achieved_sparsity"], gradual=final["gradual"])
    out["prune"] = prune
    history = _history(ctx)
    out["finetune"] = {"history": history, **(out["stages"].get("finetune", {}).get("summary") or {})} \
        if ctx.has("finetune") else None
    out["evaluate"] = out["stages"].get("evaluate", {}).get("summary", {}).get("metrics")
    teacher = out["stages"].get("teacher", {}).get("summary")
    out["teacher"] = {k: teacher.get(k) for k in ("metrics", "steps", "checkpoint")} if teacher else None
    if teacher and out["evaluate"]:
        from ..finetuning.evaluation import baseline_rows

        out["baseline"] = baseline_rows(out["evaluate"], teacher.get("metrics"))
    saved = out["stages"]["save"]["summary"]
    out["size"] = {"before": source_stats(ctx), "after": {k: v for k, v in saved.items() if k not in ("format", "speed")}}
    out["speed"] = saved.get("speed")
    out["shrink"] = out["stages"].get("shrink", {}).get("summary") if ctx.has("shrink") else None
    return out


# ------------------------------------------------------------------------------------------------ plots
def draw_plots(data: dict[str, Any], folder: Path) -> dict[str, str]:
    """PNG files under ``folder``; returns {plot name: file name}. Empty when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    def done(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=90)
        plt.close(fig)
        made[name] = f"{name}.png"

    layers = (data.get("prune") or {}).get("layers") or []
    if layers:
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(layers) + 1)))
        names = [lay["name"] for lay in layers][::-1]
        ax.barh(names, [lay["density"] for lay in layers][::-1], color="tab:blue")
        target = 1 - (data["prune"].get("target_sparsity") or 0)
        ax.axvline(target, color="k", ls="--", lw=1, label=f"target density {target:.3f}")
        ax.set(xlabel="density (kept fraction)", xlim=(0, 1))
        ax.tick_params(axis="y", labelsize=6)
        ax.legend(fontsize=7)
        done(fig, "density")
    pcn_layers = (data.get("pcn") or {}).get("layers") or []
    if pcn_layers:
        fig, ax = plt.subplots(figsize=(7, 3))
        x = list(range(len(pcn_layers)))
        ax.bar(x, [lay["explained_variance"] for lay in pcn_layers], color="tab:green", label="explained variance")
        ax.plot(x, [lay["width_after"] / max(lay["width_before"], 1) for lay in pcn_layers], "ko-",
                label="width kept / width")
        ax.set(xticks=x, xticklabels=[f"{lay['layer']}:{lay['kind']}" for lay in pcn_layers], ylim=(0, 1.05),
               xlabel="layer")
        ax.legend(fontsize=7)
        done(fig, "pcn_variance")
    history = (data.get("finetune") or {}).get("history") or []
    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [r for r in history if r.get("event") == "eval"]
    if losses or evals:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3))
        if losses:
            axes[0].plot(*zip(*losses, strict=True), "o-", ms=3)
        axes[0].set(xlabel="optimizer step", ylabel="training loss")
        for key in sorted({k for r in evals for k in r if k.startswith("eval_")}):
            axes[1].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-", label=key)
        axes[1].set(xlabel="optimizer step", ylabel="evaluation")
        if evals:
            axes[1].legend(fontsize=7)
        done(fig, "curves")
    size = data.get("size") or {}
    before, after = size.get("before") or {}, size.get("after") or {}
    keys = [k for k in ("nonzero_params", "flops_per_token", "file_bytes") if before.get(k) and after.get(k)]
    if keys:
        fig, ax = plt.subplots(figsize=(6, 3))
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], [1.0] * len(keys), 0.4, label="before", color="tab:gray")
        ratios = [after[k] / before[k] for k in keys]
        ax.bar([i + 0.2 for i in x], ratios, 0.4, label="after", color="tab:orange")
        for i, r in zip(x, ratios, strict=True):
            ax.text(i + 0.2, r, f"x{r:.3f}", ha="center", va="bottom", fontsize=7)
        ax.set(xticks=list(x), xticklabels=keys, ylabel="relative to before")
        ax.legend(fontsize=7)
        done(fig, "sizes")
    return made


# ------------------------------------------------------------------------------------------------ markdown
def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


def _share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def render_markdown(data: dict[str, Any], plots: dict[str, str], plot_prefix: str) -> str:
    lines = ["# hf-px run report", ""]
    lines += ["| stage | folder | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {n} | `{s['folder']}` | {_num(s['elapsed_s'])} |" for n, s in data["stages"].items()]
    prune = data.get("prune")
    if prune:
        lines += ["", "## Pruning", "", f"`{prune['method']}`: target sparsity {_num(prune['target_sparsity'])}, "
                  f"achieved {_num(prune['achieved_sparsity'])} over {_num(prune['prunable_params'])} prunable "
                  f"weights in {_num(prune['rounds'])} rounds ({_num(prune['time_s'])} s).", ""]
        if prune.get("gradual"):
            g = prune["gradual"]
            lines[-1:] = [f"Gradual: one-shot to {_num(prune['initial_sparsity'])} before fine-tuning, then "
                          f"re-scored every {g['every']} steps on a cubic schedule, final from {_share(g['end'])} "
                          "of the steps; the densities below are the final masks.", ""]
        lines += ["| matrix | weights | density |", "| --- | ---: | ---: |"]
        lines += [f"| `{lay['name']}` | {_num(lay['numel'])} | {lay['density']:.4f} |" for lay in prune["layers"]]
    if data.get("pcn"):
        lines += ["", "## PCN", "", "| layer | kind | width | explained variance |", "| --- | --- | --- | ---: |"]
        lines += [f"| {lay['layer']} | {lay['kind']} | {lay['width_before']} -> {lay['width_after']} | "
                  f"{lay['explained_variance']:.4f} |" for lay in data["pcn"]["layers"]]
    ft = data.get("finetune")
    if ft:
        lines += ["", "## Fine-tuning", "", f"{_num(ft.get('steps'))} optimizer steps on {_num(ft.get('world_size'))} "
                  f"process(es); final metrics: " + ", ".join(f"{k} {_num(v)}" for k, v in
                                                               (ft.get("metrics") or {}).items())]
    if data.get("baseline"):
        teacher = data["teacher"]
        where = f"`{teacher['checkpoint']}`" if teacher.get("checkpoint") else \
            f"the starting model fine-tuned with the same recipe ({_num(teacher.get('steps'))} steps)"
        lines += ["", "## Evaluation: dense baseline vs this model", "", f"Dense baseline: {where}.", "",
                  "| metric | dense | this model | share of dense kept |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['metric']} | {_num(r['dense'])} | {_num(r['value'])} | {_share(r['retained'])} |"
                  for r in data["baseline"]]
    elif data.get("evaluate"):
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | ---: |"]
        lines += [f"| {k} | {_num(v)} |" for k, v in data["evaluate"].items()]
    lines += speed_lines(data)
    size = data["size"]
    lines += ["", "## Size", "", "| | before | after | ratio |", "| --- | ---: | ---: | ---: |"]
    for key in ("params", "nonzero_params", "flops_per_token", "file_bytes"):
        b, a = size["before"].get(key), size["after"].get(key)
        ratio = f"{a / b:.3f}" if a and b else "-"
        lines.append(f"| {key} | {_num(b)} | {_num(a)} | {ratio} |")
    lines += ["", "FLOPs per token count 2 x the non-zero weights of the Linear layers (what a sparse kernel "
              "multiplies); `before` is the starting checkpoint, whose weights are all counted as non-zero."]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{PLOTS[name]}]({plot_prefix}{file})" for name, file in plots.items()]
    return "\n".join(lines) + "\n"


def speed_lines(data: dict[str, Any]) -> list[str]:
    """The report's speed section: what the shrink stage removed and the latency measured after saving."""
    speed, shrink = data.get("speed"), data.get("shrink")
    if not speed:
        return []
    lines = ["", "## Speed", ""]
    if shrink:
        lines += [f"Planned for a {_num(speed['target_speedup'])}x speed-up: {shrink['blocks_removed']} of "
                  f"{shrink['num_blocks']} blocks removed (lowest PX scores), FFN width {shrink['ffn_width']} "
                  f"({_share(shrink['ffn_fraction'])} of the original)"
                  + ("." if shrink.get("target_met") else "; no shape reached the target, the fastest was used."), ""]
    lines += ["| batch x tokens | dense ms | this model ms | speed-up |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['batch']} x {r['tokens']} | {r['dense_ms']:.2f} | {r['ms']:.2f} | {r['speedup']:.2f}x |"
              for r in speed["shapes"]]
    threads = speed["shapes"][0].get("threads") if speed["shapes"] else None
    lines += ["", f"Measured on this machine after saving, side by side with the starting model (interleaved calls, "
              f"medians; {threads} torch thread(s)); ratios, not absolute times, carry over to other machines."]
    return lines


def write_report(ctx: Any, tmp: Path) -> dict[str, Any]:
    data = collect(ctx)
    plots = draw_plots(data, tmp / "plots") if ctx.cfg.report.plots else {}
    data["plots"] = {name: f"plots/{file}" for name, file in plots.items()}
    write_json_atomic(tmp / "report.json", data)
    (tmp / "report.md").write_text(render_markdown(data, plots, "plots/"), encoding="utf-8")
    return {"plots": sorted(plots)}


def publish_report(ctx: Any) -> None:
    """Copies of report.json / report.md at the top of the run folder, plots linked into the report stage."""
    folder = ctx.stage_path("report")
    data = json.loads((folder / "report.json").read_text())
    data["plots"] = {k: f"{folder.name}/{v}" for k, v in data["plots"].items()}
    write_json_atomic(ctx.root / "report.json", data)
    plots = {k: Path(v).name for k, v in data["plots"].items()}
    md = render_markdown(data, plots, f"{folder.name}/plots/")
    tmp = ctx.root / ".report.md.tmp"
    tmp.write_text(md, encoding="utf-8")
    tmp.replace(ctx.root / "report.md")


def write_card(ctx: Any, model_dir: Path) -> dict[str, Any]:
    from ..export.card import build_card, pipeline_tag_for
    from .stages import copy_tree

    data = json.loads((ctx.stage_path("report") / "report.json").read_text())
    if (ctx.stage_path("report") / "plots").exists():
        copy_tree(ctx.stage_path("report") / "plots", model_dir / "plots")
    report = dict(data.get("prune") or {"method": "none (not pruned)", "layers": []})
    report["base_model"] = ctx.cfg.model.name_or_path
    report["calibration"] = data.get("calibration") or {}
    if data.get("pcn"):
        report["pcn"] = data["pcn"]
    if data.get("finetune"):
        report["finetune"] = {k: v for k, v in ctx.cfg.to_dict()["finetune"].items()
                              if k in ("epochs", "max_steps", "learning_rate", "batch_size", "peft", "seed")}
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=ctx.cfg.model.trust_remote_code)
    tag = pipeline_tag_for(config)
    plots = [(PLOTS[name], path) for name, path in data.get("plots", {}).items()]
    card = build_card(report, base_model=ctx.cfg.model.name_or_path, dataset=ctx.cfg.data.dataset,
                      metrics=data.get("evaluate"), format=ctx.cfg.output.format, pipeline_tag=tag,
                      repo_id=ctx.cfg.push.hub_model_id, plots=plots, baseline=data.get("baseline"))
    card.save(model_dir / "README.md")
    return {"plots_linked": len(plots), "pipeline_tag": tag}
