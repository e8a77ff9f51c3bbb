"""Loading a generated tree (see kernelgen/build.py for its layout): the op specs, their torch
forward functions, which arch folder a device uses, and the Triton kernel module for it.

Only torch is imported here; triton is imported when a kernel module is first loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
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


def user_ops() -> list[OpInfo]:
    """The ops registered from trees of the user's own (lo.load), in the order they were loaded."""
    _ensure_builtin()
    builtin = builtin_tree()
    return [op for op in _ops.values() if op.tree != builtin]


def is_builtin(name: str) -> bool:
    """`name` is an op of the built-in tree (False for a user's op and for an unknown name)."""
    _ensure_builtin()
    op = _ops.get(name)
    return op is not None and op.tree == builtin_tree()


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
        elif not child.name.startswith((".", "_")) and child.name != _contract.KERNELS_DIR and child.is_dir():
            regular[child.name] = child
    folders = dict(regular)
    for arch, found in siblings.items():
        if arch not in regular:
            folders[arch] = found.get("incoming", found.get("outgoing"))
            _warn_once(("swap", folders[arch]), f"lowmem_ops: {tree / arch} is missing: a `kernelgen build` was "
                       f"stopped while it swapped that folder; using the complete {folders[arch].name}. Run the "
                       f"build again to finish it.")
    return folders


@dataclass(frozen=True)
class BuiltArch:
    """An arch folder of a tree, as the VENDOR and CAPABILITY its configs.py records (the build writes
    them there from kernelgen/targets.py; manifest.json is a build record the runtime never reads)."""

    name: str  # sm80, gfx942: the name `kernelgen build --arch` gives it
    folder: str  # the folder holding it: `name`, or a sibling a killed build left (arch_folders)
    vendor: str  # "nvidia" | "amd"
    capability: int | str  # NVIDIA: 10 * major + minor; AMD: the gfx name, which is also `name`


VENDORS = _contract.VENDORS


def built_archs(tree: Path) -> dict[str, BuiltArch]:
    """arch name -> BuiltArch, for the arch folders of `tree` whose configs.py is sound. An arch whose
    configs.py is damaged or missing is skipped with a warning naming the file, so one broken arch does
    not stop the others. Each configs.py is imported once per process (the launch configs of the arch
    picked are read from that same module)."""
    found, problems = _scan_archs(tree)
    for key, message in problems:
        _warn_once(key, message)
    return found


def _scan_archs(tree: Path) -> tuple[dict[str, BuiltArch], list[tuple[tuple, str]]]:
    found, problems = {}, []
    for name, folder in arch_folders(tree).items():
        configs = folder / _contract.CONFIGS_FILE
        if not configs.is_file():
            # an arch folder (not some other directory) lost it: it has the build record, or is of an
            # older build (arch packages with __init__.py)
            if (folder / _contract.MANIFEST_FILE).is_file() or (folder / "__init__.py").is_file():
                problems.append((("configs", configs), arch_problem(tree, name, configs, "missing")))
            continue
        built = _read_arch(tree, name, folder)
        if isinstance(built, str):
            problems.append((("configs", configs, built), arch_problem(tree, name, configs, built)))
        else:
            found[name] = built
    return found, problems


def configs_module(tree: Path, folder: str) -> ModuleType:
    """`<tree>/<folder>/configs.py`, imported once per process."""
    return import_file(tree / folder / _contract.CONFIGS_FILE,
                       f"lowmem_ops._trees.{tree_key(tree)}.{folder}.{_contract.CONFIGS_STEM}")


