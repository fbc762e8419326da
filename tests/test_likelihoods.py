import torch

from bype.models.likelihoods import Bernoulli, DiscretizedLogistic, Gaussian, discretized_logistic_logpmf


def test_discretized_logistic_sums_to_one_over_256_bins():
    torch.manual_seed(0)
    grey = torch.arange(256, dtype=torch.float64) / 255
    for mean, log_scale in [(0.5, -3.0), (0.0, -6.5), (1.0, -1.0), (0.3, 0.0), (0.77, -7.0)]:
        m = torch.full((256,), mean, dtype=torch.float64)
        s = torch.full((256,), log_scale, dtype=torch.float64)
        total = discretized_logistic_logpmf(grey, m, s).exp().sum()
        assert abs(total.item() - 1.0) < 1e-9, (mean, log_scale, total.item())


def test_discretized_logistic_matches_cdf_differences():
    torch.manual_seed(1)
    x = torch.randint(1, 255, (1000,)).double() / 255
    mean, log_scale = torch.rand(1000).double(), torch.empty(1000).uniform_(-5, 0).double()
    s = log_scale.exp()
    direct = torch.log(torch.sigmoid((x + 1 / 510 - mean) / s) - torch.sigmoid((x - 1 / 510 - mean) / s))
    ours = discretized_logistic_logpmf(x, mean, log_scale)
    fine = direct > -20  # where the naive difference of CDFs has not cancelled to 0
    assert fine.sum() > 500
    torch.testing.assert_close(ours[fine], direct[fine], rtol=1e-7, atol=1e-9)
    assert torch.isfinite(ours).all()  # and ours stays finite where the naive one gives -inf


def test_bernoulli_matches_torch_distribution():
    torch.manual_seed(2)
    logits = torch.randn(7, 1, 33) * 4
    x = torch.bernoulli(torch.full((7, 33), 0.4))
    ours = Bernoulli().log_prob(x, logits)
    ref = torch.distributions.Bernoulli(logits=logits[:, 0]).log_prob(x).sum(-1)
    torch.testing.assert_close(ours, ref)


def test_gaussian_matches_torch_distribution():
    torch.manual_seed(3)
    lik = Gaussian(0.2)
    mean = torch.rand(5, 1, 11)
    x = torch.rand(5, 11)
    ref = torch.distributions.Normal(mean[:, 0], 0.2).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.log_prob(x, mean), ref)


def test_pairwise_and_exact_data_terms_match_brute_force():
    torch.manual_seed(4)
    x = torch.rand(40, 13).double()
    for lik, params in [(Bernoulli(), torch.randn(6, 1, 13).double()),
                        (Gaussian(0.3), torch.rand(6, 1, 13).double()),
                        (DiscretizedLogistic(), torch.stack([torch.rand(6, 13), -torch.rand(6, 13) * 3], 1).double())]:
        xs = (x * 255).round() / 255 if lik.name == "logistic" else x
        brute = torch.stack([lik.log_prob(xs, params[s:s + 1].expand(40, -1, -1)) for s in range(6)], 1)
        torch.testing.assert_close(lik.pairwise_log_prob(xs, params), brute)
        stats = lik.sufficient_stats(xs)
        if stats is not None:
            torch.testing.assert_close(lik.data_term(stats, params), brute.sum(0))


def test_grad_u_contract_matches_autograd():
    torch.manual_seed(5)
    u = torch.rand(4, 9, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(6, dtype=torch.float64)
    for lik, params in [(Bernoulli(), torch.randn(6, 1, 9).double()), (Gaussian(0.3), torch.rand(6, 1, 9).double())]:
        (lik.pairwise_log_prob(u, params) * coef).sum().backward()
        torch.testing.assert_close(lik.grad_u_contract(u.detach(), params, coef), u.grad)
        u.grad = None
