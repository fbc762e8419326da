"""`train.compile`: the training loss through torch.compile, with the step's noise fed in as inputs.

The model draws its reparameterisation noise from the `noise` argument of its loss (a `RowNoise`: a CPU
generator keyed by seed, epoch and step), which TorchDynamo cannot trace. `CompiledLoss` therefore records, on the first
step of each batch shape (run eagerly), which draws the model makes; on every later step it makes the same
draws eagerly from that step's `RowNoise` and hands them to the compiled graph through a `NoiseTape`.
A compiled run sees exactly the noise of an eager one, and the graph has no breaks (the mixture prior's
`bype_kernels::mixture_logpdf` is a `torch.library` custom op, one node forward and one backward).

`plan_compile` decides when to compile (`train.compile: null`, the default), by what was measured
(docs/ARCHITECTURE.md, "The training step"):
- on a CPU, for runs long enough to pay the compile time: no `train.max_minutes` budget, or one of at
  least `CPU_MIN_MINUTES` (on 2 cores the compiled step saved ~4% of a Gaussian-prior step; compiling
  took 16-100 s);
- not on CUDA: on an H200 the compiled step with CUDA graphs (`reduce-overhead`) took 21.6 ms (Gaussian)
  and 26.5 ms (ByPE) against 4.1 and 12.1 ms eager; `train.compile=true` still compiles there;
- never with the Exemplar prior, whose random subsets have data-dependent sizes (recompiles, breaks).
"""
from __future__ import annotations

from typing import Optional

import torch

CPU_MIN_MINUTES = 60.0  # a CPU run shorter than this does not pay the compile time (docs/ARCHITECTURE.md)


def plan_compile(cfg, device: torch.device) -> tuple[Optional[str], str]:
    """(torch.compile mode or None for eager, the reason in words)."""
    t = cfg.train
    if t.compile is False:
        return None, "train.compile=false"
    if t.compile is None:
        if cfg.prior.kind == "exemplar":
            return None, "auto: the exemplar prior's subsets have data-dependent sizes"
        if device.type == "cuda":
            return None, "auto: measured slower than eager on a GPU at these sizes (docs/ARCHITECTURE.md)"
        if t.max_minutes is not None and t.max_minutes < CPU_MIN_MINUTES:
            return None, (f"auto: a {t.max_minutes:g}-minute CPU run does not pay the compile time "
                          f"(compiles from {CPU_MIN_MINUTES:g} minutes or without train.max_minutes)")
    mode = t.compile_mode
    if mode == "auto":
        mode = "reduce-overhead" if device.type == "cuda" else "default"
    return mode, ("train.compile=true" if t.compile else "auto") + f", mode {mode}"


class NoiseTape:
    """Stands in for the model's `RowNoise` inside the compiled graph: hands out, in order, the draws made
    eagerly before the call (the very numbers the `RowNoise` gives)."""

    def __init__(self):
        self.draws: list[torch.Tensor] = []
        self.next = 0

    def _take(self, like: torch.Tensor) -> torch.Tensor:
        out = self.draws[self.next]
        self.next += 1
        return out

    randn_like = rand_like = _take


class _NoiseRecorder:
    """Passes draws through to a `RowNoise` and notes (method, shape, dtype, device) of each."""

    def __init__(self, noise):
        self.noise, self.specs = noise, []

    def randn_like(self, like):
        self.specs.append(("randn_like", like.shape, like.dtype, like.device))
        return self.noise.randn_like(like)

    def rand_like(self, like):
        self.specs.append(("rand_like", like.shape, like.dtype, like.device))
        return self.noise.rand_like(like)


class CompiledLoss:
    """`loss(x, idx, beta)` of `model` through torch.compile.

    The bare model is compiled and `wrap` (DDP) goes around the compiled module, so DDP's own forward
    (bucket bookkeeping, its logger: not traceable) runs eagerly and calls the compiled loss, whose
    backward fires DDP's gradient hooks as usual. Compiling the DDP wrapper itself with fullgraph=True
    fails in DDP's `_pre_forward`."""

    def __init__(self, model: torch.nn.Module, mode: str, fullgraph: bool = True, wrap=None):
        self.model = model
        self.compiled = torch.compile(model, mode=None if mode == "default" else mode, fullgraph=fullgraph)
        self.wrapped = wrap(self.compiled) if wrap is not None else self.compiled
        self.cudagraphs = mode in ("reduce-overhead", "max-autotune")  # the modes that capture CUDA graphs
        self.specs: dict[tuple, list] = {}  # the noise draws of one step, per input shape
        self.tape = NoiseTape()
        self._beta: tuple[float, Optional[torch.Tensor]] = (float("nan"), None)

    def _beta_tensor(self, beta: float, device: torch.device) -> torch.Tensor:
        """beta as a device tensor, made once per value: a Python float would be a constant of the graph
        (a recompile per warm-up epoch), and `torch.full` on the device needs no host-to-device copy."""
        if self._beta[0] != beta:
            self._beta = (beta, torch.full((), float(beta), device=device))
        return self._beta[1]

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, beta: float, noise=None):
        key = (tuple(x.shape), x.dtype, x.device)
        if noise is not None and key not in self.specs:  # a new shape: one eager step learns its draws
            recorder = _NoiseRecorder(noise)
            try:
                with torch.compiler.set_stance("force_eager"):  # through the wrapper, the model uncompiled
                    return self.wrapped(x, idx, beta, recorder)
            finally:
                self.specs[key] = recorder.specs
        tape = None
        if noise is not None:
            self.tape.draws = [getattr(noise, name)(torch.empty(shape, dtype=dtype, device=device))
                               for name, shape, dtype, device in self.specs[key]]
            self.tape.next = 0
            tape = self.tape
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        return self.wrapped(x, idx, self._beta_tensor(beta, x.device), tape)