def _read_arch(tree: Path, name: str, folder: Path) -> BuiltArch | str:
    """The arch `folder` holds, or what is wrong with its configs.py."""
    try:
        module = configs_module(tree, folder.name)
    except Exception as err:  # a damaged file can raise anything while it runs
        return f"cannot be imported ({type(err).__name__}: {err})"
    missing = [attr for attr in (_contract.VENDOR, _contract.CAPABILITY) if not hasattr(module, attr)]
    if missing:
        return f"has no {' or '.join(missing)} (written by builds since the runtime stopped reading manifests)"
    vendor, capability = getattr(module, _contract.VENDOR), getattr(module, _contract.CAPABILITY)
    if vendor == _contract.NVIDIA:
        if not isinstance(capability, int) or isinstance(capability, bool) or capability <= 0:
            return f"CAPABILITY must be a positive integer such as 80 for an NVIDIA arch, got {capability!r}"
    elif vendor == _contract.AMD:
        if capability != name:
            return f"CAPABILITY must be the gfx name of its folder, {name!r}, for an AMD arch, got {capability!r}"
    else:
        return f"VENDOR must be one of {', '.join(map(repr, VENDORS))}, got {vendor!r}"
    return BuiltArch(name, folder.name, vendor, capability)


def arch_problem(tree: Path, arch: str, path: Path, problem: str) -> str:
    return (f"lowmem_ops: {path}: {problem}; the {arch} kernels of {tree} are not used. Restore the file "
            f"(the built-in tree: `git checkout generated/` in a checkout, else reinstall lowmem-ops) or rebuild "
            f"the arch with `kernelgen build --arch {arch} --out {tree}` (and the --spec files of a tree of your own)")


_warned: set = set()


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def _built_or_fail(tree: Path) -> dict[str, BuiltArch]:
    archs = built_archs(tree)
    if not archs:
        problems = "".join(f"\n  {message}" for _, message in _scan_archs(tree)[1])
        raise RuntimeError(f"{tree} holds no built arch: run `kernelgen build --arch sm80` (or the arch of your "
                           f"GPU){problems}")
    return archs


def _nvidia(archs: dict[str, BuiltArch]) -> dict[int, str]:
    """capability -> folder of the NVIDIA archs (the first of two folders claiming one capability)."""
    found = {}
    for a in sorted(archs.values(), key=lambda a: a.name):
        if a.vendor == _contract.NVIDIA:
            found.setdefault(a.capability, a.folder)
    return dict(sorted(found.items()))


def lowest_arch(tree: Path) -> str:
    """The folder the interpreter uses (it runs any arch's kernels): the lowest NVIDIA capability, else
    the first AMD arch by name."""
    archs = _built_or_fail(tree)
    nvidia = _nvidia(archs)
    return nvidia[min(nvidia)] if nvidia else archs[min(archs)].folder


def pick_arch(tree: Path, gpu: int | str) -> str | None:
    """The folder of `tree` for a GPU: `gpu` is an NVIDIA capability (90) or an AMD gfx name ('gfx942',
    see gpu_arch). NVIDIA: the arch built for it, else the nearest lower one (warning once), else the
    lowest. AMD: the AMD arch of that name, else None (the caller takes the torch path, as for any AMD
    GPU before there were AMD builds): a gfx GPU is never given an sm folder's kernels and configs."""
    archs = _built_or_fail(tree)
    if isinstance(gpu, str):
        found = archs.get(gpu)
        return found.folder if found is not None and found.vendor == _contract.AMD else None
    nvidia = _nvidia(archs)
    if not nvidia:
        raise RuntimeError(f"{tree} holds no arch built for NVIDIA GPUs (only {', '.join(sorted(archs))}): run "
                           f"`kernelgen build --arch sm{gpu}`")
    if gpu in nvidia:
        return nvidia[gpu]
    lower = [c for c in nvidia if c < gpu]
    chosen = nvidia[max(lower)] if lower else nvidia[min(nvidia)]
    if (tree, gpu) not in _warned:
        _warned.add((tree, gpu))
        warnings.warn(
            f"lowmem_ops: no kernels built for sm{gpu} in {tree}; using the {chosen} build "
            f"(launch configs tuned for another GPU). Build yours with `kernelgen build --arch sm{gpu}`.",
            stacklevel=3,
        )
    return chosen


