"""The PNG plots of an ``hf-px run`` report and their captions, drawn from the report's data (``report.json``).

Every plot has a title, axis labels in words and text of at least 8 pt, laid out by matplotlib's constrained
layout so nothing is clipped; :func:`caption` gives the line ``report.md`` prints under it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# alt text of each plot (report.md and the model card link them under these names)
PLOTS = {
    "density": "per-layer density after pruning",
    "pcn_variance": "PCN: explained variance and width kept per layer",
    "curves": "fine-tuning: training loss and evaluation metrics",
    "sizes": "parameters, FLOPs and file size before and after",
}
HEATMAP_OVER = 40  # more matrices than this: a blocks x roles heat map instead of one bar per matrix
FONT = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
        "legend.fontsize": 8, "figure.titlesize": 11}
DPI = 110
SIZE_LABELS = {
    "params": "parameters",
    "nonzero_params": "non-zero parameters",
    "flops_per_token": "matmul FLOPs per token",
    "file_bytes": "weight file size",
}


def density_lines(data: dict[str, Any]) -> tuple[float | None, float | None]:
    """(target density, layer-collapse floor) of the pruning the report shows; None where unknown."""
    prune = data.get("prune") or {}
    if prune.get("target_sparsity") is None:
        return None, None
    target = 1.0 - float(prune["target_sparsity"])
    ratio = ((data.get("config") or {}).get("prune") or {}).get("min_density_ratio")
    return target, (None if not ratio else float(ratio) * target)


def _short_names(layers: list[dict[str, Any]]) -> list[str]:
    """``block 3 · q`` where the registry named the matrix, else its name without the common prefix."""
    if all(lay.get("block") is not None and lay.get("role") for lay in layers):
        return [f"block {lay['block']} · {lay['role']}" for lay in layers]
    names = [lay["name"].removesuffix(".weight") for lay in layers]
    parts = [n.split(".") for n in names]
    common = 0
    while len(names) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [".".join(p[common:]) for p in parts]


def _density(plt: Any, data: dict[str, Any]) -> Any:
    layers = data["prune"]["layers"]
    target, floor = density_lines(data)
    title = "Density per prunable matrix after pruning"
    grid = all(lay.get("block") is not None and lay.get("role") for lay in layers)
    if len(layers) > HEATMAP_OVER and grid:
        import numpy as np

        blocks = sorted({int(lay["block"]) for lay in layers})
        roles = list(dict.fromkeys(lay["role"] for lay in layers))
        cells = np.full((len(blocks), len(roles)), np.nan)
        for lay in layers:
            cells[blocks.index(int(lay["block"])), roles.index(lay["role"])] = lay["density"]
        fig, ax = plt.subplots(figsize=(max(4.5, 0.75 * len(roles) + 2.5), max(3.0, 0.2 * len(blocks) + 1.6)),
                               layout="constrained")
        top = max(float(np.nanmax(cells)), target or 0.0) or 1.0
        image = ax.imshow(cells, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_xticks(range(len(roles)), roles, rotation=30, ha="right")
        step = max(1, math.ceil(len(blocks) / 32))  # one label per row up to 32 rows, then every few
        ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
        ax.set(xlabel="matrix role", ylabel="block", title=title)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("density (kept fraction)")
        from matplotlib.lines import Line2D

        handles = []  # explained in a legend under the plot: text beside the colour bar would hit its ticks
        if target is not None:
            bar.ax.axhline(target, color="black", ls="--", lw=1.5)
            handles.append(Line2D([], [], color="black", ls="--", lw=1.5, label=f"target density {target:.3f}"))
        if floor is not None:
            bar.ax.axhline(floor, color="red", ls=":", lw=2)
            handles.append(Line2D([], [], color="red", ls=":", lw=2, label=f"layer-collapse floor {floor:.3f}"))
            at_floor = np.argwhere(cells <= floor * 1.02)  # matrices held up by the layer-collapse floor
            if len(at_floor):
                ax.scatter(at_floor[:, 1], at_floor[:, 0], marker="x", s=16, color="red", lw=1)
                handles.append(Line2D([], [], color="red", marker="x", ls="", label="matrix at the floor"))
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        return fig
    if len(layers) > HEATMAP_OVER:  # no block/role names (generic targets): density against the matrix's index
        fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
        ax.plot(range(len(layers)), [lay["density"] for lay in layers], "o", ms=3, color="tab:blue")
        ax.set(xlabel="prunable matrix (model order)", ylabel="density (kept fraction)", title=title, ylim=(0, None))
        line, legend_at = ax.axhline, "best"
    else:
        names = _short_names(layers)
        fig, ax = plt.subplots(figsize=(7, max(2.8, 0.24 * len(layers) + 1.4)), layout="constrained")
        y = list(range(len(layers)))[::-1]
        ax.barh(y, [lay["density"] for lay in layers], color="tab:blue", height=0.7)
        ax.set_yticks(y, names)
        ax.set(xlabel="density (kept fraction)", ylabel="matrix" if names[0].startswith("block") else
               "matrix (name)", title=title, xlim=(0, 1))
        line, legend_at = ax.axvline, "lower right"
    if target is not None:
        line(target, color="black", ls="--", lw=1.2, label=f"target density {target:.3f}")
    if floor is not None:
        line(floor, color="red", ls=":", lw=1.5, label=f"layer-collapse floor {floor:.3f}")
    if target is not None or floor is not None:
        ax.legend(loc=legend_at)
    return fig


def _pcn(plt: Any, data: dict[str, Any]) -> Any:
    pcn = data["pcn"]
    layers = pcn["layers"]
    x = list(range(len(layers)))
    labels = [f"{lay['layer']}" + ("" if lay["kind"] == "ffn" else f" {lay['kind']}") for lay in layers]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(min(11.0, max(5.5, 0.3 * len(layers) + 2.5)), 5.0),
                                      layout="constrained")
    bars = top.bar(x, [lay["explained_variance"] for lay in layers], color="tab:green", width=0.7)
    if len(layers) <= 12:
        top.bar_label(bars, fmt="%.4f", fontsize=8, padding=2)
    target = (pcn.get("config") or {}).get("variance")
    if target is not None:
        top.axhline(target, color="black", ls="--", lw=1.2, label=f"variance target {target:g}")
    low = min(lay["explained_variance"] for lay in layers)
    top.set(ylabel="explained variance\n(top components)", ylim=(max(0.0, min(0.9, low - 0.05)), 1.03),
            title="Explained variance of the principal components PCN used")
    top.set_yticks([t for t in top.get_yticks() if t <= 1.0 + 1e-9])  # the room above 1 is for the labels
    if pcn.get("undersampled"):  # said on the plot too: a wall of 1.0 bars looks like a perfect result
        top.text(0.01, 0.04, f"only {pcn.get('calibration_tokens', 0):,} calibration tokens, fewer than the components "
                 "kept: these values are 1 by construction", transform=top.transAxes, color="red", fontsize=8,
                 bbox={"facecolor": "white", "edgecolor": "red", "pad": 2})
    width = 0.38
    bottom.bar([i - width / 2 for i in x], [lay["width_before"] for lay in layers], width, color="tab:gray",
               label="width before")
    bottom.bar([i + width / 2 for i in x], [lay["width_after"] for lay in layers], width, color="tab:green",
               label="width kept")
    bottom.set(ylabel="width (units)", xlabel="block" if all(lay["kind"] == "ffn" for lay in layers) else
               "block and input", title="Width before and after PCN")
    long = any(len(lab) > 3 for lab in labels) and len(layers) > 8
    bottom.set_xticks(x, labels, rotation=90 if long else 0)
    step = max(1, math.ceil(len(layers) / 40))  # at most ~40 tick labels side by side
    for i, tick in enumerate(bottom.get_xticklabels()):
        tick.set_visible(i % step == 0)
    bottom.set_ylim(0, max(lay["width_before"] for lay in layers) * 1.1)
    handles = [h for ax in (top, bottom) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(f"PCN ({(pcn.get('config') or {}).get('mode', 'structured')}) on "
                 f"{pcn.get('calibration_tokens', 0):,} calibration tokens")
    return fig


def _curves(plt: Any, data: dict[str, Any]) -> Any:
    from matplotlib.ticker import MaxNLocator

    history = data["finetune"]["history"]
    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [r for r in history if r.get("event") == "eval"]
    few = len(losses) <= 30  # markers show single points; on long runs they would hide the line
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.4), layout="constrained")
    if losses:
        steps, values = zip(*losses, strict=True)
        left.plot(steps, values, "o-" if few else "-", ms=4, lw=1.2, label="training loss")
    eval_loss = [(r["step"], r["eval_loss"]) for r in evals if "eval_loss" in r]
    if eval_loss:
        steps, values = zip(*eval_loss, strict=True)
        left.plot(steps, values, "s--", ms=5, lw=1.2, color="tab:red", label="evaluation loss")
    left.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    if losses or eval_loss:
        left.legend(loc="best")
    keys = sorted({k for r in evals for k in r if k.startswith("eval_") and k != "eval_loss"
                   and isinstance(r[k], (int, float))})
    for key in keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        right.plot(*zip(*points, strict=True), "o-", ms=5, lw=1.2, label=key.removeprefix("eval_"))
    majority = (data.get("eval_labels") or {}).get("majority_accuracy")
    if majority is not None and "eval_accuracy" in keys:
        # drawn over the metric lines: dashes stay visible where the accuracy sits on the majority rate
        right.axhline(majority, color="dimgray", ls="--", lw=1.5, zorder=3, label=f"majority class {majority:.3f}")
    dense = ((data.get("teacher") or {}).get("metrics") or {}).get("eval_accuracy")
    if dense is not None and "eval_accuracy" in keys:
        right.axhline(dense, color="black", ls=":", lw=1.2, label=f"dense baseline {dense:.3f}")
    values = [r[k] for r in evals for k in keys if k in r]
    lines = [v for v in (majority, dense) if v is not None and "eval_accuracy" in keys]
    if values and min(values) > 0 and max(values) / min(values) > 50:  # e.g. perplexity beside an accuracy
        from matplotlib.ticker import ScalarFormatter

        right.set_yscale("log")
        right.yaxis.set_major_formatter(ScalarFormatter())
    elif values and max(values) <= 1.0:  # rates: room around the points and the reference lines
        lo, hi = min(values + lines), max(values + lines)
        right.set_ylim(max(0.0, lo - 0.1), min(1.0, hi + 0.1) + 0.02)
    right.set(xlabel="optimizer step", ylabel="metric on the evaluation split", title="Evaluation")
    if keys:
        right.legend(loc="best")
    else:
        right.text(0.5, 0.5, "no evaluation during fine-tuning", ha="center", va="center",
                   transform=right.transAxes)
    steps = {r["step"] for r in history if "loss" in r or r.get("event") == "eval"}
    for ax in (left, right):  # steps are whole numbers, also when a single point sets the range
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(steps) == 1:
            (only,) = steps
            ax.set_xlim(only - 1, only + 1)
    fig.suptitle("Fine-tuning")
    return fig


def _sizes(plt: Any, data: dict[str, Any]) -> Any:
    before, after = data["size"]["before"], data["size"]["after"]
    keys = [k for k in SIZE_LABELS if before.get(k) and after.get(k)]
    ratios = [after[k] / before[k] for k in keys]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(keys) + 1.6), layout="constrained")
    y = list(range(len(keys)))[::-1]
    ax.barh(y, ratios, color="tab:orange", height=0.6)
    for yi, k, r in zip(y, keys, ratios, strict=True):
        ax.text(r + 0.02, yi, f"x{r:.3f}  ({_human(before[k], k)} → {_human(after[k], k)})", va="center",
                fontsize=8)
    ax.axvline(1.0, color="black", ls="--", lw=1)
    ax.set_yticks(y, [SIZE_LABELS[k] for k in keys])
    ax.set_xlim(0, max(1.0, max(ratios)) * 1.75)  # room for the value labels right of the bars
    ax.set(xlabel="after ÷ before (dashed line: before = 1)", title="Size of the saved model relative to the start")
    return fig


def _human(value: float, key: str) -> str:
    """``3.98MB``, ``999k``: three significant digits and a unit (bytes for the file size, counts otherwise)."""
    units = ("B", "kB", "MB", "GB", "TB") if key == "file_bytes" else ("", "k", "M", "G", "T")
    value = float(value)
    for unit in units:
        if abs(value) < 999.5 or unit == units[-1]:
            break
        value /= 1000
    digits = 0 if abs(value) >= 99.95 or unit in ("", "B") else 1 if abs(value) >= 9.995 else 2
    return f"{value:.{digits}f}{unit}"


DRAW = {"density": _density, "pcn_variance": _pcn, "curves": _curves, "sizes": _sizes}


def wanted(data: dict[str, Any]) -> list[str]:
    """The plots the report's data can fill."""
    size = data.get("size") or {}
    before, after = size.get("before") or {}, size.get("after") or {}
    history = (data.get("finetune") or {}).get("history") or []
    have = {
        "density": bool((data.get("prune") or {}).get("layers")),
        "pcn_variance": bool((data.get("pcn") or {}).get("layers")),
        "curves": any("loss" in r or r.get("event") == "eval" for r in history),
        "sizes": any(before.get(k) and after.get(k) for k in SIZE_LABELS),
    }
    return [name for name in DRAW if have[name]]


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
    with plt.rc_context(FONT):
        for name in wanted(data):
            fig = DRAW[name](plt, data)
            try:
                fig.savefig(folder / f"{name}.png", dpi=DPI)
            finally:
                plt.close(fig)
            made[name] = f"{name}.png"
    return made


