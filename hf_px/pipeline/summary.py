"""``report.json``, ``report.md``, the PNG plots and the model card of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .context import random_init_config
from .plots import PLOTS, caption, draw_plots
from .stages import write_json_atomic, write_new

__all__ = ["PLOTS", "collect", "draw_plots", "model_stats", "render_markdown", "write_card", "write_report"]

FLOPS_NOTE = ("FLOPs per token count 2 x the weights of every Linear layer (blocks, pooler, heads), non-zero ones "
              "only (what a sparse kernel multiplies); embedding lookups and attention scores are not counted. "
              "`before` is the starting checkpoint, whose weights are all counted as non-zero. The PCN section uses "
              "the same count on the dense model.")


def model_stats(model: nn.Module, folder: Path | None = None, meta: bool = False) -> dict[str, Any]:
    """Parameter and non-zero counts, matmul FLOPs per token and weight-file bytes.

    FLOPs follow :func:`hf_px.pcn.structured.linear_flops` (2 x the weights of every Linear layer): the count of
    the non-zero weights, and of all of them (``dense_flops_per_token``). ``meta=True`` (a skeleton without
    weights) counts every weight as non-zero.
    """
    from ..pcn.structured import linear_flops

    total = sum(p.numel() for p in model.parameters())
    dense = linear_flops(model)
    if meta:
        nonzero, flops = total, dense
    else:
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        flops = linear_flops(model, nonzero=True)
    stats: dict[str, Any] = {"params": total, "nonzero_params": nonzero, "flops_per_token": flops,
                             "dense_flops_per_token": dense}
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


def eval_labels(ctx: Any) -> dict[str, Any] | None:
    """The evaluation split's label counts and the accuracy of always answering the most frequent label (the
    floor a classifier must beat); None without labels (causal LM, features)."""
    data, column = ctx.plan.eval, ctx.plan.label_column
    if data is None or not column or column not in getattr(data, "column_names", ()):
        return None
    counts: dict[str, int] = {}
    for y in data[column]:
        counts[str(y)] = counts.get(str(y), 0) + 1
    if not counts:
        return None
    top = max(counts, key=counts.__getitem__)
    return {"counts": counts, "majority": top, "majority_accuracy": counts[top] / sum(counts.values())}


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
                                           "prunable_params", "kept_params", "total_params", "time_s", "layers")}
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
    out["eval_labels"] = eval_labels(ctx)
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
        lines += pcn_lines(data["pcn"])
    ft = data.get("finetune")
    if ft:
        lines += ["", "## Fine-tuning", "", f"{_num(ft.get('steps'))} optimizer steps on {_num(ft.get('world_size'))} "
                  f"process(es); final metrics: " + ", ".join(f"{k} {_num(v)}" for k, v in
                                                               (ft.get("metrics") or {}).items())]
    if data.get("baseline"):
        teacher = data["teacher"]
        steps, student = teacher.get("steps"), (ft or {}).get("steps")
        same = f"with the same recipe ({_num(steps)} steps)" if steps == student or student is None else \
            f"with the same recipe but {_num(steps)} steps, against this model's {_num(student)}"
        where = f"`{teacher['checkpoint']}`" if teacher.get("checkpoint") else f"the starting model fine-tuned {same}"
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
    for key, label in SIZE_ROWS.items():
        b, a = size["before"].get(key), size["after"].get(key)
        ratio = f"{a / b:.3f}" if a and b else "-"
        lines.append(f"| {label} | {_num(b)} | {_num(a)} | {ratio} |")
    lines += ["", FLOPS_NOTE]
    if prune and prune.get("prunable_params") and size["after"].get("params"):
        lines += ["", prunable_share(prune, size["after"]["params"])]
    if plots:
        lines += ["", "## Plots"]
        for name, file in plots.items():  # a caption line under each plot
            lines += ["", f"![{PLOTS[name]}]({plot_prefix}{file})", "", f"*{caption(name, data)}*"]
    return "\n".join(lines) + "\n"


SIZE_ROWS = {"params": "parameters", "nonzero_params": "non-zero parameters",
             "flops_per_token": "matmul FLOPs per token", "file_bytes": "weight file bytes"}


def prunable_share(prune: dict[str, Any], params: int) -> str:
    """Why "80% sparsity" removes far fewer of all parameters: it counts the prunable matrices only."""
    prunable, kept = prune["prunable_params"], prune.get("kept_params") or 0
    removed = prunable - kept
    return (f"Sparsity counts the prunable matrices only (the Linear weights inside the blocks): "
            f"{_num(prunable)} of the model's {_num(params)} parameters ({_share(prunable / params)}). The "
            f"embeddings, norms, biases, pooler and head stay dense, so {_share(prune['achieved_sparsity'])} "
            f"sparsity zeroes {_num(removed)} weights, {_share(removed / params)} of all parameters: that is why "
            "the non-zero parameters drop only a little while the FLOPs per token drop with the sparsity.")


def pcn_lines(pcn: dict[str, Any]) -> list[str]:
    """The report's PCN section: widths, explained variance, the calibration sample and the FLOPs."""
    calib = pcn.get("calibration") or {}
    sample = f" ({_num(calib['examples'])} examples drawn for PCN)" if calib.get("examples") else ""
    lines = ["", "## PCN", "", f"Measured on {_num(pcn.get('calibration_tokens'))} calibration tokens{sample}."]
    if pcn.get("undersampled"):
        lines[-1] += (" **Fewer tokens than the components some layers keep:** their PCA is rank-deficient and "
                      "an explained variance of 1.0 there says nothing about the layer; give PCN more calibration "
                      "data (`pcn.calibration_factor`, a larger training split or longer examples).")
    if pcn.get("flops_before") and pcn.get("flops_after"):
        lines += ["", f"Matmul FLOPs per token of the dense model (the size table's definition): "
                  f"{_num(pcn['flops_before'])} -> {_num(pcn['flops_after'])} "
                  f"(x{pcn['flops_after'] / pcn['flops_before']:.3f}); parameters {_num(pcn.get('params_before'))} "
                  f"-> {_num(pcn.get('params_after'))}."]
    lines += ["", "| layer | kind | width | explained variance |", "| --- | --- | --- | ---: |"]
    lines += [f"| {lay['layer']} | {lay['kind']} | {lay['width_before']} -> {lay['width_after']} | "
              f"{lay['explained_variance']:.4f} |" for lay in pcn["layers"]]
    return lines


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
    # a from_config model has no name: keep what the prune stage recorded ("from_config:bert")
    report["base_model"] = ctx.cfg.model.name_or_path or report.get("base_model")
    report["calibration"] = data.get("calibration") or {}
    if data.get("pcn"):
        report["pcn"] = data["pcn"]
    if data.get("finetune"):
        report["finetune"] = {k: v for k, v in ctx.cfg.to_dict()["finetune"].items()
                              if k in ("epochs", "max_steps", "learning_rate", "batch_size", "peft", "seed")}
        if ctx.cfg.distill is not None:
            report["finetune"]["distill"] = (f"from the dense teacher, T={ctx.cfg.distill.temperature:g}, "
                                             f"alpha={ctx.cfg.distill.alpha:g}")
        if ctx.cfg.gradual is not None:
            report["finetune"]["gradual"] = f"every {ctx.cfg.gradual.every} steps until {ctx.cfg.gradual.end:.0%}"
    if data.get("speed"):
        report["speed"], report["shrink"] = data["speed"], data.get("shrink")
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir), trust_remote_code=ctx.cfg.model.trust_remote_code)
    tag = pipeline_tag_for(config)
    plots = [(PLOTS[name], path) for name, path in data.get("plots", {}).items()]
    # the load snippet names a repo only when this run really pushes there
    card = build_card(report, base_model=report["base_model"], dataset=ctx.cfg.data.dataset,
                      metrics=data.get("evaluate"), format=ctx.cfg.output.format, pipeline_tag=tag,
                      repo_id=ctx.cfg.push.hub_model_id if ctx.cfg.push.enabled else None, plots=plots,
                      baseline=data.get("baseline"), dataset_config=ctx.cfg.data.dataset_config)
    # a new file, never written into: model_dir's other files are hard links to the save stage's
    write_new(model_dir / "README.md", str(card))
    return {"plots_linked": len(plots), "pipeline_tag": tag}
