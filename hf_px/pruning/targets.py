"""The prunable set: which weight tensors (or parts of fused tensors) receive masks.

A :class:`Target` is one scored unit: a full weight, or one part of a fused weight (GPT-2 ``c_attn``).
Masks are always held per parameter (full shape); a target reads and writes its slice of it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..registry import ArchSpec, find_arch, get_arch, get_module, is_linear_like


@dataclass(eq=False)
class Target:
    key: str  # unique name: parameter name, plus "[role]" for parts of fused weights
    param_name: str  # name in model.named_parameters()
    param: nn.Parameter
    block: int = -1
    role: str = "linear"
    split: tuple[int, int, int] | None = None  # (dim, index, parts)
    on_path: bool = True  # False: PX gives no score, the density follows `follows` roles of the block
    follows: tuple[str, ...] = ()

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This target's part of a tensor shaped like the full parameter."""
        if self.split is None:
            return tensor
        dim, index, parts = self.split
        size = tensor.shape[dim] // parts
        return tensor.narrow(dim, index * size, size)

    def numel(self) -> int:
        return self.view(self.param).numel()


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def arch_targets(model: nn.Module, spec: ArchSpec) -> list[Target]:
    """Targets of a registered architecture: the block matrices listed in the registry entry."""
    names = _param_names(model)
    base = getattr(model, "base_model", model)
    off_path = {role: grp.follows for grp in spec.off_path for role in grp.roles}
    targets = []
    for b, block in enumerate(spec.block_modules(base)):
        for ref in spec.layers:
            module = get_module(block, ref.path)
            pname = names[id(module.weight)]
            key = pname if ref.split is None else f"{pname}[{ref.role}]"
            targets.append(Target(
                key=key, param_name=pname, param=module.weight, block=b, role=ref.role, split=ref.split,
                on_path=ref.role not in off_path, follows=off_path.get(ref.role, ()),
            ))
    return targets


def _repeated_blocks(model: nn.Module) -> list[nn.ModuleList]:
    """ModuleLists of at least two blocks of one type: the repeated trunk of a transformer."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({type(m) for m in module}) == 1 and any(is_linear_like(m) for m in module[0].modules()):
                found.append(module)
    return found


def generic_targets(model: nn.Module) -> list[Target]:
    """Every Linear/Conv1D weight inside the repeated blocks (opt-in for unregistered architectures)."""
    names = _param_names(model)
    targets = []
    for blocks in _repeated_blocks(model):
        for b, block in enumerate(blocks):
            for module in block.modules():
                if is_linear_like(module):
                    pname = names[id(module.weight)]
                    targets.append(Target(key=pname, param_name=pname, param=module.weight, block=b))
    if not targets:
        raise ValueError("generic mode found no nn.Linear inside a repeated block list (nn.ModuleList).")
    return targets


def plain_targets(model: nn.Module) -> list[Target]:
    """Every Linear and Conv2d weight of a plain (non-transformer) network, in module order."""
    names = _param_names(model)
    targets = []
    for i, module in enumerate(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))):
        pname = names[id(module.weight)]
        targets.append(Target(key=pname, param_name=pname, param=module.weight, block=i))
    if not targets:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer to prune.")
    return targets


def is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def collect_targets(model: nn.Module, generic: bool = False) -> list[Target]:
    """The prunable set of ``model``.

    Registered Hugging Face architectures use their registry entry; plain ``nn.Module`` networks (no
    ``transformers`` base class) prune every Linear/Conv2d; other Hugging Face models need ``generic=True``.
    """
    if not is_transformers_model(model):
        return plain_targets(model)
    spec = find_arch(model)
    if spec is not None:
        return arch_targets(model, spec)
    if not generic:
        get_arch(model)  # raises the explanatory error
    warnings.warn(
        f"{type(model).__name__} is not in the hf_px registry: generic mode prunes every Linear inside the "
        "repeated blocks; embeddings, norms and heads stay dense.", stacklevel=2,
    )
    return generic_targets(model)


def prunable_parameters(model: nn.Module, generic: bool = False) -> dict[str, nn.Parameter]:
    """Names and tensors of the parameters that carry masks (fused weights listed once)."""
    return {t.param_name: t.param for t in collect_targets(model, generic=generic)}
