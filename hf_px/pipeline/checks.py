"""Everything ``hf-px run`` checks before it loads a model or creates an output folder.

Each failure is one :class:`~hf_px.pipeline.config.ConfigError` line that names the problem and the fix. The
checks read only metadata (``config.json``, safetensors headers, tokenizer file names) and the dataset; the model
skeleton used to compare names and shapes is built on the ``meta`` device, so no weights are read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..builtin import MODELS as BUILTIN
from ..builtin import resolve_model
from ..modeling import CLASSIFICATION_TASKS, Task, resolve_task
from .config import ConfigError, RunConfig

BUILTIN_MODELS = tuple(BUILTIN)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
EVAL_SPLITS = ("validation", "dev", "test", "eval")  # the first present is evaluated on, unless data.eval_split


@dataclass
class Plan:
    """What the checks resolved: the pipeline's stages use it instead of re-reading the inputs."""

    model_path: str | None  # local folder or Hub id; None for from_config
    tokenizer_path: str
    task: Task
    num_labels: int | None
    train: Any
    eval: Any
    text_column: str | None
    label_column: str | None
    image_column: str | None
    eval_split: str | None
    labels: Any = None  # hf_px.data.labels.Labels: the one label map of every split, written into the model config


def resolve_builtin(name: str | None) -> str | None:
    return resolve_model(name)


def _local(name: str) -> bool:
    from ..modeling import _looks_local

    return os.path.exists(os.path.expanduser(name)) or _looks_local(name)


def check_output_dirs(cfg: RunConfig) -> None:
    """Every folder the run writes: new/empty or hf-px's own of the same kind, never holding an input, writable.

    The folders a user names for the results (``output.model_dir``, ``finetune.output_dir``) come first: their
    refusal says more than one of the run folder beside them.
    """
    from ..folders import OutputFolderError, UnwritableFolderError, check_output_folder, local_inputs

    teacher = cfg.teacher.checkpoint if cfg.teacher is not None else None
    names = (cfg.model.name_or_path, cfg.model.tokenizer, cfg.data.dataset, teacher)
    inputs = local_inputs(*(resolve_builtin(i) if i in BUILTIN_MODELS else i for i in names))
    folders = [("output.model_dir", cfg.output.model_dir, "prune"), ("output.output_dir", cfg.output.output_dir, "run")]
    if cfg.finetune is not None and cfg.finetune.output_dir is not None:
        folders.insert(1, ("finetune.output_dir", cfg.finetune.output_dir, "finetune"))
    for key, path, kind in folders:
        if path is None:
            continue
        try:
            check_output_folder(path, key=key, kind=kind, inputs=inputs, overwrite=cfg.output.overwrite,
                                resume=cfg.finetune is not None and cfg.finetune.resume)
        except (OutputFolderError, UnwritableFolderError) as err:
            raise ConfigError(str(err)) from err


# ------------------------------------------------------------------------------------------------ model
def _read_config(folder: Path, trust_remote_code: bool):
    import transformers

    raw_path = folder / "config.json"
    try:
        raw = json.loads(raw_path.read_text())
    except ValueError as err:
        raise ConfigError(f"{raw_path} is corrupt (not valid JSON: {err}); re-save the checkpoint with "
                          "save_pretrained or restore the file.") from err
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"{raw_path} has no model_type; it is not a transformers config. Re-save the checkpoint "
                          "with save_pretrained.")
    from ..modeling import register_pcn_types

    register_pcn_types(folder)
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"{raw_path}: model_type {raw['model_type']!r} is not known to transformers "
                          f"{transformers.__version__} ({str(err).splitlines()[0][:120]}); upgrade transformers or "
                          "set model.trust_remote_code: true for a custom model.") from err


def _weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from ..export.checkpoint_files import CheckpointFileError, check_checkpoint_files

    try:
        headers = check_checkpoint_files(folder)
    except CheckpointFileError as err:
        raise ConfigError(str(err)) from err
    return {name: h.shape for tensors in headers.values() for name, h in tensors.items()}


def _check_weights_match(folder: Path, config: Any, trust_remote_code: bool) -> None:
    """The safetensors names/shapes must belong to the architecture that config.json describes."""
    sparse = (folder / "hf_px.json").exists() and (folder / "model.sparse.safetensors").exists()
    shapes = _weight_shapes(folder)
    if not shapes:
        return  # pickle-only (allowed explicitly) or GGUF: nothing to compare without loading
    import torch
    import transformers

    with torch.device("meta"):
        skeleton = transformers.AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    if sparse:  # packed names differ from the model's: hf_px.load's own layout check, without the loading
        from ..export.serialization import check_sparse_folder

        try:
            check_sparse_folder(folder, skeleton)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    prefix = getattr(skeleton, "base_model_prefix", "") + "."
    found = {(k[len(prefix):] if k.startswith(prefix) else k): s for k, s in shapes.items()}
    hits = [k for k in expected if k in found]
    if len(hits) < 0.5 * len(expected):
        example = next(iter(shapes))
        raise ConfigError(
            f"{folder}/config.json describes a {config.model_type} model, but the weights do not belong to it "
            f"({len(hits)} of {len(expected)} expected tensors found; the file has e.g. {example!r}). The config "
            "and the weights come from different architectures: restore the checkpoint's own config.json."
        )
    for k in hits:
        if found[k] != expected[k]:
            raise ConfigError(f"{folder}: tensor {k!r} has shape {list(found[k])} but config.json implies "
                              f"{list(expected[k])}; the config does not match the weights (edited hidden sizes?).")


