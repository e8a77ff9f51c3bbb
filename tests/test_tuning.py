"""Autotuning on a CPU-only machine: config spaces, static pruning against real ahead-of-time
compiles, the tuning database (round trip, atomic writes, corruption), baking winners into the
build, and the breadth-first search driven by an injected timer and clock."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from kernelgen import aot, archs, build, cli, families, kernels, prune, space, spec, tunedb, tuner
from kernelgen.families import activation, norm
from lowmem_ops import _configs, _tree
from lowmem_ops._tree import builtin_tree

REPO = Path(__file__).resolve().parent.parent
SM80, SM90 = archs.ARCHS["sm80"], archs.ARCHS["sm90"]


# --- spaces --------------------------------------------------------------------------------------

def test_activation_space_enumerates_the_declared_product_plus_static(tmp_path):
    sp = activation.config_space()
    assert sp.dtypes == ("float32", "float16", "bfloat16")
    assert sp.vectors_per_thread == (1, 2, 4) and sp.num_warps == (4, 8)
    narrow = tmp_path / "a.space.toml"
    narrow.write_text("dtypes = ['bfloat16']\nvectors_per_thread = [1]\nnum_warps = [4]\n[buckets]\nn_elements = [8]\n")
    for cpb in (1, 2, 4, 8):
        fp32 = activation.load_space(narrow).configs(SM90, "float32", cpb)
        assert fp32 == [activation.static_config(SM90, "float32", cpb)]  # outside the space: static only
        # 4 fp32 elements per 16-byte vector
        assert {(c["BLOCK_BYTES"], c["num_warps"]) for c in sp.configs(SM90, "float32", cpb)} == \
            {(v * 4 * 32 * w // cpb, w) for v in (1, 2, 4) for w in (4, 8)}
        bf16 = sp.configs(SM90, "bfloat16", cpb)
        assert bf16[0] == activation.static_config(SM90, "bfloat16", cpb)
        # 8 bf16 elements per 16-byte vector: elements per program = vectors * 8 * 32 * warps
        want = {(v * 8 * 32 * w // cpb, w) for v in (1, 2, 4) for w in (4, 8)}
        assert {(c["BLOCK_BYTES"], c["num_warps"]) for c in bf16} == want
    assert sp.buckets == ["n<=65536", "n<=1048576", "n<=16777216", "n>16777216"]
    assert [sp.problem_size(i) for i in range(4)] == [65536, 1048576, 16777216, 4 * 16777216]


def test_norm_space_respects_its_constraints():
    sp = norm.config_space()
    lo, hi = sp.elements_per_thread
    for w_index, width in enumerate(sp.widths):
        fwd = sp.configs(SM90, "forward", "bfloat16", w_index)
        single = [c for c in fwd if c["SINGLE_PASS"]]
        assert single[0]["num_warps"] == norm.static_config(SM90)["single_warps"][width]  # static first
        assert all(c["BLOCK_N"] == width for c in single)
        assert {c["num_warps"] for c in single[1:]} <= {w for w in sp.single_warps if lo <= width // (32 * w) <= hi}
        loops = [c for c in fwd if not c["SINGLE_PASS"]]
        assert all(c["BLOCK_N"] < width for c in loops)  # only chunks narrower than the row
        bwd = sp.configs(SM90, "backward", "bfloat16", w_index)
        per_compile = {space.config_id(space.compile_part(c)) for c in bwd if c["SINGLE_PASS"]}
        # PROGRAMS_PER_SM multiplies the candidates, not the compiles
        assert len([c for c in bwd if c["SINGLE_PASS"]]) == len(per_compile) * len({c["PROGRAMS_PER_SM"] for c in bwd if c["SINGLE_PASS"]})
    wide = sp.configs(SM90, "backward", "float32", len(sp.widths))
    assert wide[0] == {"BLOCK_N": 4096, "SINGLE_PASS": False, "num_warps": 8}  # static, and in the space
    assert len(wide) == len(sp.loop_block_n) * len(sp.loop_warps)
    assert sp.buckets[0] == "w<=512,r<=1024" and sp.buckets[-1] == "w>8192,r>16384"


def test_variants_are_unique_compile_configs():
    specs = spec.load_builtin()
    groups = families.groups(specs, SM90)
    configs = families.variants(groups)
    variants = [vs[0] for vs in configs]
    idents = [(v.op, v.kernel, v.dtype, space.config_id(v.config)) for v in variants]
    assert len(idents) == len(set(idents))
    assert not any("PROGRAMS_PER_SM" in v.config for v in variants)
    for vs in configs:  # per kernel and flag set (add_norm compiles two), one compile per weight dtype the runtime
        assert all(v.aligned and v.config == vs[0].config for v in vs)  # uses, the model's own first
        # the gated kernels: the flat kernel and its twin that reads strided views by rows, one config
        want_fns = [vs[0].fn, vs[0].fn.removesuffix("_kernel") + "_rows_kernel"] if vs[0].kernel.startswith("gated") else None
        assert want_fns is None or [v.fn for v in vs] == want_fns
        by_flags: dict = {}
        for v in vs:
            by_flags.setdefault((v.fn, tuple(sorted(v.flags.items()))), []).append(v.signature.get("w_ptr"))
        for (_, flags), weights in by_flags.items():
            affine = ".affine." in vs[0].kernel or dict(flags).get("AFFINE", False)
            affine_half = affine and vs[0].dtype != "float32"
            assert weights == ([f"*{archs.TRITON_DTYPE[vs[0].dtype]}", "*fp32"] if affine_half else [weights[0]])
    for g in groups:  # every candidate's compiled kernel is among them
        for c in g.candidates:
            assert (g.op, g.kernel, g.dtype, space.config_id(space.compile_part(c))) in set(idents)


@pytest.mark.parametrize("text, needle", [
    ("dtypes = ['float16']\nvectors_per_thread = [1, 3]\nnum_warps = [4]\n[buckets]\nn_elements = [10]\n",
     "vectors_per_thread must hold powers of two"),
    ("dtypes = ['float16']\nvectors_per_thread = [1]\nnum_warps = [4]\n[buckets]\nn_elements = [10, 5]\n",
     "[buckets] n_elements must be strictly increasing"),
    ("dtypes = ['fp8']\nvectors_per_thread = [1]\nnum_warps = [4]\n[buckets]\nn_elements = [10]\n",
     "dtypes must be a list drawn from"),
    ("dtypes = ['float16']\nvectors_per_thread = []\nnum_warps = [4]\n", "vectors_per_thread must be a non-empty list"),
    ("dtypes = [\n", "bad.space.toml"),
])
def test_bad_space_files_are_rejected_with_file_and_key(tmp_path, text, needle):
    path = tmp_path / "bad.space.toml"
    path.write_text(text)
    with pytest.raises(space.SpaceError) as err:
        activation.load_space(path)
    assert needle in str(err.value) and str(path) in str(err.value)


# --- static pruning ------------------------------------------------------------------------------

def _res(registers, spill_stores=0, spill_loads=0, stack=0, shared=0):
    return aot.CompileResult(registers, spill_stores, spill_loads, stack, 0, shared)


def test_judge_applies_each_rule():
    ok = prune.judge(SM90, 4, _res(32))
    # sm90: 16 blocks of 4 warps by threads (2048 / 128) and by registers (65536 / (32 * 32 * 4))
    assert ok.kept and ok.occupancy == 1.0
    half = prune.judge(SM90, 4, _res(64))  # 65536 / (64 * 128) = 8 blocks
    assert half.kept and half.occupancy == 0.5
    spill = prune.judge(SM90, 16, _res(128, spill_stores=212, spill_loads=140, stack=112))
    assert not spill.kept and spill.reason == "spills registers: 212 B stored, 140 B loaded per thread at 128 registers"
    assert spill.spilled_bytes == 352
    assert prune.judge(SM90, 4, _res(32, stack=8)).kept  # a stack frame without spills: a local array
    smem = prune.judge(SM80, 4, _res(32, shared=SM80.max_smem_per_block + 1))
    assert not smem.kept and "shared memory" in smem.reason and "166912" in smem.reason
    assert prune.judge(SM80, 4, "CompilationError: boom").reason == "does not compile: CompilationError: boom"
    assert prune.judge(SM80, 4, _res(256)).reason.startswith("256 registers")


def test_rank_orders_by_occupancy_and_static_falls_back():
    cands = [{"B": 1, "num_warps": 4}, {"B": 2, "num_warps": 4}, {"B": 3, "num_warps": 4}]
    v = {1: prune.Verdict(True, "", 0.5), 2: prune.Verdict(True, "", 1.0), 3: prune.Verdict(False, "spills", 0.0, 8)}
    ranked = prune.rank(cands, lambda c: v[c["B"]])
    assert [c["B"] for c in ranked] == [2, 1]
    assert prune.static_choice(cands, ranked) == cands[0]  # static kept: it stays the static choice
    v[1] = prune.Verdict(False, "spills", 0.0, 16)
    ranked = prune.rank(cands, lambda c: v[c["B"]])
    assert prune.static_choice(cands, ranked) == cands[1]  # static dropped: the best-ranked survivor
    v[2] = prune.Verdict(False, "spills", 0.0, 4)
    assert prune.static_choice(cands, prune.rank(cands, lambda c: v[c["B"]])) is None
    assert prune.least_spilling(cands, lambda c: v[c["B"]]) == cands[1]


def _manifest(arch):
    return json.loads((REPO / "generated" / arch / "manifest.json").read_text())


def _compiles(row: dict) -> list[dict]:
    """A manifest row's compiles: its usual one (top level), then its other specialisations."""
    return [row] + list(row.get("also", ()))


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_committed_manifest_verdicts_agree_with_the_rules(arch):
    """Kept = every compile with aligned sizes (each weight dtype) is clean, and a chosen config also
    compiles for any size; its occupancy is the lowest of its aligned compiles."""
    a = archs.ARCHS[arch]
    m = _manifest(arch)
    rows = m["variants"]
    assert m["pruning"]["compiled"] == sum(len(_compiles(r)) for r in rows)
    assert len(rows) == m["pruning"]["kept"] + m["pruning"]["dropped"]
    for v in rows:
        aligned = [c for c in _compiles(v) if c["specialisation"]["sizes"] == "multiples of 16"]
        anysize = [c for c in _compiles(v) if c["specialisation"]["sizes"] == "any"]
        assert aligned[0] is v and len(aligned) + len(anysize) == len(_compiles(v))
        if any("error" in c for c in aligned):
            assert not v["kept"] and v["reason"].startswith("does not compile")
            continue
        clean = all(c["spill_stores"] == 0 and c["spill_loads"] == 0 and c["shared_bytes"] <= a.max_smem_per_block
                    for c in aligned) and not any("error" in c for c in anysize)
        assert v["kept"] == clean, v
        if v["kept"]:
            assert v["occupancy"] == min(round(a.occupancy(v["config"]["num_warps"], c["registers"], c["shared_bytes"]), 4)
                                         for c in aligned)
    assert m["pruning"]["dropped"] > 0  # the spaces reach past what fits, so pruning has work to do
    # every chosen config was compiled for any size too, for each weight dtype
    by_ident = {(r["op"], r["kernel"], r["dtype"], space.config_id(r["config"])): r for r in rows}
    for c in m["choices"]:
        row = by_ident[(c["op"], c["kernel"], c["dtype"], space.config_id(space.compile_part(c.get("tuned") or c["static"])))]
        weights = {x["specialisation"].get("weight") for x in _compiles(row)}
        assert {x["specialisation"].get("weight") for x in _compiles(row) if x["specialisation"]["sizes"] == "any"} == weights


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_recorded_compile_results_match_a_fresh_compile(arch):
    """The build reuses what manifests recorded; this compiles a sample again, kept and dropped
    configs of an activation and of the norms, each of their specialisations (weight dtypes, any
    size), and demands the same registers, spills and smem."""
    a = archs.ARCHS[arch]
    m = _manifest(arch)
    specs = {s.name: s for s in spec.load_builtin()}
    sample = [v for v in m["variants"] if v["op"] == "regelu2" and v["dtype"] == "bfloat16" and v["kernel"] == "forward"]
    sample += [v for v in m["variants"] if v["op"] == "ms_norm" and not v["kept"]][:3]
    sample += [v for v in m["variants"] if v["op"] == "ms_norm" and v["kept"] and v["kernel"].endswith("backward")
               and len(v.get("also", ())) >= 3][:3]
    by_key = {}
    for config in families.variants(families.groups([specs["regelu2"]], a)):
        for vv in config:
            for case in (vv, vv.unaligned()):
                by_key[(case.op, case.kernel, case.dtype, space.config_id(case.config),
                        json.dumps(case.specialisation, sort_keys=True))] = case
    checked = 0
    for rec in sample:
        for compiled in _compiles(rec):
            vv = by_key[(rec["op"], rec["kernel"], rec["dtype"], space.config_id(rec["config"]),
                         json.dumps(compiled["specialisation"], sort_keys=True))]
            job = aot.CompileJob(str(REPO / "generated" / m["ops"][vv.op]["file"]), vv.fn, vv.signature, vv.constexprs, vv.num_warps,
                                 vv.num_stages, a.capability, vv.aligned_args)
            got = aot.compile_one(job)
            if "error" in compiled:
                assert got == compiled["error"], compiled
            else:
                assert isinstance(got, aot.CompileResult), got
                assert aot.to_dict(got) == {k: compiled[k] for k in aot.CompileResult.__dataclass_fields__}, rec
            checked += 1
    assert checked > len(sample)  # specialisations beyond the usual compile were among them


