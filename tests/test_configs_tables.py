"""configs.py's tables are described by data (kernels.ConfigTable), rendered by one loop of
templates/configs.py.j2 and read by one lookup (lowmem_ops._configs.lookup): a family the registry
knows gets its table and its lookup with no edit of either."""

from __future__ import annotations

import dataclasses
import re

import pytest

from kernelgen import families, render
from kernelgen.archs import ARCHS
from kernelgen.kernels import Bounds, ConfigTable, TuneGroup
from kernelgen.templating import RenderError
from lowmem_ops import _configs
from lowmem_ops import _contract as C
from lowmem_ops._tree import builtin_tree

ARCH = ARCHS["sm80"]
WIDTHS, ROWS = (8, 64), (100,)  # the fake family's buckets: 3 widths x 2 row counts


@dataclasses.dataclass
class FakeFamily:
    """Only what render_configs asks of a family: its table and its rows' keys."""

    table: ConfigTable
    name: str = "fake"

    def config_key(self, group: TuneGroup) -> tuple:
        return (group.kernel, group.dtype, *group.index)

    def configs_table(self) -> ConfigTable:
        return self.table


FAKE_TABLE = ConfigTable("FAKE", "A family the template and the runtime never heard of", ("kernel", "dtype"),
                         (Bounds("FAKE_WIDTHS", WIDTHS, "width bucket", "buckets the row width"),
                          Bounds("FAKE_ROWS", ROWS, "row bucket", "buckets the row count")))


def _config(w: int, r: int) -> dict:
    return {"BLOCK": 16 << w, "num_warps": 1 << r}  # a distinct config per bucket


def _choices(kernels=("fwd", "bwd")) -> list:
    return [(TuneGroup("fake", k, "float16", f"w{w},r{r}", (w, r), (), "fake"), _config(w, r), "static")
            for k in kernels for w in range(len(WIDTHS) + 1) for r in range(len(ROWS) + 1)]


def _tree_with(tmp_path, monkeypatch, family, choices):
    monkeypatch.setattr(families, "ALL", (*families.ALL, family))
    (tmp_path / ARCH.name).mkdir()
    (tmp_path / ARCH.name / C.CONFIGS_FILE).write_text(render.render_configs(ARCH, choices, "", {}))
    return tmp_path


def test_a_new_familys_table_is_rendered_and_looked_up_without_template_or_runtime_edits(tmp_path, monkeypatch):
    tree = _tree_with(tmp_path, monkeypatch, FakeFamily(FAKE_TABLE), _choices())
    text = (tree / ARCH.name / C.CONFIGS_FILE).read_text()
    assert "# A family the template and the runtime never heard of, keyed (kernel, dtype, width bucket, row bucket)." in text
    assert "# FAKE_WIDTHS buckets the row width." in text
    # by hand: width <= 8 is bucket 0, <= 64 bucket 1, wider bucket 2; rows <= 100 bucket 0, more bucket 1
    for cols, w in ((1, 0), (8, 0), (9, 1), (64, 1), (65, 2), (10 ** 9, 2)):
        for rows, r in ((0, 0), (100, 0), (101, 1)):
            for kernel in ("fwd", "bwd"):
                assert _configs.lookup(tree, ARCH.name, "FAKE", (kernel, "float16"), (cols, rows)) == _config(w, r)
    module = _configs.table(tree, ARCH.name)
    assert module.FAKE_WIDTHS == WIDTHS and module.FAKE_ROWS == ROWS and len(module.FAKE) == 12
    assert getattr(module, C.TABLE_BOUNDS) == {"FAKE": (WIDTHS, ROWS)}


