"""Length-grouped batches: every example once per epoch, little padding, same order across resumes."""

from __future__ import annotations

import datasets
import pytest
import torch
from tiny_models import VOCAB, tiny

from hf_px.finetuning.data import LengthGroupedSampler, sequence_lengths
from hf_px.finetuning.loop import FinetuneConfig, finetune


def _lengths(n: int = 400, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 60, (n,), generator=g).tolist()


def _padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_each_epoch_is_a_permutation_with_far_less_padding_than_a_shuffle():
    lengths, bs = _lengths(), 16
    sampler = LengthGroupedSampler(lengths, bs, window=10, seed=3)
    random_order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(3)).tolist()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(lengths)))
        grouped, shuffled = _padded_tokens(order, lengths, bs), _padded_tokens(random_order, lengths, bs)
        assert grouped < 0.8 * shuffled, (grouped, shuffled)
        assert grouped >= sum(lengths)


def test_order_depends_on_seed_and_epoch_only():
    lengths = _lengths()
    a, b = LengthGroupedSampler(lengths, 8, seed=1), LengthGroupedSampler(lengths, 8, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(LengthGroupedSampler(lengths, 8, seed=2)) != list(a)


def test_only_the_last_batch_is_short():
    lengths, bs = _lengths(n=101), 8
    order = list(LengthGroupedSampler(lengths, bs, window=4, seed=0))
    # 101 = 12 full batches + 5: with windows of 32 examples the short slices would be mid-epoch
    firsts = [order[i:i + bs] for i in range(0, 96, bs)]
    assert all(len(b) == bs for b in firsts) and len(order[96:]) == 5


def test_untokenized_data_get_a_clear_error():
    with pytest.raises(ValueError, match="group_by_length"):
        sequence_lengths(datasets.Dataset.from_dict({"pixel_values": [[0.0]]}))


def _data(n: int = 40, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(2, 12, (n,), generator=g)]
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
                                       "label": [r[0] % 3 for r in ids]})


class _Killed(Exception):
    pass


def test_fine_tuning_with_groups_resumes_to_the_same_weights(tmp_path):
    cfg = dict(epochs=3, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0, log_every=1, progress_bar=False,
               group_by_length=True)
    seen = []
    ref = finetune(tiny("bert"), _data(), config=FinetuneConfig(**cfg))

    def kill(step, _):
        if step == 7:
            raise _Killed

    with pytest.raises(_Killed):
        finetune(tiny("bert"), _data(), config=FinetuneConfig(**cfg, output_dir=str(tmp_path), save_every=5),
                 on_step=kill)
    resumed = finetune(tiny("bert"), _data(), config=FinetuneConfig(**cfg, output_dir=str(tmp_path), save_every=5,
                                                                   resume=True), on_step=lambda s, r: seen.append(s))
    assert resumed.resumed_from is not None and seen[0] == 6 and resumed.global_step == ref.global_step == 15
    ref_params = dict(ref.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-6, rtol=1e-5)


def test_the_training_loop_uses_the_groups():
    def tokens_seen(group: bool) -> int:
        model, seen = tiny("bert"), []
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()),
                                        with_kwargs=True)
        finetune(model, _data(n=96), config=FinetuneConfig(epochs=1, batch_size=8, progress_bar=False,
                                                           group_by_length=group))
        return sum(seen)

    assert tokens_seen(True) < 0.85 * tokens_seen(False)
