"""Sparse kernels only where they pay: pick, per layer, the faster of dense and CSR, then check the whole model.

Whether a CSR matmul beats the dense BLAS kernel depends on the layer's sparsity and shape, on the number of rows
it multiplies (batch x tokens) and on the thread count, so nothing is decided from a rule: each candidate layer is
timed both ways at the user's batch shape, and the layers where CSR is faster are converted. Faster layers do not
always add up to a faster model (memory traffic, the layout copies around each CSR call), so the whole forward
is then timed, dense against the chosen mix, and if the mix is not faster everything goes back to dense. The
contract is "never slower than dense", as measured on this machine at this batch shape and thread count.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .kernels import CSRLinear, densify, set_module
from .timing import Timer, interleaved_median_ms

DEFAULT_BATCH_SHAPE = (1, 128)


@dataclasses.dataclass
class LayerKernel:
    """One ``nn.Linear`` of the model: its sparsity, both timings (``None`` when not timed) and the kernel it runs.

    ``selected`` is what the per-layer timing picked; ``kernel`` is what runs, which is ``"dense"`` for every
    layer when the whole-model check reverted the selection.
    """

    name: str
    shape: tuple[int, int]
    rows: int | None
    sparsity: float
    dense_ms: float | None = None
    sparse_ms: float | None = None
    selected: str = "dense"
    kernel: str = "dense"
    note: str = ""


@dataclasses.dataclass
class KernelReport:
    """What :func:`choose_kernels` (or ``hf_px.load(kernels=...)``) decided, and what it gained.

    ``dense_ms``/``ms`` are medians of the whole forward at ``batch_shape``, dense and with the kernels kept
    (``None`` when no layer was worth a whole-model check); ``speedup = dense_ms / ms`` (1.0 when dense).
    """

    mode: str
    batch_shape: tuple[int, int] | None
    threads: int
    layers: list[LayerKernel]
    dense_ms: float | None = None
    ms: float | None = None
    speedup: float = 1.0
    reverted: bool = False
    max_abs_diff: float | None = None
    note: str = ""
    torch_version: str = torch.__version__

    @property
    def sparse_layers(self) -> list[str]:
        """Names of the layers running the CSR kernel."""
        return [layer.name for layer in self.layers if layer.kernel == "csr"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``json.dumps(report.to_dict())``)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        if self.mode == "dense":
            return f"kernels='dense': all {len(self.layers)} linear layers dense."
        shape = "x".join(map(str, self.batch_shape or ()))
        head = f"kernels={self.mode!r} at batch {shape}, {self.threads} thread{'s' * (self.threads != 1)}: "
        timed = sum(layer.dense_ms is not None for layer in self.layers)
        body = f"{len(self.sparse_layers)}/{len(self.layers)} linear layers CSR ({timed} timed)"
        if self.dense_ms is not None:
            body += f"; model {self.ms:.2f} ms vs {self.dense_ms:.2f} ms dense ({self.speedup:.2f}x)"
        return head + body + (f"; {self.note}" if self.note else ".")


def check_batch_shape(batch_shape: Any) -> tuple[int, int]:
    """``batch_shape`` as ``(batch, tokens)``, or a :class:`~hf_px.errors.ConfigError` naming the fix."""
    ok = (isinstance(batch_shape, (tuple, list)) and len(batch_shape) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in batch_shape))
    if not ok:
        raise ConfigError(f"batch_shape must be two positive integers (batch, tokens), got {batch_shape!r}; "
                          "e.g. batch_shape=(1, 128).")
    return int(batch_shape[0]), int(batch_shape[1])


def example_inputs(model: nn.Module, batch_shape: tuple[int, int] = DEFAULT_BATCH_SHAPE, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Random inputs for ``model`` at ``batch_shape`` (token ids and a full attention mask; images for vision).

    Vision models take ``(batch, channels, image_size, image_size)`` pixels: their token count follows from the
    image size, so ``batch_shape[1]`` is not used. Other inputs (audio...) need ``inputs=`` in
    :func:`choose_kernels`.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                          intermediate_size=64, vocab_size=100))
        >>> {k: tuple(v.shape) for k, v in example_inputs(m, (2, 16)).items()}
        {'input_ids': (2, 16), 'attention_mask': (2, 16)}
    """
    batch, tokens = check_batch_shape(batch_shape)
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(seed)
    if main == "input_ids" and getattr(config, "vocab_size", None):
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(limit, int) and tokens > limit:
            raise ConfigError(f"batch_shape {batch_shape!r} has {tokens} tokens but the model takes at most {limit}; "
                              f"pass batch_shape=({batch}, {limit}) or fewer tokens.")
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, tokens), generator=g),
                  "attention_mask": torch.ones(batch, tokens, dtype=torch.long)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = inputs["input_ids"].clone()
        return inputs
    if main == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), h, w, generator=g)}
    raise ConfigError(f"cannot build example inputs for {type(model).__name__} (main input {main!r}); pass "
                      "inputs={...}, a dict of the tensors its forward takes, to choose_kernels.")