def test_worker_crash_is_pinned_on_its_job(tmp_path, monkeypatch):
    """A compile that kills its worker process drops just that config; the others still compile."""
    src = tmp_path / "k.py"
    src.write_text("import os\nimport triton\nimport triton.language as tl\n\n\n"
                   "@triton.jit\ndef ok(x_ptr, BLOCK: tl.constexpr):\n    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)\n\n\n"
                   "if os.environ.get('KG_CRASH_TEST'):\n    os._exit(9)\n")
    job = aot.CompileJob(str(src), "ok", {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128}, 4, None, 80)
    monkeypatch.setenv("KG_CRASH_TEST", "")
    good = aot.compile_all([job, job], workers=2)
    assert all(isinstance(o, aot.CompileResult) for o in good)
    monkeypatch.setenv("KG_CRASH_TEST", "1")  # the worker dies importing the kernel file
    crashed = aot.compile_all([job, job, job], workers=2)
    assert all(isinstance(o, str) and o.startswith("compiler crashed (worker exit code 9)") for o in crashed)


# --- the database ----------------------------------------------------------------------------------

def _key(**kw):
    base = dict(op="regelu2", kernel="forward", dtype="bfloat16", bucket="n<=65536", source_sha256="a" * 64,
                triton="3.6.0", gpu="NVIDIA H200")
    return tunedb.EntryKey(**{**base, **kw})


