"""The model card (``README.md``) of a pruned checkpoint, built with ``huggingface_hub``'s ``ModelCard``.

The YAML metadata comes from ``ModelCardData`` and ``EvalResult`` (never hand-written YAML); the body is the Jinja
template ``templates/default.md`` shipped inside this package, filled with the pruning report, so the card
always shows the measured numbers.

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

import math
import os
import pathlib
import re
from importlib import resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..builtin import hub_id as builtin_hub_id
from ..builtin import is_builtin, license_of
from .hub import REPO_ID

TEMPLATE = "templates/default.md"  # inside this package (shipped in the wheel as package data)
REPO_PLACEHOLDER = "YOUR-USERNAME/YOUR-MODEL"
LOCAL_PATH = "(local path)"
# Metric ids of the Hub's evaluation results (``model-index``); anything else (loss, runtime) stays in the text.
HUB_METRICS = frozenset({
    "accuracy", "f1", "precision", "recall", "perplexity", "matthews_correlation", "exact_match", "bleu", "rouge",
    "roc_auc", "mse", "mae", "pearsonr", "spearmanr", "wer", "cer", "squad",
})
# ``Trainer``-style prefixes of a metric name that say which split it came from, not what it measures
_SPLIT_PREFIX = re.compile(r"^(eval|test|validation|val|dev)_")
# calibration report keys about the training and evaluation data, not the calibration sample
_NOT_CALIBRATION = frozenset({"train_examples", "eval_examples", "train_split", "eval_split"})
_DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".arrow")
_HUB_DATASET = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?$")  # a canonical (namespace-free) data set
_HUB_CACHE = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)/snapshots/")
FORMAT_NOTES = {
    "dense": "standard `model.safetensors` with the pruned weights stored as zeros; stock "
    "`transformers` loads it, `hf-px` is not needed.",
    "dense-pcn": "standard `model.safetensors`, but the PCN projection layers are hf-px model classes: install "
    "`hf-px` and `import hf_px.pcn` before loading it with `transformers`.",
    "sparse": "`model.sparse.safetensors` holds only the kept weights plus a packed bitmask per pruned matrix "
    "(layout in `hf_px.json`); load it with `hf_px.load` (`pip install hf-px`), which rebuilds the exact dense "
    "weights. Stock `from_pretrained` cannot read this file.",
}


def _looks_like_path(text: str) -> bool:
    """A string that names a file or folder of this machine (absolute, home-relative, or existing with a
    separator); Hub ids are ``namespace/name`` and are only taken for a path when such a folder exists here."""
    if not text or "\n" in text or is_builtin(text) or "://" in text:
        return False
    if text.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", text):
        return True
    return ("/" in text or os.sep in text) and os.path.exists(text)


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
    text = str(value)
    if _looks_like_path(text):  # a card is public: a path of this machine says nothing to its readers
        return LOCAL_PATH
    return text.replace("|", "\\|").replace("\n", " ")


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


def metric_type(name: str) -> str:
    """What a metric measures, as the Hub names it: ``eval_accuracy`` -> ``accuracy``, ``eval/f1`` -> ``f1``."""
    return _SPLIT_PREFIX.sub("", name.split("/")[-1])


def pipeline_tag_for(model: Any) -> str | None:
    """The Hub pipeline tag of a model or transformers config (its :class:`~hf_px.modeling.Task`); None for a
    head hf_px does not train."""
    from ..modeling import Task, task_of

    task = task_of(model)
    return None if task is Task.FEATURES else task.pipeline_tag


def _local_card(folder: str | os.PathLike) -> dict:
    """The metadata of a local folder's ``README.md`` ({} when there is none or it does not parse)."""
    readme = pathlib.Path(folder).expanduser() / "README.md"
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception:  # noqa: BLE001 - a broken upstream card must not stop saving
        return {}


def base_model_license(base_model: str | None) -> str | None:
    """The license of the base model when it is known offline: a built-in model's, a local folder's card's, or
    the card of a Hub model already in the local Hub cache. None otherwise (nothing is downloaded)."""
    if not base_model:
        return None
    if license_of(base_model):
        return license_of(base_model)
    if os.path.isdir(os.path.expanduser(base_model)):
        return _local_card(base_model).get("license")
    if REPO_ID.match(base_model):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "README.md")
        except Exception:  # noqa: BLE001 - the cache is a bonus; no license is a fine answer
            return None
        if isinstance(cached, str):
            return _local_card(os.path.dirname(cached)).get("license")
    return None


def base_model_hub_id(base_model: str | None) -> str | None:
    """The Hub id of the model a checkpoint was made from, or None when it has none (a local or random model).

    ``builtin:minilm`` (or its folder) is the Hub model it is a copy of; a folder in the Hub cache is the repo it
    was downloaded from; a folder that hf-px saved earlier has the ``base_model`` of its own card; a string that
    is no existing path and has the form ``namespace/name`` is a Hub id.
    """
    if not base_model or base_model.startswith("from_config:"):
        return None
    known = builtin_hub_id(base_model)
    if known or is_builtin(base_model):
        return known
    local = os.path.expanduser(base_model)
    if os.path.exists(local):
        cache = _HUB_CACHE.search(pathlib.Path(local).resolve().as_posix())
        if cache and cache.group(1) == "models":
            return f"{cache.group(2)}/{cache.group(3)}"
        if os.path.isfile(os.path.join(local, "hf_px.json")):  # our own earlier output: its base is ours
            parent = _local_card(local).get("base_model")
            return parent if isinstance(parent, str) and REPO_ID.match(parent) else None
        return None
    return base_model if REPO_ID.match(base_model) else None