def caption(name: str, data: dict[str, Any]) -> str:
    """The line report.md prints under plot ``name``."""
    if name == "density":
        layers = data["prune"]["layers"]
        target, floor = density_lines(data)
        heat = len(layers) > HEATMAP_OVER and all(lay.get("block") is not None and lay.get("role") for lay in layers)
        text = f"Density (kept fraction) of each of the {len(layers)} prunable matrices after pruning"
        text += (": one cell per matrix, rows are blocks and columns matrix roles." if heat else
                 ", one bar per matrix.")
        if target is not None:
            text += (" On the colour bar, dashed" if heat else " Dashed line") + f": the target density {target:.3f}"
            if floor is not None:
                text += (f"; dotted{'' if heat else ' line'}: the layer-collapse floor {floor:.3f} "
                         "(prune.min_density_ratio x the target density, the least any matrix ranked by the global "
                         "threshold keeps)")
            text += "."
        if heat and floor is not None:
            text += " Red crosses mark the matrices held at the floor."
        return text
    if name == "pcn_variance":
        pcn = data["pcn"]
        note = (" Fewer calibration tokens than components in some layers: their explained variance is 1 by "
                "construction, not a measurement." if pcn.get("undersampled") else "")
        return ("Top: share of the activation variance in the principal components PCN used for each layer. "
                f"Bottom: the layer's width before and after PCN. {pcn.get('calibration_tokens', 0):,} "
                f"calibration tokens.{note}")
    if name == "curves":
        majority = (data.get("eval_labels") or {}).get("majority_accuracy")
        extra = (f" The grey dashed line is the accuracy of always predicting the most frequent evaluation label "
                 f"({majority:.3f}): a model at or below it has learnt nothing." if majority is not None else "")
        return ("Left: training loss (and evaluation loss) per optimizer step. Right: the evaluation metrics "
                "measured during fine-tuning." + extra)
    if name == "sizes":
        return ("Each quantity of the saved model divided by the starting model's (1 = unchanged); FLOPs count "
                "the multiply-adds of the non-zero Linear weights, see the size table.")
    return ""
