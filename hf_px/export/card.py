"""The model card (``README.md``) of a pruned checkpoint, built with ``huggingface_hub``'s ``ModelCard``.

The YAML metadata comes from ``ModelCardData`` (never hand-written YAML); the body is the Jinja template
``model_cards/default.md`` filled with the pruning report, so the card always shows the measured numbers.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .hub import REPO_ID

DEFAULT_TEMPLATE = pathlib.Path(__file__).resolve().parents[2] / "model_cards" / "default.md"
TAGS = ["pruned", "sparse", "px", "pcn", "hf-px"]
REPO_PLACEHOLDER = "path/or/repo-id"
FORMAT_NOTES = {
    "dense": "standard `model.safetensors` with the pruned weights stored as zeros; stock "
    "`transformers` loads it, `hf-px` is not needed.",
    "sparse": "`model.sparse.safetensors` holds only the kept weights plus a packed bitmask per pruned matrix "
    "(layout in `hf_px.json`); load it with `hf_px.load`, which rebuilds the exact dense weights. Stock "
    "`from_pretrained` cannot read this file.",
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) else _fmt(value)


def _flat_metrics(metrics: dict | None, prefix: str = "") -> list[tuple[str, Any]]:
    """``{"eval": {"accuracy": 0.8}}`` -> ``[("eval/accuracy", 0.8)]``."""
    out: list[tuple[str, Any]] = []
    for key, value in (metrics or {}).items():
        if isinstance(value, dict):
            out += _flat_metrics(value, f"{prefix}{key}/")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def pipeline_tag_for(model: Any) -> str | None:
    """The Hub pipeline tag of a model or transformers config (its :class:`~hf_px.modeling.Task`); None for a
    head hf_px does not train."""
    from ..modeling import Task, task_of

    task = task_of(model)
    return None if task is Task.FEATURES else task.pipeline_tag


def base_model_license(base_model: str | None) -> str | None:
    """The ``license`` in a local base model folder's ``README.md`` metadata, if there is one."""
    if not base_model or not os.path.isdir(base_model):
        return None
    readme = pathlib.Path(base_model) / "README.md"
    if not readme.exists():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a broken upstream card must not stop saving
        return None


def _pcn_section(pcn: Any) -> dict | None:
    if not pcn:
        return None
    if not isinstance(pcn, dict):
        return {"columns": [], "rows": [], "settings": [("PCN", _fmt(pcn))]}
    layers = pcn.get("layers") if isinstance(pcn.get("layers"), list) else []
    columns: list[str] = []
    for layer in layers:
        columns += [k for k in layer if k not in columns]
    rows = [[_fmt(layer.get(c, "")) for c in columns] for layer in layers]
    settings = [(k, _fmt(v)) for k, v in pcn.items() if k != "layers"]
    return {"columns": columns, "rows": rows, "settings": settings}


def load_snippet(format: str, repo_id: str | None, pipeline_tag: str | None) -> str:
    """The code that loads this checkpoint: stock transformers for dense, ``hf_px.load`` for sparse."""
    repo = repo_id or REPO_PLACEHOLDER
    if format == "sparse":
        return f'import hf_px  # pip install hf-px\n\nmodel = hf_px.load("{repo}")'
    from ..modeling import Task

    # the stock class that reloads a dense checkpoint: its task's
    cls = next((t.auto_class.__name__ for t in Task if t.pipeline_tag == pipeline_tag), "AutoModel")
    return f'from transformers import {cls}\n\nmodel = {cls}.from_pretrained("{repo}")'