def dataset_hub_id(dataset: str | None) -> str | None:
    """The Hub id of a data set: a built-in one's original, a Hub id as it is; None for local files and
    folders, and for built-in data without a Hub original."""
    if not dataset:
        return None
    if is_builtin(dataset):
        return builtin_hub_id(dataset)
    if os.path.exists(os.path.expanduser(dataset)) or _looks_like_path(dataset):
        return None
    if dataset.lower().endswith(_DATA_SUFFIXES):
        return None
    return dataset if REPO_ID.match(dataset) or _HUB_DATASET.match(dataset) else None


def _describe_base(base_model: str | None, hub_base: str | None) -> str | None:
    """How the text names the base model: its Hub id, else what it is, never a local path; None: unknown."""
    if hub_base:
        return f"`{hub_base}`"
    if base_model and base_model.startswith("from_config:"):
        return f"a randomly initialised {base_model.split(':', 1)[1]} model"
    return "a local checkpoint" if base_model else None


def _describe_dataset(dataset: str | None, hub_dataset: str | None) -> str | None:
    """How the text names a data set: a Hub link, a built-in name (with its Hub original), never a local path."""
    link = f"[`{hub_dataset}`](https://huggingface.co/datasets/{hub_dataset})" if hub_dataset else None
    if is_builtin(dataset):
        # a packaged copy with hf-px's own seeded split: the numbers are not on the Hub original's test split
        return f"`{dataset}` (hf-px's own seeded split of a packaged copy" + (f"; Hub original: {link})" if link
                                                                            else ")")
    if link:
        return link
    return "local data (not on the Hub)" if dataset else None


def _dataset_name(dataset: str, hub_dataset: str) -> str:
    """The model-index's display name of the evaluation data: a built-in copy says it is one."""
    name = hub_dataset.split("/")[-1]
    return f"{name} (hf-px built-in copy, own split)" if is_builtin(dataset) else name


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


def _pcn_projection(report: dict) -> bool:
    """Whether PCN replaced blocks by hf-px's projection classes (stock ``transformers`` cannot build them);
    structured PCN only narrows widths, which stock classes load."""
    pcn = report.get("pcn")
    if not isinstance(pcn, dict):
        return False
    config = pcn.get("config") if isinstance(pcn.get("config"), dict) else pcn
    return config.get("mode") == "projection"


def load_snippet(format: str, repo_id: str | None, pipeline_tag: str | None, pcn_projection: bool = False) -> str:
    """The code that loads this checkpoint: stock transformers for dense, ``hf_px.load`` for sparse.

    Without ``repo_id`` the snippet loads :data:`REPO_PLACEHOLDER`, and says so in a comment.
    """
    repo = repo_id or REPO_PLACEHOLDER
    note = "" if repo_id else "  # placeholder: your repo id or folder"
    if format == "sparse":
        return f'import hf_px\n\nmodel = hf_px.load("{repo}"){note}'
    from ..modeling import Task

    # the stock class that reloads a dense checkpoint: its task's
    cls = next((t.auto_class.__name__ for t in Task if t.pipeline_tag == pipeline_tag), "AutoModel")
    head = "import hf_px.pcn  # registers the PCN projection classes with transformers\n" if pcn_projection else ""
    return f'{head}from transformers import {cls}\n\nmodel = {cls}.from_pretrained("{repo}"){note}'


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
    if report.get("pcn"):
        tags.append("pcn")
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
    done = (f"pruned to {_pct(achieved)} sparsity (target {_pct(target)}) with `{method}`" if pruned
            else f"{'fine-tuned' if report.get('finetune') else 'saved'} with hf-px (not pruned)")
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


def _speed_section(speed: dict | None, shrink: dict | None) -> dict | None:
    """The latency table of a ``speed``-planned run (``hf-px run``'s save stage measures it)."""
    if not speed or not speed.get("shapes"):
        return None
    rows = [(f"{r['batch']} x {r['tokens']}", f"{r['dense_ms']:.2f}", f"{r['ms']:.2f}", f"{r['speedup']:.2f}x")
            for r in speed["shapes"]]
    plan = None
    if shrink:
        plan = (f"{shrink['blocks_removed']} of {shrink['num_blocks']} blocks removed (lowest PX scores), FFN width "
                f"{shrink['ffn_width']} ({100 * shrink['ffn_fraction']:.1f}% of the original), planned for a "
                f"{speed['target_speedup']:g}x speed-up")
        if not shrink.get("target_met", True):
            plan += " (no candidate reached it on that machine, so the fastest one was used)"
        short = [f"{r['batch']} x {r['tokens']}" for r in speed["shapes"] if r["speedup"] < speed["target_speedup"]]
        if short:
            plan += f"; the final model measured below the target at {', '.join(short)}"
    threads = speed["shapes"][0].get("threads")
    return {"rows": rows, "plan": plan, "threads": threads}
