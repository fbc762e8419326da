"""Every architecture x likelihood x prior builds, trains on a fixed batch and generates."""
import pytest
import torch

from bype.config import load_config
from bype.models import build_model


def make(tmp_path, arch, likelihood, prior, shape):
    dataset = "fashion-mnist" if likelihood == "bernoulli" else "cifar10"
    extra = [] if dataset == "fashion-mnist" else ["data.source=shards", "data.shards=unused"]
    cfg = load_config(None, [f"out_dir={tmp_path}", f"model.arch={arch}", f"model.likelihood={likelihood}",
                             f"prior.kind={prior}", f"data.dataset={dataset}", *extra, "model.hidden=32",
                             "model.latent_dim=6", "prior.components=9", "prior.exemplar.subset=20"])
    torch.manual_seed(0)
    d = int(torch.tensor(shape).prod())
    bank = torch.rand(40, d) if prior == "exemplar" else None
    model = build_model(cfg, shape, bank)
    if model.prior.n_components:
        model.prior.init_from_data(torch.rand(model.prior.n_components, d), 40)
    return model


# Every prior on the VAE, and every architecture x likelihood with the ByPE prior. Image sizes are
# small (the convolutional stack accepts any size) to keep the suite fast on 2 cores.
CASES = [("vae", "bernoulli", (1, 28, 28), p) for p in ("gaussian", "vampprior", "exemplar", "bype")] + [
    ("hvae", "bernoulli", (1, 28, 28), "bype"), ("convhvae", "bernoulli", (1, 12, 12), "bype"),
    ("convhvae", "logistic", (3, 8, 8), "bype"), ("hvae", "logistic", (3, 8, 8), "vampprior"),
    ("vae", "logistic", (3, 8, 8), "exemplar"), ("convhvae", "bernoulli", (1, 12, 12), "exemplar")]


@pytest.mark.parametrize("arch, likelihood, shape, prior", CASES)
def test_architecture_trains_and_generates(tmp_path, arch, likelihood, shape, prior):
    model = make(tmp_path, arch, likelihood, prior, shape)
    torch.manual_seed(1)
    x = model.preprocess((torch.rand(8, *shape) * 255).round() / 255)
    idx = torch.arange(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, stats = model(x, idx, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the objective falls on a fixed batch
    model.eval()
    lw = model.log_weights_is(x[:3], 5)
    assert lw.shape == (3, 5) and torch.isfinite(lw).all()
    images = model.generate(4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, *shape) and images.min() >= 0 and images.max() <= 1


def test_log_weights_is_matches_per_sample_elbo_terms(tmp_path):
    """With n samples per example the estimator evaluates the same density as n copies of the example."""
    model = make(tmp_path, "hvae", "bernoulli", "bype", (1, 28, 28)).eval()
    x = model.preprocess(torch.rand(2, 1, 28, 28))
    torch.manual_seed(5)
    a = model.log_weights_is(x, 4)
    torch.manual_seed(5)
    rec, log_q, log_p = model._log_weights(x.repeat_interleave(4, 0))
    torch.testing.assert_close(a, (rec + log_p - log_q).view(2, 4))