def build_card(
    report: dict,
    base_model: str | None = None,
    license: str | None = None,
    dataset: str | None = None,
    metrics: dict | None = None,
    format: str = "dense",
    pipeline_tag: str | None = None,
    template_path: str | os.PathLike | None = None,
    repo_id: str | None = None,
    plots: list[tuple[str, str]] | None = None,
    baseline: list[dict] | None = None,
) -> ModelCard:
    """Render the model card of a pruned checkpoint.

    Args:
        report: ``PruneReport.to_dict()`` (method, target/achieved sparsity, layers, calibration...), with
            optional ``pcn`` and ``finetune`` sections.
        base_model: Hub id of the base model (a local folder is named in the text only, not in the metadata).
        license: license id; default: the base model folder's card license, if any.
        dataset: the dataset the metrics were measured on (``datasets`` metadata).
        metrics: ``{"accuracy": 0.81, ...}`` (nested dicts are flattened to ``a/b``); numbers go to
            ``model-index``.
        format: ``"dense"`` or ``"sparse"``; decides the format note and the load snippet.
        pipeline_tag: e.g. ``"text-classification"``.
        template_path: a Jinja markdown template; default ``model_cards/default.md``.
        repo_id: where the checkpoint will live, used in the load snippet.
        plots: ``(caption, relative path)`` of images stored with the checkpoint, shown in a Plots section.
        baseline: the dense model's scores beside this model's, as :func:`hf_px.finetuning.evaluation.baseline_rows` gives
            them (``metric``, ``dense``, ``value``, ``retained``); the Evaluation section then compares the two.

    Example:
        >>> card = build_card({"method": "px", "target_sparsity": 0.9, "achieved_sparsity": 0.9,
        ...                    "layers": []}, base_model="org/base", license="apache-2.0",
        ...                   metrics={"accuracy": 0.8}, pipeline_tag="text-classification")
        >>> card.data.base_model, card.data.eval_results[0].metric_value
        ('org/base', 0.8)
    """
    if format not in ("dense", "sparse"):
        raise ValueError(f"format must be 'dense' or 'sparse', got {format!r}.")
    template = pathlib.Path(template_path) if template_path else DEFAULT_TEMPLATE
    if not template.exists():
        raise FileNotFoundError(f"model card template {template} not found; pass template_path=.")
    base_model = base_model or report.get("base_model")
    hub_base = base_model if base_model and REPO_ID.match(base_model) and not os.path.exists(base_model) else None
    license = license or base_model_license(base_model)
    calibration = report.get("calibration") or {}
    dataset = dataset or calibration.get("dataset")
    flat = _flat_metrics(metrics)
    model_name = (repo_id or "").split("/")[-1] or (f"{hub_base.split('/')[-1]}-px" if hub_base else "pruned-model")

    eval_results = [
        EvalResult(task_type=pipeline_tag or "text-classification", dataset_type=dataset or "custom",
                   dataset_name=dataset or "custom", metric_type=name.split("/")[-1], metric_name=name,
                   metric_value=float(value))
        for name, value in flat
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    data = ModelCardData(
        base_model=hub_base, library_name="transformers", pipeline_tag=pipeline_tag, tags=list(TAGS),
        datasets=[dataset] if dataset else None, license=license, model_name=model_name,
        eval_results=eval_results or None,
    )

    achieved, target = report.get("achieved_sparsity"), report.get("target_sparsity")
    pruning_rows = [
        ("method", _fmt(report.get("method", "unknown"))),
        ("base model", _fmt(base_model or "unknown")),
        ("target sparsity", _pct(target)),
        ("achieved sparsity", _pct(achieved)),
        ("rounds", _fmt(report.get("rounds"))),
        ("prunable weights", _fmt(report.get("prunable_params"))),
        ("kept weights", _fmt(report.get("kept_params"))),
        ("total parameters", _fmt(report.get("total_params"))),
        ("pruning time", f"{report['time_s']:.1f} s" if isinstance(report.get("time_s"), (int, float)) else None),
    ]
    layers = [
        {"name": layer.get("name"), "shape": " × ".join(str(s) for s in layer.get("shape", [])),
         "numel": _fmt(layer.get("numel")), "density": _fmt(layer.get("density"))}
        for layer in report.get("layers") or []
    ]
    summary = (
        f"{f'`{base_model}`' if base_model else 'The base model'} pruned to {_pct(achieved)} sparsity "
        f"(target {_pct(target)}) "
        f"with `{report.get('method', 'unknown')}`."
    )
    return ModelCard.from_template(
        data,
        template_path=str(template),
        model_title=model_name,
        summary=summary,
        format=format,
        format_note=FORMAT_NOTES[format],
        load_snippet=load_snippet(format, repo_id, pipeline_tag),
        pruning_rows=[(k, v) for k, v in pruning_rows if v not in (None, "None")],
        calibration_rows=[(k, _fmt(v)) for k, v in calibration.items() if v is not None],
        layers=layers,
        pcn=_pcn_section(report.get("pcn")),
        finetune_rows=[(k, _fmt(v)) for k, v in (report.get("finetune") or {}).items()],
        metric_rows=[(k, _fmt(v)) for k, v in flat],
        baseline_rows=[(r["metric"], _fmt(r["dense"]), _fmt(r["value"]),
                        "-" if r["retained"] is None else f"{100 * r['retained']:.1f}%") for r in baseline or []],
        eval_dataset=dataset,
        plots=plots or [],
    )
