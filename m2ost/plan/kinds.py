"""The model kinds: what each is and what the workflow does with it (standard library only).

One registry, read by the Snakefile while planning (which kinds need the neural training
launcher and which settings reach their ``train`` rule) and by the package (the ``--kind``
choices, the trainer that fits a kind, the kinds a ``model.pt`` may hold).

Adding a kind: add a :class:`ModelKind` here; implement it in :mod:`m2ost.learn` (a network
variant for a neural kind, or a baseline class in ``m2ost.learn.baselines.BASELINES`` under the
same name); add its name to the ``models`` and ``predict.model`` enums of
``workflow/schemas/config.schema.yaml`` (``tests/test_layout.py`` checks they match).
"""

from __future__ import annotations

from dataclasses import dataclass

from m2ost.errors import InputError

# The training settings that a baseline uses (which spots it fits on, and how they are read):
# a change of any other training setting must not refit it.
BASELINE_TRAIN_KEYS = ("seed", "val_fraction", "drop_padded", "workers")


@dataclass(frozen=True)
class ModelKind:
    """One model kind.

    ``neural``: trained by the network loop (``m2ost.learn.trainer``: torch, GPUs, the
    distributed launcher, the ``model`` settings); else fitted in one pass as a baseline.
    ``train_keys``: the ``train`` settings it uses (None = all of them).
    ``views``: the views it always uses (None = every view of the bundle).
    """

    name: str
    neural: bool
    description: str
    train_keys: tuple[str, ...] | None = None
    views: tuple[int, ...] | None = None


KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("m2ost", True, "M2OST on every view"),
    ModelKind("m2ost_single", True, "M2OST on view 0 only (the single-view ablation)", views=(0,)),
    ModelKind("ridge", False, "ridge regression on handcrafted colour and texture features of the views",
              train_keys=BASELINE_TRAIN_KEYS),
    ModelKind("mean", False, "the training-set mean expression for every spot", train_keys=BASELINE_TRAIN_KEYS),
)}


def model_kind(name: str) -> ModelKind:
    """The kind called ``name``; an InputError listing the kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise InputError(f"model kind '{name}' is not one of {', '.join(KINDS)}") from None


def is_neural(name: str) -> bool:
    return model_kind(name).neural
