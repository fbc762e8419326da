"""Triton kernels on CUDA against float64 references, and the resources of the compiled kernels.

  python -m bype.bench._gpu_accuracy [--json FILE]     (a step of launch/gpu-check.sh; needs CUDA)

The kernel test files check the same maths at small shapes; this adds the shapes training and
the benchmarks use (several tiles, ragged edges, inputs far from the origin), so a GPU-only fault
(precision mode, tiling, masks) shows up as a number, and it reads registers and spills of every
kernel Triton compiled from its in-process cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from unittest import mock

import torch

import kernels
from bype.device_sync import synchronize as _sync
from kernels import coreset_reference as cref
from kernels import mixture as mix
from kernels import mixture_reference as mref

MIXTURE_SHAPES = [(37, 53, 7), (100, 500, 40), (1024, 5000, 40), (257, 1031, 64), (100, 25000, 16)]
CORESET_SHAPES = [(500, 500, 784, "bernoulli"), (100, 64, 3072, "logistic"), (13, 29, 37, "logistic")]


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error relative to the tensor's largest entry (gradients mix big and tiny entries)."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def mixture_inputs(B, M, d, mode, device, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    means = offset + torch.randn(M, d, generator=g, dtype=torch.float64)
    z = means[torch.randint(0, M, (B,), generator=g)] + 0.7 * torch.randn(B, d, generator=g, dtype=torch.float64)
    log_weights = torch.randn(M, generator=g, dtype=torch.float64)
    log_var = 0.3 * torch.randn({"shared": (), "component": (M,), "diag": (M, d)}[mode], generator=g,
                                dtype=torch.float64)
    return [t.to(device) for t in (z, means, log_weights, log_var)]


FP32_TOL = 1e-3  # fp32 kernels against float64: 1e-3 of the largest entry flags a real fault, not rounding
BF16_TOL = 2.0**-6  # bf16 results are rounded to 8 bits (2^-9 relative) on top of the fp32 computation


def check_mixture(B, M, d, mode, device, seed, offset=0.0, plan=None, dtype=torch.float32) -> dict:
    """Forward and gradients against float64; ``plan`` forces the Triton path's plan ('fused' / 'split');
    ``dtype`` bfloat16 runs bf16 inputs (results stored in bf16) against float64 of the same rounded values."""
    if plan is None:
        return _check_mixture(B, M, d, mode, device, seed, offset, dtype)
    with mock.patch.dict(os.environ, {mix.PLAN_ENV: plan}):
        r = _check_mixture(B, M, d, mode, device, seed, offset, dtype)
    return dict(r, mode=f"{r['mode']}/{plan}")


def _check_mixture(B, M, d, mode, device, seed, offset=0.0, dtype=torch.float32) -> dict:
    x64 = [t.to(dtype).double() for t in mixture_inputs(B, M, d, mode, device, seed, offset)]
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    upstream = upstream.to(dtype).double()
    leaves64 = [t.clone().requires_grad_() for t in x64]
    out64 = mref.mixture_logpdf_naive(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, upstream)
    leaves = [t.to(dtype).clone().requires_grad_() for t in x64]
    _sync(device)
    t0 = time.perf_counter()
    out = kernels.mixture_logpdf(*leaves, impl="triton")
    grads = torch.autograd.grad(out, leaves, upstream.to(dtype))
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    errors = dict(out=scaled_error(out, out64))
    for name, g, g64 in zip(("z", "means", "log_weights", "log_var"), grads, grads64):
        errors[name] = scaled_error(g, g64)
    suffix = (f"+offset{offset:g}" if offset else "") + ("+bf16" if dtype == torch.bfloat16 else "")
    return dict(op="mixture_logpdf", shape=[B, M, d], mode=mode + suffix, errors=errors, ms=round(ms, 2),
                tol=BF16_TOL if dtype == torch.bfloat16 else FP32_TOL)


def check_coreset(M, S, D, likelihood, device, seed) -> dict:
    g = torch.Generator().manual_seed(seed)
    U = torch.rand(M, D, generator=g, dtype=torch.float64)
    w = 100.0 * torch.rand(M, generator=g, dtype=torch.float64)
    if likelihood == "bernoulli":
        params = 2.0 * torch.randn(S, 1, D, generator=g, dtype=torch.float64)
    else:
        params = torch.stack([torch.rand(S, D, generator=g, dtype=torch.float64),
                              0.7 * torch.randn(S, D, generator=g, dtype=torch.float64) - 3.0], 1)
    data_term = -5e4 + 30.0 * torch.randn(S, generator=g, dtype=torch.float64)
    U, w, params, data_term = (t.to(device) for t in (U, w, params, data_term))
    ref = cref.coreset_grads_reference(U, w, params, data_term, likelihood)
    _sync(device)
    t0 = time.perf_counter()
    got = kernels.coreset_grads(U.float(), w.float(), params.float(), data_term, likelihood, impl="triton")
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    errors = {name: scaled_error(a, b) for name, a, b in zip(("grad_U", "grad_w", "residual"), got, ref)}
    return dict(op="coreset_grads", shape=[M, S, D], mode=likelihood, errors=errors, ms=round(ms, 2))


def compiled_kernels() -> list[dict]:
    """Registers, spills and shared memory of every kernel compiled in this process."""
    from kernels import coreset_triton, mixture_triton
    out = []
    for module in (mixture_triton, coreset_triton):
        for name in dir(module):
            fn = getattr(module, name)
            caches = getattr(fn, "device_caches", None)
            if not caches:
                continue
            for dev_cache in caches.values():
                cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
                for key, k in cache.items():
                    meta = getattr(k, "metadata", None)
                    out.append(dict(kernel=name, n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                                    shared=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                                    num_stages=getattr(meta, "num_stages", None)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bype.bench._gpu_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--device", default="cuda", help="cuda; cpu runs the first shapes through the interpreter (a smoke test)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_accuracy: needs a CUDA device")
    records, failures = [], []
    cases = [(check_mixture, (B, M, d, mode, device, i)) for i, (B, M, d) in enumerate(MIXTURE_SHAPES)
             for mode in ("shared", "component", "diag")]
    # the shapes auto runs with the one-launch fused plan, once more with the split plan (its small tiles)
    cases += [(check_mixture, (B, M, d, mode, device, i, 0.0, "split")) for i, (B, M, d) in enumerate(MIXTURE_SHAPES)
              for mode in ("shared", "component", "diag") if mix.triton_plan(B, M) == "fused"]
    cases.append((check_mixture, (256, 1000, 40, "shared", device, 99, 30.0)))  # far from the origin
    # bf16 inputs: the kernels' stores convert to bf16 (rounding on a GPU; the interpreter truncates)
    cases += [(check_mixture, (100, 500, 40, mode, device, 7, 0.0, plan, torch.bfloat16))
              for plan in mix.PLANS for mode in ("shared", "diag")]
    cases += [(check_coreset, (M, S, D, lik, device, i)) for i, (M, S, D, lik) in enumerate(CORESET_SHAPES)]
    if device.type == "cpu":  # the interpreter is slow: the smallest shape of each op, and one bf16 case
        cases = [c for c in cases if c[1][:3] in ((37, 53, 7), (13, 29, 37))] + [
            (check_mixture, (37, 53, 7, "diag", device, 7, 0.0, "fused", torch.bfloat16))]
    for fn, a in cases:
        try:
            r = fn(*a)
        except Exception as e:  # report and go on: one broken variant must not hide the others
            r = dict(op=fn.__name__, shape=list(a[:3]), mode=str(a[3]), errors={}, error=f"{type(e).__name__}: {e}"[:300])
            failures.append(r)
        records.append(r)
        errs = " ".join(f"{k}={v:.1e}" for k, v in r["errors"].items())
        print(f"{r['op']} {r['shape']} {r['mode']}: {errs or r.get('error')} ({r.get('ms', '-')} ms)", flush=True)
    compiled = compiled_kernels()
    for k in compiled:
        print(f"compiled {k['kernel']}: regs={k['n_regs']} spills={k['n_spills']} shared={k['shared']} "
              f"warps={k['num_warps']} stages={k['num_stages']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(accuracy=records, compiled=compiled), f, indent=1)
    bad = [r for r in records if "error" in r or max(r["errors"].values()) > r.get("tol", FP32_TOL)]
    print(f"gpu_accuracy: {len(records) - len(bad)}/{len(records)} within tolerance of float64 "
          f"({FP32_TOL:g} of the largest entry, {BF16_TOL:g} for bf16)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
