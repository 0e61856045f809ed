"""``hf_px.run``: the whole pipeline, stage by stage, resumable.

Stages (each in its own folder under the run directory, complete only when its manifest is written; the list is
:data:`hf_px.pipeline.table.STAGES`): teacher -> calibrate -> pcn -> prune -> finetune -> evaluate -> save ->
report -> card -> push. PCN runs before PX so that PX prunes the model that is shipped (projecting after masking
would refill the pruned weights). A re-run skips every stage whose manifest matches its inputs; ``force=True``
redoes them all. Under ``accelerate launch`` the teacher, fine-tuning and evaluation run on every process, the
other stages on the main process while the rest wait.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HfPxError
from ..folders import RUN_MARKER, FolderLockedError, folder_lock
from ..registry import UnsupportedArchitectureError
from . import table
from .checks import check_run
from .config import ConfigError, RunConfig
from .context import Context
from .stages import Stage, clean_leftovers, copy_tree, fingerprint, write_json_atomic
from .table import StageSpec


class RunError(HfPxError, RuntimeError):
    """A stage failed for an environmental reason (disk full, ...); completed stages are kept."""


@dataclass
class RunResult:
    """What :func:`run` returns: per-stage status (``ran``, ``skipped``, ``off``), the report and the final model
    folder (``output.model_dir`` when set)."""

    output_dir: Path
    stages: dict[str, str]
    report: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None
    is_main_process: bool = True

    @property
    def metrics(self) -> dict[str, float]:
        return self.report.get("evaluate") or {}


def _load_config(config: RunConfig | str | os.PathLike | dict, overrides: dict[str, Any] | None) -> RunConfig:
    from .config import apply_overrides

    if isinstance(config, RunConfig):
        if not overrides:
            return config
        config = config.to_dict()
    if isinstance(config, dict):
        return RunConfig.from_dict(apply_overrides(config, overrides or {}))
    return RunConfig.from_file(config, overrides)


def _world() -> tuple[int, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, None
    from accelerate import PartialState

    from ..finetuning.accelerator import has_device

    return world, PartialState(cpu=not has_device())


def _say(msg: str, main: bool) -> None:
    if main:
        print(f"[hf-px run] {msg}", flush=True)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' and datasets' logs below errors and their progress bars off, restored on exit.

    What this hides is the libraries' own chatter between the stage lines: transformers' LOAD REPORT (expected
    here: a new classification head, a narrowed FFN), its "Loading weights" / "Writing model shards" bars and
    datasets' "Map" bars. hf-px's own output (stage lines, pruning and fine-tuning progress, tables) and errors
    stay. The Hub's download bars follow transformers' switch, so they are restored to what they were too.
    """
    import datasets
    import huggingface_hub.utils as hub_utils
    import transformers

    tf_log, ds_log = transformers.logging.get_verbosity(), datasets.logging.get_verbosity()
    tf_bar, ds_bar = transformers.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hub_off = hub_utils.are_progress_bars_disabled()
    with warnings.catch_warnings():  # datasets warns when an environment variable overrides the switch
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        datasets.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transformers.logging.set_verbosity(tf_log)
            datasets.logging.set_verbosity(ds_log)
            if tf_bar:
                transformers.logging.enable_progress_bar()
            if ds_bar:
                datasets.enable_progress_bars()
            if hub_off:
                hub_utils.disable_progress_bars()
            else:
                hub_utils.enable_progress_bars()