def _check_args(model: nn.Module, min_sparsity: float, min_speedup: float, repeats: int, model_repeats: int,
                timer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"choose_kernels needs a torch nn.Module, got {type(model).__name__}.")
    devices = {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}
    if devices - {"cpu"}:
        raise ConfigError(f"choose_kernels times CPU kernels but the model is on {sorted(devices - {'cpu'})}; "
                          "move it first with model.to('cpu').")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ConfigError(f"min_sparsity must be a fraction of zeros in [0, 1], got {min_sparsity!r}.")
    if not min_speedup >= 1.0:
        raise ConfigError(f"min_speedup must be >= 1 (below 1 would keep kernels measured slower than dense), "
                          f"got {min_speedup!r}.")
    for key, value in (("repeats", repeats), ("model_repeats", model_repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer (timing rounds per kernel), got {value!r}.")
    if timer is not None and not callable(timer):
        raise ConfigError(f"timer must be a callable timer(fns, repeats, layer) -> dict of ms, got {timer!r}.")


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and not hasattr(output, "to_tuple"):
        return next(iter(output.values()))
    return output[0]  # a transformers ModelOutput or a tuple: logits / last_hidden_state come first


def _twin(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` sharing every parameter and buffer (no weight is copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _survey(model: nn.Module, inputs: dict[str, torch.Tensor], min_sparsity: float
            ) -> tuple[list[LayerKernel], torch.Tensor]:
    """Every ``nn.Linear`` with its sparsity and the rows it multiplies in one dense forward (whose output is
    returned too); ``note`` says why a layer is not a candidate."""
    names_of: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(pname)
    rows: dict[str, tuple[int, ...]] = {}
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's return replaces args
            rows.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in linears]
    try:
        with torch.no_grad():
            reference = _first_tensor(model(**inputs))
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for name, m in linears:
        w = m.weight
        shape = rows.get(name)
        entry = LayerKernel(name=name, shape=(m.out_features, m.in_features),
                            rows=None if shape is None else int(torch.Size(shape[:-1]).numel()),
                            sparsity=float((w == 0).float().mean()))
        if w.dtype != torch.float32:
            entry.note = f"{str(w.dtype).removeprefix('torch.')}, not float32"
        elif len(names_of.get(id(w), [])) > 1:
            entry.note = "weight tied to " + ", ".join(n for n in names_of[id(w)] if not n.startswith(name + "."))
        elif shape is None:
            entry.note = "not called in the forward"
        elif entry.sparsity < min_sparsity:
            entry.note = f"sparsity below {min_sparsity:g}"
        layers.append(entry)
    return layers, reference


@torch.no_grad()
def choose_kernels(
    model: nn.Module,
    batch_shape: tuple[int, int] = DEFAULT_BATCH_SHAPE,
    *,
    inputs: dict[str, torch.Tensor] | None = None,
    min_sparsity: float = 0.7,
    min_speedup: float = 1.03,
    repeats: int = 7,
    model_repeats: int = 7,
    timer: Timer | None = None,
) -> KernelReport:
    """Run CSR kernels in the ``nn.Linear`` layers of ``model`` where they make it faster; never make it slower.

    In place, on CPU: the model is put in eval mode (CSR layers are inference-only). Each float32 layer with at
    least ``min_sparsity`` zeros is timed dense vs CSR on an input with the rows it gets at ``batch_shape``
    (interleaved, median of ``repeats``), and kept as CSR when at least ``min_speedup`` times faster. Then the
    whole forward is timed, dense vs that mix (median of ``model_repeats``), twice; unless the mix is
    ``min_speedup`` times faster both times, every layer goes back to dense and the report says ``reverted``
    (its speed-up is the smaller of the two measurements). Choices hold for this machine,
    batch shape and ``torch.get_num_threads()``; call again if those change. CSR layers already in ``model`` are
    made dense first. Undo with :func:`hf_px.inference.densify`.

    Args:
        model: a pruned model on CPU (a transformers model, or any module when ``inputs`` is given).
        batch_shape: ``(batch, tokens)`` of the inputs to optimise for.
        inputs: the forward's keyword arguments to time with; default: :func:`example_inputs` at ``batch_shape``.
        min_sparsity: layers with a smaller fraction of zeros are not timed (CSR cannot win there).
        min_speedup: how much faster (ratio of medians) a layer, then the model, must be to keep CSR; the margin
            keeps timing noise from deciding.
        repeats, model_repeats: timing rounds per kernel for each layer, and for the whole model.
        timer: ``timer(fns, repeats, layer) -> {"dense": ms, "sparse": ms}``
            (default :func:`hf_px.inference.interleaved_median_ms`); inject one to force decisions in tests.

    Returns:
        A :class:`KernelReport`, also stored as ``model.hf_px_kernels``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                          intermediate_size=64, vocab_size=100))
        >>> with torch.no_grad():
        ...     m.encoder.layer[0].intermediate.dense.weight[:, 3:] = 0
        >>> fake = lambda fns, repeats, layer: {"dense": 2.0, "sparse": 1.0}   # CSR "faster" everywhere
        >>> report = choose_kernels(m, (1, 16), timer=fake)
        >>> report.sparse_layers, report.speedup
        (['encoder.layer.0.intermediate.dense'], 2.0)
    """
    _check_args(model, min_sparsity, min_speedup, repeats, model_repeats, timer)
    batch_shape = check_batch_shape(batch_shape)
    timer = timer or interleaved_median_ms
    densify(model)
    model.eval()
    if inputs is None:
        inputs = example_inputs(model, batch_shape)
    layers, reference = _survey(model, inputs, min_sparsity)
    report = KernelReport(mode="auto", batch_shape=batch_shape, threads=torch.get_num_threads(), layers=layers)

    csr: dict[str, CSRLinear] = {}
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        if layer.note:
            continue
        dense = model.get_submodule(layer.name)
        sparse = CSRLinear(dense)
        x = torch.randn(layer.rows, layer.shape[1], generator=g)  # values do not change either kernel's speed
        t = timer({"dense": lambda d=dense, x=x: d(x), "sparse": lambda s=sparse, x=x: s(x)}, repeats, layer.name)
        layer.dense_ms, layer.sparse_ms = float(t["dense"]), float(t["sparse"])
        if layer.dense_ms >= min_speedup * layer.sparse_ms:
            layer.selected = "csr"
            csr[layer.name] = sparse

    if not any(layer.dense_ms is not None for layer in layers):
        report.note = f"no layer is a candidate (float32, untied, at least {min_sparsity:g} zeros)"
    elif not csr:
        report.note = "no layer was faster with CSR"
    else:
        twin = _twin(model)
        for name, module in csr.items():
            set_module(twin, name, module)
        fns = {"dense": lambda: model(**inputs), "sparse": lambda: twin(**inputs)}
        report.max_abs_diff = float((_first_tensor(twin(**inputs)) - reference).abs().max())
        # two separate measurements must both show the gain: on a busy machine one lucky median can pass the
        # margin, and the decision would then rest on the very numbers it was selected by
        for _ in range(2):
            t = timer(fns, model_repeats, None)
            dense_ms, ms = float(t["dense"]), float(t["sparse"])
            ratio = dense_ms / ms if ms > 0 else float("inf")
            if report.dense_ms is None or ratio < report.speedup:
                report.dense_ms, report.ms, report.speedup = dense_ms, ms, ratio  # the less flattering
            if dense_ms < min_speedup * ms:
                break
        if report.speedup >= min_speedup:
            for name, module in csr.items():
                set_module(model, name, module)
                next(layer for layer in layers if layer.name == name).kernel = "csr"
        else:
            report.note = (f"the {len(csr)} layers faster with CSR made the model {report.ms:.2f} ms vs "
                           f"{report.dense_ms:.2f} ms dense, not {min_speedup:g}x faster: reverted to dense")
            report.reverted, report.ms, report.speedup = True, report.dense_ms, 1.0
    model.hf_px_kernels = report
    return report


def dense_report(model: nn.Module) -> KernelReport:
    """The report of a model left dense (``hf_px.load(kernels="dense")``): every layer's sparsity, no timing.

    Example:
        >>> dense_report(nn.Sequential(nn.Linear(4, 4))).layers[0].kernel
        'dense'
    """
    layers = [LayerKernel(name=n, shape=(m.out_features, m.in_features), rows=None,
                          sparsity=float((m.weight == 0).float().mean()))
              for n, m in model.named_modules() if type(m) is nn.Linear]
    report = KernelReport(mode="dense", batch_shape=None, threads=torch.get_num_threads(), layers=layers)
    model.hf_px_kernels = report
    return report
