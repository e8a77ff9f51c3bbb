"""The benchmark scripts run end to end (tiny sizes) and write the records their docs describe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TUNE = Path(__file__).resolve().parents[1] / "tune"


def run(script: str, tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(TUNE / script), "--device", "cpu", "--out", str(out), *args],
                   check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.read_text())


def test_bench_overhead(tmp_path):
    doc = run("bench_overhead.py", tmp_path, "--rounds", "2", "--calls", "3", "--launch-path",
              "--profile", str(tmp_path / "profile.txt"))
    ops = {r["op"] for r in doc["records"]}
    assert ops == {"regelu2", "resilu2", "swiglu", "geglu", "layernorm", "rmsnorm"}
    for r in doc["records"]:
        assert 0 < r["ours"]["min_us"] <= r["ours"]["median_us"] <= r["ours"]["max_us"]
        assert r["ratio"] == pytest.approx(r["ours"]["median_us"] / r["torch"]["median_us"])
    assert set(doc["launch_path"]) == {"activation", "norm"}
    assert "===== rmsnorm" in (tmp_path / "profile.txt").read_text()


def test_bench_step(tmp_path):
    doc = run("bench_step.py", tmp_path, "--quick", "--dtypes", "fp32")
    seen = {(r["model"], r["lora"], r["variant"]) for r in doc["records"]}
    assert len(seen) == 2 * 2 * 3
    for r in doc["records"]:
        assert r["ms_median"] > 0
        if r["variant"] == "converted":
            assert r["saved_ratio"] < 1 and r["gradient_cosine"] > 0.9
        if r["variant"] == "baseline":
            assert r["saved_ratio"] == 1 and r["time_ratio"] == 1


def test_bench_activations_records_spread(tmp_path):
    doc = run("bench_activations.py", tmp_path, "--quick", "--threads", "1", "--dtypes", "fp32")
    assert doc["environment"]["torch_num_threads"] == 1
    for r in doc["records"]:
        assert r["ours_us_min"] <= r["ours_us"] <= r["ours_us_max"]


def test_bench_cpu_times_gated_and_norms_against_torch(tmp_path):
    doc = run("bench_cpu.py", tmp_path, "--threads", "1", "--sizes", "2**12", "--cols", "64", "--reps", "2",
              "--warmup", "0", "--dtypes", "fp32")
    assert doc["threads"] == 1 and doc["backend"] == "cpp"
    ops = {r["op"] for r in doc["records"]}
    assert {"swiglu exact", "geglu approx", "swiglu gated_halves", "geglu on chunks", "layernorm inverse 64c",
            "rmsnorm none 64c"} <= ops
    for r in doc["records"]:
        assert r["ours_us_min"] <= r["ours_us"] <= r["ours_us_max"]
        assert r["ratio"] == pytest.approx(r["ours_us"] / r["torch_us"])


def test_plan_gpu_check_compares_plan_and_real_step(tmp_path):
    """The GPU check's path on CPU: each model and variant planned on fake tensors, and measured on real
    ones (by the tracker there, as CPU has no allocator peak); fake and real must agree within 5 %."""
    doc = run("plan_gpu_check.py", tmp_path, "--tiny")
    assert doc["device"] == "cpu"
    assert {(r["model"], r["variant"]) for r in doc["rows"]} == {(m, v) for m in ("llama-style", "vit")
                                                                  for v in ("baseline", "converted")}
    for r in doc["rows"]:
        assert r["planned"] > 0 and r["ratio"] == pytest.approx(r["planned"] / r["measured"])
        assert r["within_5_percent"], r


def test_bench_moe_lora_plans_less_saved_with_the_factored_experts():
    peft = pytest.importorskip("peft")
    if not hasattr(peft.tuners.lora.layer, "ParamWrapper"):
        pytest.skip("this peft has no target_parameters")
    done = subprocess.run([sys.executable, str(TUNE / "bench_moe_lora.py"), "--only", "OLMoE-1B-7B", "--layers", "1",
                           "--seq", "32", "--time-tokens", "0"], check=True, capture_output=True, text=True, timeout=600)
    saved = {line[15:42].strip(): float(line.split()[-2]) for line in done.stdout.splitlines()
             if line.startswith("OLMoE-1B-7B")}
    assert set(saved) == {"stock", "converted, merged saved", "converted"}
    # one layer's merged expert stacks (0.75 GiB) are no longer saved
    assert saved["converted, merged saved"] - saved["converted"] == pytest.approx(0.75, abs=0.02)