def _db():
    db = tunedb.TuneDB("sm90")
    static = {"BLOCK_BYTES": 512, "num_warps": 4}
    db.entry(_key(), [65536], 327680, static)
    db.record(_key(), static, 0.010)
    db.record(_key(), {"BLOCK_BYTES": 256, "num_warps": 4}, 0.008)
    db.record(_key(), {"BLOCK_BYTES": 2048, "num_warps": 8}, math.inf, "OutOfResources: shared memory")
    db.entry(_key(kernel="backward"), [65536], 300000, static)
    db.record(_key(kernel="backward"), static, 0.007)
    return db


def test_db_round_trip_is_sorted_and_byte_stable(tmp_path):
    path = tmp_path / "db" / "sm90.json"
    db = _db()
    db.save(path)
    again = tunedb.load(path, "sm90")
    assert again.entries.keys() == db.entries.keys()
    for k in db.entries:
        assert again.entries[k].results == db.entries[k].results and again.entries[k].static == db.entries[k].static
    assert again.to_json() == path.read_text()  # canonical: saving what was loaded changes nothing
    data = json.loads(path.read_text())
    assert [e["kernel"] for e in data["entries"]] == ["backward", "forward"]  # sorted keys
    failed = [r for r in data["entries"][1]["results"] if r["ms"] is None]
    assert failed == [{"config": {"BLOCK_BYTES": 2048, "num_warps": 8}, "ms": None, "error": "OutOfResources: shared memory"}]
    assert os.listdir(path.parent) == ["sm90.json"]  # no temp files left


