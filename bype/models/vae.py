"""Architectures of the ByPE-VAE and Exemplar VAE reference code (docs/ARCHITECTURE.md): VAE (gated MLP), HVAE (two latent levels), ConvHVAE.

All share `VAEBase`: the prior sits on the top latent, whose posterior mean network mu(.) also gives
the mixture components mu(u) of the ByPE and Exemplar priors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from bype.models.layers import GatedConv2d, GatedDense, gated_mlp, init_weights
from bype.models.likelihoods import Likelihood, build_likelihood
from bype.models.priors import Prior, build_prior, normal_logpdf

LOGVAR_MIN, LOGVAR_MAX = -6.0, 2.0


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Autocast's bf16 / fp16 outputs back to fp32 (fp32 and fp64 pass unchanged)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


class GaussianHead(nn.Module):
    """Mean and Hardtanh(-6, 2) log-variance of a diagonal Gaussian, in fp32 also under autocast: the
    latents, the log-densities and the mixture prior's distances keep full precision."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.mean = nn.Linear(n_in, n_out)
        self.logvar = nn.Linear(n_in, n_out)

    def forward(self, h):
        return full_precision(self.mean(h)), full_precision(self.logvar(h)).clamp(LOGVAR_MIN, LOGVAR_MAX)


def reparameterize(mu, logvar, generator=None, noise=None):
    if noise is not None:
        eps = noise.randn_like(mu)
    else:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def _repeat(t, n: int):
    """Repeat each row (or each tensor of a tuple) n times, copies adjacent."""
    if isinstance(t, tuple):
        return tuple(_repeat(a, n) for a in t)
    return t if n == 1 else t.repeat_interleave(n, 0)