def test_a_lookup_that_does_not_fit_the_table_says_what(tmp_path, monkeypatch):
    tree = _tree_with(tmp_path, monkeypatch, FakeFamily(FAKE_TABLE), _choices(kernels=("fwd",)))
    for sizes in ((8,), (8, 1, 1), 8):  # a size short, one too many (a key that exists), not a tuple
        with pytest.raises(ValueError, match=re.escape(f"FAKE buckets 2 sizes (a tuple), got {sizes!r}")):
            _configs.lookup(tree, ARCH.name, "FAKE", ("fwd", "float16"), sizes)
    with pytest.raises(LookupError, match=r"FAKE has no config for \('bwd', 'float16'\) at sizes \(8, 1\)"):
        _configs.lookup(tree, ARCH.name, "FAKE", ("bwd", "float16"), (8, 1))
    with pytest.raises(RuntimeError, match=rf"{C.CONFIGS_FILE} has no table NORM \(it has FAKE\).*kernelgen build"):
        _configs.lookup(tree, ARCH.name, "NORM", ("fwd", "float16"), (8, 1))


def test_the_committed_tables_list_their_bounds_in_key_order():
    """Every table of the built-in tree is one TABLE_BOUNDS names, with the bounds its family's space
    has (the runtime bisects those, so they must be the build's)."""
    module = _configs.table(builtin_tree(), "sm90")
    expected = {f.configs_table().name: tuple(b.values for b in f.configs_table().bounds) for f in families.ALL}
    assert getattr(module, C.TABLE_BOUNDS) == expected
    for f in families.ALL:
        t = f.configs_table()
        assert all(len(key) == len(t.key) for key in getattr(module, t.name))


W = Bounds("FAKE_WIDTHS", WIDTHS, "width bucket", "w")
R = Bounds("FAKE_ROWS", ROWS, "row bucket", "r")


@pytest.mark.parametrize("broken, message", [
    (dataclasses.replace(FAKE_TABLE, bounds=(W,)), r"key \('fwd', 'float16', 0, 0\) does not fit its fields"),  # one short
    (dataclasses.replace(FAKE_TABLE, prefix=("kernel",)), r"key \('fwd', 'float16', 0, 0\) does not fit"),
    (dataclasses.replace(FAKE_TABLE, bounds=(dataclasses.replace(W, values=(8,)), R)),
     r"key \('fwd', 'float16', 2, 0\) does not fit"),  # bucket index 2 past a single bound
    (dataclasses.replace(FAKE_TABLE, bounds=(dataclasses.replace(W, values=(64, 8)), R)),
     "FAKE_WIDTHS must be strictly increasing integers"),
    (dataclasses.replace(FAKE_TABLE, name="NORM_WIDTHS"), "would define NORM_WIDTHS twice"),
    (dataclasses.replace(FAKE_TABLE, bounds=(W, dataclasses.replace(R, name=C.TABLE_BOUNDS))), f"would define {C.TABLE_BOUNDS} twice"),
    (dataclasses.replace(FAKE_TABLE, name="FAKE = 1; import os; X"), "must be Python identifiers"),
    (dataclasses.replace(FAKE_TABLE, title="fine\nimport os"), "title: contains"),
    (dataclasses.replace(FAKE_TABLE, prefix=("kernel", "dtype\n")), "key fields: contains"),
    (dataclasses.replace(FAKE_TABLE, bounds=(dataclasses.replace(W, meaning="w\rimport os"), R)),
     "meaning of FAKE_WIDTHS: contains"),
])
def test_a_table_description_that_does_not_fit_is_a_render_error(broken, message, monkeypatch):
    """A family's description is checked against its rows, and its free text goes only into comments."""
    from kernelgen.families import norm

    monkeypatch.setattr(families, "ALL", (*families.ALL, FakeFamily(broken)))
    norm_group = norm.groups(ARCH)[0]  # the norms' table too, for names that clash
    with pytest.raises(RenderError, match=message):
        render.render_configs(ARCH, [(norm_group, dict(norm_group.candidates[0]), "static"), *_choices()], "", {})


@pytest.mark.parametrize("files", [{"regelu2": "../../elsewhere"}, {"regelu2'": "regelu2_0123456789ab"},
                                   {"regelu2": "x')\nimport os\n('"}])
def test_kernel_file_names_are_plain_words(files):
    """configs.py's KERNEL_FILES names files under kernels/: a name that is not a lower-case word is refused."""
    with pytest.raises(RenderError, match="kernel file stems and names must be lower-case words"):
        render.render_configs(ARCH, _choices(), "", files)
