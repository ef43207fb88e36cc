"""nbimagine: AI image generation that feels native in Jupyter.

``from nbimagine import Agent``; configs in :mod:`nbimagine.config`, the image tool in
:mod:`nbimagine.tools`, inputs and results in :mod:`nbimagine.events`, errors in
:mod:`nbimagine.errors`, the offline emulator in :mod:`nbimagine.emulator`.
``%load_ext nbimagine`` adds the ``%%imagine`` magic.

Everything heavy (the SDKs, Pillow, IPython) is imported on first use, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Agent", "BatchJob", "BatchStatus", "Cost", "Estimate", "ImageSet", "PromptResult", "Reply", "Usage",
           "__version__", "estimate", "generate_many", "history", "jobs", "load_ipython_extension", "panel",
           "repair_history", "studio", "submit_batch", "unload_ipython_extension"]

if TYPE_CHECKING:
    from ._agent import Agent, Reply
    from ._batch import BatchJob, jobs, submit_batch
    from ._cost import Cost, Estimate, Usage, estimate
    from ._many import ImageSet, PromptResult, generate_many
    from ._providers._base import BatchStatus

_LAZY = {
    "Agent": ("._agent", "Agent"),
    "Reply": ("._agent", "Reply"),
    "Usage": ("._cost", "Usage"),
    "Cost": ("._cost", "Cost"),
    "Estimate": ("._cost", "Estimate"),
    "estimate": ("._cost", "estimate"),
    "history": ("._history", "history"),
    "repair_history": ("._history", "repair_history"),
    "generate_many": ("._many", "generate_many"),
    "ImageSet": ("._many", "ImageSet"),
    "PromptResult": ("._many", "PromptResult"),
    "submit_batch": ("._batch", "submit_batch"),
    "BatchJob": ("._batch", "BatchJob"),
    "BatchStatus": ("._providers._base", "BatchStatus"),
    "jobs": ("._batch", "jobs"),
    "panel": ("._widgets", "panel"),
    "studio": ("._widgets", "studio"),
}


# Public submodules, importable as attributes (``nbimagine.config``) without an import of their own.
_SUBMODULES = ("config", "emulator", "errors", "events", "tools")


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nbimagine' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The public surface only (tab completion, dir()): not the typing helpers this module imports.
    return sorted({*__all__, *_SUBMODULES})


def load_ipython_extension(ipython: Any) -> None:
    from ._magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from ._magics import unload_ipython_extension as unload

    unload(ipython)
