"""Loading a generated tree (see kernelgen/build.py for its layout): the op specs, their torch
forward functions, and the Triton kernel module for a device's arch.

Only torch is imported here; triton is imported when a kernel module is first loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from . import _contract
from ._tree_specs import check_ops_module


@dataclass(frozen=True)
class OpInfo:
    name: str
    bits: int
    thresholds: tuple[float, ...]  # float32-rounded, ascending
    levels: tuple[float, ...]  # float32-rounded, levels[code]
    boundary: str  # "lower": x == c_i takes the level below c_i
    forward: Callable[[torch.Tensor], torch.Tensor]  # h(x) on float32/float64 tensors
    derivative: Callable[[torch.Tensor], torch.Tensor] | None  # exact h'(x), for gated ops
    description: str
    replaces: str
    gated: bool  # fused gated-MLP kernels were generated too
    fit_error: float
    tree: Path

    @property
    def planes(self) -> int:
        """3-bit codes are stored as 3 bit planes; 1-, 2- and 4-bit codes interleaved in bytes."""
        return 3 if self.bits == 3 else 1

    @property
    def codes_per_byte(self) -> int:
        """Codes per byte of one plane."""
        return 8 if self.bits == 3 else 8 // self.bits

    def n_code_bytes(self, numel: int) -> int:
        return self.planes * -(-numel // self.codes_per_byte)


_lock = threading.RLock()
_ops: dict[str, OpInfo] = {}
_loaded_trees: set[Path] = set()


@lru_cache(maxsize=None)
def builtin_tree() -> Path:
    """The installed lowmem_ops._generated, or generated/ of a checkout used through PYTHONPATH."""
    try:
        return Path(str(resources.files("lowmem_ops._generated"))).resolve()
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "generated"


def tree_key(tree: Path) -> str:
    return "t" + hashlib.sha1(str(tree).encode()).hexdigest()[:12]


def import_file(path: Path, module_name: str) -> ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
    return module


def load_tree(tree: str | Path) -> list[str]:
    """Register every op of a generated tree; returns their names. Loading a tree twice is a no-op."""
    tree = Path(tree).resolve()
    if tree != builtin_tree():
        _ensure_builtin()  # built-in names are reserved before any user tree registers its own
    with _lock:
        if tree in _loaded_trees:
            return [n for n, op in _ops.items() if op.tree == tree]
        ops_file = tree / _contract.OPS_FILE
        if not ops_file.is_file():
            raise FileNotFoundError(f"{tree} is not a kernelgen tree: it has no ops.py (build one with `kernelgen build`)")
        module_name = f"lowmem_ops._trees.{tree_key(tree)}.ops"
        try:
            module = import_file(ops_file, module_name)
            check_ops_module(tree, module)
        except BaseException:
            sys.modules.pop(module_name, None)  # a repaired tree at this path is imported afresh
            raise
        # all or nothing: every op is checked before the first one is registered
        infos = [OpInfo(
            name=name, bits=s["bits"], thresholds=tuple(s["thresholds"]), levels=tuple(s["levels"]),
            boundary=s["boundary"], forward=module.FORWARD[name],
            derivative=getattr(module, "DERIVATIVE", {}).get(name), description=s["description"],
            replaces=s["replaces"], gated=s.get("gated", False), fit_error=s["fit_error"], tree=tree,
        ) for name, s in module.SPECS.items()]
        for info in infos:
            if info.name in _ops and _ops[info.name].tree != tree:
                raise ValueError(f"op {info.name!r} from {tree} is already defined by {_ops[info.name].tree}")
        _ops.update((info.name, info) for info in infos)
        names = [info.name for info in infos]
        _loaded_trees.add(tree)
        return names


_builtin_loaded = False


def _ensure_builtin() -> None:
    # Called at import (lowmem_ops/__init__.py); afterwards a plain flag, cheap inside compiled code.
    global _builtin_loaded
    if not _builtin_loaded:
        load_tree(builtin_tree())
        _builtin_loaded = True


def get_op(name: str) -> OpInfo:
    _ensure_builtin()
    try:
        return _ops[name]
    except KeyError:
        raise ValueError(f"unknown lowmem_ops activation {name!r}; available: {', '.join(sorted(_ops))}") from None


def available() -> list[str]:
    _ensure_builtin()
    return sorted(_ops)


# `kernelgen build` swaps a rebuilt arch folder in through these siblings (kernelgen/build.py,
# _swap_in); a build killed mid-swap can leave <arch> missing and one of them complete.
_SWAP_SIBLING = re.compile(r"\.(?P<arch>[^.]+)\.(?P<role>incoming|outgoing)")


def arch_folders(tree: Path) -> dict[str, Path]:
    """arch name -> the folder holding it: <arch>, or, where a killed build left <arch> missing, the
    complete sibling it was swapping in (preferred: the newer build) or out."""
    regular, siblings = {}, {}
    for child in sorted(tree.iterdir()):
        m = _SWAP_SIBLING.fullmatch(child.name)
        if m and child.is_dir():
            siblings.setdefault(m["arch"], {})[m["role"]] = child
        elif not child.name.startswith((".", "_")) and child.is_dir():
            regular[child.name] = child
    folders = dict(regular)
    for arch, found in siblings.items():
        if arch not in regular:
            folders[arch] = found.get("incoming", found.get("outgoing"))
            _warn_once(("swap", folders[arch]), f"lowmem_ops: {tree / arch} is missing: a `kernelgen build` was "
                       f"stopped while it swapped that folder; using the complete {folders[arch].name}. Run the "
                       f"build again to finish it.")
    return folders


def built_archs(tree: Path) -> dict[int, str]:
    """capability -> arch folder name, for the arch folders of `tree` with a sound manifest. An arch
    whose manifest.json is damaged or missing is skipped with a warning naming the file, so one broken
    arch does not stop the others. Runs on every kernel launch: a manifest (hundreds of KB) is parsed
    once per version of the file, not per call."""
    found, problems = _scan_archs(tree)
    for key, message in problems:
        _warn_once(key, message)
    return found


def _scan_archs(tree: Path) -> tuple[dict[int, str], list[tuple[tuple, str]]]:
    found, problems = {}, []
    for arch, folder in arch_folders(tree).items():
        manifest = folder / _contract.MANIFEST_FILE
        try:
            st = manifest.stat()
        except OSError:
            if (folder / _contract.CONFIGS_FILE).is_file():  # an arch folder (not some other directory) lost its manifest
                problems.append((("manifest", manifest), manifest_problem(tree, arch, manifest, "missing")))
            continue
        capability = _manifest_capability(str(manifest), st.st_mtime_ns, st.st_size)
        if isinstance(capability, str):
            problems.append((("manifest", manifest, st.st_mtime_ns, st.st_size),
                             manifest_problem(tree, arch, manifest, capability)))
            continue
        found.setdefault(capability, folder.name)
    return dict(sorted(found.items())), problems


def manifest_problem(tree: Path, arch: str, manifest: Path, problem: str) -> str:
    return (f"lowmem_ops: {manifest}: {problem}; the {arch} kernels of {tree} are not used. Restore the file "
            f"(the built-in tree: `git checkout generated/` in a checkout, else reinstall lowmem-ops) or rebuild "
            f"the arch with `kernelgen build --arch {arch} --recompile --out {tree}` (and the --spec files of a tree "
            f"of your own)")


@lru_cache(maxsize=None)
def _manifest_capability(path: str, mtime_ns: int, size: int) -> int | str:
    """The capability a manifest records, or what is wrong with it (cached too: not re-read per launch)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        return f"cannot be read ({err})"
    except ValueError as err:
        return f"not valid JSON ({err})"
    if not isinstance(data, dict) or "capability" not in data:
        return 'has no "capability" field'
    capability = data["capability"]
    if not isinstance(capability, int) or isinstance(capability, bool) or capability <= 0:
        return f'"capability" must be a positive integer such as 80, got {capability!r}'
    return capability


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def _built_or_fail(tree: Path) -> dict[int, str]:
    archs = built_archs(tree)
    if not archs:
        problems = "".join(f"\n  {message}" for _, message in _scan_archs(tree)[1])
        raise RuntimeError(f"{tree} holds no built arch: run `kernelgen build --arch sm80` (or the arch of your "
                           f"GPU){problems}")
    return archs


