"""A user's own model, named by an import path ``"package.module:function"``.

Every entry point that builds a model (the ``ServerApp``'s ``model`` run config,
``disco-fl demo --model``, ``disco-fl train --model``, :class:`disco_fl.fl.ModelSpec`) takes
either a built-in name (:data:`disco_fl.models.MODELS`) or such a path, as Flower's own app
templates keep the model in the user's code:

- ``function`` is any callable returning a ``torch.nn.Module`` (a function, or an
  ``nn.Module`` subclass); a dotted attribute (``"pkg.mod:Factory.build"``) is followed.
- It is called with those of the standard arguments (:data:`STANDARD_ARGS`:
  ``num_classes``, ``in_channels``, ``norm``) that its signature names, all of them if it
  takes ``**kwargs``; a callable of no arguments is called with none. Nothing else is passed:
  put other settings in the function.
- An optional ``checkpoint`` (a state dict file) is loaded strictly with ``weights_only=True``
  (:func:`~disco_fl.models.checkpoint.load_checkpoint_strict`: every key and shape checked, a
  checksum of ours verified): nothing is ever unpickled.

Importing a module runs its code: the path is imported only in the process that builds the
model (the ServerApp's, the demo's, ``disco-fl train``'s), from that machine's own
environment, exactly as Flower imports an app's components. Every failure is a
:class:`ModelImportError` (a ``ValueError``) naming the path: a malformed path, a module that
cannot be imported, a missing attribute, a result that is not an ``nn.Module``, an error
raised by the function.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from disco_fl.models.checkpoint import load_checkpoint_strict
from disco_fl.models.registry import MODELS, build_model

__all__ = [
    "STANDARD_ARGS",
    "ModelImportError",
    "call_with_standard_args",
    "import_model_fn",
    "is_import_path",
    "load_model",
]

STANDARD_ARGS = ("num_classes", "in_channels", "norm")


class ModelImportError(ValueError):
    """A model import path that cannot be resolved to an ``nn.Module``; names the path."""


def is_import_path(name: str) -> bool:
    """Whether ``name`` is an import path (``"package.module:function"``), not a built-in."""
    return ":" in name


def import_model_fn(path: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` (imported now).

    Raises
    ------
    ModelImportError
        A malformed path, a module that cannot be imported (the message says where it must be
        installed), a missing attribute, or an attribute that is not callable.
    """
    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr or ":" in attr:
        raise ModelImportError(
            f"model {path!r}: expected a built-in name ({', '.join(sorted(MODELS))}) or an "
            "import path 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or whatever the module raised while running
        raise ModelImportError(
            f"model {path!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); "
            "install the package (or put it on PYTHONPATH) on the machine that builds the "
            "model"
        ) from e
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([mod_name, *attr.split(".")[:i]])
            raise ModelImportError(f"model {path!r}: {owner!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelImportError(
            f"model {path!r}: {attr!r} is a {type(obj).__name__}, not a callable returning "
            "an nn.Module"
        )
    return obj  # type: ignore[no-any-return]


def call_with_standard_args(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` (standard arguments) that ``fn``'s signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature (some builtins): call with none
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    names = {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in kwargs.items() if k in names}


def load_model(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A built-in model (by name) or a user's (``"package.module:function"``), with an
    optional checkpoint loaded strictly.

    Parameters
    ----------
    name : str
        A key of :data:`~disco_fl.models.MODELS` or an import path (see the module
        docstring).
    checkpoint : path, optional
        A state dict file (``torch.save(model.state_dict(), ...)`` or ours, checksummed),
        read with ``weights_only=True`` and loaded strictly.
    **kwargs
        Standard arguments (:data:`STANDARD_ARGS`). A built-in takes them as its builder
        does; a user's callable gets those its signature names.

    Raises
    ------
    ModelImportError
        For an import path that cannot be resolved (see :func:`import_model_fn`), a function
        that raises, or a result that is not an ``nn.Module``.
    ValueError
        An unknown built-in name; :class:`~disco_fl.models.checkpoint.CheckpointError` for a
        checkpoint that is missing, corrupt or does not fit.
    """
    if is_import_path(name):
        unknown = sorted(set(kwargs) - set(STANDARD_ARGS))
        if unknown:
            raise TypeError(f"load_model: unexpected arguments {unknown}")
        fn = import_model_fn(name)
        args = call_with_standard_args(fn, kwargs)
        try:
            model = fn(**args)
        except Exception as e:
            raise ModelImportError(
                f"model {name!r}: calling it with {args} raised {type(e).__name__}: {e}"
            ) from e
        if not isinstance(model, nn.Module):
            raise ModelImportError(
                f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module"
            )
    else:
        model = build_model(name, **kwargs)
    if checkpoint:
        load_checkpoint_strict(model, checkpoint)
    return model
