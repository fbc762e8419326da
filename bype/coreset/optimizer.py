"""`PseudocoresetOptimizer`: the pseudocoreset update inside training (Algorithm 2).

Every `coreset.every` epochs, with the VAE frozen, it fits the ByPE prior's (U, w) by the configured
objective: `posterior`, the paper's KL(pi_Uw || pi_X) (bype.coreset.posterior: z from the mixture prior,
the data term exact from sufficient statistics where the likelihood has them, gradients from the fused
kernel or the closed form in one process, the samples sharded over ranks), or `exemplar`, the
cross-entropy to the Exemplar prior (bype.coreset.exemplar). Either way it logs the weighted-mean gap.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch
from torch import nn

import kernels
from bype.coreset.data_term import build_data_term, resolve_mode
from bype.coreset.estimate import Pieces, estimate
from bype.coreset.exemplar import DEFAULT_DRAWS, DEFAULT_LR, all_means, fit_exemplar
from bype.coreset.gradients import AUTOGRAD_CHUNK, GRAD_PATHS, _autograd_grad_u, gradient_path, likelihood_gradients
from bype.coreset.posterior import Adam, DEFAULT_STEPS, FitOptions, fit, step_seed
from bype.models.vae import reparameterize
from bype.parallel.process_group import rank_and_world
from bype.parallel.shard import shard_range

log = logging.getLogger("bype")

STATE_VERSION = 1
OBJECTIVES = ("posterior", "exemplar")  # the paper's KL(pi_Uw || pi_X); the Exemplar prior's cross-entropy
STEP_SHRINK, STEP_GROW = 0.1, 2.0  # the optimiser's trust factor after a rolled-back / an accepted update


@contextlib.contextmanager
def frozen(model: nn.Module):
    """The VAE in eval mode without autograd; its training mode is restored afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


