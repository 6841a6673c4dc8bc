"""Optional dependencies, imported when first needed, with an install hint when missing."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with the ``pip install seqloss[extra]`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is needed here: pip install 'seqloss[{extra}]'") from error
