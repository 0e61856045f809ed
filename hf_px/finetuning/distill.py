"""Knowledge distillation while fine-tuning a pruned model: a dense teacher's soft targets (and hidden states).

Loss of every micro-batch, with student logits s, teacher logits t and temperature T:

    (1 - alpha) * CE(labels) + alpha * T**2 * KL(softmax(t / T) || softmax(s / T)) + hidden_weight * H

The KL term is a mean over examples for sequence/image classification and over non-padding tokens for token-level
outputs (causal LMs, token classification). The T**2 factor keeps the soft-target gradients on the scale of the
label loss whatever T is (their magnitude falls as 1/T**2). H, when ``hidden_weight > 0``, is the mean over blocks
of the per-token MSE (or 1 - cosine) between the student's and the teacher's block outputs, padding excluded.

The teacher is frozen and stateless: it runs in eval mode under ``torch.no_grad`` on every process, never wrapped
in DDP/FSDP (it has no gradients to synchronise), so ``max_steps``, resume and LoRA need nothing special. Its
logits can be cached per training example (``cache_logits``) when the same examples recur over epochs.

Example:
    >>> import datasets
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_px import DistillConfig, FinetuneConfig, finetune
    >>> make = lambda: BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> teacher, student = make(), make()
    >>> ds = datasets.Dataset.from_dict({"input_ids": [[1, 5, 7, 2]] * 16, "attention_mask": [[1] * 4] * 16,
    ...                                  "label": [0, 1] * 8})
    >>> cfg = FinetuneConfig(max_steps=2, batch_size=8, log_every=1, progress_bar=False,
    ...                      distill=DistillConfig(teacher=teacher, temperature=2.0, alpha=0.5))
    >>> out = finetune(student, ds, config=cfg)
    >>> sorted(k for k in out.history[-1] if k.startswith("loss"))
    ['loss', 'loss_ce', 'loss_kd']
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import Task, task_of
from .data import EXAMPLE_ID, with_example_ids

HIDDEN_LOSSES = ("mse", "cosine")
_CACHE_WARN_BYTES = 4 * 2**30


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class DistillConfig:
    """How to distil a teacher into the model being fine-tuned (``FinetuneConfig(distill=...)``).

    Args:
        teacher: the dense model, an ``nn.Module`` (moved to the training device, put in eval mode and frozen in
            place) or a checkpoint folder / Hub id loaded with :func:`hf_px.load` on every process. It must use
            the student's tokenizer and output space (same labels, or same vocabulary for a causal LM). ``None``
            leaves it to be filled in later: ``hf-px run`` passes the model of its teacher stage.
        temperature: T > 0 that softens both distributions before the KL; 2.0 by default.
        alpha: share of the KL term against the label loss, in [0, 1]. The default 0.5 weighs both equally
            (the T**2 factor makes the two comparable); 0 trains on labels only (the teacher still runs and its
            KL is logged), 1 on the teacher alone (labels are then not needed).
        hidden_weight: weight (>= 0) of matching every block's output to the teacher's, block i to block i;
            0 (default) turns it off. Needs the same number of blocks and hidden size in both models; a PCN
            student qualifies, since PCN narrows FFN widths only.
        hidden_loss: the per-token distance for hidden matching, ``"mse"`` or ``"cosine"`` (1 - cosine).
        hidden_layers: the teacher block each student block is matched with, one index per student block, for a
            student with blocks removed (``hidden_layers=[0, 2, 3, 5]`` after removing blocks 1 and 4: each
            remaining block learns the output of the block it was). None: block i with block i. ``hf-px run``
            sets it from its shrink stage.
        cache_logits: keep the teacher's logits of every training example on CPU, keyed by example index, and
            reuse them when the example recurs (from the second epoch on). Costs examples x classes floats for
            classification and examples x tokens x vocabulary for causal LMs; only logits are cached, so it
            cannot be combined with ``hidden_weight > 0``.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> teacher = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
        >>> cfg = DistillConfig(teacher=teacher, temperature=4.0, alpha=0.9, cache_logits=True)
        >>> cfg.to_dict()["teacher"], cfg.alpha
        ('BertForSequenceClassification', 0.9)
        >>> DistillConfig(teacher="out/dense", hidden_loss="l1")
        Traceback (most recent call last):
        ...
        ValueError: hidden_loss must be one of mse, cosine, got 'l1'.
    """

    teacher: Any = None
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    hidden_loss: str = "mse"
    hidden_layers: list[int] | None = None
    cache_logits: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.teacher, os.PathLike):
            self.teacher = os.fspath(self.teacher)
        if self.teacher is not None and (not isinstance(self.teacher, (nn.Module, str)) or self.teacher == ""):
            raise ValueError("teacher must be an nn.Module or a checkpoint folder / Hub id (str), got "
                             f"{type(self.teacher).__name__}; e.g. DistillConfig(teacher='out/dense').")
        if not _real(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}.")
        if not _real(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha (share of the KL term) must be in [0, 1], got {self.alpha!r}.")
        if not _real(self.hidden_weight) or self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be a number >= 0 (0: off), got {self.hidden_weight!r}.")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}, got {self.hidden_loss!r}.")
        if self.hidden_layers is not None:
            layers = list(self.hidden_layers) if isinstance(self.hidden_layers, (list, tuple)) else None
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers) \
                    or layers != sorted(set(layers)):
                raise ValueError("hidden_layers must list increasing teacher block indices >= 0, one per student "
                                 f"block (e.g. [0, 2, 3, 5]), got {self.hidden_layers!r}.")
            self.hidden_layers = layers
        if not isinstance(self.cache_logits, bool):
            raise ValueError(f"cache_logits must be True or False, got {self.cache_logits!r}.")
        if self.cache_logits and self.hidden_weight > 0:
            raise ValueError("cache_logits caches logits only, but hidden_weight > 0 needs the teacher's hidden "
                             "states at every step: set cache_logits=False or hidden_weight=0.")

    def to_dict(self) -> dict[str, Any]:
        teacher = self.teacher if isinstance(self.teacher, str) else type(self.teacher).__name__
        return {"teacher": teacher, "temperature": self.temperature, "alpha": self.alpha,
                "hidden_weight": self.hidden_weight, "hidden_loss": self.hidden_loss,
                "hidden_layers": self.hidden_layers, "cache_logits": self.cache_logits}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) over the last dimension, averaged over examples or over ``mask`` positions.

    Not multiplied by T**2 (the training loss applies it). Computed in float32 whatever the logits' dtype.

    Example:
        >>> s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])
        >>> float(kd_loss(s, t, 2.0))
        0.0
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    return _masked_mean(per_position, mask)


def hidden_state_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                      mask: torch.Tensor | None = None, kind: str = "mse",
                      layers: Sequence[int] | None = None) -> torch.Tensor:
    """Mean over blocks of the per-token distance between paired block outputs (``output_hidden_states[1:]``).

    ``kind`` is ``"mse"`` (mean squared error over the hidden dimension) or ``"cosine"`` (1 - cosine similarity);
    tokens where ``mask`` is 0 (padding) do not count. Student block i is paired with teacher block
    ``layers[i]`` (default: block i). Raises a ValueError when the pairing or the widths do not fit.
    """
    if kind not in HIDDEN_LOSSES:
        raise ValueError(f"kind must be one of {', '.join(HIDDEN_LOSSES)}, got {kind!r}.")
    # index 0 is the embedding output: matching starts at the first block
    s_blocks, t_blocks = list(student_hidden)[1:], list(teacher_hidden)[1:]
    s_width, t_width = student_hidden[-1].shape[-1], teacher_hidden[-1].shape[-1]
    if layers is not None:
        check_hidden_layers(layers, len(s_blocks), len(t_blocks))
        t_blocks = [t_blocks[i] for i in layers]
    if len(s_blocks) != len(t_blocks) or s_width != t_width:
        raise ValueError(_mismatch(len(s_blocks), s_width, len(t_blocks), t_width))
    terms = []
    for s, t in zip(s_blocks, t_blocks, strict=True):
        s, t = s.float(), t.float()
        if kind == "mse":
            per_token = (s - t).pow(2).mean(-1)
        else:
            per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
        terms.append(_masked_mean(per_token, mask if mask is not None and mask.shape == per_token.shape else None))
    return torch.stack(terms).mean()


def check_hidden_layers(layers: Sequence[int], student_depth: int, teacher_depth: int) -> None:
    """``layers`` pairs each of ``student_depth`` blocks with one of ``teacher_depth``, or a ValueError says why not."""
    if len(layers) != student_depth or max(layers) >= teacher_depth:
        raise ValueError(f"hidden_layers {list(layers)} must give one teacher block (0..{teacher_depth - 1}) for each "
                         f"of the student's {student_depth} blocks.")


def _mismatch(s_depth: Any, s_width: Any, t_depth: Any, t_width: Any) -> str:
    return (f"hidden-state matching pairs student block i with teacher block i, but the student has {s_depth} "
            f"blocks of width {s_width} and the teacher {t_depth} blocks of width {t_width}. Use a teacher of the "
            "same hidden size (PCN narrows FFN widths only), give hidden_layers (the teacher block of each student "
            "block) when blocks were removed, or set hidden_weight=0.")


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "get_base_model", lambda: model)()


def _depth_width(model: nn.Module) -> tuple[int | None, int | None]:
    cfg = getattr(_base(model), "config", None)
    return getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)


class Distiller:
    """The teacher, its logit cache and the running sums of the loss terms, for one fine-tuning run.

    Built by :func:`build_distiller`; the training loop calls :meth:`loss` instead of ``model(**batch).loss``
    and :meth:`logged_means` when it logs.
    """

    def __init__(self, config: DistillConfig, teacher: nn.Module, device: torch.device | str = "cpu",
                 autocast: Any = None) -> None:
        self.config = config
        self.teacher = teacher
        self.device = torch.device(device)
        self._autocast = autocast
        self.cache: dict[int, torch.Tensor] | None = {} if config.cache_logits else None
        self.cache_bytes, self.cache_hits, self.teacher_calls = 0, 0, 0
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._warned = False

    def wrap_dataset(self, dataset: Any) -> Any:
        """The training set with example indices when caching (the cache key); unchanged otherwise."""
        return with_example_ids(dataset) if self.cache is not None else dataset

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distillation loss of one micro-batch (the student forward included); records its terms."""
        cfg = self.config
        ids = batch.get(EXAMPLE_ID)
        inputs = {k: v for k, v in batch.items() if k != EXAMPLE_ID}
        hidden = cfg.hidden_weight > 0
        out = model(**inputs, output_hidden_states=True) if hidden else model(**inputs)
        if out.loss is None and cfg.alpha < 1:
            raise ValueError("distillation with alpha < 1 needs a label loss, but the batch has no labels; give the "
                             "dataset labels or set alpha=1 (teacher only).")
        mask = _position_mask(inputs, out.logits)
        t_logits, t_hidden = self._teacher_outputs(inputs, ids, mask, hidden)
        if t_logits.shape != out.logits.shape:
            raise ValueError(f"the teacher's logits have shape {tuple(t_logits.shape)}, the student's "
                             f"{tuple(out.logits.shape)}: the teacher needs the student's tokenizer and output space "
                             "(number of labels, vocabulary).")
        kd = kd_loss(out.logits, t_logits.to(out.logits.device), cfg.temperature, mask)
        terms = {"kd": kd}
        loss = cfg.alpha * cfg.temperature ** 2 * kd
        if out.loss is not None:
            terms["ce"] = out.loss
            # (1 - alpha) * ce + 0 * kd is ce exactly, so alpha=0 reproduces a plain run bit for bit
            loss = (1.0 - cfg.alpha) * out.loss + loss
        if hidden:
            token_mask = inputs.get("attention_mask")
            terms["hidden"] = hidden_state_loss(out.hidden_states, t_hidden, token_mask, cfg.hidden_loss,
                                                cfg.hidden_layers)
            loss = loss + cfg.hidden_weight * terms["hidden"]
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()
        self._count += 1
        return loss

    def logged_means(self, accelerator: Any = None) -> dict[str, float]:
        """``loss_ce``/``loss_kd``/``loss_hidden`` averaged since the last call (and over processes); resets."""
        means = {}
        for name in sorted(self._sums):  # the same order on every process: each reduce is a collective
            value = self._sums[name] / max(self._count, 1)
            if accelerator is not None:
                value = accelerator.reduce(value, reduction="mean")
            means[f"loss_{name}"] = float(value)
        self._sums, self._count = {}, 0
        return means

    def _teacher_outputs(self, inputs: dict[str, torch.Tensor], ids: torch.Tensor | None, mask: torch.Tensor | None,
                         hidden: bool) -> tuple[torch.Tensor, Any]:
        keys = ids.tolist() if ids is not None and self.cache is not None else None
        if keys is not None:
            cached = self._from_cache(keys, mask)
            if cached is not None:
                self.cache_hits += 1
                return cached, None
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}  # no teacher loss to compute
        with torch.no_grad(), self._autocast() if self._autocast is not None else contextlib.nullcontext():
            out = self.teacher(**teacher_inputs, output_hidden_states=True) if hidden else self.teacher(**teacher_inputs)
        self.teacher_calls += 1
        if keys is not None:
            self._store(keys, out.logits, mask)
        return out.logits, out.hidden_states if hidden else None

    def _store(self, keys: list[int], logits: torch.Tensor, mask: torch.Tensor | None) -> None:
        assert self.cache is not None
        for i, key in enumerate(keys):
            # token-level logits: keep only the real positions, so the entry fits any later padding width
            row = logits[i] if mask is None else logits[i][mask[i]]
            row = row.detach().to("cpu", copy=True)
            old = self.cache.get(key)
            if old is not None:
                self.cache_bytes -= old.numel() * old.element_size()
            self.cache_bytes += row.numel() * row.element_size()
            self.cache[key] = row
        if self.cache_bytes > _CACHE_WARN_BYTES and not self._warned:
            self._warned = True
            warnings.warn(f"the teacher-logit cache holds {self.cache_bytes / 2**30:.1f} GiB of CPU memory and grows "
                          "with every new example; set cache_logits=False if memory runs short.", stacklevel=3)

    def _from_cache(self, keys: list[int], mask: torch.Tensor | None) -> torch.Tensor | None:
        assert self.cache is not None
        rows = [self.cache.get(k) for k in keys]
        if any(r is None for r in rows):
            return None  # one teacher pass for the whole batch: as cheap as for the missing rows alone
        if mask is None:
            if any(r.shape != rows[0].shape for r in rows):
                return None
            return torch.stack(rows).to(self.device, non_blocking=True)
        out = rows[0].new_zeros((*mask.shape, rows[0].shape[-1]))
        for i, row in enumerate(rows):
            real = mask[i].cpu()
            if int(real.sum()) != row.shape[0]:
                return None  # the example changed length since it was cached: recompute
            out[i, real] = row
        return out.to(self.device, non_blocking=True)


