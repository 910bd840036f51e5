"""Lets vLLM's LLaVA and Qwen2-VL modules import without torchvision (kvfold's CPU environment).

vLLM 0.32's ``llava.py`` (through ``pixtral.py``) and ``qwen2_vl.py`` import one plain helper each
from a transformers module that also imports torchvision at its top: ``_num_image_tokens`` from
``transformers.models.pixtral.image_processing_pixtral`` and ``smart_resize`` from
``transformers.models.qwen2_vl.image_processing_qwen2_vl``. transformers 5 ships the same helpers,
character for character, in the PIL-backend siblings (``image_processing_pil_*``), and already
falls back to the PIL image processors by itself when torchvision is missing.

:func:`ensure_importable` therefore registers, only when torchvision is not installed (when
transformers itself falls back to PIL) and only for a module not imported yet, a stand-in module
under the torchvision module's name holding those helpers from the PIL sibling. Any other name
looked up there fails with a message naming torchvision, so nothing silently changes behaviour.
With torchvision installed it does nothing. kvfold's plugin calls it when it registers models, so
vLLM's stock LLaVA imports too (stock Qwen2-VL still cannot build its HF processor: see
``Qwen2VLImageOnlyProcessor`` in :mod:`kvfold.models.fourier_vlm.qwen2_vl`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# torchvision-backed module -> (PIL sibling, helpers vLLM imports from it)
_STAND_INS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformers.models.pixtral.image_processing_pixtral": (
        "transformers.models.pixtral.image_processing_pil_pixtral", ("_num_image_tokens",)),
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": (
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl", ("smart_resize",)),
}


def torchvision_installed() -> bool:
    """transformers' own test for its torchvision backends (no import: cheap in every process)."""
    return importlib.util.find_spec("torchvision") is not None


class _StandIn(types.ModuleType):
    """Resolves its helpers from the PIL sibling on first use (the plugin installs it in every
    vLLM process, where importing transformers' image-processing stack would cost a second)."""

    def __getattr__(self, name: str):
        if name in self.__all__:
            value = getattr(importlib.import_module(self._kvfold_source), name)
            setattr(self, name, value)
            return value
        # AttributeError, so hasattr() probes stay False; `from m import x` turns it into an
        # ImportError with this message as its context.
        raise AttributeError(
            f"{self.__name__}.{name} needs torchvision, which is not installed; kvfold provides "
            f"only {', '.join(self.__all__)} from {self._kvfold_source} in its place"
        )


def _imports_torchvision(module: str) -> bool:
    """Whether ``module``'s source imports torchvision (read, not executed: cheap)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    return "\nimport torchvision" in source or "\nfrom torchvision" in source


def ensure_importable() -> list[str]:
    """Install the stand-ins that are needed; returns the module names it installed."""
    if torchvision_installed():
        return []
    installed = []
    for name, (source, helpers) in _STAND_INS.items():
        # Not for a module already imported, nor for one that imports without torchvision
        # (e.g. transformers 4.x, where these are the PIL image processors themselves).
        if name in sys.modules or not _imports_torchvision(name):
            continue
        if importlib.util.find_spec(source) is None:
            continue
        module = _StandIn(name, f"kvfold stand-in: {', '.join(helpers)} from {source}")
        module.__all__ = list(helpers)
        module._kvfold_source = source
        sys.modules[name] = module
        installed.append(name)
    return installed