class PseudocoresetOptimizer:
    """Algorithm 2: every `every` epochs, `fit` runs `steps` Adam steps on (U, w) of the model's ByPE prior
    with the VAE frozen; z from the mixture prior, the data term exact from sufficient statistics where
    the likelihood has them, gradients from the fused kernel or the closed form in one process, the
    samples sharded over ranks under DDP / DeepSpeed."""

    def __init__(self, model: nn.Module, data, *, every: int = 10, steps: Optional[int] = None,
                 samples: Optional[int] = None, batch_size: int = 100, lr: Optional[float] = None,
                 lr_u: Optional[float] = None, schedule: str = "scaled", safeguard: bool = True,
                 data_term: str = "auto", seed: int = 0, grad_path: str = "auto", objective: str = "posterior"):
        prior = model.prior
        if getattr(prior, "kind", None) != "bype":
            raise ValueError(f"prior.kind: the pseudocoreset optimiser needs the bype prior, got {prior.kind!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"coreset.objective: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        self.objective = objective
        self.model, self.prior, self.likelihood = model, prior, model.likelihood
        self.data = data
        # sum_n x_n of the training grey levels: the weighted-mean gap ||sum x - sum w u|| / N is logged
        # before and after every update (the only thing the paper's objective sees for linear likelihoods).
        self.sum_x = torch.as_tensor(data.stats["sum_x"], dtype=torch.float64).reshape(-1).to(prior.U.device)
        self.n_data = int(data.n_train)
        self.every, self.seed, self.schedule, self.safeguard = every, seed, schedule, safeguard
        self._lr_given, self._lr_u_given = lr, lr_u
        self.lr = DEFAULT_STEPS[schedule][0] if lr is None else lr
        self.lr_u = DEFAULT_STEPS[schedule][1] if lr_u is None else lr_u
        self.steps = steps or max(1, self.n_data // batch_size)
        default_samples = DEFAULT_DRAWS if objective == "exemplar" else prior.n_components
        self.samples = samples or default_samples
        self.device = prior.U.device
        self.mode = resolve_mode(data_term, self.likelihood, model.data_dim)
        # The samples, not the data rows, are what ranks share: each rank's data term covers all rows.
        self.data_term = build_data_term(self.mode, self.likelihood, data, model.data_dim, batch_size, self.device)
        if grad_path not in GRAD_PATHS:
            raise ValueError(f"grad_path: {grad_path!r} is not one of {', '.join(GRAD_PATHS)}")
        self.grad_path = gradient_path(self.likelihood) if grad_path == "auto" else grad_path
        self.adam = Adam({"U": prior.U.shape, "w": prior.w.shape}, self.device, prior.U.dtype)
        self.updates = 0
        self.total_steps = 0
        self.rollbacks = 0
        # Trust factor on both step sizes: a rolled-back update shrinks it, an accepted one grows it back
        # towards 1, so the steps settle where the likelihood's own scale wants them (a discretised
        # logistic needs U steps ~100x smaller than a Bernoulli: docs/CORESET.md).
        self.step_scale = 1.0
        self.history: list[dict] = []  # one summary per update
        self.trace: list[float] = []  # ½Var(R) at every step of the latest update
        self.step_seconds: list[float] = []
        if objective == "exemplar":
            log.info("coreset: exemplar objective (cross-entropy to the Exemplar prior), M=%d, %d draws, %d steps "
                     "every %d epochs, Adam %g on U's and w's logits", prior.n_components, self.samples,
                     self.steps, every, self.exemplar_lrs()[0])
        else:
            log.info("coreset: %s data term, %s gradients, M=%d, S=%d, %d steps every %d epochs, %s steps "
                     "(w %g, U %g)", self.mode, self.grad_path, prior.n_components, self.samples, self.steps,
                     every, schedule, self.lr, self.lr_u)

    @classmethod
    def from_config(cls, cfg, model: nn.Module, data) -> "PseudocoresetOptimizer":
        c = cfg.coreset
        return cls(model, data, every=c.every, steps=c.steps, samples=c.samples, batch_size=c.batch_size,
                   lr=c.lr, lr_u=c.lr_u, schedule=c.schedule, safeguard=c.safeguard, data_term=c.data_term,
                   seed=cfg.seed, objective=c.objective)

    def exemplar_lrs(self) -> tuple[float, float]:
        """(step on U's logits, step on w's logits) of the exemplar objective: coreset.lr_u / coreset.lr when
        set, else DEFAULT_LR, times the trust factor."""
        lr_u = DEFAULT_LR if self._lr_u_given is None else self._lr_u_given
        lr_w = DEFAULT_LR if self._lr_given is None else self._lr_given
        return lr_u * self.step_scale, lr_w * self.step_scale

    def mean_gap(self) -> float:
        """||sum_n x_n - sum_m w_m u_m|| / N: zero whenever the coreset's weighted mean matches the data's."""
        w, U = self.prior.w.double(), self.prior.U.double()
        return float(torch.linalg.vector_norm(self.sum_x - w @ U) / self.n_data)

    def due(self, epoch: int) -> bool:
        return epoch % self.every == 0

    # --- what `fit` evaluates -----------------------------------------------------------------------
    def sample_z(self, U: torch.Tensor, w: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """Algorithm 1, steps 1-2: m ~ Cat(w / N), z ~ N(mu(u_m), s2 I)."""
        pick = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
        mu = self.component_means(U)[pick]
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * self.prior.log_var)

    def component_means(self, U: torch.Tensor) -> torch.Tensor:
        """mu(u_m) [M, d]; under torch.distributed each rank encodes its share of the rows and the blocks
        are all-gathered in rank order."""
        return all_means(lambda u: self.model.encode_flat(u)[0], lambda lo, hi: U[lo:hi], U.shape[0])

    def decode(self, z: torch.Tensor, lo: int, hi: int, generator: torch.Generator) -> torch.Tensor:
        """Decoder outputs [hi - lo, P, D] of samples z[lo:hi]. A two-level model's z1 noise is drawn for
        all S samples, so every shard sees the random numbers of one process."""
        if self.model.hierarchical:
            z1 = reparameterize(*self.model.p_z1(z), generator)
            return self.model.decode_x(z1[lo:hi], z[lo:hi])
        return self.model.decode_params(z[lo:hi], generator)

    def pieces(self, U, z, lo, hi, generator, with_grad) -> Pieces:
        params = self.decode(z, lo, hi, generator)
        data = self.data_term(params, generator).double()
        A = self.likelihood.pairwise_log_prob(U, params).double()

        def contract(coef: torch.Tensor) -> torch.Tensor:
            closed = self.likelihood.grad_u_contract(U, params, coef)
            if closed is not None:
                return closed
            rows = max(1, AUTOGRAD_CHUNK // (params.shape[0] * U.shape[1]))
            ones = torch.ones(U.shape[0], device=U.device, dtype=U.dtype)
            return _autograd_grad_u(lambda u: self.likelihood.pairwise_log_prob(u, params), U, ones, coef, rows)

        return Pieces(A, data, contract if with_grad else None)

    def fused(self, U, w, z, generator):
        params = self.decode(z, 0, z.shape[0], generator)
        return likelihood_gradients(self.likelihood, U, w, params, self.data_term(params, generator), self.grad_path)

    def probe_step(self) -> None:
        """One step's work at the current (U, w): draws, decoder, data term, gradients, not applied (what
        the start-up cost estimate times). Collective under torch.distributed, like a step of `fit`."""
        U, w = self.prior.U, self.prior.w
        g = torch.Generator(device=U.device).manual_seed(step_seed(self.seed, 0, "probe"))
        z = self.sample_z(U, w, self.samples, g)
        if self.objective == "exemplar":  # a step's work: the mixture and the encoder on U, both ways
            with torch.enable_grad():
                u = U.detach().requires_grad_(True)
                log_p = kernels.mixture_logpdf(z, self.model.encode_flat(u)[0], torch.log(w / self.n_data),
                                               self.prior.log_var.detach())
                torch.autograd.grad(-log_p.sum(), u)
            return
        rank, world = rank_and_world()
        if world == 1:
            self.fused(U, w, z, g)
        else:
            lo, hi = shard_range(self.samples, rank, world)
            estimate(self.pieces(U, z, lo, hi, g, True), U, w, lo, self.samples)

    def update(self, epoch: int) -> dict:
        """One pseudocoreset update (the VAE frozen); returns floats logged as coreset_<key>."""
        t0 = time.perf_counter()
        gap_before = self.mean_gap()
        with frozen(self.model):
            out = self._fit_exemplar(epoch) if self.objective == "exemplar" else self._fit_posterior(epoch)
        out["mean_gap_before"], out["mean_gap_after"] = gap_before, self.mean_gap()
        self.trace = out.pop("trace")
        self.step_seconds = out.pop("step_seconds")  # benchmarks read it
        self.updates += 1
        self.total_steps += self.steps
        self.rollbacks += int(out["rolled_back"])
        out["step_scale"] = self.step_scale
        self.step_scale = STEP_SHRINK * self.step_scale if out["rolled_back"] else min(1.0, STEP_GROW * self.step_scale)
        seconds = time.perf_counter() - t0
        result = {**out, "rollbacks": float(self.rollbacks), "seconds": seconds,
                  "seconds_per_step": seconds / self.steps,
                  "data_term_exact": float(self.mode == "exact"), "active": float((self.prior.w > 0).sum())}
        self.history.append({"epoch": epoch, **result})
        self._log_update(epoch, out, seconds)
        return result

    def _fit_posterior(self, epoch: int) -> dict:
        """The paper's objective, KL(pi_Uw || pi_X) (eq. 17-19)."""
        prior = self.prior
        options = FitOptions(steps=self.steps, samples=self.samples, seed=self.seed, epoch=epoch,
                             schedule=self.schedule, lr_w=self.lr, lr_u=self.lr_u, step_scale=self.step_scale,
                             domain=self.likelihood.domain, safeguard=self.safeguard)
        return fit(lambda x, z: self.likelihood.pairwise_log_prob(x, self.decode(z, 0, z.shape[0], None)),
                   prior.U, prior.w, self.sample_z,
                   lambda z: self.data_term(self.decode(z, 0, z.shape[0], None), None),
                   n_data=self.n_data, options=options, adam=self.adam, pieces=self.pieces, fused=self.fused)

    def _fit_exemplar(self, epoch: int) -> dict:
        """The Exemplar prior's cross-entropy (bype/coreset/exemplar.py); the training means encoded once."""
        x = self.data.train_split().x
        dev = self.prior.U.device

        def rows(lo: int, hi: int) -> torch.Tensor:
            return x[lo:hi].reshape(hi - lo, -1).to(dev).float() / 255.0

        def encode(u: torch.Tensor) -> torch.Tensor:
            return self.model.encode_flat(u)[0]

        lr_u, lr_w = self.exemplar_lrs()
        out = fit_exemplar(encode, self.prior.U, self.prior.w, all_means(encode, rows, x.shape[0]),
                           self.prior.log_var, n_data=self.n_data, steps=self.steps, draws=self.samples,
                           seed_of=lambda step: step_seed(self.seed, epoch, step), lr_u=lr_u, lr_w=lr_w,
                           domain=self.likelihood.domain, safeguard=self.safeguard)
        out.update(skipped_steps=0.0, weight_resets=0.0)
        return out

    def _log_update(self, epoch: int, out: dict, seconds: float) -> None:
        gap = (f"weighted-mean gap {out['mean_gap_before']:.4g} -> {out['mean_gap_after']:.4g}, "
               f"w in [{out['w_min']:.3g}, {out['w_max']:.3g}] (ESS {out['w_ess']:.1f}), "
               f"|ΔU| {out['u_mean_abs_change']:.3g}, {self.steps} steps, {seconds:.2f} s")
        if self.objective == "exemplar":
            if out["rolled_back"]:
                log.warning("coreset: epoch %d: update rolled back (held-out cross-entropy %.4f -> %.4f); %d so far",
                            epoch, out["heldout_ce_before"], out["heldout_ce_after"], self.rollbacks)
            log.info("coreset update at epoch %d: held-out cross-entropy to the Exemplar prior %.4f -> %.4f "
                     "(gap to its own %.4f -> %.4f nats), %s", epoch, out["heldout_ce_before"],
                     out["heldout_ce_after"], out["heldout_ce_gap_before"], out["heldout_ce_gap_after"], gap)
            return
        if out["skipped_steps"]:
            log.warning("coreset: epoch %d: %d of %d steps skipped (non-finite gradients)", epoch,
                        out["skipped_steps"], self.steps)
        if out["rolled_back"]:
            log.warning("coreset: epoch %d: update rolled back (held-out ½Var(R) %.4g -> %.4g); %d so far", epoch,
                        out["heldout_half_var_before"], out["heldout_half_var_after"], self.rollbacks)
        log.info("coreset update at epoch %d: held-out ½Var(R) %.4g -> %.4g, ESS %.1f -> %.1f of %d, %s", epoch,
                 out["heldout_half_var_before"], out["heldout_half_var_after"], out["heldout_ess_before"],
                 out["heldout_ess_after"], self.samples, gap)

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but U and w (those live in the model's state): Adam, counters, history."""
        return {"version": STATE_VERSION, "adam": self.adam.state_dict(), "updates": self.updates,
                "total_steps": self.total_steps, "rollbacks": self.rollbacks, "step_scale": self.step_scale,
                "history": [dict(h) for h in self.history], "trace": list(self.trace), "data_term": self.mode}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("version", "adam", "updates", "total_steps", "history", "trace") if k not in state]
        if missing:
            raise ValueError(f"coreset state: missing key {missing[0]!r}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"coreset state: version {state['version']}, this code reads {STATE_VERSION}")
        self.adam.load_state_dict(state["adam"])
        self.updates, self.total_steps = int(state["updates"]), int(state["total_steps"])
        self.rollbacks = int(state.get("rollbacks", 0))
        self.step_scale = float(state.get("step_scale", 1.0))
        self.history = [dict(h) for h in state["history"]]
        self.trace = list(state["trace"])

