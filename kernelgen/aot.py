"""Ahead-of-time compiles: triton.compile for a GPUTarget, no GPU needed, and the resources each
kernel uses. CUDA (here): registers, spills, shared memory read back from the cubin with cuobjdump;
HIP (kernelgen/aot_amd.py): VGPRs, SGPRs, scratch and LDS from the code object's metadata.

Compiles run in worker processes, `python -m kernelgen.aot` (a compiler crash kills a worker, not
the build), and are keyed by everything that determines their result, so a rebuild reuses what an
earlier manifest recorded. This module imports only the standard library and kernelgen's small
tables at the top (Triton inside the compile): workers start fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from . import aot_amd
from .aot_common import ast_source, one_line
from .aot_amd import AmdCompileResult


@dataclass(frozen=True)
class CompileResult:
    registers: int
    spill_stores: int  # bytes per thread ptxas spilled to local memory (its -v report)
    spill_loads: int
    stack_bytes: int  # the stack frame per thread: spill slots and local arrays
    local_bytes: int  # other local memory per thread
    shared_bytes: int  # static + dynamic, per block


@dataclass(frozen=True)
class CompileJob:
    """One kernel of a rendered file, for one target, with all its constexprs and launch options.
    `backend`, `capability` and `warp_size` are Triton's GPUTarget arguments: ("cuda", 90, 32),
    ("hip", "gfx942", 64)."""

    path: str  # the rendered .py file
    fn: str  # its @triton.jit function
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int | None  # None: Triton's default
    capability: int | str  # CUDA: 10 * major + minor; HIP: the gfx name
    aligned_args: tuple[str, ...] = ()  # integer arguments marked multiples of 16, as Triton's JIT marks them
    warp_size: int = 32  # the target's (Arch.warp_size)
    backend: str = "cuda"  # "cuda" | "hip"
    waves_per_eu: int = 0  # HIP only: the backend's register-budget hint; 0: none

    def key(self, source_sha256: str, triton_version: str) -> str:
        """What the result depends on: the source, the kernel, its specialisation, target, compiler."""
        record = {"results": RESULT_FORMAT, "source": source_sha256, "fn": self.fn, "signature": self.signature, "constexprs": self.constexprs,
                  "num_warps": self.num_warps, "num_stages": self.num_stages, "capability": self.capability,
                  "aligned_args": list(self.aligned_args), "triton": triton_version}
        # recorded where they differ from a CUDA compile's, so the CUDA manifests' keys stay valid
        for name, usual in (("warp_size", 32), ("backend", "cuda"), ("waves_per_eu", 0)):
            if getattr(self, name) != usual:
                record[name] = getattr(self, name)
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


RESULT_FORMAT = 2  # bump when CompileResult changes: recorded results of another format are not reused

# A compile that fails yields its message instead of its resources (CompileResult for CUDA,
# AmdCompileResult for HIP).
Outcome = CompileResult | AmdCompileResult | str

_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")

def _resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True, text=True)
    match = _RES_RE.search(out.stdout)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"cannot read resource usage with cuobjdump: {out.stderr.strip() or out.stdout}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, stack, shared, local


@contextlib.contextmanager
def _ptxas_report():
    """Yield a buffer that receives ptxas' -v report of the compiles inside. Spills are only there;
    Triton prints it when asked, and only when it runs ptxas, so the on-disk cache is bypassed (the
    build keeps its own cache: the manifests). Everything touched is restored afterwards."""
    import triton

    knobs, log = triton.knobs, io.StringIO()
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    had_fusion = "TRITON_DEFAULT_FP_FUSION" in os.environ
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless set; 1 is its default
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    try:
        with contextlib.redirect_stdout(log):
            yield log
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
        if not had_fusion:
            os.environ.pop("TRITON_DEFAULT_FP_FUSION", None)


def compile_kernel(job: CompileJob):
    """triton.compile the job for its CUDA arch: (Triton's CompiledKernel, ptxas' -v report)."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": job.num_warps}
    if job.num_stages is not None:
        options["num_stages"] = job.num_stages
    with _ptxas_report() as log:
        compiled = triton.compile(ast_source(job), target=GPUTarget("cuda", job.capability, job.warp_size),
                                  options=options)
    return compiled, log.getvalue()


