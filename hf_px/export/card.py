"""The model card (``README.md``) of a pruned checkpoint, built with ``huggingface_hub``'s ``ModelCard``.

The YAML metadata comes from ``ModelCardData`` and ``EvalResult`` (never hand-written YAML); the body is the Jinja
template ``templates/default.md`` shipped inside this package, filled with the pruning report, so the card
always shows the measured numbers. The body's tables and sections come from :mod:`.card_sections`, what the card
says about the base model and the data from :mod:`.card_provenance`.

A card is published, so it says only what is true and public:

* no path of the machine it was made on: a local base model, data file or folder is described ("a local
  checkpoint"), never named;
* ``base_model`` and ``datasets`` hold Hub ids only: a ``builtin:`` model or data set is named by the Hub repo it
  is a copy of, a local one is left out; the base model's license is carried over when it is known;
* ``model-index`` holds metric types the Hub knows (``accuracy``, not ``eval_accuracy``), and only for a data
  set on the Hub, since a result has to name one;
* tags name only what was applied (``pcn`` only after PCN, ``sparse`` only with zeros or the sparse format);
* a checkpoint stock ``transformers`` cannot load (the sparse format, PCN projection layers) says
  ``pip install hf-px`` and claims ``library_name: hf-px``, not ``transformers``.
"""

from __future__ import annotations

import os
import pathlib
from importlib import resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .card_provenance import (
    _dataset_name,
    _describe_base,
    _describe_dataset,
    base_model_hub_id,
    base_model_license,
    dataset_hub_id,
)
from .card_sections import (
    FORMAT_NOTES,
    LOCAL_PATH,
    REPO_PLACEHOLDER,
    _flat_metrics,
    _fmt,
    _pcn_projection,
    _pcn_section,
    _pct,
    _speed_section,
    load_snippet,
    metric_type,
)

# the card's public names, wherever they are defined
__all__ = [
    "FORMAT_NOTES", "HUB_METRICS", "LOCAL_PATH", "REPO_PLACEHOLDER", "TEMPLATE", "base_model_hub_id",
    "base_model_license", "build_card", "dataset_hub_id", "load_snippet", "metric_type", "pipeline_tag_for",
]

TEMPLATE = "templates/default.md"  # inside this package (shipped in the wheel as package data)
# Metric ids of the Hub's evaluation results (``model-index``); anything else (loss, runtime) stays in the text.
HUB_METRICS = frozenset({
    "accuracy", "f1", "precision", "recall", "perplexity", "matthews_correlation", "exact_match", "bleu", "rouge",
    "roc_auc", "mse", "mae", "pearsonr", "spearmanr", "wer", "cer", "squad",
})
# calibration report keys about the training and evaluation data, not the calibration sample
_NOT_CALIBRATION = frozenset({"train_examples", "eval_examples", "train_split", "eval_split"})


def pipeline_tag_for(model: Any) -> str | None:
    """The Hub pipeline tag of a model or transformers config (its :class:`~hf_px.modeling.Task`); None for a
    head hf_px does not train."""
    from ..modeling import Task, task_of

    task = task_of(model)
    return None if task is Task.FEATURES else task.pipeline_tag