def run(
    config: RunConfig | str | os.PathLike | dict,
    *,
    output_dir: str | None = None,
    force: bool = False,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run load -> teacher -> calibrate -> PCN -> PX -> fine-tune -> evaluate -> save -> report -> card -> push.

    Args:
        config: a :class:`RunConfig`, a dict of sections, or a YAML/JSON file path.
        output_dir: overrides ``output.output_dir``.
        force: redo every stage even when its folder is complete.
        progress: progress bars for pruning and fine-tuning.
        overrides: ``{"section.key": value}`` applied on top of the config.
        verbose: keep transformers' and datasets' logs and progress bars (load reports, "Writing model
            shards", "Map"); by default they are quiet while the pipeline runs (:func:`quiet_libraries`).

    Every input is checked before a model is loaded or a folder created (:class:`ConfigError`).

    Example:
        >>> result = hf_px.run("scripts/configs/tiny-smoke.yaml", output_dir="runs/smoke")  # doctest: +SKIP
        >>> result.stages["prune"], sorted(result.metrics)                                  # doctest: +SKIP
        ('ran', ['eval_accuracy', 'eval_loss'])
    """
    overrides = dict(overrides or {})
    if output_dir is not None:
        overrides["output.output_dir"] = str(output_dir)
    cfg = _load_config(config, overrides)
    with contextlib.ExitStack() as held:
        if not verbose:  # from the checks on: they load the data (datasets' bars) and read model configs
            held.enter_context(quiet_libraries())
        plan = check_run(cfg)
        world, state = _world()
        is_main = state is None or state.is_main_process
        root = Path(cfg.output.output_dir).expanduser().absolute()
        busy = None
        if is_main:
            root.mkdir(parents=True, exist_ok=True)
            try:
                held.enter_context(folder_lock(root))
            except FolderLockedError as err:
                busy = str(err)
        busy = _from_main(state, busy)
        if busy is not None:
            raise RunError(busy)
        return _run_locked(cfg, plan, root, state, is_main, world, force, progress)


def _from_main(state: Any, value: str | None) -> str | None:
    """The main process's ``value`` on every process, so that all of them stop together."""
    if state is None:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _run_locked(cfg: RunConfig, plan: Any, root: Path, state: Any, is_main: bool, world: int, force: bool,
                progress: bool) -> RunResult:
    def barrier() -> None:
        if state is not None:
            state.wait_for_everyone()

    # stages switched off keep their folders from earlier configs: nothing of this run reads them (they are not
    # in ctx.stages) and a later run that switches them back on re-uses or redoes them by fingerprint
    stages = table.STAGES  # read at run time: the table is the one place that lists stages
    off = [spec.name for spec in stages if not spec.enabled(cfg)]
    if is_main:
        clean_leftovers(root)
        write_json_atomic(root / RUN_MARKER, {"config": cfg.to_dict(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              "world_size": world, "stages_off": off})
    barrier()
    ctx = Context(cfg=cfg, plan=plan, root=root, folders=table.folders(stages), progress=progress, is_main=is_main)
    config_values = cfg.to_dict()
    status: dict[str, str] = {}
    upstream: list[str] = []
    current = None
    try:
        for spec in stages:
            name = current = spec.name
            if name in off:
                status[name] = "off"
                continue
            fp = fingerprint({"stage": name, "inputs": spec.inputs(config_values), "upstream": upstream})
            stage = Stage(ctx.stage_path(name), name, fp)
            barrier()
            state_now = "forced" if force else stage.status()
            if state_now == "complete":
                _say(f"{stage.path.name}: complete, skipped (inputs unchanged)", is_main)
                status[name] = "skipped"
            else:
                _say(f"{stage.path.name}: running" + ("" if state_now == "missing" else f" ({state_now})"), is_main)
                t0 = time.perf_counter()
                _run_stage(ctx, spec, stage, is_main, force, barrier)
                barrier()
                _say(f"{stage.path.name}: done in {time.perf_counter() - t0:.1f} s", is_main)
                status[name] = "ran"
            ctx.stages[name] = stage
            upstream.append(stage.content_hash())
            if spec.after is not None and is_main:
                spec.after(ctx)
    except KeyboardInterrupt:
        if is_main:
            print(f"\n[hf-px run] interrupted during stage {current!r}. Completed stages are kept in {root}; nothing "
                  "half-written was left. Run the same command again to resume"
                  + (" (fine-tuning continues from its last checkpoint)."
                     if any(s.resumable and s.name == current for s in stages) else "."),
                  file=sys.stderr, flush=True)
        raise
    except UnsupportedArchitectureError as err:  # the registry's refusal (PCN, pruning) is the input's, not a bug
        raise ConfigError(str(err)) from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise RunError(f"disk full while writing stage {current!r} under {root}: free some space and run the "
                           "same command again; completed stages are kept and nothing half-written remains.") from err
        raise
    report = {}
    if (root / "report.json").exists():
        import json

        report = json.loads((root / "report.json").read_text())
    model_dir = ctx.stage_path("card") / "model"
    if cfg.output.model_dir is not None and is_main:
        model_dir = publish(model_dir, Path(cfg.output.model_dir))
    return RunResult(output_dir=root, stages=status, report=report, model_dir=model_dir if model_dir.exists() else None, is_main_process=is_main)


def publish(src: Path, dst: Path) -> Path:
    """``src`` linked into a temp folder beside ``dst``, then renamed into place; an earlier save at ``dst``
    (which :func:`~hf_px.pipeline.checks.check_run` let through) is replaced only once the new one is complete."""
    dst = dst.expanduser().absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (dst.parent / f".{dst.name}.{kind}-{uuid.uuid4().hex[:8]}" for kind in ("tmp", "old"))
    try:
        copy_tree(src, tmp)
        if dst.exists():
            os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except OSError:
            if old.exists():
                os.replace(old, dst)  # the earlier save goes back rather than nothing being there
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def _run_stage(ctx: Context, spec: StageSpec, stage: Stage, is_main: bool, force: bool,
               barrier: Callable[[], None]) -> None:
    work = ctx.work_dir(spec.name) if spec.resumable else None
    if work is not None:
        if is_main:
            stamp = work / "fingerprint"
            if work.exists() and (force or not stamp.exists() or stamp.read_text() != stage.fingerprint):
                shutil.rmtree(work)  # checkpoints of other inputs must not be resumed
            work.mkdir(parents=True, exist_ok=True)
            stamp.write_text(stage.fingerprint)
        barrier()
    if not is_main:
        if spec.every_rank:
            spec.work(ctx, None, {})
        return
    # files equal to an earlier stage's (unchanged weights, tokenizers, masks) become hard links to it
    with stage.writing(share_with=tuple(ctx.stages.values())) as (tmp, summary):
        spec.work(ctx, tmp, summary)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


__all__ = ["ConfigError", "RunConfig", "RunError", "RunResult", "quiet_libraries", "run"]
