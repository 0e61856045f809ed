"""``python -m hf_px.run CONFIG [flags]`` / ``accelerate launch -m hf_px.run CONFIG``: the ``hf-px run`` command.

``hf_px.run(config)`` (the function) lives in :mod:`hf_px.pipeline`; this module only gives it a ``-m`` entry
point. Importing it replaces nothing: the module is callable and forwards to the function.
"""

from __future__ import annotations

import sys
import types


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["run", *(sys.argv[1:] if argv is None else argv)])


class _CallableModule(types.ModuleType):
    # `import hf_px.run` rebinds the package attribute `hf_px.run` to this module; keep `hf_px.run(config)` working
    def __call__(self, *args, **kwargs):
        from .pipeline import run

        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
