"""The pipeline's stages in run order, one entry each: when it runs, what its fingerprint covers, where it runs.

Stage ``i`` writes the folder ``f"{i:02d}-{name}"`` of the run directory. A stage is redone when the config values
its ``inputs`` pick change, or when any stage before it changed its files; adding a stage is one entry here plus
its function in :mod:`hf_px.pipeline.steps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import steps
from .config import RunConfig
from .summary import publish_report

# fine-tuning keys that change what is printed, logged or where checkpoints go, not the weights
_COSMETIC = ("progress_bar", "log_every", "output_dir", "resume")


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage.

    Args:
        name: the stage's name (its folder is numbered by its place in :data:`STAGES`).
        work: ``work(ctx, tmp, summary)`` fills the temp folder ``tmp`` and the manifest's ``summary``; on the
            processes other than the main one (``every_rank`` stages only) ``tmp`` is None.
        enabled: whether the config switches the stage on.
        inputs: the values of ``RunConfig.to_dict()`` the stage's output depends on.
        every_rank: runs on every process under ``accelerate launch`` (fine-tuning, evaluation); the others run
            on the main process while the rest wait.
        resumable: keeps checkpoints in ``<folder>.work`` across interrupts; they are resumed while the
            stage's fingerprint is unchanged and removed once the stage is complete.
        after: called on the main process once the stage is complete (run or skipped).
    """

    name: str
    work: Callable[..., None]
    enabled: Callable[[RunConfig], bool] = lambda cfg: True
    inputs: Callable[[dict[str, Any]], Any] = lambda d: None
    every_rank: bool = False
    resumable: bool = False
    after: Callable[[Any], None] | None = None


def _recipe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (d["finetune"] or {}).items() if k not in _COSMETIC}


def _source(d: dict[str, Any]) -> str:
    source = (d["prune"] or {}).get("source", "auto")
    if source == "auto":  # what auto resolves to is what the output depends on
        return "teacher" if d.get("teacher") is not None else "pretrained"
    return source


def _report_inputs(d: dict[str, Any]) -> Any:
    import importlib.util

    return [d["report"], importlib.util.find_spec("matplotlib") is not None]


STAGES: tuple[StageSpec, ...] = (
    StageSpec("teacher", steps.teacher, lambda cfg: cfg.teacher is not None,
              lambda d: [d["model"], d["data"], d["teacher"], _recipe(d)], every_rank=True, resumable=True),
    StageSpec("calibrate", steps.calibrate,
              lambda cfg: cfg.pcn is not None or cfg.speed is not None or cfg.prune is not None,
              lambda d: [d["model"], d["data"]]),
    StageSpec("pcn", steps.pcn, lambda cfg: cfg.pcn is not None, lambda d: [d["pcn"], _source(d)]),
    StageSpec("shrink", steps.shrink, lambda cfg: cfg.speed is not None,
              lambda d: [d["speed"], _source(d), (d["prune"] or {}).get("method", "px")]),
    StageSpec("prune", steps.prune, lambda cfg: cfg.prune is not None,
              lambda d: [d["prune"], (d["gradual"] or {}).get("initial_sparsity")]),
    StageSpec("finetune", steps.finetune, lambda cfg: cfg.finetune is not None,
              lambda d: [d["model"], d["data"], _recipe(d), d["distill"], d["gradual"], d["prune"]], every_rank=True,
              resumable=True),
    StageSpec("evaluate", steps.evaluate, lambda cfg: cfg.evaluate.enabled, lambda d: d["evaluate"],
              every_rank=True),
    StageSpec("save", steps.save, inputs=lambda d: [d["output"]["format"], d["speed"]]),
    StageSpec("report", steps.report, inputs=_report_inputs, after=publish_report),
    StageSpec("card", steps.card, inputs=lambda d: d["push"]["hub_model_id"]),
    StageSpec("push", steps.push, lambda cfg: cfg.push.enabled, lambda d: d["push"]),
)


def folders(stages: tuple[StageSpec, ...] | None = None) -> dict[str, str]:
    """Stage name -> its folder under the run directory, numbered by its place in the run order."""
    return {spec.name: f"{i:02d}-{spec.name}" for i, spec in enumerate(STAGES if stages is None else stages)}
