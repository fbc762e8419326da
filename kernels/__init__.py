"""Fused kernels for bype (Triton + pure-torch references). Never imports ``bype``.

Public API::

    mixture_logpdf(z, means, log_weights, log_var, impl="auto", chunk=0) -> Tensor[B]
    coreset_grads(U, w, params, data_term, likelihood, impl="auto") -> (grad_U, grad_w, residual)
    pairwise_log_prob(x, params, likelihood, impl="auto") -> Tensor[n, S]
    resolve_impl(tensor, impl="auto") -> "torch" | "triton"
"""
from .coreset_grads import coreset_grads, pairwise_log_prob
from .coreset_reference import coreset_grads_reference, logistic_log_pmf
from .dispatch import ENV_VAR, IMPLS, interpreter_enabled, resolve_impl, triton_available
from .mixture import mixture_logpdf
from .mixture_reference import mixture_logpdf_cdist, mixture_logpdf_naive

__all__ = [
    "coreset_grads",
    "coreset_grads_reference",
    "logistic_log_pmf",
    "pairwise_log_prob",
    "ENV_VAR",
    "IMPLS",
    "interpreter_enabled",
    "mixture_logpdf",
    "mixture_logpdf_cdist",
    "mixture_logpdf_naive",
    "resolve_impl",
    "triton_available",
]