def test_db_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sm90.json"
    _db().save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tunedb.os, "replace", boom)
    db = _db()
    db.record(_key(), {"BLOCK_BYTES": 1024, "num_warps": 4}, 0.001)
    with pytest.raises(OSError):
        db.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["sm90.json"]


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t[: len(t) // 2], "not JSON"),
    (lambda t: t.replace('"arch": "sm90"', '"arch": "sm80"'), "holds arch 'sm80', expected 'sm90'"),
    (lambda t: t.replace('"format": 1', '"format": 7'), "format 7; this kernelgen reads format 1"),
    (lambda t: t.replace('"ms": 0.007', '"ms": -1'), "entries[0].results[0].ms: must be a positive number"),
    (lambda t: t.replace('"op": "regelu2"', '"op": ""', 1), "entries[0].op: must be a non-empty string"),
    (lambda t: t.replace('"bytes_moved": 300000', '"bytes_moved": "many"'), "entries[0].bytes_moved"),
])
def test_corrupt_db_is_a_clear_error_when_loading(tmp_path, mutate, needle):
    path = tmp_path / "sm90.json"
    path.write_text(mutate(_db().to_json()))
    with pytest.raises(tunedb.DBError) as err:
        tunedb.load(path, "sm90")
    assert str(path) in str(err.value) and needle in str(err.value)
    with pytest.warns(tunedb.TuneDBWarning, match="static config"):
        assert tunedb.load_or_warn(path, "sm90").entries == {}


