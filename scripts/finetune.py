"""Entry point for ``accelerate launch``: the same options as ``hf-px finetune``.

Examples (configs in scripts/configs/):
    accelerate launch --config_file scripts/configs/accelerate_cpu.yaml scripts/finetune.py --model out/ \
        --dataset builtin:rotten_tomatoes --epochs 1 --output-dir ft/
    accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml scripts/finetune.py ...   # 2 CPU processes
    accelerate launch --config_file scripts/configs/accelerate_multi_gpu.yaml --num_processes 4 scripts/finetune.py ...
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from hf_px.commands.finetune import add_arguments, run

    parser = add_arguments(argparse.ArgumentParser(prog="scripts/finetune.py", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    code = main()
    # torch's gloo teardown sometimes aborts a finished rank (docs/offline.md §5): leave without running it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
