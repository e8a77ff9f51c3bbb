"""On a CUDA device: the generated kernels against the torch path, at sizes the CPU tests cannot
reach (over 2**31 elements). Skipped without a GPU; tune/gpu_check.sh runs these on one."""

import pytest
import torch

import lowmem_ops as lo
from lowmem_ops.activations import approx_act_bwd, approx_act_fwd

from . import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["regelu2", "resilu2"])
@pytest.mark.parametrize("n", [1, 1000, 4096, 4097, 1 << 20, (1 << 22) + 3])
def test_cuda_kernels_match_torch_path(name, dtype, n):
    torch.manual_seed(n)
    x = (torch.randn(n, dtype=torch.float64) * 4).to(dtype)
    dy = torch.randn(n, dtype=torch.float64).to(dtype)
    y_c, codes_c = approx_act_fwd(x.cuda(), name, True)
    dx_c = approx_act_bwd(dy.cuda(), codes_c, name)
    with ref.backend("torch"):
        y_t, codes_t = approx_act_fwd(x, name, True)
        dx_t = approx_act_bwd(dy, codes_t, name)
    assert torch.equal(codes_c.cpu(), codes_t)
    assert torch.equal(dx_c.cpu(), dx_t)
    # y is exact GELU/SiLU computed in float32 by two libraries. Each one's error: erf (or exp) to
    # 2 ulp, i.e. up to 2 eps absolute where |erf| nears 1, scaled by 0.5 |x| in 0.5 x (1 + erf(.)),
    # plus the rounding of x / sqrt(2) (under 0.5 eps after erf's slope) and of y: at most
    # 1.5 |x| eps + 2 |y| eps. Two such results differ by at most twice that. (The cancellation in
    # 1 + erf for negative x is why the bound scales with |x|, not |y|.)
    eps = ref.ulp(dtype)
    bound = 3 * eps * x.double().abs() + 4 * eps * y_t.double().abs()
    err = (y_c.cpu().double() - y_t.double()).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g} at {(err - bound).argmax().item()}"


def test_over_two_to_the_31_elements():
    n = (1 << 31) + 5
    if torch.cuda.get_device_properties(0).total_memory < 24 * n:
        pytest.skip("needs about 24 bytes per element of GPU memory")
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_(-6, 6)
    x[-5:] = torch.tensor([-10.0, -1.0, 0.5, 2.0, 10.0], dtype=torch.bfloat16)
    y, codes = approx_act_fwd(x, "regelu2", True)
    assert codes.numel() == (n + 3) // 4
    tail = torch.arange(n - 4096, n, device="cuda")
    torch.testing.assert_close(y[tail].double().cpu(), ref.forward("regelu2", x[tail].cpu()), rtol=8e-3, atol=1e-5)
    dx = approx_act_bwd(torch.ones_like(x), codes, "regelu2")
    # the spec's own levels at these codes, computed independently in float64 on the CPU
    expected = ref.grad("regelu2", x[-5:].cpu(), torch.ones(5, dtype=torch.float64))
    assert expected.tolist() == pytest.approx([0.0, -0.0492, 1.0487, 1.0487, 1.0], abs=1e-3)
    torch.testing.assert_close(dx[-5:].double().cpu(), expected, rtol=ref.ulp(torch.bfloat16), atol=0)
    del y, codes, dx


def test_compiled_training_step_on_cuda():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), lo.nn.ReGELU2(), torch.nn.Linear(256, 64), lo.nn.ReSiLU2()).cuda().bfloat16()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("width", [1, 768, 4096, 8192, 8193, 70001])
def test_cuda_norms_match_torch_path(is_rms, width, dtype):
    torch.manual_seed(width)
    rows = 64
    x = torch.randn(rows, width, dtype=dtype)
    w = torch.rand(width) + 0.5
    b = None if is_rms else torch.randn(width) * 0.1
    dy = torch.randn(rows, width, dtype=dtype)
    out = {}
    for device in ("cuda", "cpu"):
        xs = x.to(device).requires_grad_(True)
        ws = w.to(device).requires_grad_(True)
        bs = b.to(device).requires_grad_(True) if b is not None else None
        y = lo.ms_rmsnorm(xs, width, ws, 1e-5) if is_rms else lo.ms_layernorm(xs, width, ws, bs, 1e-5)
        y.backward(dy.to(device))
        out[device] = [t.detach().cpu().double() for t in (y, xs.grad, ws.grad) + ((bs.grad,) if bs is not None else ())]
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    for got, want in zip(out["cuda"], out["cpu"]):
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= tol * scale