def test_tuned_choice_prefers_current_triton_and_allowed_configs():
    db = _db()
    static = {"BLOCK_BYTES": 512, "num_warps": 4}
    fast = {"BLOCK_BYTES": 256, "num_warps": 4}
    allowed = [static, fast]
    group = _key().group
    t = tunedb.tuned_choice(db, group, "a" * 64, allowed, static, "3.6.0")
    assert t.config == fast and t.ms == 0.008 and t.static_ms == 0.010
    assert tunedb.tuned_choice(db, group, "b" * 64, allowed, static, "3.6.0") is None  # other source
    assert tunedb.tuned_choice(db, group, "a" * 64, [static], static, "3.6.0").config == static  # fast was pruned
    newer = _key(triton="3.9.0")
    db.entry(newer, [65536], 327680, static)
    db.record(newer, static, 0.009)
    assert tunedb.tuned_choice(db, group, "a" * 64, allowed, static, "3.9.0").config == static
    assert tunedb.stale_groups(db, {group: "b" * 64}) == [group]
    assert tunedb.stale_groups(db, {group: "a" * 64}) == []


# --- the search ------------------------------------------------------------------------------------

def _task(name, n_configs, source="s" * 64):
    g = kernels.TuneGroup(name, "forward", "bfloat16", "n<=65536", (0,), ())
    ranked = tuple({"BLOCK_BYTES": 64 << i, "num_warps": 4} for i in range(n_configs))
    return tuner.Task(g, source, ranked, (65536,), 400000)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_search_is_breadth_first_and_respects_the_budget():
    tasks = [_task("a", 3), _task("b", 2), _task("c", 3)]
    clock, order, saves = FakeClock(), [], []

    def measure(task, cfg):
        order.append((task.group.op, cfg["BLOCK_BYTES"]))
        clock.t += 1.0  # every measurement costs a second of the budget
        return cfg["BLOCK_BYTES"] / 64.0

    db = tunedb.TuneDB("sm90")
    stats = tuner.search(tasks, db, measure, gpu="G", triton="T", budget_s=4.5, clock=clock,
                         save=lambda: saves.append(len(order)))
    # round 0: every static config first; then round 1 until the budget is gone
    assert order == [("a", 64), ("b", 64), ("c", 64), ("a", 128), ("b", 128)]
    assert stats.out_of_time and stats.measured == 5 and saves[-1] == 5
    # resuming with more budget measures only what is missing
    order.clear()
    stats = tuner.search(tasks, db, measure, gpu="G", triton="T", budget_s=100, clock=clock)
    assert order == [("c", 128), ("a", 256), ("c", 256)] and stats.reused == 5 and not stats.out_of_time
    entry = db.entries[tunedb.EntryKey("a", "forward", "bfloat16", "n<=65536", "s" * 64, "T", "G")]
    assert entry.best()[1].ms == 1.0 and json.loads(entry.static) == tasks[0].static


def test_search_scores_failures_as_infinitely_slow_and_keeps_going():
    tasks = [_task("a", 3)]

    def measure(task, cfg):
        if cfg["BLOCK_BYTES"] == 128:
            raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")
        if cfg["BLOCK_BYTES"] == 256:
            raise tuner.CompileTimeout("the first launch (compile) took over 1 s")
        return 0.5

    db = tunedb.TuneDB("sm90")
    stats = tuner.search(tasks, db, measure, gpu="G", triton="T", budget_s=10)
    results = next(iter(db.entries.values())).results
    assert stats.failed == 2 and stats.measured == 3
    errors = sorted(r.error for r in results.values() if math.isinf(r.ms))
    assert errors[0].startswith("CompileTimeout") and errors[1].startswith("RuntimeError: out of resource")


