"""``python -m hf_px COMMAND ...``: the ``hf-px`` command line, also under ``accelerate launch``.

Example:
    python -m hf_px run scripts/configs/tiny-smoke.yaml
    accelerate launch --config_file scripts/configs/accelerate_cpu2.yaml -m hf_px run scripts/configs/tiny-smoke.yaml
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