def _position_mask(inputs: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor | None:
    """Which positions count in the KL: None (all) for (B, C) logits, the real tokens for (B, L, V) logits."""
    if logits.dim() != 3:
        return None
    attention, labels = inputs.get("attention_mask"), inputs.get("labels")
    if attention is not None and attention.shape == logits.shape[:2]:
        return attention != 0
    if labels is not None and labels.shape == logits.shape[:2]:
        return labels != -100
    return None


def load_teacher(teacher: nn.Module | str, student: nn.Module, device: torch.device | str) -> nn.Module:
    """The teacher module, frozen, in eval mode, on ``device`` (a checkpoint path is loaded with ``hf_px.load``)."""
    if isinstance(teacher, str):
        from ..export.serialization import load

        # loading may initialise missing weights from the global RNG; keep the seeded stream of the run intact
        with torch.random.fork_rng(devices=[]):
            teacher = load(teacher)
    student_params = {id(p) for p in student.parameters()}
    if any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError("the teacher shares parameters with the model being trained; pass a separate copy, e.g. "
                         "teacher=copy.deepcopy(dense_model) taken before pruning, or its saved folder.")
    return teacher.to(device).eval().requires_grad_(False)


def build_distiller(config: DistillConfig | Mapping[str, Any] | None, student: nn.Module,
                    accelerator: Any = None) -> Distiller | None:
    """A :class:`Distiller` for ``student`` (None when ``config`` is None); checks depth/width for hidden matching.

    The teacher goes to ``accelerator.device`` as a plain module: frozen, it needs no DDP/FSDP wrapper.
    """
    if config is None:
        return None
    if isinstance(config, Mapping):  # e.g. FinetuneConfig.to_dict() read back, or a run file's section
        config = DistillConfig(**config)
    if not isinstance(config, DistillConfig):
        raise TypeError(f"FinetuneConfig.distill must be a hf_px.DistillConfig or None, got {type(config).__name__}.")
    if config.teacher is None:
        raise ValueError("DistillConfig.teacher is None: pass the dense model or its checkpoint folder, e.g. "
                         "DistillConfig(teacher='out/dense').")
    base_cfg = getattr(_base(student), "config", None)
    if task_of(student) is not Task.CAUSAL_LM and (
            getattr(base_cfg, "problem_type", None) == "regression" or getattr(base_cfg, "num_labels", 2) == 1):
        raise ValueError("distillation matches class distributions, but the model has a single-output (regression) "
                         "head; fine-tune it without distill.")
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    teacher = load_teacher(config.teacher, student, device)
    if config.hidden_weight > 0:
        s, t = _depth_width(student), _depth_width(teacher)
        if config.hidden_layers is not None and None not in s + t:
            check_hidden_layers(config.hidden_layers, s[0], t[0])
            if s[1] != t[1]:
                raise ValueError(_mismatch(*s, *t))
        elif None not in s + t and s != t:
            raise ValueError(_mismatch(*s, *t))
    return Distiller(config, teacher, device, accelerator.autocast if accelerator is not None else None)