class VAEBase(nn.Module):
    hierarchical = False  # two latent levels: the prior sits on z2, p(z1|z2) between it and the decoder

    def __init__(self, input_shape: tuple, latent_dim: int, likelihood: Likelihood, prior: Prior):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.data_dim = int(math.prod(input_shape))
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.prior = prior

    # Every call that draws random numbers takes `noise`: a source with rand_like / randn_like keyed by
    # what is drawn (the trainer's RowNoise: seed, epoch, step and global row; evaluation's IndexNoise:
    # example and sample index), so results do not depend on ranks or chunking. None: the global RNG.
    def forward(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None, beta: float = 1.0, noise=None):
        """The training objective; DDP and DeepSpeed wrap this call."""
        return self.loss(x, idx, beta, noise)

    # --- data ---------------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor, noise=None) -> torch.Tensor:
        """[B, C, H, W] grey levels -> flattened model input; Bernoulli data is binarised here, with `noise`
        when given (training rows, evaluation indices)."""
        x = x.reshape(x.shape[0], -1)
        if self.likelihood.name == "bernoulli":
            if noise is not None:
                u = noise.rand_like(x)
            else:
                u = torch.rand(x.shape, dtype=x.dtype).to(x.device)
            x = (u < x).to(x.dtype)
        return x

    # --- networks, implemented per architecture ----------------------------------------------
    def encode_flat(self, x: torch.Tensor):
        """q(z_top | x) for flattened x [B, D] -> (mu, logvar)."""
        raise NotImplementedError

    def decode_params(self, z_top: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Likelihood parameters [S, P, D] given the top latent (lower levels sampled from the model)."""
        raise NotImplementedError

    def _log_weights(self, x: torch.Tensor, idx=None, n_samples: int = 1, noise=None):
        """`n_samples` reparameterised samples per example: (log p(x|z), log q(z|x), log p(z)), each
        [B * n_samples] (samples of one example adjacent); the encoder runs once per example."""
        raise NotImplementedError

    # --- objectives ---------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None, beta: float = 1.0, noise=None):
        """Mean negative beta-ELBO of a flattened batch, and per-term statistics."""
        rec, log_q, log_p = self._log_weights(x, idx, noise=noise)
        kl = log_q - log_p
        loss = -(rec - beta * kl).mean()
        return loss, {"rec": -rec.mean().detach(), "kl": kl.mean().detach(), "elbo": (rec - kl).mean().detach()}

    def log_weights_is(self, x: torch.Tensor, n_samples: int, noise=None) -> torch.Tensor:
        """Importance weights log p(x|z) + log p(z) - log q(z|x), [B, n_samples]."""
        b = x.shape[0]
        rec, log_q, log_p = self._log_weights(x, n_samples=n_samples, noise=noise)
        return (rec + log_p - log_q).view(b, n_samples)

    @torch.no_grad()
    def generate(self, n: int, generator: Optional[torch.Generator] = None, mean: bool = True) -> torch.Tensor:
        """Algorithm 1: component ~ prior, z ~ r(z|u), x ~ p(x|z); images [n, C, H, W]."""
        z = self.prior.sample(n, self, generator)
        params = self.decode_params(z, generator)
        x = self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
        return x.view(n, *self.input_shape)


class VAE(VAEBase):
    """Gated MLP encoder D-300-300 and decoder 40-300-300-D."""

    def __init__(self, input_shape, latent_dim, hidden, likelihood, prior):
        super().__init__(input_shape, latent_dim, likelihood, prior)
        d = self.data_dim
        self.encoder = gated_mlp(d, hidden)
        self.q_z = GaussianHead(hidden, latent_dim)
        self.decoder = gated_mlp(latent_dim, hidden)
        self.out = nn.Linear(hidden, likelihood.planes * d)
        init_weights(self)

    def encode_flat(self, x):
        return self.q_z(self.encoder(x))

    def decode_params(self, z_top, generator=None):
        raw = full_precision(self.out(self.decoder(z_top)))
        return self.likelihood.head(raw.view(z_top.shape[0], self.likelihood.planes, self.data_dim))

    def _log_weights(self, x, idx=None, n_samples=1, noise=None):
        mu, logvar = _repeat(self.encode_flat(x), n_samples)
        z = reparameterize(mu, logvar, noise=noise)
        rec = self.likelihood.log_prob(_repeat(x, n_samples), self.decode_params(z))
        return rec, normal_logpdf(z, mu, logvar), self.prior.log_prob(z, self, idx)


class HierarchicalBase(VAEBase):
    """Two latent levels: q(z2|x) q(z1|x,z2), p(z2) the configured prior, p(z1|z2), p(x|z1,z2)."""

    hierarchical = True

    def __init__(self, input_shape, latent_dim, hidden, likelihood, prior):
        super().__init__(input_shape, latent_dim, likelihood, prior)
        self.p_z1 = nn.Sequential(gated_mlp(latent_dim, hidden), GaussianHead(hidden, latent_dim))

    def encode_z1(self, x, z2):
        raise NotImplementedError

    def decode_x(self, z1, z2):
        raise NotImplementedError

    def decode_params(self, z_top, generator=None):
        mu1, logvar1 = self.p_z1(z_top)
        z1 = reparameterize(mu1, logvar1, generator)
        return self.decode_x(z1, z_top)

    def _log_weights(self, x, idx=None, n_samples=1, noise=None):
        mu2, logvar2 = _repeat(self.encode_flat(x), n_samples)
        z2 = reparameterize(mu2, logvar2, noise=noise)
        x = _repeat(x, n_samples)
        mu1, logvar1 = self.encode_z1(x, z2)
        z1 = reparameterize(mu1, logvar1, noise=noise)
        pmu1, plogvar1 = self.p_z1(z2)
        rec = self.likelihood.log_prob(x, self.decode_x(z1, z2))
        log_q = normal_logpdf(z2, mu2, logvar2) + normal_logpdf(z1, mu1, logvar1)
        log_p = self.prior.log_prob(z2, self, idx) + normal_logpdf(z1, pmu1, plogvar1)
        return rec, log_q, log_p


class HVAE(HierarchicalBase):
    """Gated MLP HVAE; q(z1|x,z2) and p(x|z1,z2) join two 300-wide branches."""

    def __init__(self, input_shape, latent_dim, hidden, likelihood, prior):
        super().__init__(input_shape, latent_dim, hidden, likelihood, prior)
        d = self.data_dim
        self.q_z2 = nn.Sequential(gated_mlp(d, hidden), GaussianHead(hidden, latent_dim))
        self.q_z1_x = GatedDense(d, hidden)
        self.q_z1_z2 = GatedDense(latent_dim, hidden)
        self.q_z1 = nn.Sequential(GatedDense(2 * hidden, hidden), GaussianHead(hidden, latent_dim))
        self.p_x_z1 = GatedDense(latent_dim, hidden)
        self.p_x_z2 = GatedDense(latent_dim, hidden)
        self.p_x = nn.Sequential(GatedDense(2 * hidden, hidden), nn.Linear(hidden, likelihood.planes * d))
        init_weights(self)

    def encode_flat(self, x):
        return self.q_z2(x)

    def encode_z1(self, x, z2):
        return self.q_z1(torch.cat([self.q_z1_x(x), self.q_z1_z2(z2)], -1))

    def decode_x(self, z1, z2):
        raw = self.p_x(torch.cat([self.p_x_z1(z1), self.p_x_z2(z2)], -1))
        return self.likelihood.head(full_precision(raw).view(z1.shape[0], self.likelihood.planes, self.data_dim))


def _conv_encoder(c_in: int) -> nn.Sequential:
    # Kernels 7,3,5,3,3; strides 1,2,1,2,1; channels 32-32-64-64-6, as in the reference code.
    spec = [(c_in, 32, 7, 1), (32, 32, 3, 2), (32, 64, 5, 1), (64, 64, 3, 2), (64, 6, 3, 1)]
    return nn.Sequential(*[GatedConv2d(i, o, k, s, k // 2) for i, o, k, s in spec])


class ConvHVAE(HierarchicalBase):
    """Gated-convolution HVAE; the decoder runs four 3x3 gated convolutions of 64 channels."""

    def __init__(self, input_shape, latent_dim, hidden, likelihood, prior):
        super().__init__(input_shape, latent_dim, hidden, likelihood, prior)
        c, h, w = self.input_shape
        feat = 6 * math.ceil(h / 4) * math.ceil(w / 4)
        self.q_z2_conv = _conv_encoder(c)
        self.q_z2_head = GaussianHead(feat, latent_dim)
        self.q_z1_conv = _conv_encoder(c)
        self.q_z1_x = GatedDense(feat, hidden)
        self.q_z1_z2 = GatedDense(latent_dim, hidden)
        self.q_z1 = nn.Sequential(GatedDense(2 * hidden, hidden), GaussianHead(hidden, latent_dim))
        self.p_x_z1 = GatedDense(latent_dim, h * w)
        self.p_x_z2 = GatedDense(latent_dim, h * w)
        self.p_x_conv = nn.Sequential(GatedConv2d(2, 64, 3, 1, 1), GatedConv2d(64, 64, 3, 1, 1),
                                      GatedConv2d(64, 64, 3, 1, 1), GatedConv2d(64, 64, 3, 1, 1))
        self.p_x_out = nn.Conv2d(64, likelihood.planes * c, 1)
        init_weights(self)

    def _image(self, x):
        return x.view(x.shape[0], *self.input_shape)

    def encode_flat(self, x):
        return self.q_z2_head(self.q_z2_conv(self._image(x)).flatten(1))

    def encode_z1(self, x, z2):
        hx = self.q_z1_x(self.q_z1_conv(self._image(x)).flatten(1))
        return self.q_z1(torch.cat([hx, self.q_z1_z2(z2)], -1))

    def decode_x(self, z1, z2):
        _, h, w = self.input_shape
        planes = torch.stack([self.p_x_z1(z1).view(-1, h, w), self.p_x_z2(z2).view(-1, h, w)], 1)
        raw = self.p_x_out(self.p_x_conv(planes))  # [B, P*C, H, W], planes outermost
        return self.likelihood.head(full_precision(raw).reshape(z1.shape[0], self.likelihood.planes, self.data_dim))


ARCHITECTURES = {"vae": VAE, "hvae": HVAE, "convhvae": ConvHVAE}


def build_model(cfg, input_shape: tuple, bank: Optional[torch.Tensor] = None) -> VAEBase:
    """The configured architecture, likelihood and prior. `bank`: flattened training images (Exemplar)."""
    data_dim = int(math.prod(input_shape))
    likelihood = build_likelihood(cfg.model.likelihood, cfg.model.gaussian_std)
    prior = build_prior(cfg, data_dim, bank)
    arch = ARCHITECTURES[cfg.model.arch]
    return arch(input_shape, cfg.model.latent_dim, cfg.model.hidden, likelihood, prior)