def _template_text(template_path: str | os.PathLike | None) -> str:
    if template_path:
        path = pathlib.Path(template_path)
        if not path.is_file():
            raise FileNotFoundError(f"model card template {path} not found; pass an existing template_path.")
        return path.read_text(encoding="utf-8")
    # importlib.resources: the template is package data, found in a wheel install as in a source checkout
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def _tags(report: dict, pruned: bool, format: str) -> list[str]:
    """Tags for what was applied to this checkpoint, and nothing else."""
    finetune = report.get("finetune") if isinstance(report.get("finetune"), dict) else {}
    method = str(report.get("method") or "")
    tags = []
    if pruned:
        tags.append("pruned")
    if pruned or format == "sparse":
        tags.append("sparse")
    if pruned and method == "px":
        tags.append("px")
    if report.get("pcn") or (report.get("shrink") or {}).get("ffn_fraction", 1) < 1:
        tags.append("pcn")
    if (report.get("shrink") or {}).get("blocks_removed"):
        tags.append("layer-pruning")
    if finetune.get("distill"):
        tags.append("distillation")
    if finetune.get("peft") == "lora":
        tags.append("lora")
    return [*tags, "hf-px"]


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
    dataset_config: str | None = None,
) -> ModelCard:
    """Render the model card of a pruned checkpoint.

    Args:
        report: ``PruneReport.to_dict()`` (method, target/achieved sparsity, layers, calibration...), with
            optional ``pcn`` and ``finetune`` sections. ``{"method": "none (not pruned)", "layers": []}`` for a
            checkpoint that was only fine-tuned.
        base_model: what the checkpoint was made from: a Hub id, a local folder or a ``builtin:`` name (default:
            ``report["base_model"]``). The metadata gets its Hub id when there is one (see
            :func:`base_model_hub_id`); the text never shows a local path.
        license: license id; default: the base model's, when known offline (:func:`base_model_license`).
        dataset: the data set the metrics were measured on: a Hub id, a ``builtin:`` name or a local file (which
            the card describes but does not name); ``datasets`` metadata gets its Hub id only.
        metrics: ``{"eval_accuracy": 0.81, ...}`` (nested dicts are flattened to ``a/b``); Hub metric types
            (``accuracy``, ``f1``...) go to ``model-index`` when the data set is on the Hub.
        format: ``"dense"`` or ``"sparse"``; decides the format note, the load snippet and ``library_name``.
        pipeline_tag: e.g. ``"text-classification"``.
        template_path: a Jinja markdown template; default: the one shipped in ``hf_px/export/templates/``.
        repo_id: the Hub repo the checkpoint is pushed to, used in the load snippet (else a marked placeholder).
        plots: ``(caption, relative path)`` of images stored with the checkpoint, shown in a Plots section.
        baseline: the dense model's scores beside this model's, as :func:`hf_px.finetuning.evaluation.baseline_rows` gives
            them (``metric``, ``dense``, ``value``, ``retained``); the Evaluation section then compares the two.
        dataset_config: the Hub data set's configuration (e.g. ``sst2`` for ``glue``), for ``model-index``.

    Example:
        >>> card = build_card({"method": "px", "target_sparsity": 0.9, "achieved_sparsity": 0.9,
        ...                    "layers": []}, base_model="builtin:minilm", dataset="builtin:rotten_tomatoes",
        ...                   metrics={"eval_accuracy": 0.8}, pipeline_tag="text-classification")
        >>> card.data.base_model, card.data.license, card.data.eval_results[0].metric_type
        ('sentence-transformers/all-MiniLM-L6-v2', 'apache-2.0', 'accuracy')
    """
    if format not in ("dense", "sparse"):
        raise ValueError(f"format must be 'dense' or 'sparse', got {format!r}.")
    template = _template_text(template_path)
    base_model = base_model or report.get("base_model")
    hub_base = base_model_hub_id(base_model)
    license = license or base_model_license(base_model) or (base_model_license(hub_base) if hub_base else None)
    calibration = dict(report.get("calibration") or {})
    dataset = dataset or calibration.get("dataset")
    hub_dataset = dataset_hub_id(dataset)
    # top-level metrics are this model's own, shown by what they measure; nested groups keep their full name
    flat = [(name if "/" in name else metric_type(name), value) for name, value in _flat_metrics(metrics)]
    achieved, target = report.get("achieved_sparsity"), report.get("target_sparsity")
    method = str(report.get("method") or "unknown")
    pruned = not method.startswith("none") and (bool(report.get("layers")) or bool(achieved))
    projection = _pcn_projection(report)
    needs_hf_px = format == "sparse" or projection

    if hub_base:
        stem = hub_base.split("/")[-1]
        suffix = f"-{method}{round(100 * achieved)}" if pruned and isinstance(achieved, (int, float)) else "-hf-px"
        default_name = stem + suffix
    else:
        default_name = "pruned-model" if pruned else "model"
    model_name = (repo_id or "").split("/")[-1] or default_name

    known = [(name, float(value)) for name, value in flat
             if name in HUB_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)]
    eval_results = [
        EvalResult(task_type=pipeline_tag, dataset_type=hub_dataset, dataset_name=_dataset_name(dataset, hub_dataset),
                   dataset_config=dataset_config, metric_type=kind, metric_name=kind, metric_value=value)
        for kind, value in known
    ] if hub_dataset and pipeline_tag else []
    data = ModelCardData(
        base_model=hub_base, library_name="hf-px" if needs_hf_px else "transformers", pipeline_tag=pipeline_tag,
        tags=_tags(report, pruned, format), datasets=[hub_dataset] if hub_dataset else None, license=license,
        model_name=model_name, metrics=sorted({kind for kind, _ in known}) or None,
        eval_results=eval_results or None,
    )

    base_text = _describe_base(base_model, hub_base)
    pruning_rows = [
        ("method", _fmt(method)),
        ("base model", base_text or "not recorded"),
        ("target sparsity", _pct(target)),
        ("achieved sparsity", _pct(achieved)),
        ("rounds", _fmt(report.get("rounds"))),
        ("prunable weights", _fmt(report.get("prunable_params"))),
        ("kept weights", _fmt(report.get("kept_params"))),
        ("total parameters", _fmt(report.get("total_params"))),
        ("pruning time", f"{report['time_s']:.1f} s" if isinstance(report.get("time_s"), (int, float)) else None),
    ] if pruned else []
    layers = [
        {"name": layer.get("name"), "shape": " × ".join(str(s) for s in layer.get("shape", [])),
         "numel": _fmt(layer.get("numel")), "density": _fmt(layer.get("density"))}
        for layer in report.get("layers") or []
    ]
    calibration["dataset"] = _describe_dataset(calibration.get("dataset"), dataset_hub_id(calibration.get("dataset")))
    calibration_rows = [(k, v if k == "dataset" else _fmt(v)) for k, v in calibration.items()
                        if v is not None and k not in _NOT_CALIBRATION]
    shrink = report.get("shrink") or {}
    shrunk = (f"{shrink['blocks_removed']} of {shrink['num_blocks']} blocks removed and FFN width cut to "
              f"{shrink['ffn_width']}" if shrink.get("num_blocks") else None)
    if pruned:
        done = f"pruned to {_pct(achieved)} sparsity (target {_pct(target)}) with `{method}`"
        done = f"{done}, after {shrunk}" if shrunk else done
    elif shrunk:
        done = f"made smaller with hf-px: {shrunk} (dense weights, no unstructured sparsity)"
    else:
        done = f"{'fine-tuned' if report.get('finetune') else 'saved'} with hf-px (not pruned)"
    summary = f"{base_text[0].upper() + base_text[1:]} {done}." if base_text else f"{done[0].upper() + done[1:]}."
    return ModelCard.from_template(
        data,
        template_str=template,
        model_title=model_name,
        summary=summary,
        format=format,
        format_note=FORMAT_NOTES["dense-pcn" if format == "dense" and projection else format],
        install_hf_px=needs_hf_px,
        load_snippet=load_snippet(format, repo_id, pipeline_tag, projection),
        repo_placeholder=None if repo_id else REPO_PLACEHOLDER,
        pruning_rows=[(k, v) for k, v in pruning_rows if v not in (None, "None")],
        calibration_rows=calibration_rows if pruned else [],
        layers=layers,
        pcn=_pcn_section(report.get("pcn")),
        finetune_rows=[(k, _fmt(v)) for k, v in (report.get("finetune") or {}).items()],
        metric_rows=[(k, _fmt(v)) for k, v in flat],
        baseline_rows=[(metric_type(r["metric"]), _fmt(r["dense"]), _fmt(r["value"]),
                        "-" if r["retained"] is None else f"{100 * r['retained']:.1f}%") for r in baseline or []],
        eval_dataset=_describe_dataset(dataset, hub_dataset),
        plots=plots or [],
        speed=_speed_section(report.get("speed"), report.get("shrink")),
    )
