"""How much of the embedding table a task uses: the case for (and against) dropping unused vocabulary rows.

MiniLM's word embeddings are 30,522 x 384 = 11.7M of its 22.7M parameters. A task that never produces most token
ids could ship a smaller table with a token map. This measures, on the built-in Rotten Tomatoes data, how many
distinct ids the training split produces, how many test tokens fall outside them (they would become [UNK]), and
the parameter and file-size saving.

    .venv/bin/python scripts/bench_vocab.py            # writes results/vocab.json
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from hf_px.builtin import minilm_path
from hf_px.data import load_dataset_any


def ids_of(tokenizer, texts) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in texts]


def main() -> None:
    path = minilm_path()
    tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    data = load_dataset_any("builtin:rotten_tomatoes")
    train = ids_of(tokenizer, data["train"]["text"])
    test = ids_of(tokenizer, data["test"]["text"])
    kept = set(tokenizer.all_special_ids).union(*map(set, train))
    test_tokens = sum(len(x) for x in test)
    unseen = sum(1 for x in test for i in x if i not in kept)
    unseen_examples = sum(1 for x in test if any(i not in kept for i in x))
    vocab, hidden = config.vocab_size, config.hidden_size
    record = {"model": "sentence-transformers/all-MiniLM-L6-v2 (packaged)", "dataset": "rotten_tomatoes",
              "vocab_size": vocab, "train_distinct_ids": len(kept), "kept_share": len(kept) / vocab,
              "test_tokens": test_tokens, "test_tokens_unseen": unseen, "test_token_unseen_share": unseen / test_tokens,
              "test_examples_with_unseen": unseen_examples, "test_examples": len(test),
              "embedding_params": vocab * hidden, "embedding_params_kept": len(kept) * hidden,
              "float32_bytes_saved": (vocab - len(kept)) * hidden * 4}
    out = Path("results/vocab.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("| measure | value |\n| --- | ---: |")
    for k, v in record.items():
        print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v:,} |" if isinstance(v, int) else
              f"| {k} | {v} |")


if __name__ == "__main__":
    main()