def resources(compiled, ptxas_log: str) -> CompileResult:
    """What a compiled kernel uses: registers and shared memory from its cubin, spills from ptxas."""
    spills = _SPILL_RE.findall(ptxas_log)
    if not spills:
        raise RuntimeError("ptxas printed no spill report")
    reg, stack, static_shared, local = _resource_usage(compiled.asm["cubin"])
    return CompileResult(reg, sum(int(s) for s, _ in spills), sum(int(ld) for _, ld in spills), stack, local,
                         static_shared + int(compiled.metadata.shared))


def compile_one(job: CompileJob) -> Outcome:
    """Compile in this process. Any error comes back as its message (Triton raises many types)."""
    if job.backend == "hip":
        return aot_amd.compile_one(job)
    try:
        if job.backend != "cuda":
            raise ValueError(f"unknown compile backend {job.backend!r}; choose from cuda, hip")
        return resources(*compile_kernel(job))
    except Exception as err:
        return one_line(err)


def _encode(outcome: Outcome) -> str:
    return json.dumps({"error": outcome} if isinstance(outcome, str) else to_dict(outcome))


def _decode(line: str) -> Outcome:
    data = json.loads(line)
    return data["error"] if "error" in data else from_dict(data)


def _worker_env() -> dict:
    # The worker imports kernelgen from wherever this process did (a checkout on PYTHONPATH too).
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_worker(jobs: list[CompileJob], progress) -> list[Outcome]:
    """Compile `jobs` in order in a child process (python -m kernelgen.aot), restarting it past a
    job that kills it: that job's outcome is the crash, so the build drops just that config."""
    out: list[Outcome] = []
    while len(out) < len(jobs):
        remaining = jobs[len(out):]
        with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
                [sys.executable, "-m", "kernelgen.aot"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True, env=_worker_env()) as proc:

            def feed(proc=proc, remaining=remaining):
                try:
                    for job in remaining:
                        proc.stdin.write(json.dumps(asdict(job)) + "\n")
                    proc.stdin.close()
                except (BrokenPipeError, OSError):  # the worker died; its outcome is read below
                    pass

            writer = threading.Thread(target=feed, daemon=True)
            writer.start()
            for line in proc.stdout:
                out.append(_decode(line))
                progress(len(out) - 1)
            proc.wait()
            writer.join()
            if len(out) < len(jobs):
                err.seek(0)
                tail = [line for line in err.read().strip().splitlines() if line.strip()][-1:]
                out.append(f"compiler crashed (worker exit code {proc.returncode})" + (f": {tail[0]}" if tail else ""))
                progress(len(out) - 1)
    return out


def compile_all(jobs: list[CompileJob], workers: int, progress=lambda index: None) -> list[Outcome]:
    """Compile every job; outcomes in job order. workers <= 1 compiles in this process (no
    protection from compiler crashes); otherwise in `workers` child processes."""
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for i, job in enumerate(jobs):
            out.append(compile_one(job))
            progress(i)
        return out
    workers = min(workers, len(jobs))
    lock = threading.Lock()
    results: dict[int, Outcome] = {}

    def run(w: int) -> None:
        mine = list(range(w, len(jobs), workers))  # interleaved: every worker gets a mix of kernels

        def tick(k: int) -> None:
            with lock:
                progress(mine[k])

        for k, outcome in enumerate(_run_worker([jobs[i] for i in mine], tick)):
            results[mine[k]] = outcome

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, range(workers)))
    return [results[i] for i in range(len(jobs))]


def to_dict(result: CompileResult | AmdCompileResult) -> dict:
    return asdict(result)


def from_dict(data: dict) -> CompileResult | AmdCompileResult:
    """A recorded result, of the vendor whose fields it has (a HIP compile records VGPRs)."""
    kind = AmdCompileResult if "total_vgprs" in data else CompileResult
    return kind(**{k: int(data[k]) for k in kind.__dataclass_fields__})


def _serve() -> None:
    """The worker: one JSON job per stdin line, one JSON outcome per stdout line, in order."""
    for line in sys.stdin:
        if line.strip():
            print(_encode(compile_one(CompileJob(**json.loads(line)))), flush=True)


if __name__ == "__main__":
    _serve()
