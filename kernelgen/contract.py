"""The names shared with the runtime: lowmem_ops/_contract.py, read without importing lowmem_ops.

`import lowmem_ops` imports torch and registers the built-in tree, which must not be a condition
for running the generator (a damaged tree is repaired by a build). So the contract file is loaded
by itself, under its own module name: lowmem_ops, imported later, finds and shares that module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "lowmem_ops._contract"


def _load():
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    package = importlib.util.find_spec("lowmem_ops")  # locates the package; runs none of its code
    if package is None or not package.submodule_search_locations:
        raise ImportError("kernelgen needs the lowmem_ops package beside it (for lowmem_ops/_contract.py)")
    path = Path(list(package.submodule_search_locations)[0]) / "_contract.py"
    spec = importlib.util.spec_from_file_location(_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_NAME, None)
        raise
    return module


contract = _load()
