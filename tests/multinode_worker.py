"""One process of a simulated two-machine fine-tune, for tests/test_multinode.py.

Each "machine" is an ``accelerate launch --multi_gpu --num_machines 2 --machine_rank R --main_process_ip
127.0.0.1`` of this script (one gloo rank each; hf_px builds its Accelerator with ``cpu=True`` without a GPU).
To launch the setup only once, the script runs ``hf-px finetune`` twice in the same processes:

1. ``OUT/ref``: an uninterrupted run that writes checkpoints;
2. ``OUT/ft``: a copy of ``OUT/ref`` cut back to an earlier checkpoint (as if killed), resumed with ``--resume``.

Usage: multinode_worker.py OUT CUT_STEP -- <hf-px finetune arguments without --output-dir>
"""

from __future__ import annotations

import os
import shutil
import sys


def main() -> int:
    from accelerate import PartialState

    from hf_px.cli import main as cli

    out, cut = sys.argv[1], int(sys.argv[2])
    args = sys.argv[sys.argv.index("--") + 1:]
    code = cli(["finetune", *args, "--output-dir", os.path.join(out, "ref")])
    state = PartialState()
    if code:
        return code
    if state.is_main_process:  # the output folder is shared by both "machines", as a real cluster needs
        ref, ft = os.path.join(out, "ref"), os.path.join(out, "ft")
        shutil.copytree(os.path.join(ref, "checkpoints"), os.path.join(ft, "checkpoints"))
        for name in os.listdir(os.path.join(ft, "checkpoints")):
            if int(name.split("_")[1]) > cut:
                shutil.rmtree(os.path.join(ft, "checkpoints", name))
    state.wait_for_everyone()
    return cli(["finetune", *args, "--output-dir", os.path.join(out, "ft"), "--resume"])


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # torch 2.13's gloo teardown sometimes aborts a finished rank (docs/offline.md §5)