def check_model(cfg: RunConfig) -> tuple[str | None, Task, Any]:
    """(resolved model path, task, transformers config) for the model section."""
    import transformers

    m = cfg.model
    if m.from_config is not None:
        fields = dict(m.from_config)
        model_type = fields.pop("model_type")
        try:
            config = transformers.AutoConfig.for_model(model_type, **fields)
        except ValueError as err:
            raise ConfigError(f"model.from_config: unknown model_type {model_type!r} "
                              f"({str(err).splitlines()[0][:100]}).") from err
        return None, resolve_task(m.task, config), config
    path = resolve_builtin(m.name_or_path)
    folder = Path(path).expanduser()
    if not folder.exists():
        if _local(path):
            raise ConfigError(f"model.name_or_path {path!r} does not exist; pass a checkpoint folder or a Hub id.")
        return path, resolve_task(m.task, None), None  # a Hub id: checked when it is downloaded
    from ..errors import HfPxError
    from ..modeling import check_model_source

    try:
        check_model_source(str(folder), allow_pickle=m.allow_pickle)
    except HfPxError as err:
        raise ConfigError(str(err)) from err
    if m.gguf_file:
        if not (folder / m.gguf_file).is_file():
            raise ConfigError(f"model.gguf_file {m.gguf_file!r} is not in {folder}; name a .gguf file inside it.")
        return str(folder), resolve_task(m.task, None), None
    config = _read_config(folder, m.trust_remote_code)
    _check_weights_match(folder, config, m.trust_remote_code)
    return str(folder), resolve_task(m.task, config), config


def check_tokenizer(cfg: RunConfig, model_path: str | None, task: Task) -> str:
    where = resolve_builtin(cfg.model.tokenizer) or model_path
    if where is None:
        raise ConfigError("model.tokenizer is needed with model.from_config.")
    folder = Path(where).expanduser()
    if not folder.is_dir():
        if _local(where):
            raise ConfigError(f"model.tokenizer {where!r} does not exist; pass a folder with tokenizer files.")
        return where  # Hub id
    if cfg.model.gguf_file and where == model_path:
        return where
    wanted = _PROCESSOR_FILES if task is Task.IMAGE_CLASSIFICATION else _TOKENIZER_FILES
    if not any((folder / f).exists() for f in wanted):
        kind = "image processor" if task is Task.IMAGE_CLASSIFICATION else "tokenizer"
        raise ConfigError(f"no {kind} in {folder} (none of {', '.join(wanted)}); set model.tokenizer to a folder "
                          f"or Hub id that has one, or save it next to the model.")
    return where


# ------------------------------------------------------------------------------------------------- data
def _subset(ds: Any, n: int | None, seed: int) -> Any:
    return ds.shuffle(seed=seed).select(range(min(n, len(ds)))) if n and len(ds) > n else ds


def _drop_rows(ds: Any, rows: list[int]) -> Any:
    drop = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in drop]) if drop else ds


