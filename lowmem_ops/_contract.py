"""The names `kernelgen build` writes and the runtime reads: one spelling for both sides.

A generated tree (layout: kernelgen/build.py) is the interface between the generator and lowmem_ops;
everything either side must agree on by name is here: file names of a tree, the kernel names of
configs.py and the tuning database, the tables configs.py defines, dtype names. Standard library
only: the runtime imports it without kernelgen's dependencies (jinja2, sympy, scipy).
"""

from __future__ import annotations

# --- a tree's files ------------------------------------------------------------------------------
OPS_FILE = "ops.py"  # arch-independent: the op specs and their torch functions
CPU_FILE = "cpu_kernels.cpp"  # arch-independent: the C++ CPU kernels
CONFIGS_STEM = "configs"  # <arch>/configs.py: the baked launch configs
CONFIGS_FILE = CONFIGS_STEM + ".py"
MANIFEST_FILE = "manifest.json"  # <arch>/manifest.json: the build record
# The Triton kernel files, shared by every arch folder: their text does not depend on the arch, so
# each is written once, named by its content (kernel_name); <arch>/configs.py's KERNEL_FILES says
# which file each stem of that arch uses.
KERNELS_DIR = "kernels"
NORM_STEM = "ms_norm"  # the memory-sharing norm kernels
DROPOUT_STEM = "dropout"  # the dropout kernel
ADD_NORM_STEM = "add_norm"  # dropout + residual add + MS norm
RESERVED_STEMS = frozenset({CONFIGS_STEM, NORM_STEM, DROPOUT_STEM, ADD_NORM_STEM})  # kernel stems that are not activations
KERNEL_HASH_CHARS = 12  # of the source's sha256, in a kernel file's name


def kernel_name(stem: str, source_sha256: str) -> str:
    """The name of a kernel file's text (stem = an activation's name, or another family's stem):
    <stem>_<first 12 hex digits of its sha256>. Two texts of one stem get two files."""
    return f"{stem}_{source_sha256[:KERNEL_HASH_CHARS]}"


def kernel_file(name: str) -> str:
    """kernels/<name>.py, relative to the tree, for a kernel_name."""
    return f"{KERNELS_DIR}/{name}.py"


def legacy_kernel_file(stem: str) -> str:
    """<arch>/<stem>.py: where trees built before the shared kernels/ folder hold a stem's kernels
    (their configs.py has no KERNEL_FILES)."""
    return f"{stem}.py"


# --- dtypes ----------------------------------------------------------------------------------------
DTYPES = ("float32", "float16", "bfloat16")  # torch's names: getattr(torch, name)
CPU_DTYPE_CODES = ("float32", "bfloat16", "float16")  # cpu_kernels.cpp's dtype argument: the index here

# --- activation kernels (configs.py ACTIVATION[(op, kernel, dtype, bucket)]) --------------------
FORWARD = "forward"
FORWARD_NOGRAD = "forward_nograd"
BACKWARD = "backward"
GATED_FORWARD = "gated_forward"
GATED_FORWARD_APPROX = "gated_forward_approx"
GATED_BACKWARD = "gated_backward"
GATED_BACKWARD_APPROX = "gated_backward_approx"
ACTIVATION_KERNELS = (FORWARD, FORWARD_NOGRAD, BACKWARD)
GATED_KERNELS = (GATED_FORWARD, GATED_FORWARD_APPROX, GATED_BACKWARD, GATED_BACKWARD_APPROX)

# --- norm kernels (configs.py NORM[(kernel, dtype, width bucket, row bucket)]) ------------------
NORM_KINDS = ("layernorm", "rmsnorm")
NORM_STAGES = ("forward", "backward", "param_grad")


def norm_kernel(kind: str, affine: bool, stage: str) -> str:
    """A norm kernel's name: layernorm.affine.backward, rmsnorm.forward, ..."""
    return f"{kind}{'.affine' if affine else ''}.{stage}"


# --- the dropout kernel (configs.py DROPOUT[(kernel, dtype, element bucket)]) -------------------
DROPOUT_KERNEL = "apply"  # forward on x and backward on dy are the same kernel

# --- add_norm kernels (configs.py ADD_NORM[(kernel, dtype, width bucket)]) ------------------------
ADD_NORM_FORWARD = "forward"  # one row per program, held in registers: width buckets up to the widest
ADD_NORM_DROPOUT_ADD = "dropout_add"  # wider rows (the open width bucket): dropout + add, then ms_norm


# --- configs.py: the GPU its folder is for, the tables it defines, the launch-only parameters ---
VENDOR = "VENDOR"  # configs.py's VENDOR: one of VENDORS
KERNEL_FILES = "KERNEL_FILES"  # configs.py's {stem: kernel_name}: the kernel files this arch uses
CAPABILITY = "CAPABILITY"  # NVIDIA: 10 * major + minor; AMD: the gfx name
NVIDIA, AMD = "nvidia", "amd"
VENDORS = (NVIDIA, AMD)
ACTIVATION_TABLE = "ACTIVATION"
ELEMENT_BOUNDS = "ELEMENT_BOUNDS"
NORM_TABLE = "NORM"
NORM_WIDTHS = "NORM_WIDTHS"
NORM_ROW_BOUNDS = "NORM_ROW_BOUNDS"
DROPOUT_TABLE = "DROPOUT"
DROPOUT_ELEMENT_BOUNDS = "DROPOUT_ELEMENT_BOUNDS"
ADD_NORM_TABLE = "ADD_NORM"
ADD_NORM_WIDTHS = "ADD_NORM_WIDTHS"
# table name -> the tuples of bucket bounds its keys' bucket indices were taken over, in key order: what
# lowmem_ops._configs.lookup bisects, the same for every table
TABLE_BOUNDS = "TABLE_BOUNDS"
PROGRAMS_PER_SM = "PROGRAMS_PER_SM"  # grid size only: one compile serves every value
LAUNCH_ONLY = frozenset({PROGRAMS_PER_SM})
