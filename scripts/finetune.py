"""Entry point for ``accelerate launch``: ``hf-px finetune`` with the same flags.

Examples (configs in scripts/configs/):
    accelerate launch --config_file scripts/configs/accelerate_cpu.yaml scripts/finetune.py --model out/ \
        --dataset builtin:rotten_tomatoes --epochs 1 --output-dir ft/
    accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml scripts/finetune.py ...   # 2 CPU processes
    accelerate launch --config_file scripts/configs/accelerate_multi_gpu.yaml --num_processes 4 scripts/finetune.py ...
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    from hf_px.cli import main

    code = main(["finetune", *sys.argv[1:]])
    # torch's gloo teardown sometimes aborts a finished rank (docs/offline.md §5): leave without running it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