def check_data(cfg: RunConfig, task: Task, ckpt_config: Any) -> dict[str, Any]:
    """The splits with their columns resolved and labels encoded by one map; the evaluation split only when a
    stage evaluates."""
    from ..data import check_text_rows, empty_text_rows, load_dataset_any, resolve_columns
    from ..data.labels import checkpoint_label_names, encode_labels, infer_num_labels, trained_head

    d = cfg.data
    try:
        dd = load_dataset_any(d.dataset, config_name=d.dataset_config, seed=d.seed)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:
        raise ConfigError(f"data.dataset: {err}") from err
    if d.train_split not in dd:
        raise ConfigError(f"data.train_split {d.train_split!r} is not in {d.dataset!r} (splits: {', '.join(dd)}).")
    if d.eval_split is not None and d.eval_split not in dd:
        raise ConfigError(f"data.eval_split {d.eval_split!r} is not in {d.dataset!r} (splits: {', '.join(dd)}).")
    evaluated = cfg.finetune is not None or cfg.evaluate.enabled or cfg.teacher is not None
    eval_split = (d.eval_split or next((s for s in EVAL_SPLITS if s in dd), None)) if evaluated else None
    train = dd[d.train_split]
    evals = dd[eval_split] if eval_split else None
    if evals is None and evaluated and d.eval_holdout and len(train) > 1:
        parts = train.train_test_split(test_size=d.eval_holdout, seed=d.seed)
        train, evals, eval_split = parts["train"], parts["test"], f"{d.train_split} (held out {d.eval_holdout:g})"
    train = _subset(train, d.max_train_samples, d.seed)
    evals = _subset(evals, d.max_eval_samples, d.seed) if evals is not None else None
    if len(train) == 0:
        raise ConfigError(f"split {d.train_split!r} of {d.dataset!r} is empty: the calibration set would be empty; "
                          "use a split with examples.")
    causal = task is Task.CAUSAL_LM
    if causal and d.num_batches is None and (cfg.pcn is not None or cfg.prune is not None):
        raise ConfigError("a causal LM calibrates on unlabelled text: set data.num_batches (e.g. 8) to size the "
                          "calibration set.")
    label_col = None if causal else d.label_column
    try:
        text, label, image = resolve_columns(train, d.text_column, label_col, d.image_column)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if text is None and image is None:
        raise ConfigError(f"no text or image column in {d.dataset!r} (columns: {', '.join(train.column_names)}); "
                          "set data.text_column or data.image_column.")
    if task is Task.IMAGE_CLASSIFICATION and image is None:
        raise ConfigError(f"the model is an image classifier but {d.dataset!r} has no image column; set "
                          "data.image_column or use a text model.")
    if text is not None and image is None:
        for name, split in ((d.train_split, train), (eval_split, evals)):
            if split is None:
                continue
            if not d.drop_empty_text:
                try:
                    check_text_rows(split, text, name, fix="remove them from the data or set data.drop_empty_text: true")
                except ValueError as err:
                    raise ConfigError(str(err)) from err
        if d.drop_empty_text:
            train = _drop_rows(train, empty_text_rows(train, text))
            evals = _drop_rows(evals, empty_text_rows(evals, text)) if evals is not None else None
    num_labels, labels = cfg.model.num_labels, None
    if label is not None and task in CLASSIFICATION_TASKS:
        head = trained_head(ckpt_config)
        try:
            labels = infer_num_labels(
                train, label, evals, num_labels=num_labels, head_labels=head,
                names=checkpoint_label_names(ckpt_config) if head else None, setting="model.num_labels",
                min_classes=2 if cfg.finetune is not None or cfg.evaluate.enabled else 1,
                train_split=d.train_split, eval_split=str(eval_split))
        except ValueError as err:
            raise ConfigError(str(err)) from err
        train = encode_labels(train, labels)
        evals = encode_labels(evals, labels) if evals is not None else None
        num_labels = labels.num_labels
    return {"train": train, "eval": evals, "text_column": text, "label_column": None if causal else label,
            "image_column": image, "num_labels": num_labels, "eval_split": eval_split, "labels": labels}


def check_push(cfg: RunConfig) -> None:
    if not cfg.push.enabled:
        return
    from ..export.hub import check_repo_id

    check_repo_id(cfg.push.hub_model_id, "push.hub_model_id")


def check_teacher(cfg: RunConfig, path: str, task: Task, num_labels: int | None) -> None:
    """``teacher.checkpoint``: a readable checkpoint folder (or Hub id) whose head fits the data's labels."""
    from ..errors import HfPxError
    from ..modeling import check_model_source

    folder = Path(path).expanduser()
    if not folder.exists():
        if _local(path):
            raise ConfigError(f"teacher.checkpoint {path!r} does not exist; pass the folder of a dense model "
                              "fine-tuned on this task, or remove the key to train the teacher.")
        return  # a Hub id: checked when it is downloaded
    try:
        check_model_source(str(folder), allow_pickle=cfg.model.allow_pickle, key="teacher.checkpoint")
    except HfPxError as err:
        raise ConfigError(f"teacher.checkpoint: {err}") from err
    config = _read_config(folder, cfg.model.trust_remote_code)
    if task in CLASSIFICATION_TASKS and num_labels is not None and getattr(config, "num_labels", None) != num_labels:
        raise ConfigError(f"teacher.checkpoint {path!r} has a head with {config.num_labels} labels but the data have "
                          f"{num_labels}; pass a teacher fine-tuned on this task, or remove the key to train one.")


def check_run(cfg: RunConfig) -> Plan:
    """All checks, in the order a user would fix them; nothing is written and no weights are read."""
    teacher = cfg.teacher.checkpoint if cfg.teacher is not None else None
    check_output_dirs(cfg)
    check_push(cfg)
    model_path, task, ckpt_config = check_model(cfg)
    tokenizer_path = check_tokenizer(cfg, model_path, task)
    data = check_data(cfg, task, ckpt_config)
    if teacher is not None:
        check_teacher(cfg, teacher, task, data["num_labels"])
    return Plan(model_path=model_path, tokenizer_path=tokenizer_path, task=task, num_labels=data["num_labels"],
                train=data["train"], eval=data["eval"], text_column=data["text_column"],
                label_column=data["label_column"], image_column=data["image_column"], eval_split=data["eval_split"],
                labels=data["labels"])