@pytest.mark.parametrize("mode", ["exact", "approx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gated_matches_torch_path(mode, dtype):
    torch.manual_seed(0)
    n = (1 << 20) + 7
    g, u, dy = (torch.randn(n, dtype=dtype) * 3 for _ in range(3))
    out = {}
    for device in ("cuda", "cpu"):
        gs, us = g.to(device).requires_grad_(True), u.to(device).requires_grad_(True)
        y = lo.swiglu(gs, us, mode)
        y.backward(dy.to(device))
        out[device] = [t.detach().cpu().double() for t in (y, gs.grad, us.grad)]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for got, want in zip(out["cuda"], out["cpu"]):
        assert ((got - want).abs() <= tol * (want.abs() + 1)).all()


@pytest.mark.parametrize("name", ["regelu1", "regelu3", "regelu4"])
def test_cuda_other_bit_widths(name):
    x = torch.randn((1 << 20) + 3, dtype=torch.bfloat16) * 4
    dy = torch.randn_like(x)
    y_c, codes_c = approx_act_fwd(x.cuda(), name, True)
    with ref.backend("torch"):
        _, codes_t = approx_act_fwd(x, name, True)
        dx_t = approx_act_bwd(dy, codes_t, name)
    assert torch.equal(codes_c.cpu(), codes_t)
    assert torch.equal(approx_act_bwd(dy.cuda(), codes_c, name).cpu(), dx_t)


def test_tuner_measures_for_real_and_every_kept_config_gives_the_same_result(tmp_path):
    """The measuring path on a GPU: a tiny budget over two groups, real do_bench times in the DB,
    and every kept config of those groups computing exactly what the static one does."""
    from kernelgen import archs, families, spec, tuner, tunedb
    from lowmem_ops._tree import builtin_tree

    major, minor = torch.cuda.get_device_capability()
    arch = archs.ARCHS.get(f"sm{10 * major + minor}")
    if arch is None or not (builtin_tree() / arch.name).exists():
        pytest.skip("no build for this GPU's arch")
    tasks = tuner.plan(spec.load_builtin(), arch, builtin_tree(), families.ALL,
                       lambda g: g.dtype == "bfloat16" and g.index[-1] == 0 and
                       g.key[:2] in {("regelu2", "forward"), ("ms_norm", "rmsnorm.affine.backward")})
    assert tasks
    db = tunedb.TuneDB(arch.name)
    measure = tuner.CudaMeasure(builtin_tree(), arch)
    stats = tuner.search(tasks, db, measure, gpu=torch.cuda.get_device_name(), triton="test", budget_s=60)
    assert stats.measured > 0 and stats.failed == 0
    for entry in db.entries.values():
        assert all(0 < r.ms < 100 for r in entry.results.values())
    for t in tasks[:2]:
        outs = [measure._launcher(t, c)() for c in t.ranked]
        # Elementwise kernels must agree bit for bit. A norm's reductions run in a config's own order:
        # a row's outputs may differ by their final rounding (one ulp of a bf16 output), and float32
        # parameter gradients, sums over all rows, by the accumulated rounding of those sums.
        exact = t.group.family != families.NORM.name
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                if not isinstance(a, torch.Tensor):
                    continue
                if exact:
                    assert torch.equal(a, b)
                elif a.dtype == torch.float32:
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
                else:
                    torch.testing.assert_close(a, b, rtol=ref.ulp(a.dtype), atol=ref.ulp(a.dtype))


@pytest.mark.parametrize("layout", ["chunked", "interleaved", "transposed", "expanded", "offset"])
def test_cuda_ops_on_views_match_torch_path(layout):
    """The compiled kernels (not the interpreter) on strided inputs: each family's forward and gradients."""
    from .test_layouts import leaf_shape, view

    rows, cols = 33, 1000
    torch.manual_seed(1)
    leaves = [torch.randn(leaf_shape(layout, k, rows, cols)) * 3 for k in (0, 1, 0)]
    w = torch.rand(cols) + 0.5
    dy = torch.randn(rows, cols)
    out = {}
    for device in ("cuda", "cpu"):
        ls = [t.to(device).requires_grad_(True) for t in leaves]
        a, b, c = (view(t, layout, k, rows, cols) for t, k in zip(ls, (0, 1, 0)))
        ws = w.to(device).requires_grad_(True)
        y = lo.swiglu(a, b, "exact") + lo.geglu(a, b, mode="approx") + lo.regelu2(c) + lo.ms_layernorm(c, cols, ws)
        y.backward(dy.to(device))
        out[device] = [t.detach().cpu().double() for t in [y, ws.grad] + [t.grad for t in ls]]
    for got, want in zip(out["cuda"], out["cpu"]):
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= 1e-3 * scale  # a layout bug is off by O(1)


@pytest.mark.parametrize("cols", [1024, 1000], ids=["sizes-x16", "sizes-odd"])  # rows kernels' UNIT 16 and 1
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gated_halves_matches_the_cpp_path(cols, dtype):
    """gated_halves on CUDA (the rows kernels read the halves in place and write gate_up's gradient
    whole) against the C++ op on CPU: the same kernels' arithmetic, so within an ulp."""
    from lowmem_ops.gated import gated_halves

    torch.manual_seed(2)
    values, dy = (torch.randn(65, 2 * cols) * 3).to(dtype), torch.randn(65, cols).to(dtype)
    out = {}
    for device in ("cuda", "cpu"):
        gate_up = values.to(device).requires_grad_(True)
        y = gated_halves(gate_up, "resilu2")
        assert ("Triton" in type(y.grad_fn).__name__) == (device == "cuda")
        y.backward(dy.to(device))
        out[device] = [y.detach().cpu().float(), gate_up.grad.cpu().float()]
    for got, want in zip(out["cuda"], out["cpu"]):
        torch.testing.assert_close(got, want, rtol=2 * ref.ulp(dtype), atol=2 * ref.ulp(dtype) * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("width", [16, 8192, 9000])
def test_cuda_norms_on_rows_that_overflow_float32(is_rms, width, dtype):
    """The kernels' statistics of rows up to float32's limit, against float64 torch (the interpreter
    computes some of it in float64, so only a GPU shows a float32 overflow)."""
    from .test_norm_edges import float64_norm

    gen = torch.Generator().manual_seed(width)
    scales = torch.tensor([1.0, 1e20, 1e30, 1e36 if dtype == torch.bfloat16 else 3e38], dtype=torch.float64)[:, None]
    x = (torch.randn(4, width, generator=gen, dtype=torch.float64) * scales).clamp(-3e38, 3e38).to(dtype)
    w = torch.rand(width, generator=gen) + 0.5
    b = None if is_rms else torch.randn(width, generator=gen) * 0.2
    dy = torch.randn(4, width, generator=gen).to(dtype)
    xs, ws = x.cuda().requires_grad_(True), w.cuda().requires_grad_(True)
    bs = b.cuda().requires_grad_(True) if b is not None else None
    y = lo.ms_rmsnorm(xs, width, ws, 1e-5) if is_rms else lo.ms_layernorm(xs, width, ws, bs, 1e-5)
    y.backward(dy.cuda())
    y_ref, dx_ref, dw_ref, _ = float64_norm(x, w, b, 1e-5, is_rms, dy)
    x64 = x.double()
    rstd = 1.0 / torch.sqrt(((x64 * x64).mean(-1) if is_rms else x64.var(-1, unbiased=False)) + 1e-5)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    assert (y.cpu().double() - y_ref).abs().max().item() <= 2 * tol
    # dx is rstd * O(dy * gamma); rstd of the last float32 row is below float32's normal range
    assert ((xs.grad.cpu().double() - dx_ref) / rstd[:, None]).abs().max().item() <= 5 * tol + 1e-2 * (dtype == torch.float32)
    assert (ws.grad.cpu().double() - dw_ref).abs().max().item() <= 5 * tol * max(1.0, dw_ref.abs().max().item())


@pytest.mark.parametrize("is_rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("edit", ["data = zeros", "data.fill_(0)", "data[3] = 0"])
@pytest.mark.filterwarnings("ignore:lowmem_ops. norm parameters break")
def test_cuda_data_edit_after_a_safe_verdict(is_rms, edit):
    """On CUDA the cached verdict is re-checked on the device at each call and read in backward
    (a non-blocking copy): an edit through .data gives a clear error or exact gradients, never NaN."""
    from .test_norm_edges import EDITS, float64_norm

    torch.manual_seed(0)
    norm = (lo.nn.MSRMSNorm if is_rms else lo.nn.MSLayerNorm)(8, device="cuda")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 8, device="cuda", requires_grad=True)
    dy = torch.randn(3, 8, device="cuda")
    norm(x).backward(dy)
    EDITS[edit](norm.weight)
    x.grad = norm.weight.grad = None
    y = norm(x)
    if edit != "data = zeros":  # a new storage is seen before the forward; an edit in place only in backward
        with pytest.raises(RuntimeError, match=r"changed through \.data"):
            y.backward(dy)
        x.grad = norm.weight.grad = None
        y = norm(x)  # checked again: the plain path
    y.backward(dy)
    _, dx_ref, dw_ref, _ = float64_norm(x.cpu(), norm.weight.cpu(), norm.bias.cpu() if norm.bias is not None else None,
                                        norm.eps, is_rms, dy.cpu())
    torch.testing.assert_close(x.grad.cpu().double(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad.cpu().double(), dw_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["phi3", "flan_t5", "mixtral"])
def test_cuda_convert_fused_gates_and_casting_norms(arch):
    """On the compiled kernels: Phi-3's one-projection MLP (the halves of one tensor), FLAN-T5 in bf16
    with `wo` in float32 (norms with out_dtype bf16, a gated MLP casting into wo) and Mixtral's experts
    (grouped_mm on CUDA, the gate fused) convert with nothing undone and the original's gradients."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                         num_local_experts=4, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
        batch = {"input_ids": torch.randint(0, 300, (2, 64), device="cuda")}
    elif arch == "phi3":
        cfg = transformers.Phi3Config(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=1)
        model = transformers.Phi3ForCausalLM(cfg)
        batch = {"input_ids": torch.randint(0, 300, (2, 64), device="cuda")}
    else:
        cfg = transformers.T5Config(d_model=256, d_ff=704, num_layers=2, num_heads=4, d_kv=64, vocab_size=300,
                                    feed_forward_proj="gated-gelu")
        model = transformers.T5ForConditionalGeneration(cfg)
        batch = {"input_ids": torch.randint(0, 300, (2, 64), device="cuda"),
                 "decoder_input_ids": torch.randint(0, 300, (2, 64), device="cuda")}
    model = model.to("cuda", torch.bfloat16)
    for m in model.modules():
        if hasattr(m, "wo"):
            m.wo.float()
    report = lo.convert(model, example_inputs=batch)
    assert not [c for c in report.changes if c.status == "undone"], str(report)
    fused = {"phi3": "FusedGatedMLP", "flan_t5": "GatedMLP", "mixtral": "MixtralExperts"}[arch]
    assert fused in {c.after.split()[0] for c in report.applied}, str(report)
    assert report.gradient_cosine > 0.999, str(report)
    assert report.memory_after.total_bytes < report.memory_before.total_bytes


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_cuda_factored_experts_under_peft(arch, rank):
    """PEFT target_parameters LoRA on the experts, on CUDA's grouped_mm (rank 4 in bf16: the factors
    zero-padded to aligned strides): the factored clone's outputs and gradients are as close to a float32
    run of the stock model (its eager loop) as the stock bf16 model's, and no expert stack's worth is saved."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    if not hasattr(peft.tuners.lora.layer, "ParamWrapper"):
        pytest.skip("this peft has no target_parameters")
    import copy

    from lowmem_ops import _moe_experts, conversion

    torch.manual_seed(0)
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=300, num_local_experts=8, num_experts_per_tok=2,
                 experts_implementation="grouped_mm")
    if arch == "gpt_oss":
        model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**shape, head_dim=64,
                                                                        layer_types=["full_attention"] * 2))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**shape))
    model = peft.get_peft_model(model.to("cuda"), peft.LoraConfig(
        r=rank, init_lora_weights=False, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    reference = copy.deepcopy(model)
    reference.get_base_model().set_experts_implementation("eager")
    model.to(torch.bfloat16)
    for m in model.modules():  # adapters stay float32, as PEFT keeps them
        if hasattr(m, "lora_A"):
            m.lora_A.float(), m.lora_B.float()
    stock = copy.deepcopy(model)
    experts = {p: m for p, m in model.named_modules() if type(m).__name__.endswith("Experts")}
    for path, module in experts.items():
        setattr(*conversion._home(model, path), _moe_experts.factored(module))
    batch = {"input_ids": torch.randint(0, 300, (2, 64), device="cuda")}
    results = []
    for m in (model, stock, reference):
        m.eval()  # no dropout: the three runs see one function
        m.zero_grad()
        out = m(**batch).logits.float()
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}))
    (out, grads), (stock_out, stock_grads), (ref_out, ref_grads) = results

    def error(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert error(out, ref_out) <= 2 * error(stock_out, ref_out) + 1e-3
    assert grads.keys() == stock_grads.keys() == ref_grads.keys() and any("experts" in n for n in grads)
    for n in grads:
        assert error(grads[n], ref_grads[n]) <= 2 * error(stock_grads[n], ref_grads[n]) + 1e-3, n
    smallest = min(m.down_proj.numel() for m in experts.values())
    big = []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: (big.append(t.shape) if t.untyped_storage().data_ptr() not in params and t.numel() >= smallest
                       else None) or t, lambda t: t):
        model(**batch)
    assert big == []