def lowest_arch(tree: Path) -> str:
    archs = _built_or_fail(tree)
    return archs[min(archs)]


def pick_arch(tree: Path, capability: int) -> str:
    """The arch built for `capability`, else the nearest lower one (warning once), else the lowest."""
    archs = _built_or_fail(tree)
    if capability in archs:
        return archs[capability]
    lower = [c for c in archs if c < capability]
    chosen = archs[max(lower)] if lower else archs[min(archs)]
    if (tree, capability) not in _warned:
        _warned.add((tree, capability))
        warnings.warn(
            f"lowmem_ops: no kernels built for sm{capability} in {tree}; using the {chosen} build "
            f"(launch configs tuned for another GPU). Build yours with `kernelgen build --arch sm{capability}`.",
            stacklevel=3,
        )
    return chosen


def kernel_module(op: str, arch: str, interpret: bool) -> ModuleType:
    """The generated Triton module of activation `op` for `arch`."""
    return kernel_module_file(get_op(op).tree, arch, op, interpret)


@lru_cache(maxsize=None)
def kernel_module_file(tree: Path, arch: str, stem: str, interpret: bool) -> ModuleType:
    """Import `<tree>/<arch>/<stem>.py`. With interpret=True its kernels are created under
    TRITON_INTERPRET=1 (Triton reads it when @triton.jit runs), so they run on CPU tensors."""
    path = tree / arch / _contract.kernel_file(stem)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: rebuild the tree with `kernelgen build --arch {arch}`")
    require_triton("lowmem_ops needs triton to run its kernels")
    name = f"lowmem_ops._trees.{tree_key(tree)}.{arch}.{stem}" + ("_interpret" if interpret else "")
    if not interpret:
        return import_file(path, name)
    # triton itself is imported above as configured, so its own @jit helpers stay consistent with
    # the rest of the process; only our kernels' decorators see TRITON_INTERPRET=1. Generated code
    # therefore calls Triton builtins only (see kernelgen/expr.py).
    with interpreting():
        return import_file(path, name)


def require_triton(what: str) -> None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"{what} ({err}): `pip install triton`, or LOWMEM_OPS_BACKEND=torch for the torch "
                           "implementation") from None


@contextlib.contextmanager
def interpreting():
    """TRITON_INTERPRET=1 while modules are imported inside: the @triton.jit functions they create read
    it then and run on CPU tensors. One thread at a time (the variable is process-wide)."""
    try:  # Triton >= 3.5 imports gluon lazily from the interpreter: do it now, outside the toggle
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    with _lock:
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = before
