"""Masked LoRA: adapters on the registry targets, merged without refilling pruned weights."""

from __future__ import annotations

import datasets
import pytest
import torch
from tiny_models import VOCAB, tiny

from hf_px.finetuning.loop import FinetuneConfig, finetune
from hf_px.finetuning.lora import apply_lora, lora_target_modules, merge_lora
from hf_px.pruning.masks import apply_masks
from hf_px.pruning.targets import collect_targets


def _pruned(family: str, density: float = 0.4, seed: int = 0):
    model = tiny(family, seed=seed, **({"hidden_dropout_prob": 0.0} if family == "bert" else {}))
    g = torch.Generator().manual_seed(seed)
    masks = {t.param_name: torch.rand(t.param.shape, generator=g) < density for t in collect_targets(model)}
    apply_masks(model, masks)
    return model, masks


def _randomize_adapters(peft_model) -> None:
    # B starts at zero (delta = 0); give the adapters a non-trivial delta everywhere
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_merge_keeps_every_pruned_weight_zero_and_the_function(family):
    model, masks = _pruned(family)
    kept = sum(int(m.sum()) for m in masks.values())
    peft_model = apply_lora(model, masks, r=4, dropout=0.0)
    _randomize_adapters(peft_model)
    peft_model.eval()
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    merged = merge_lora(peft_model)
    assert not hasattr(merged, "peft_config")
    params = dict(merged.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
    # the adapters did change the kept weights (delta is non-zero there)
    assert sum(int((params[n] != 0).sum()) for n in masks) == kept
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    # training-time forward (masked delta) equals the merged model: what was trained is what is saved
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_targets_come_from_the_registry():
    model, _ = _pruned("gpt2")
    names = lora_target_modules(model)
    assert names == list(dict.fromkeys(t.param_name.rsplit(".", 1)[0] for t in collect_targets(model)))
    assert sum(n.endswith("attn.c_attn") for n in names) == 2  # fused QKV listed once per block
    peft_model = apply_lora(model, r=2)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert {a.split("base_model.model.")[-1] for a in adapted} == set(names)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


def test_bad_target_module_names_the_fix():
    model, _ = _pruned("bert")
    with pytest.raises(ValueError, match="lora_target_modules"):
        apply_lora(model, target_modules=["bert.encoder.layer.9.attention.self.query"])


def test_finetune_with_lora_trains_adapters_and_head_and_keeps_sparsity():
    model, masks = _pruned("bert")
    head_before = model.classifier.weight.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("bert.embeddings")}
    targets_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in masks}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (32, 8), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * 32,
                                     "label": (ids[:, 0] % 3).tolist()})
    out = finetune(model, ds, ds, FinetuneConfig(epochs=2, batch_size=8, learning_rate=1e-2, peft="lora",
                                                 lora_r=4, progress_bar=False, metrics=("accuracy", "f1")))
    merged = out.model
    assert type(merged).__name__ == "BertForSequenceClassification"
    params = dict(merged.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
    assert out.sparsity["nonzero_after"] == out.sparsity["kept_before"]
    assert not torch.equal(merged.classifier.weight, head_before)  # the head was trained (modules_to_save)
    for name, value in frozen.items():  # everything outside adapters and head is frozen
        assert torch.equal(params[name], value), name
    assert all(not torch.equal(params[n], targets_before[n]) for n in masks)  # merged deltas landed
    assert {"eval_accuracy", "eval_f1", "eval_loss"} <= set(out.metrics)


def test_unmerged_adapters_are_saved_and_merge_later(tmp_path):
    model, masks = _pruned("bert")
    ds = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 16, "attention_mask": [[1] * 4] * 16,
                                     "label": [0, 1, 2, 0] * 4})
    out = finetune(model, ds, config=FinetuneConfig(max_steps=3, batch_size=8, peft="lora", merge_lora=False,
                                                    learning_rate=1e-2, output_dir=str(tmp_path),
                                                    progress_bar=False))
    assert hasattr(out.model, "peft_config")
    assert (tmp_path / "model" / "adapter_config.json").exists()
    assert not (tmp_path / "model" / "config.json").exists()  # adapters only, not a full copy of the model
    merged = merge_lora(out.model)
    params = dict(merged.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
