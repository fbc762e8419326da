"""Mixture-prior kernel benchmark: every implementation of `kernels.mixture_logpdf` over a sweep.

  bype bench kernels [--quick] [--B 128,1024] [--M 500,5000] [--d 16,40] [--impls naive,chunked,...]
                     [--passes fwd,fwdbwd] [--log-var shared|component|diag] [--device auto|cpu|cuda]
                     [--repeats 7] [--mem-limit-gb X] [--max-seconds S] [--out DIR]
  bype bench kernels --compile-report sm_90|sm_80 [--json FILE]

Implementations (each only where available):
  naive     torch eager, full B x M matrix: cdist + logsumexp (isotropic), expanded matmul form (diag)
  chunked   kernels.mixture_logpdf(impl="torch"): tiles of components, analytic tile-wise backward
  compiled  torch.compile(naive, dynamic=True) (inductor; compile time excluded)
  triton    kernels.mixture_logpdf(impl="triton"), CUDA only (the CPU interpreter is not timed)
  keops     pykeops LazyTensor logsumexp, if importable

Measures, per (impl, pass, B, M, d):
  time      median over --repeats calls after warm-up: CUDA events on GPU, perf_counter on CPU;
  memory    peak bytes above the inputs: CUDA max_memory_allocated after a reset on GPU; on CPU the
            resident-set high-water mark VmHWM (reset through /proc/self/clear_refs, Linux) minus
            the resident set before the call, falling back to an estimate from tensor sizes;
  FLOP/s    nominal work / time, with 2 B M d FLOPs for the forward (the distance matmul) and 3x
            that for forward+backward (every implementation does at least this much);
  exp/s     B M exponentials forward, 2 B M forward+backward (forward LSE + responsibilities);
  fraction  FLOP/s over the device's fp32 matmul rate measured once here (same nominal count).
A config whose full-matrix footprint (naive, compiled) would exceed --mem-limit-gb is skipped with
the reason, as is one whose previous, smaller config already took over --max-seconds per call.
Writes DIR/kernels.json, DIR/kernels.md (the table) and DIR/kernels.png (time vs M); rows are
printed once, as they are measured.

--compile-report compiles every Triton kernel call (mixture forward and both backwards, coreset
pairwise and gradient) exactly as the launchers would, for a list of (B, M) and d, with
triton.compile for GPUTarget("cuda", arch, 32): no GPU needed. Registers and spill bytes (local +
stack) come from the cubin (cuobjdump -res-usage, shipped in the triton wheel), shared memory
from the compiled metadata, programs from the launch grid.

Longer than the other modules on purpose: the sweep, its implementations, memory limits and the compile
report share one command line and one output table; each part is a function of its own.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import kernels
from bype.bench._kernel_profile import markdown as profile_markdown
from bype.bench._kernel_profile import profile_call
from kernels import mixture as mix
from bype.device_sync import synchronize as _sync

FULL = dict(B=[128, 1024, 8192], M=[500, 5000, 50000], d=[16, 40, 64])
QUICK = dict(B=[128, 1024], M=[500, 5000], d=[40])
IMPLS = ("naive", "chunked", "compiled", "triton", "keops")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help=f"small sweep {QUICK}")
    p.add_argument("--B", type=_ints, default=None, help=f"comma-separated batch sizes (default {FULL['B']})")
    p.add_argument("--M", type=_ints, default=None, help=f"comma-separated component counts (default {FULL['M']})")
    p.add_argument("--d", type=_ints, default=None, help=f"comma-separated latent sizes (default {FULL['d']})")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--passes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    p.add_argument("--log-var", choices=("shared", "component", "diag"), default=None,
                   help="log_var shape: 0-dim (ByPE/Exemplar, the default), [M], or [M, d] (VampPrior); "
                        "--compile-report: shared and diag unless given")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per config (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per config")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="skip full-matrix configs above this (default: 40%% of free RAM / GPU memory)")
    p.add_argument("--max-seconds", type=float, default=5.0,
                   help="skip an impl's larger configs once one call took longer than this")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n x n fp32 matmul (2048 CPU, 8192 GPU)")
    p.add_argument("--out", default="runs/bench/kernels", help="directory for kernels.json/.md/.png")
    p.add_argument("--compile-report", metavar="ARCH", default=None,
                   help="instead of timing: compile every Triton kernel for sm_80 or sm_90 as the launchers "
                        "would (offline, no GPU) and print registers, spills, shared memory, programs")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="with --compile-report or --launches: write the records here")
    p.add_argument("--profile", action="store_true",
                   help="also record each row's kernels (CUDA) or operators (CPU) with torch.profiler: time per "
                        "kernel and share, written after the table in kernels.md and as 'profile' in kernels.json")
    p.add_argument("--launches", action="store_true",
                   help="instead of timing: kernels launched and host time of one forward + backward per "
                        "implementation (--B, --M, --d: one shape each; default the training shape 100 x 500 x 40)")


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


# --- implementations ------------------------------------------------------------------------------
def _naive(z, means, log_weights, log_var):
    if log_var.dim() < 2:
        return kernels.mixture_logpdf_cdist(z, means, log_weights, log_var)
    # diag: expanded form, three B x M matrices (no cdist for per-component metrics)
    p = torch.exp(-log_var)
    d2 = (z * z) @ p.T - 2 * z @ (p * means).T + (p * means * means).sum(1)
    const = log_weights - 0.5 * (z.shape[1] * math.log(2 * math.pi) + log_var.sum(1))
    return torch.logsumexp(const - 0.5 * d2, dim=1)


def _keops_fn():
    from pykeops.torch import LazyTensor  # noqa: F401  (ImportError -> impl unavailable)

    def fn(z, means, log_weights, log_var):
        from pykeops.torch import LazyTensor
        d = z.shape[1]
        if log_var.dim() == 2:
            raise NotImplementedError("keops row: diagonal log_var not wired")
        lv = log_var.expand(means.shape[0])
        const = (log_weights - 0.5 * d * (math.log(2 * math.pi) + lv))[None, :, None]
        prec = torch.exp(-lv)[None, :, None]
        z_i = LazyTensor(z[:, None, :])
        m_j = LazyTensor(means[None, :, :])
        s = LazyTensor(const.contiguous()) - 0.5 * LazyTensor(prec.contiguous()) * ((z_i - m_j) ** 2).sum(-1)
        return s.logsumexp(dim=1).view(-1)
    return fn


def available_impls(device: torch.device, wanted: list[str]) -> dict:
    out, notes = {}, {}
    for name in wanted:
        if name == "naive":
            out[name] = _naive
        elif name == "chunked":
            out[name] = lambda *a: kernels.mixture_logpdf(*a, impl="torch")
        elif name == "compiled":
            out[name] = torch.compile(_naive, dynamic=True)
        elif name == "triton":
            if device.type != "cuda" or not kernels.triton_available():
                notes[name] = "needs CUDA (the CPU interpreter is not timed)"
                continue
            out[name] = lambda *a: kernels.mixture_logpdf(*a, impl="triton")
        elif name == "keops":
            try:
                out[name] = _keops_fn()
            except ImportError:
                notes[name] = "pykeops not importable"
        else:
            raise SystemExit(f"bype bench kernels: unknown impl {name!r} (choose from {', '.join(IMPLS)})")
    return out, notes


# --- measurement ----------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _malloc_returns_large_blocks() -> bool:
    """glibc raises its mmap threshold after the first big free, after which freed tensors stay
    resident and VmHWM stops seeing new peaks. Pin the threshold (128 KiB) so every tensor
    above it is mmapped and unmapped on free: the resident set then follows live tensors."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _time_calls(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _back_to_back(fn, device, repeats: int) -> tuple[float, float]:
    """(seconds to enqueue one call, seconds per call) over ``repeats`` calls issued without waiting: where
    the enqueueing takes as long as the call, the host, not the device, sets the pace."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    enqueue = (time.perf_counter() - t0) / repeats
    _sync(device)
    return enqueue, (time.perf_counter() - t0) / repeats


def _peak_bytes(fn, device) -> tuple[int | None, str]:
    """Extra memory of one call, and how it was measured."""
    if device.type == "cuda":
        from bype.memory import cuda_peak_bytes
        return cuda_peak_bytes(fn, device), "cuda_max_allocated"
    before = _status_kb("VmRSS")
    if before is None or not _reset_hwm():
        return None, "unavailable"
    fn()
    peak = _status_kb("VmHWM")
    return max(0, (peak - before) * 1024), "vmhwm"


def full_matrix_bytes(B: int, M: int, mode: str, bwd: bool) -> int:
    """Footprint of the naive path: ~3 live B x M fp32 matrices forward, ~5 with autograd."""
    return 4 * B * M * ((5 if bwd else 3) + (1 if mode == "diag" else 0))


def estimated_bytes(impl: str, B: int, M: int, d: int, mode: str, bwd: bool) -> int:
    if impl in ("naive", "compiled"):
        return full_matrix_bytes(B, M, mode, bwd)
    chunk = kernels.mixture_reference.auto_chunk(B, M) if impl == "chunked" else 64
    return 4 * B * min(chunk, M) * 4 + 4 * (B + M) * d * (3 if bwd else 1)


def matmul_rate(device: torch.device, n: int | None = None) -> float:
    """Measured fp32 matmul FLOP/s (TF32 off): the device limit the fraction column refers to."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = statistics.median(_time_calls(lambda: a @ b, device, 2, 5))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * n ** 3 / t


