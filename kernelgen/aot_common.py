"""What the CUDA and HIP ahead-of-time compiles share (kernelgen/aot.py, kernelgen/aot_amd.py): the
rendered file loaded once per process, the launch's divisibility as Triton's JIT marks it, and a
compile error in one line. Standard library only: compile workers start fast."""

from __future__ import annotations

import importlib.util

_modules: dict[str, object] = {}


def load_module(path: str):
    """The rendered kernel file at `path`, imported once per process."""
    if path not in _modules:
        spec = importlib.util.spec_from_file_location(f"_kernelgen_aot_{len(_modules)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


def divisibility_attrs(signature: dict, aligned_args=()) -> dict:
    """What Triton's JIT marks divisible by 16 at a launch: pointers (torch's allocator aligns to 16 B
    and more) and integers that are multiples of 16 (`aligned_args`: the aligned specialisation's sizes)."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
            if kind.startswith("*") or name in aligned_args}


def ast_source(job):
    """Triton's ASTSource of a compile job (aot.CompileJob): its kernel function, types, constants
    and the divisibility of its aligned specialisation."""
    from triton.compiler import ASTSource

    return ASTSource(fn=getattr(load_module(job.path), job.fn), signature=job.signature, constexprs=job.constexprs,
                     attrs=divisibility_attrs(job.signature, job.aligned_args))


def one_line(err: BaseException) -> str:
    """An error as its type and first message line: what the manifest and the tuning DB record."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
