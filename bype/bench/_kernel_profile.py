"""Where one call's time goes: `bype bench kernels --profile`.

A benchmark row says how long a call takes; this says which kernels take it. torch.profiler records a
few calls and groups the device kernels by name (CUDA: each Triton kernel, cuBLAS and aten kernel with
its own device time) or, on a CPU, the aten operators by their own CPU time. The shares show what to
work on next: one kernel far above its roofline, or many short ones (launch bound).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bype.device_sync import synchronize


def profile_call(call: Callable[[], object], device: torch.device, repeats: int = 3, top: int = 12) -> dict:
    """{"total_us": the kernels' (CUDA) or operators' (CPU) time per call, "top": the `top` of them by time,
    each with its name, launches per call, microseconds per call and share of the total}, over `repeats`
    calls after one untimed call."""
    cuda = device.type == "cuda"
    call()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(repeats):
            call()
        synchronize(device)
    rows = []
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue  # CPU operators carry their kernels' time too: count each kernel once
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            rows.append(dict(name=event.key, launches=event.count / repeats, us=us / repeats))
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    return {"total_us": total, "top": [dict(r, share=r["us"] / (total or 1.0)) for r in rows[:top]]}


def markdown(rows: list[dict]) -> str:
    """The report's section: one table per profiled benchmark row."""
    parts = ["## Where the time goes (`--profile`)", "",
             "Device time per kernel (CUDA) or own CPU time per operator (CPU), per call, and its share of the "
             "call's total over all kernels or operators (the largest are listed)."]
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        parts += ["", f"**{r['impl']} {r['passes']} B={r['B']} M={r['M']} d={r['d']}**: {prof['total_us']:.1f} us "
                  "per call in all", "", "| kernel / operator | launches per call | us per call | share |",
                  "|---|---|---|---|"]
        parts += [f"| {p['name'][:90]} | {p['launches']:.1f} | {p['us']:.1f} | {100 * p['share']:.1f}% |"
                  for p in prof["top"]]
    return "\n".join(parts) + "\n"