def exp_rate(device: torch.device) -> float:
    x = torch.randn(1 << 24, device=device)
    t = statistics.median(_time_calls(lambda: torch.exp(x), device, 2, 5))
    return x.numel() / t


def _inputs(B, M, d, mode, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    means = torch.randn(M, d, generator=g)
    z = means[torch.randint(0, M, (B,), generator=g)] + 0.5 * torch.randn(B, d, generator=g)
    lw = torch.randn(M, generator=g) - math.log(M)
    shape = {"shared": (), "component": (M,), "diag": (M, d)}[mode]
    lv = 0.1 * torch.randn(shape, generator=g) - 1.0
    return [t.to(device) for t in (z, means, lw, lv)]


def _free_bytes(device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    kb = None
    try:
        m = re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
        kb = int(m.group(1)) if m else None
    except OSError:
        pass
    return (kb or 8 * 1024 * 1024) * 1024


def run_sweep(args) -> tuple[list[dict], dict]:
    args.log_var = args.log_var or "shared"
    device = torch.device("cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()))
                          else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = dict(QUICK if args.quick else FULL)
    for k in ("B", "M", "d"):
        if getattr(args, k) is not None:
            grid[k] = getattr(args, k)
    passes = [p for p in args.passes.split(",") if p]
    for p in passes:
        if p not in ("fwd", "fwdbwd"):
            raise SystemExit(f"bype bench kernels: --passes takes fwd,fwdbwd, got {p!r}")
    impls, notes = available_impls(device, [s for s in args.impls.split(",") if s])
    if device.type == "cpu" and not _malloc_returns_large_blocks():
        print("  note: could not pin glibc's mmap threshold; CPU peak memory may read low")
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    mem_limit = int(args.mem_limit_gb * 2**30) if args.mem_limit_gb else int(0.4 * _free_bytes(device))
    peak_flops = matmul_rate(device, args.matmul_size)
    peak_exp = exp_rate(device)
    meta = dict(device=str(device), device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                                                 else platform.processor() or platform.machine()),
                threads=torch.get_num_threads(), torch=torch.__version__, log_var=args.log_var,
                matmul_flops=peak_flops, exp_per_s=peak_exp, mem_limit_bytes=mem_limit,
                memory_method=("cuda_max_allocated" if device.type == "cuda" else "vmhwm"),
                unavailable=notes, repeats=args.repeats, load_avg_start=load0)
    print(f"device {meta['device_name']} ({device}), {meta['threads']} threads; fp32 matmul "
          f"{peak_flops / 1e9:.1f} GFLOP/s, exp {peak_exp / 1e9:.2f} G/s; memory limit {mem_limit / 2**30:.1f} GiB")
    for name, why in notes.items():
        print(f"  {name}: skipped ({why})")

    rows = []
    slow = {}  # (impl, pass) -> work of the first config over --max-seconds
    for d in grid["d"]:
        for B in grid["B"]:
            for M in grid["M"]:
                z, means, lw, lv = _inputs(B, M, d, args.log_var, device)
                for pname in passes:
                    bwd = pname == "fwdbwd"
                    for name, fn in impls.items():
                        row = dict(impl=name, passes=pname, B=B, M=M, d=d)
                        if name == "triton":  # which plan of the Triton path ran (BYPE_MIXTURE_PLAN overrides)
                            row["plan"] = mix.triton_plan(B, M)
                        est = estimated_bytes(name, B, M, d, args.log_var, bwd)
                        work = B * M * d
                        if est > mem_limit:
                            row["skipped"] = f"needs ~{est / 2**30:.1f} GiB > limit {mem_limit / 2**30:.1f} GiB"
                        elif (name, pname) in slow and work >= slow[(name, pname)]:
                            row["skipped"] = f"a smaller config took > {args.max_seconds:g} s per call"
                        if "skipped" in row:
                            rows.append(row)
                            print(_fmt_row(row))
                            continue
                        row.update(_measure(fn, (z, means, lw, lv), bwd, device, args, peak_flops, peak_exp))
                        if "error" not in row and row["time_s"] > args.max_seconds:
                            slow[(name, pname)] = work
                        rows.append(row)
                        print(_fmt_row(row))
                del z, means, lw, lv
    _add_speedups(rows)
    # other processes on the machine skew CPU timings: record how busy it was
    meta["load_avg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return rows, meta


def _measure(fn, inputs, bwd, device, args, peak_flops, peak_exp) -> dict:
    B, d = inputs[0].shape
    M = inputs[1].shape[0]
    leaves = [t.detach().clone().requires_grad_(bwd) for t in inputs]

    def call():
        out = fn(*leaves)
        if bwd:
            out.sum().backward()
            for t in leaves:
                t.grad = None
        return out

    try:
        with torch.set_grad_enabled(bwd):
            times = _time_calls(call, device, args.warmup, args.repeats)
            enqueue, b2b = _back_to_back(call, device, args.repeats)
            mem, how = _peak_bytes(call, device)
    except (RuntimeError, NotImplementedError) as e:  # e.g. out of memory, keops build failure
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    t = statistics.median(times)
    flops = 2 * B * M * d * (3 if bwd else 1)
    exps = B * M * (2 if bwd else 1)
    row = dict(time_s=t, time_min_s=min(times), b2b_s=b2b, enqueue_s=enqueue, peak_bytes=mem, memory_method=how,
               gflops=flops / t / 1e9, gexp_per_s=exps / t / 1e9,
               frac_matmul=flops / t / peak_flops, frac_exp=exps / t / peak_exp)
    if args.profile:  # after the timing, so that the profiler's own cost is not in it
        try:
            with torch.set_grad_enabled(bwd):
                row["profile"] = profile_call(call, device)
        except (RuntimeError, NotImplementedError) as e:  # a profiler that cannot start must not cost the row
            row["profile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return row


def _add_speedups(rows):
    base = {(r["passes"], r["B"], r["M"], r["d"]): r["time_s"] for r in rows if r["impl"] == "naive" and "time_s" in r}
    for r in rows:
        b = base.get((r["passes"], r["B"], r["M"], r["d"]))
        if b and "time_s" in r:
            r["speedup_vs_naive"] = b / r["time_s"]


def _fmt_bytes(n):
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


HEADER = ("| impl | pass | B | M | d | median ms | min ms | peak mem | GFLOP/s | Gexp/s | % matmul | x naive "
          "| back to back ms | enqueue ms |")


def _fmt_row(r) -> str:
    impl = f"{r['impl']} ({r['plan']})" if r.get("plan") else r["impl"]
    head = f"| {impl} | {r['passes']} | {r['B']} | {r['M']} | {r['d']} |"
    if "skipped" in r:
        return head + f" skipped: {r['skipped']} | | | | | | | | |"
    if "error" in r:
        return head + f" error: {r['error']} | | | | | | | | |"
    sp = f"{r['speedup_vs_naive']:.2f}" if "speedup_vs_naive" in r else ""
    return (head + f" {r['time_s'] * 1e3:.2f} | {r['time_min_s'] * 1e3:.2f} | {_fmt_bytes(r['peak_bytes'])} | {r['gflops']:.1f} | "
            f"{r['gexp_per_s']:.2f} | {100 * r['frac_matmul']:.1f} | {sp} | {r['b2b_s'] * 1e3:.2f} | "
            f"{r['enqueue_s'] * 1e3:.2f} |")


def _plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if "time_s" in r]
    if not ok:
        return False
    passes = sorted({r["passes"] for r in ok})
    Bs, ds = sorted({r["B"] for r in ok}), sorted({r["d"] for r in ok})
    fig, axes = plt.subplots(len(passes), len(Bs), figsize=(4 * len(Bs), 3.2 * len(passes)), squeeze=False)
    d_show = 40 if 40 in ds else ds[-1]
    for i, p in enumerate(passes):
        for j, B in enumerate(Bs):
            ax = axes[i][j]
            for impl in IMPLS:
                pts = sorted((r["M"], r["time_s"] * 1e3) for r in ok
                             if r["impl"] == impl and r["passes"] == p and r["B"] == B and r["d"] == d_show)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set(xscale="log", yscale="log", xlabel="M", ylabel="ms", title=f"{p}, B={B}, d={d_show}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- static GPU report (offline compilation, no GPU) -------------------------------------------------
REPORT_SHAPES = [(100, 500), (100, 25000), (1024, 50000), (50000, 500)]  # (B, M): training and large
REPORT_D = [16, 40, 64]
CORESET_D = 784  # Fashion-MNIST pixels: the coreset kernels' feature size


def _cuobjdump() -> str:
    import triton
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not exe.exists():
        raise SystemExit(f"bype bench kernels: {exe} missing (the triton wheel ships it); cannot read cubin resources")
    return str(exe)


def _resources(cubin: bytes) -> dict:
    """Registers and spill bytes (local + stack) of the kernel in a cubin, via cuobjdump -res-usage."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage: no resource line in {text!r}")
    reg, stack, _static, local = (int(v) for v in m.groups())
    return dict(regs=reg, spill_bytes=stack + local)


class _Compiler:
    """Compiles Launch records for one GPU target exactly as the JIT would (same binder, same
    argument specialisation), caching identical specialisations."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.cache = {}

    def __call__(self, fn, launch) -> dict:
        import triton
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, spec, opts = binder(*launch.args, **launch.meta)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, launch.meta, bound, spec, opts)
        key = (launch.kernel, str(signature), str(constexprs), str(attrs), str(options))
        if key not in self.cache:
            ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=self.target,
                                options=options.__dict__)
            self.cache[key] = dict(_resources(ck.asm["cubin"]), shared_bytes=ck.metadata.shared)
        return self.cache[key]


def compile_report(arch: int, shapes=REPORT_SHAPES, ds=REPORT_D, modes=("shared", "diag")) -> list[dict]:
    """One record per (kernel, shape, d, log_var) of the mixture kernels and per (kernel, shape)
    of the coreset kernels: registers, spill bytes, shared memory, programs per launch."""
    if kernels.interpreter_enabled():
        raise SystemExit("bype bench kernels --compile-report: unset TRITON_INTERPRET (it needs compiled kernels)")
    import importlib
    cg = importlib.import_module("kernels.coreset_grads")  # the package attribute is the function
    from kernels import coreset_triton, mixture_triton
    from kernels import tiling
    target = tiling.cuda_target(arch)
    compiler = _Compiler(arch)
    records = []
    t0 = time.perf_counter()
    print("\n".join([REPORT_HEADER, "|" + "---|" * 12]), flush=True)  # rows follow as they compile

    def add(module, launch, B, M, d, log_var):
        res = compiler(getattr(module, launch.kernel), launch)
        resident = tiling.resident_programs(arch, launch.meta.get("num_warps", 4), res["regs"], res["shared_bytes"])
        rec = dict(kernel=launch.kernel.strip("_").removesuffix("_kernel"), arch=f"sm_{arch}", B=B, M=M, d=d,
                   log_var=log_var, programs=launch.programs, **res, resident=resident,
                   waves=round(launch.programs / (target.sms * resident), 2) if resident else None)
        records.append(rec)
        print(_fmt_report(rec) + f"   ({len(records)} done, {time.perf_counter() - t0:.0f} s)", flush=True)

    for mode in modes:
        for d in ds:
            for B, M in shapes:
                for launch in mix.all_launches(B, M, d, mode, target):
                    add(mixture_triton, launch, B, M, d, mode)
    for N, S in shapes:  # coreset: N pseudo-points (or data rows) x S samples
        for launch in cg.all_launches(N, S, CORESET_D, target):
            add(coreset_triton, launch, N, S, CORESET_D, None)
    return records


ROW_PASSES = {"mixture_prep_rows", "mixture_prep_components", "mixture_combine_fwd", "mixture_finish_z",
              "mixture_finish_m"}
REPORT_HEADER = ("| kernel | arch | B | M | d | log_var | regs | spill B | shared B | programs | resident / SM "
                 "| waves |")


def _fmt_report(r) -> str:
    return (f"| {r['kernel']} | {r['arch']} | {r['B']} | {r['M']} | {r['d']} | {r['log_var'] or '-'} | {r['regs']} | "
            f"{r['spill_bytes']} | {r['shared_bytes']} | {r['programs']} | {r['resident']} | {r['waves']} |")


def run_compile_report(args) -> int:
    arch = args.compile_report.lower().removeprefix("sm_")
    if not arch.isdigit():
        raise SystemExit(f"bype bench kernels: --compile-report takes sm_80 or sm_90, got {args.compile_report!r}")
    shapes = [(B, M) for B in args.B for M in args.M] if (args.B and args.M) else REPORT_SHAPES
    if bool(args.B) != bool(args.M):
        raise SystemExit("bype bench kernels: --compile-report takes both --B and --M, or neither")
    records = compile_report(int(arch), shapes, args.d or REPORT_D, (args.log_var,) if args.log_var else ("shared", "diag"))
    worst = max(r["spill_bytes"] for r in records)
    # the row passes (preparation, combination) are launch bound by design: judge the tiled kernels' grids
    few = min(r["programs"] for r in records if r["kernel"] not in ROW_PASSES)
    print(f"{len(records)} kernel calls: max spill {worst} B, fewest programs per launch of a tiled kernel {few}")
    if args.json:
        from bype.atomic import write_text_atomic
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(str(path), json.dumps(records, indent=1))
        print(f"wrote {path}")
    return 0


def run_launches(args) -> int:
    from bype.bench import _kernel_launches as kl

    shape = {k: (v[0] if v else default) for k, v, default in (("B", args.B, 100), ("M", args.M, 500), ("d", args.d, 40))}
    rows = kl.report(**shape, modes=(args.log_var,) if args.log_var else ("shared", "diag"))
    if args.json:
        from bype.atomic import write_text_atomic
        write_text_atomic(args.json, json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


def run(args) -> int:
    if args.compile_report:
        return run_compile_report(args)
    if args.launches:
        return run_launches(args)
    rows, meta = run_sweep(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    table = "\n".join([HEADER, "|" + "---|" * 14] + [_fmt_row(r) for r in rows])
    profiles = "\n" + profile_markdown(rows) if any(r.get("profile") for r in rows) else ""
    (out / "kernels.md").write_text(
        f"device {meta['device_name']} ({meta['device']}, {meta['threads']} threads), log_var {meta['log_var']}, "
        f"fp32 matmul {meta['matmul_flops'] / 1e9:.1f} GFLOP/s, exp {meta['exp_per_s'] / 1e9:.2f} G/s, "
        f"memory: {meta['memory_method']}, load average {meta['load_avg_start']} -> {meta['load_avg_end']}"
        f"\n\n{table}\n{profiles}")
    plotted = _plot(rows, out / "kernels.png")
    print(f"wrote {out / 'kernels.json'}, {out / 'kernels.md'}" + (f", {out / 'kernels.png'}" if plotted else ""))
    return 0


def main(argv=None) -> int:  # `python -m bype.bench.kernels`
    p = argparse.ArgumentParser(prog="bype bench kernels", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
