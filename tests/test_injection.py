"""No code from data files: text from a spec file (name, description, replaces, forward, fit_source,
the file's own name) or a tuning database (every key string, error messages) either is refused with
a one-line error naming the field, or reaches the generated tree as data only: the generated code
is token for token what a harmless text gives, the text reads back unchanged, and a payload that
would run (creating a marker file) never does.

Most strings are checked by rendering alone (fast); one real build runs the accepted payloads
through import, the torch path and the interpreted Triton path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tokenize
import unicodedata
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernelgen import archs, build, families, render, spec, templating, tunedb
from kernelgen.families.activation import groups_of, render_activation

from . import reference as ref

ARCH = archs.resolve("sm80")[0]
LINE_BREAKS = [c for c in map(chr, range(0x110000)) if (c + "a").splitlines() != [c + "a"]]
CONTROLS = [c for c in map(chr, range(0x110000)) if unicodedata.category(c) in ("Cc", "Zl", "Zp")]
QUOTES = ["'", '"', "'''", '"""', "\\", "\\'", '\\"', "\\\\", "#", "{{", "}}", "{%", "%}", "\\N{BULLET}", "\\x41"]
UNICODE = ["é", "\u00a0", "😀", "\u202e", "\ufeff", "x\U0001f600y"]


def run_payload(marker: Path) -> str:
    """Python that, if it ever runs, creates `marker`."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def payloads(marker: Path) -> list[str]:
    code = run_payload(marker)
    out = [f"{br}{code}" for br in LINE_BREAKS] + [f"{c}{code}" for c in CONTROLS[:40]]
    out += [f"a{q}{code}{q}" for q in QUOTES] + [f'"""; {code}; """', f"'''; {code}; '''", f"x\\\n{code}"]
    return out + UNICODE + ["", " ", "plain text"]


GOOD = {
    "op": {"name": "myact", "description": "d", "forward": "x * sigmoid(x)", "replaces": "SiLU"},
    "approx": {"bits": 2, "boundary": "lower", "thresholds": [-1.0, 0.0, 1.0], "coefficients": [0.25, 0.5, 0.25],
               "fit_error": 0.5, "fit_source": "hand"},
}


def spec_with(tmp_path: Path, field: str, value: str, filename: str = "myact.toml") -> Path:
    data = json.loads(json.dumps(GOOD))
    table = "approx" if field == "fit_source" else "op"
    data[table][field] = value
    path = tmp_path / filename
    path.write_bytes(tomli_w.dumps(data).encode())  # a TOML writer: any text survives the file
    return path


def code_tokens(source: str) -> list[tuple[int, str]]:
    """The tokens Python runs: everything but comments and blank lines."""
    return [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL)]


def exec_ops(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "ops.py", "exec"), namespace)  # noqa: S102 - the point: run it
    return namespace


@pytest.fixture(scope="module")
def reference_sources(tmp_path_factory):
    s = spec.load(spec_with(tmp_path_factory.mktemp("ref"), "description", "d"))
    return (code_tokens(render_activation(s, ARCH)), code_tokens(render.render_ops([s])),
            cpp_code_lines(render.render_cpu([s])))


def cpp_code_lines(source: str) -> list[str]:
    """The C++ a compiler sees, line by line: everything but `//` comment lines. A line ending in a
    backslash would splice the next line into it (a comment could swallow code): there must be none."""
    assert source.isascii()  # so splitlines() splits exactly where the compiler does
    lines = source.splitlines()
    assert not [line for line in lines if line.endswith("\\")], "a line ends with a backslash"
    return [line for line in lines if not line.lstrip().startswith("//")]


def check_text_is_data(tmp_path: Path, field: str, value: str, reference_sources) -> None:
    """`value` in spec field `field`: refused in one line naming the field, or rendered as data."""
    marker = tmp_path / "ran"
    path = spec_with(tmp_path, field, value)
    try:
        s = spec.load(path)
    except spec.SpecError as err:
        msg = str(err)
        assert "\n" not in msg and "\r" not in msg and f"[{'approx' if field == 'fit_source' else 'op'}].{field}: " in msg, msg
        return
    assert all(value.count(c) == 0 for c in CONTROLS), f"{field} = {value!r} was accepted"
    activation, ops = render_activation(s, ARCH), render.render_ops([s])
    ref_activation, ref_ops, ref_cpp = reference_sources
    assert cpp_code_lines(render.render_cpu([s])) == ref_cpp  # the C++ kernels: comments changed only
    assert code_tokens(activation) == ref_activation  # the text changed comments only
    namespace = exec_ops(ops)
    got = namespace["SPECS"]["myact"]
    if field in ("description", "replaces"):
        assert got[field] == value  # round-trips as data, non-BMP characters too
    assert not marker.exists()


@pytest.mark.parametrize("field", ["description", "replaces", "fit_source", "name"])
def test_spec_text_fields_refused_or_data(tmp_path, field, reference_sources):
    for i, value in enumerate(payloads(tmp_path / "ran")):
        sub = tmp_path / str(i)
        sub.mkdir()
        if field == "name":  # names are words: everything here but the plain ones is refused
            path = spec_with(sub, "name", value)
            with pytest.raises(spec.SpecError) as err:
                spec.load(path)
            assert "[op].name: " in str(err.value) and "\n" not in str(err.value)
            continue
        check_text_is_data(sub, field, value, reference_sources)


@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=12))
def test_any_description_is_refused_or_data(tmp_path_factory, reference_sources, text):
    check_text_is_data(tmp_path_factory.mktemp("h"), "description", text, reference_sources)


def test_control_character_error_names_field_and_character(tmp_path):
    with pytest.raises(spec.SpecError) as err:
        spec.load(spec_with(tmp_path, "description", "ok\u2028print(1)"))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'myact.toml'}:") and "[op].description: contains U+2028 (LINE SEPARATOR)" in msg


def test_comments_are_stripped_from_expressions(tmp_path):
    """`forward` may hold comments and line breaks inside parentheses: what is stored, shown and
    rendered is the expression as checked, never the comment (which could close a docstring)."""
    marker = tmp_path / "ran"
    code = run_payload(marker)
    for text in [f'x * sigmoid(x)  # """; {code}; """', f"(x *\n sigmoid(x)  # '''\n)  # {code}",
                 f"(x * sigmoid(x) # \\\n)"]:
        s = spec.load(spec_with(tmp_path, "forward", text))
        assert s.forward.text == "x * sigmoid(x)"
        assert exec_ops(render.render_ops([s]))["SPECS"]["myact"]["forward"] == "x * sigmoid(x)"
        assert "__import__" not in render_activation(s, ARCH) + render.render_ops([s])
    assert not marker.exists()
    for bad in ["x\x0b+ 1", "x\u2028+ 1", "x +\x85 1"]:
        with pytest.raises(spec.SpecError, match=r"\[op\]\.forward: .*contains U\+"):
            spec.load(spec_with(tmp_path, "forward", bad))


def test_render_refuses_unchecked_text_by_construction(tmp_path):
    """Below validation: a Spec built in code with a line break in its description, or a spec file
    whose own name holds one, cannot render as code. The ops module quotes any text."""
    marker = tmp_path / "ran"
    base = spec.load(spec_with(tmp_path, "description", "d"))
    for value in payloads(marker):
        s = dataclasses.replace(base, description=value, replaces=value)
        exec_ops_ns = exec_ops(render.render_ops([s]))["SPECS"]["myact"]
        assert exec_ops_ns["description"] == value and exec_ops_ns["replaces"] == value
        if any(c in CONTROLS for c in value):
            with pytest.raises(render.RenderError, match=r"myact: \[op\]\.description: contains U\+"):
                render_activation(s, ARCH)
    odd = spec.load(spec_with(tmp_path, "description", "d", filename="a\nraise SystemExit\n.toml"))
    with pytest.raises(render.RenderError, match="file name: contains U\\+000A"):
        render_activation(odd, ARCH)
    with pytest.raises(render.RenderError, match="handed to a template unmarked"):
        templating.render(render.OPS_TEMPLATE, specs=[{"name": "myact", "description": "a\nb"}],
                       spec_files=[], template_sha256="0")
    assert not marker.exists()


# --- tuning databases ---------------------------------------------------------------------------

DB_ENTRY = {"op": "myact", "kernel": "forward", "dtype": "float32", "bucket": "n<=65536", "source_sha256": "a" * 64,
            "triton": "3.9.0", "gpu": "NVIDIA H200", "problem": [65536], "bytes_moved": 524288,
            "static": {"BLOCK_BYTES": 256, "num_warps": 4}, "results": [{"config": {"BLOCK_BYTES": 256, "num_warps": 4}, "ms": 0.01}]}


def db_text(**changes) -> str:
    entry = {**DB_ENTRY, **changes}
    return json.dumps({"arch": "sm80", "entries": [entry], "format": tunedb.FORMAT})


@pytest.mark.parametrize("field", ["op", "kernel", "dtype", "bucket", "source_sha256", "triton", "gpu", "error"])
def test_db_strings_refused_or_data(tmp_path, field):
    marker = tmp_path / "ran"
    for value in payloads(marker):
        changes = ({"results": [{"config": {"BLOCK_BYTES": 256, "num_warps": 4}, "ms": None, "error": value}]}
                   if field == "error" else {field: value})
        try:
            db = tunedb.parse(db_text(**changes), "sm80", "db.json")
        except tunedb.DBError as err:
            msg = str(err)
            where = "db.json: entries[0].results[0].error" if field == "error" else f"db.json: entries[0].{field}"
            assert msg.startswith(where) and "\n" not in msg and "\r" not in msg, msg
            continue
        assert not any(c in CONTROLS for c in value) and field in ("gpu", "error"), (field, value)
        key = next(iter(db.entries))
        assert (key.gpu if field == "gpu" else db.entries[key].results[next(iter(db.entries[key].results))].error) == value
        if field == "gpu":  # what reaches configs.py: the GPU's name in a comment
            groups = groups_of(spec.load(spec_with(tmp_path, "description", "d")), ARCH)
            choices = [(g, dict(g.candidates[0]), "tuned 1.10x") for g in groups]
            source = render.render_configs(ARCH, choices, build._tuned_with([{"gpu": value, "triton": "3.9.0"}]), {})
            namespace: dict = {}
            exec(compile(source, "configs.py", "exec"), namespace)  # noqa: S102
            assert len(namespace["ACTIVATION"]) == len(groups)
    assert not marker.exists()


def test_db_error_messages_written_by_kernelgen_read_back(tmp_path):
    """The tuner records a compiler's message: one with line breaks or control codes is recorded
    cleaned, so the DB kernelgen writes is one it accepts."""
    db = tunedb.parse(db_text(), "sm80", "db.json")
    key = next(iter(db.entries))
    db.record(key, {"BLOCK_BYTES": 512, "num_warps": 4}, float("inf"), "CompilationError:\nat 1:2\x1b[31m bad\u2028")
    db.save(tmp_path / "sm80.json")
    again = tunedb.load(tmp_path / "sm80.json", "sm80")
    errors = [r.error for r in again.entries[key].results.values() if r.error]
    assert errors == ["CompilationError: at 1:2 [31m bad "]


# --- one real build ------------------------------------------------------------------------------

NASTY = "it's \"quoted\" ''' \"\"\" \\ \\n # {{ x }} é 😀 \u202e"


@pytest.fixture(scope="module")
def built_tree(tmp_path_factory):
    """A tree of one op whose text fields hold every accepted nasty character, built with a tuning
    DB whose GPU name does too (its entry keyed by the source the build will render)."""
    root = tmp_path_factory.mktemp("nasty")
    marker = root / "ran"
    code = run_payload(marker)
    data = json.loads(json.dumps(GOOD))
    data["op"].update(name="nastyact", description=NASTY + code, replaces=f"'''{code}'''",
                      forward=f'x / (1 + abs(x))  # """; {code}; """')
    path = root / "nastyact.toml"
    path.write_bytes(tomli_w.dumps(data).encode())
    s = spec.load(path)
    out = root / "tree"
    source_sha = hashlib.sha256(render_activation(s, ARCH).encode()).hexdigest()
    db_dir = root / "db"
    db_dir.mkdir()
    gpu = f"GPU \"x\" ''' \\ # {code}"
    entry = {**DB_ENTRY, "op": "nastyact", "source_sha256": source_sha, "gpu": gpu}
    (db_dir / "sm80.json").write_text(json.dumps({"arch": "sm80", "entries": [entry], "format": tunedb.FORMAT}))
    build.build([s], [ARCH], out, fams=families.for_tree(builtin=False), opts=build.BuildOptions(db_dir=db_dir))
    return out, marker, data["op"], gpu


def test_built_tree_runs_text_as_data(built_tree):
    import lowmem_ops as lo
    from lowmem_ops._tree import get_op

    out, marker, op, gpu = built_tree
    configs = (out / "sm80" / "configs.py").read_text()
    assert "1 of 36 choices are tuned" in configs and gpu in configs  # the DB's entry was baked, as a comment
    assert lo.load(out) == ["nastyact"]
    assert not marker.exists()  # importing ops.py ran nothing
    x = torch.linspace(-3, 3, 40, requires_grad=True)
    want = x.detach() / (1 + x.detach().abs())
    for backend in ("torch", "triton-interpret"):
        x.grad = None
        with ref.backend(backend):
            y = lo.approx_activation(x, "nastyact")
            y.sum().backward()
        torch.testing.assert_close(y, want)
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert not marker.exists()  # the forward ran, configs.py was imported at the first kernel launch
    info = get_op("nastyact")
    assert info.description == op["description"] and info.replaces == op["replaces"]  # data, unchanged