_gpus: dict[int, int | str] = {}  # device index -> gpu_arch
_archs: dict[tuple, str | None] = {}  # (tree, gpu_arch or None for the interpreter) -> folder


def gpu_arch(device: torch.device) -> int | str:
    """What a GPU is when picking its folder, once per device index: its capability as 10 * major + minor
    on CUDA torch; on ROCm torch (which calls AMD GPUs "cuda" too) the gfx name without its feature
    flags ('gfx942:sramecc+:xnack-' -> 'gfx942')."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    gpu = _gpus.get(index)
    if gpu is None:
        if torch.version.hip is not None:
            gpu = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
        else:
            major, minor = torch.cuda.get_device_capability(index)
            gpu = 10 * major + minor
        _gpus[index] = gpu
    return gpu


def folder_for(device: torch.device, tree: Path, interpret: bool) -> str | None:
    """The arch folder whose kernels and configs `device` uses (None: an AMD GPU `tree` has no folder for).
    Resolved once per tree and GPU model, so the launch path reads no folder or file after the first
    call (a tree rebuilt while the process runs is used by the next process, as are its
    already-imported kernel modules). The interpreter ignores tuned launch configs: it takes the lowest."""
    gpu = gpu_arch(device) if device.type == "cuda" and not interpret else None
    key = (tree, gpu)
    try:
        return _archs[key]
    except KeyError:
        folder = _archs[key] = lowest_arch(tree) if gpu is None else pick_arch(tree, gpu)
        return folder


def arch_for(device: torch.device, tree: Path, interpret: bool) -> str:
    """folder_for, where a folder must exist (the Triton launchers)."""
    folder = folder_for(device, tree, interpret)
    if folder is None:
        gpu = gpu_arch(device)
        raise RuntimeError(f"lowmem_ops: {tree} has no kernels built for this {gpu} GPU: build them with "
                           f"`kernelgen build --arch {gpu} --out {tree}`, or set LOWMEM_OPS_BACKEND=torch")
    return folder


def kernel_module(op: str, arch: str, interpret: bool) -> ModuleType:
    """The generated Triton module of activation `op` for `arch`."""
    return kernel_module_file(get_op(op).tree, arch, op, interpret)


def kernel_path(tree: Path, arch: str, stem: str) -> tuple[Path, str]:
    """The kernel file arch folder `arch` of `tree` uses for `stem` (an op's name, or ms_norm, dropout,
    add_norm), and a module name unique to it: kernels/<name>.py as its configs.py's KERNEL_FILES
    names it. A tree built before kernels/ existed (no KERNEL_FILES) holds it as <arch>/<stem>.py."""
    files = getattr(configs_module(tree, arch), _contract.KERNEL_FILES, None)
    if files is None:
        return tree / arch / _contract.legacy_kernel_file(stem), f"{arch}.{stem}"
    name = files.get(stem) if isinstance(files, dict) else None
    if not isinstance(name, str):
        raise RuntimeError(f"{tree / arch / _contract.CONFIGS_FILE} names no kernel file for {stem!r}: rebuild "
                           f"the tree with `kernelgen build --arch {arch} --out {tree}`")
    return tree / _contract.kernel_file(name), f"{_contract.KERNELS_DIR}.{name}"


@lru_cache(maxsize=None)
def kernel_module_file(tree: Path, arch: str, stem: str, interpret: bool) -> ModuleType:
    """Import the kernel file of `stem` that `<tree>/<arch>` uses (kernel_path); archs using the same
    file share its module. With interpret=True its kernels are created under TRITON_INTERPRET=1
    (Triton reads it when @triton.jit runs), so they run on CPU tensors."""
    path, module = kernel_path(tree, arch, stem)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: rebuild the tree with `kernelgen build --arch {arch} --out {tree}`")
    require_triton("lowmem_ops needs triton to run its kernels")
    name = f"lowmem_ops._trees.{tree_key(tree)}.{module}" + ("_interpret" if interpret else "")
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
