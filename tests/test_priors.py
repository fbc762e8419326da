import math

import torch

from bype.config import load_config
from bype.models import build_model


def direct_log_prior(z, mu, w, n, log_var):
    """log p(z|U,w) of eq. 12 by a float64 direct sum over components (no log-sum-exp trick needed
    in float64 for moderate distances; for extreme ones we compare against the exact max term)."""
    z, mu, w = z.double(), mu.double(), w.double()
    s2 = math.exp(log_var)
    d = z.shape[1]
    sq = ((z[:, None, :] - mu[None]) ** 2).sum(-1)
    terms = torch.log(w)[None] - sq / (2 * s2)
    return -(d / 2) * math.log(2 * math.pi * s2) - math.log(n) + torch.logsumexp(terms, 1)


def bype_model(tmp_path, m=37, d=6):
    cfg = load_config(None, [f"out_dir={tmp_path}", f"prior.components={m}", f"model.latent_dim={d}",
                             "model.hidden=32"])
    model = build_model(cfg, (1, 28, 28))
    torch.manual_seed(0)
    model.prior.init_from_data(torch.rand(m, 784), 50000)
    with torch.no_grad():
        model.prior.w.copy_(torch.rand(m) + 0.01)
        model.prior.w.mul_(50000 / model.prior.w.sum())
        model.prior.log_var.fill_(-1.3)
    return model


def test_bype_log_prior_matches_float64_direct_sum(tmp_path):
    model = bype_model(tmp_path)
    mu = model.encode_flat(model.prior.U)[0].detach()
    z = mu[torch.randint(0, mu.shape[0], (29,))] + 0.7 * torch.randn(29, mu.shape[1])
    ours = model.prior.log_prob(z, model).double()
    ref = direct_log_prior(z, mu, model.prior.w, 50000, -1.3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_bype_log_prior_extreme_distances_stay_finite(tmp_path):
    model = bype_model(tmp_path)
    mu = model.encode_flat(model.prior.U)[0].detach()
    z = torch.cat([mu[:3] + 1e3, mu[:3] - 3e2, mu[:3] + 1e-6])  # far from every component, and on top of one
    z.requires_grad_(True)
    ours = model.prior.log_prob(z, model)
    assert torch.isfinite(ours).all()
    ours.sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(model.prior.log_var.grad)
    ref = direct_log_prior(z.detach(), mu, model.prior.w, 50000, -1.3)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-3)


def test_prior_samples_follow_the_weights(tmp_path):
    model = bype_model(tmp_path, m=5, d=2)
    with torch.no_grad():
        model.prior.w.copy_(torch.tensor([0.0, 0.0, 50000.0, 0.0, 0.0]))
        model.prior.log_var.fill_(-8.0)
    z = model.prior.sample(200, model, torch.Generator().manual_seed(1))
    target = model.encode_flat(model.prior.U[2:3])[0]
    assert (z - target).abs().max() < 0.2  # every sample comes from the only weighted component


def test_vampprior_and_gaussian_normalise(tmp_path):
    """Each prior is a density: a Monte Carlo estimate of its integral over a box is close to 1 (d=2)."""
    torch.manual_seed(0)  # the network and pseudo-inputs, whatever ran before in this process
    for kind in ("gaussian", "vampprior"):
        cfg = load_config(None, [f"out_dir={tmp_path}", f"prior.kind={kind}", "prior.components=7",
                                 "model.latent_dim=2", "model.hidden=16"])
        model = build_model(cfg, (1, 28, 28))
        model.prior.init_from_data(torch.rand(model.prior.n_components, 784), 50000)
        grid = torch.linspace(-12, 12, 601)
        zz = torch.cartesian_prod(grid, grid)
        with torch.no_grad():
            mass = model.prior.log_prob(zz, model).exp().sum() * (grid[1] - grid[0]) ** 2
        assert abs(mass.item() - 1) < 1e-2, (kind, mass.item())
