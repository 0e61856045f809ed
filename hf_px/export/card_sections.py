"""The body of the model card: values formatted for its tables, and its metrics, PCN, speed and loading sections.

Values are written with :func:`_fmt`, which shows a path of this machine as :data:`LOCAL_PATH`: a card is public.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .card_provenance import _looks_like_path

REPO_PLACEHOLDER = "YOUR-USERNAME/YOUR-MODEL"
LOCAL_PATH = "(local path)"
# ``Trainer``-style prefixes of a metric name that say which split it came from, not what it measures
_SPLIT_PREFIX = re.compile(r"^(eval|test|validation|val|dev)_")
FORMAT_NOTES = {
    "dense": "standard `model.safetensors` (pruned weights, if any, are stored as zeros); stock "
    "`transformers` loads it, `hf-px` is not needed.",
    "dense-pcn": "standard `model.safetensors`, but the PCN projection layers are hf-px model classes: install "
    "`hf-px` and `import hf_px.pcn` before loading it with `transformers`.",
    "sparse": "`model.sparse.safetensors` holds only the kept weights plus a packed bitmask per pruned matrix "
    "(layout in `hf_px.json`); load it with `hf_px.load` (`pip install hf-px`), which rebuilds the exact dense "
    "weights. Stock `from_pretrained` cannot read this file.",
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