def test_adding_a_config_keeps_every_earlier_result():
    db = tunedb.TuneDB("sm90")
    tuner.search([_task("a", 2)], db, lambda t, c: 1.0, gpu="G", triton="T", budget_s=10)
    calls = []
    tuner.search([_task("a", 3)], db, lambda t, c: calls.append(c) or 2.0, gpu="G", triton="T", budget_s=10)
    assert calls == [{"BLOCK_BYTES": 256, "num_warps": 4}]
    assert len(next(iter(db.entries.values())).results) == 3


def test_run_with_timeout():
    import time

    with pytest.raises(tuner.CompileTimeout):
        tuner.run_with_timeout(lambda: time.sleep(2), 0.05)
    with pytest.raises(ValueError, match="boom"):
        tuner.run_with_timeout(lambda: (_ for _ in ()).throw(ValueError("boom")), 5)
    tuner.run_with_timeout(lambda: None, 5)


# --- planning from a tree, baking into a build -----------------------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of the committed tree rebuilt for sm90: compile results come from its manifests."""
    out = tmp_path_factory.mktemp("tuning") / "generated"
    shutil.copytree(REPO / "generated", out, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def kernel_file(stem: str) -> str:
    """The committed sm90 kernel file of `stem`, relative to the tree."""
    path, _ = _tree.kernel_path(REPO / "generated", "sm90", stem)
    return str(path.relative_to(REPO / "generated"))


def _build(out, db_dir=None):
    build.build(spec.load_builtin(), [SM90], out, opts=build.BuildOptions(db_dir=db_dir))


def test_rebuilding_from_recorded_results_reproduces_the_committed_arch(tree):
    _build(tree)
    for name in ("sm90/configs.py", "sm90/manifest.json", kernel_file("regelu2"), kernel_file("ms_norm")):
        assert (tree / name).read_bytes() == (REPO / "generated" / name).read_bytes(), name


def _plan(tree, ops=None):
    select = (lambda g: g.op in ops) if ops else (lambda g: True)
    return tuner.plan(spec.load_builtin(), SM90, tree, families.ALL, select)


def test_plan_takes_kept_configs_static_first(tree):
    tasks = _plan(tree)
    m = json.loads((tree / "sm90" / "manifest.json").read_text())
    kept = {(v["op"], v["kernel"], v["dtype"], space.config_id(v["config"])) for v in m["variants"] if v["kept"]}
    assert tasks and {t.group.dtype for t in tasks} == {"float32", "float16", "bfloat16"}
    for t in tasks:
        assert len(t.ranked) >= 2
        assert all((t.group.op, t.group.kernel, t.group.dtype, space.config_id(space.compile_part(c))) in kept
                   for c in t.ranked)
        assert t.source_sha256 == m["ops"][t.group.op]["source_sha256"]
    t = next(t for t in tasks if t.group.key == ("regelu2", "forward", "bfloat16", "n<=1048576"))
    assert t.problem == (1048576,) and t.bytes_moved == 2 * 2 * 1048576 + 1048576 // 4


def test_plan_refuses_a_stale_tree(tree, tmp_path):
    stale = tmp_path / "generated"
    shutil.copytree(tree, stale)
    path = stale / kernel_file("regelu2")
    path.write_text(path.read_text() + "\n# edited\n")
    with pytest.raises(tuner.TuneError, match=r"regelu2_[0-9a-f]{12}\.py is not what the current templates and specs render"):
        _plan(stale)


def _fake_tune(tree, db_dir, ops):
    """Tune with a timer that makes the highest-ranked non-static config 2x faster than static."""
    tasks = _plan(tree, ops)
    db = tunedb.TuneDB("sm90")

    def measure(task, cfg):
        return 1.0 if cfg == task.static else (0.5 if cfg == task.ranked[1] else 0.8)

    tuner.search(tasks, db, measure, gpu="NVIDIA H200", triton=__import__("triton").__version__, budget_s=1e9)
    db.save(tunedb.db_path(db_dir, "sm90"))
    return tasks


def test_build_bakes_db_winners_deterministically(tree, tmp_path):
    db_dir = tmp_path / "db"
    tasks = _fake_tune(tree, db_dir, {"regelu2", "ms_norm"})
    _build(tree, db_dir)
    first = (tree / "sm90" / "configs.py").read_bytes()
    _build(tree, db_dir)
    assert (tree / "sm90" / "configs.py").read_bytes() == first  # same DB: byte-identical
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("baked_configs", tree / "sm90" / "configs.py")
    baked = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(baked)
    for t in tasks:
        g = t.group
        key = (g.op, g.kernel, g.dtype, *g.index) if g.op != "ms_norm" else (g.kernel, g.dtype, *g.index)
        table = baked.ACTIVATION if g.op != "ms_norm" else baked.NORM
        assert table[key] == t.ranked[1], g.key
    text = first.decode()
    assert "# tuned 2.00x" in text and f"{len(tasks)} of " in text and "NVIDIA H200" in text
    manifest = json.loads((tree / "sm90" / "manifest.json").read_text())
    tuned = [c for c in manifest["choices"] if "tuned" in c]
    assert len(tuned) == len(tasks) and all(c["ms"] == 0.5 and c["static_ms"] == 1.0 for c in tuned)
    _build(tree)  # without the DB: back to the committed, static tree
    assert (tree / "sm90" / "configs.py").read_bytes() == (REPO / "generated" / "sm90" / "configs.py").read_bytes()


def test_corrupt_or_stale_db_falls_back_to_static_with_a_warning(tree, tmp_path):
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    (db_dir / "sm90.json").write_text("{ not json")
    with pytest.warns(tunedb.TuneDBWarning, match="ignoring the tuning database.*not JSON"):
        _build(tree, db_dir)
    assert (tree / "sm90" / "configs.py").read_bytes() == (REPO / "generated" / "sm90" / "configs.py").read_bytes()
    _fake_tune(tree, db_dir, {"regelu2"})
    data = json.loads((db_dir / "sm90.json").read_text())
    for e in data["entries"]:
        e["source_sha256"] = "0" * 64  # as if measured before a template change
    (db_dir / "sm90.json").write_text(json.dumps(data))
    with pytest.warns(tunedb.TuneDBWarning, match="measured on other kernel sources"):
        _build(tree, db_dir)
    assert (tree / "sm90" / "configs.py").read_bytes() == (REPO / "generated" / "sm90" / "configs.py").read_bytes()


# --- the measuring path, run under the interpreter ---------------------------------------------------

@pytest.mark.slow
def test_measure_launches_every_kernel_kind_with_candidate_configs(tree):
    """CudaMeasure's launches, on CPU tensors through the interpreter with a counting timer: each
    kind of kernel runs with its candidates and gives the same result as with its static config."""
    calls = []

    def timer(fn):
        calls.append(fn())
        return 1.0

    m = tuner.CudaMeasure(builtin_tree(), SM90, device="cpu", interpret=True, timer=timer, max_elements=4096)
    tasks = _plan(tree, {"regelu2", "ms_norm"})
    picked = {}
    for t in tasks:
        kind = t.group.kernel if t.group.op != "ms_norm" else t.group.kernel.split(".", 1)[1]
        if t.group.dtype == "bfloat16" and t.group.index[-1] == 0 and kind not in picked:
            if t.group.op != "ms_norm" or t.group.index[0] in (1, len(norm.config_space().widths)):
                picked[kind] = t
    assert {"forward", "backward", "gated_backward_approx", "affine.backward", "affine.param_grad"} <= set(picked)
    for t in picked.values():
        outs = []
        for cfg in t.ranked[:3]:
            assert m(t, cfg) == 1.0
            outs.append(calls[-1])
        for other in outs[1:]:
            for a, b in zip(_tensors(outs[0]), _tensors(other)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _tensors(out):
    return [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]


# --- runtime bucket selection and the CLI ------------------------------------------------------------

def test_runtime_picks_the_bucket_by_size():
    tree = builtin_tree()
    t = _configs.table(tree, "sm90")
    for n, bucket in ((1, 0), (65536, 0), (65537, 1), (16777216, 2), (16777217, 3)):
        assert _configs.lookup(tree, "sm90", "ACTIVATION", ("regelu2", "forward", "bfloat16"), (n,)) == \
            t.ACTIVATION[("regelu2", "forward", "bfloat16", bucket)]
    for rows, cols, key in ((1, 1, (0, 0)), (1024, 512, (0, 0)), (1025, 513, (1, 1)), (20000, 8192, (4, 2)),
                            (10, 8193, (5, 0))):
        assert _configs.lookup(tree, "sm90", "NORM", ("rmsnorm.backward", "float16"), (cols, rows)) == \
            t.NORM[("rmsnorm.backward", "float16", *key)]


def test_cli_tune_without_gpu_says_so(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["tune", "--arch", "native"]) == 1
    assert "--arch native needs a CUDA GPU, and this machine has none" in capsys.readouterr().err
    assert cli.main(["tune", "--arch", "sm90", "--db", str(tmp_path)]) == 1
    assert "measuring sm90 needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_tune_of_an_amd_target_says_what_it_builds(capsys, tmp_path):
    assert cli.main(["tune", "--arch", "gfx942", "--report", "--db", str(tmp_path)]) == 1
    assert "measures on NVIDIA GPUs only: gfx942 builds its static configs" in capsys.readouterr().err


def test_cli_report(tree, tmp_path, capsys):
    db_dir = tmp_path / "db"
    assert cli.main(["tune", "--arch", "sm90", "--report", "--db", str(db_dir)]) == 0
    assert "no measurements for sm90" in capsys.readouterr().out
    _fake_tune(tree, db_dir, {"resilu2"})
    assert cli.main(["tune", "--arch", "sm90", "--report", "--db", str(db_dir), "--dtypes", "bf16"]) == 1
    assert "--dtypes: unknown bf16; choose from float32, float16, bfloat16" in capsys.readouterr().err
    assert cli.main(["tune", "--arch", "sm90", "--report", "--db", str(db_dir), "--out", str(tree),
                     "--kernels", "backward"]) == 0
    out = capsys.readouterr().out
    assert "resilu2" in out and "2.00x" in out and "geometric mean 2.000x" in out and "fresh" in out
    assert "forward_nograd" not in out


def test_cli_report_names_a_corrupt_db(tmp_path, capsys):
    (tmp_path / "sm90.json").write_text('{"format": 1, "arch": "sm90", "entries": [{"op": 3}]}')
    assert cli.main(["tune", "--arch", "sm90", "--report", "--db", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'sm90.json'}: entries[0].op: must be a non-empty string, got 3" in err


def test_cli_tune_end_to_end_on_a_pretend_gpu(tmp_path, monkeypatch, capsys):
    """`kernelgen tune` as on a GPU, with CUDA faked and the launches run by the interpreter on CPU:
    the DB it writes is valid, holds every candidate of the selected groups, and a rerun reuses it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Pretend H200")
    launched = []

    def timer(fn):
        launched.append(fn())
        return 0.25 if len(launched) % 2 else 0.5

    real = tuner.CudaMeasure
    monkeypatch.setattr(tuner, "CudaMeasure", lambda tree, arch, compile_timeout_s: real(
        tree, arch, device="cpu", interpret=True, timer=timer, max_elements=2048))
    argv = ["tune", "--arch", "native", "--db", str(tmp_path), "--ops", "resilu2", "--kernels", "backward",
            "--dtypes", "bfloat16"]
    assert cli.main(argv) == 0
    db = tunedb.load(tmp_path / "sm90.json", "sm90")
    tasks = _plan(builtin_tree(), {"resilu2"})
    # --kernels matches by substring: backward, gated_backward, gated_backward_approx; 4 buckets each
    tasks = [t for t in tasks if "backward" in t.group.kernel and t.group.dtype == "bfloat16"]
    assert len(db.entries) == len(tasks) == 12 and len(launched) == sum(len(t.ranked) for t in tasks) == 72
    for e in db.entries.values():
        assert e.key.gpu == "Pretend H200" and set(e.results) == {space.config_id(c) for c in next(
            t.ranked for t in tasks if t.group.key == e.key.group)}
    assert "wrote" in capsys.readouterr().err
    launched.clear()
    assert cli.main(argv) == 0 and launched == []  # everything already measured
    assert "reused 72 from the database" in capsys.readouterr().err.replace("\n", " ")
