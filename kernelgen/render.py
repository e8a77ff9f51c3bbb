"""Render specs into Triton source (one file per op and arch) and the arch-independent ops module."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from .archs import DTYPES, Arch, elementwise_config
from .spec import Spec, to_f32

ACTIVATION_TEMPLATE = "activation.py.j2"
OPS_TEMPLATE = "ops.py.j2"


class RenderError(RuntimeError):
    pass


def template_dir() -> Path:
    return Path(str(resources.files("kernelgen.templates")))


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,  # a missing variable is an error, never an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def template_sha256(name: str) -> str:
    return hashlib.sha256((template_dir() / name).read_bytes()).hexdigest()


def spec_file_label(spec: Spec) -> str:
    """A path that is the same on every machine: builtins by package path, others by file name."""
    path = Path(spec.path)
    builtin = Path(str(resources.files("kernelgen.specs")))
    return f"kernelgen/specs/{path.name}" if path.resolve().parent == builtin.resolve() else path.name


def _level_select(levels: tuple[float, ...]) -> str:
    # A chain of selects: Triton has no gather from a constant table. 2**k - 1 compares per element.
    expr = repr(levels[-1])
    for code in range(len(levels) - 2, -1, -1):
        expr = f"tl.where(code == {code}, {levels[code]!r}, {expr})"
    return expr


def _pack_rounds(spec: Spec) -> list[dict]:
    """Round r packs neighbouring fields of width bits * 2**r in pairs: groups of 2**(r+1) codes."""
    rounds, width, group = [], spec.bits, 2
    while width < 8:
        rounds.append({"width": width, "group": group})
        width, group = width * 2, group * 2
    return rounds


@dataclass(frozen=True)
class KernelVariant:
    """One compiled unit: a kernel of an op for a dtype with a launch config."""

    op: str
    kernel: str  # forward | forward_nograd | backward
    dtype: str
    config: dict

    @property
    def key(self) -> str:
        return f"{self.op}.{self.kernel}[{self.dtype}]"


KERNELS = ("forward", "forward_nograd", "backward")


def activation_variants(spec: Spec, arch: Arch) -> list[KernelVariant]:
    return [
        KernelVariant(spec.name, kernel, dtype, elementwise_config(arch, dtype, spec.codes_per_byte))
        for kernel in KERNELS
        for dtype in DTYPES
    ]


def render_activation(spec: Spec, arch: Arch) -> str:
    configs = [(repr((v.kernel, v.dtype)), repr(dict(sorted(v.config.items())))) for v in activation_variants(spec, arch)]
    try:
        return _env().get_template(ACTIVATION_TEMPLATE).render(
            spec=spec,
            arch=arch,
            spec_file=spec_file_label(spec),
            template_sha256=template_sha256(ACTIVATION_TEMPLATE),
            thresholds=[repr(to_f32(c)) for c in spec.thresholds],
            levels=[repr(to_f32(v)) for v in spec.levels],
            compare=">" if spec.boundary == "lower" else ">=",
            forward_triton=spec.forward.triton(),
            level_select=_level_select(tuple(to_f32(v) for v in spec.levels)),
            configs=configs,
            pack_rounds=_pack_rounds(spec),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering {spec.name} for {arch.name} from templates/{ACTIVATION_TEMPLATE}: {err}") from err


def render_ops(specs: list[Spec]) -> str:
    rows = [
        {
            "name": s.name,
            "description": s.description,
            "forward": s.forward,
            "replaces": s.replaces,
            "bits": s.bits,
            "boundary": s.boundary,
            "thresholds_f32": [repr(to_f32(c)) for c in s.thresholds],
            "levels_f32": [repr(to_f32(v)) for v in s.levels],
            "fit_error": repr(s.fit_error),
            "sha256": s.sha256,
            "forward_torch": s.forward.torch(),
        }
        for s in specs
    ]
    try:
        return _env().get_template(OPS_TEMPLATE).render(
            specs=rows,
            spec_files=[spec_file_label(s) for s in specs],
            template_sha256=template_sha256(OPS_TEMPLATE),
        )
    except jinja2.TemplateError as err:
        raise RenderError(f"rendering the ops module from templates/{OPS_TEMPLATE}: {err}") from err
