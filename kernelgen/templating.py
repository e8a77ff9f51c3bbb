"""Templates and what may reach them: the Jinja environment over templates/, and the marked text
types every value handed to a template must be.

No free text reaches generated code, by construction: every value handed to a template is checked
(_template_vars) to be an integer, a plain word (identifier, hex digest), or text this module has
marked for where it goes: `Code` (printed by kernelgen: expressions, float reprs, config dicts), `Quoted`
(any text as an ASCII Python string literal: no quote or line break can end it) or `CommentText`
(text refused if it holds a line break or control character: safe after a `#`). A spec's
description, a file name or a tuning database's GPU name handed over bare is a RenderError, so a
future template cannot paste it into code by mistake.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from pathlib import Path

import jinja2

from typing import TYPE_CHECKING

from . import plaintext

if TYPE_CHECKING:
    from .kernels import TargetInfo
    from .spec import Spec


class RenderError(RuntimeError):
    pass


def template_dir() -> Path:
    """The installed kernelgen.templates, or templates/ of a checkout used through PYTHONPATH."""
    try:
        return Path(str(resources.files("kernelgen.templates")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "templates"


class Code(str):
    """Code this module printed itself; emitted verbatim."""


class Quoted(str):
    """Text as an ASCII Python string literal (ascii()): no quote, backslash or line break in the
    text can end it, and non-ASCII characters read back exactly whatever the file's encoding."""


class CommentText(str):
    """One line of printable text, for a position after `#`."""


def quoted(text: str) -> Quoted:
    return Quoted(ascii(str(text)))


def comment_text(text: str, what: str) -> CommentText:
    bad = plaintext.problem(str(text))
    if bad:
        raise RenderError(f"{what}: {bad}")
    return CommentText(text)


_WORD = re.compile(r"[A-Za-z0-9_]*")  # identifiers, arch names, hex digests: harmless anywhere


def _template_vars(value, where: str = "template variables"):
    """`value`, after checking that nothing in it is text a template could paste unmarked."""
    if isinstance(value, (Code, Quoted, CommentText, int)):  # bool is an int
        return value
    if isinstance(value, str):
        if _WORD.fullmatch(value):
            return value
        raise RenderError(f"{where}: text {value!r:.60} handed to a template unmarked; wrap it in "
                          "quoted(), comment_text() or (if printed by kernelgen) Code()")
    if isinstance(value, dict):
        return {k: _template_vars(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_template_vars(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise RenderError(f"{where}: {type(value).__name__} handed to a template; pass its fields")


def _finalize(value):
    # Only strings and integers print; a None or a float would print as Python spells it, silently.
    if isinstance(value, (str, int)):
        return value
    raise RenderError(f"a template prints {type(value).__name__} {value!r:.60}")


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    """One environment per process: it caches the compiled templates (and reloads a changed file)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,  # a missing variable is an error, never an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_finalize,
    )


def render(template: str, **variables) -> str:
    return _env().get_template(template).render(**_template_vars(variables))


def template_sha256(name: str) -> str:
    return hashlib.sha256((template_dir() / name).read_bytes()).hexdigest()


def spec_file_label(spec: Spec) -> str:
    """A path that is the same on every machine: builtins by package path, others by file name."""
    path = Path(spec.path)
    builtin = Path(str(resources.files("kernelgen.specs")))
    return f"kernelgen/specs/{path.name}" if path.resolve().parent == builtin.resolve() else path.name


def num(value: float) -> Code:
    return Code(repr(float(value)))


def arch_vars(arch: TargetInfo) -> dict:
    return {"name": arch.name}
