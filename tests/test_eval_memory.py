"""Evaluation memory bounded in bytes: the probe's tensor accounting, chunking that changes nothing but
memory, and the resident peak of one evaluation of 218x178x3 photographs against eval.memory_mb."""
import ctypes
import ctypes.util

import numpy as np
import pytest
import torch

from bype import memory
from bype.bench.speed import MemoryMeter
from bype.config import load_config
from bype.data.memory import Split
from bype.eval.evaluate import evaluate, importance_sampled_ll, validation_loss
from bype.models import build_model

from tests.helpers import tiny_config

CELEBA_HW = (218, 178)  # the aligned CelebA photographs, height x width


def photo_crops(n: int, hw=CELEBA_HW) -> torch.Tensor:
    """n real RGB photographs of CelebA's size: windows of scikit-image's bundled pictures, uint8 [n, 3, H, W]."""
    from skimage import data

    pictures = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry()]
    h, w = hw
    out = []
    for i in range(n):
        pic = pictures[i % len(pictures)]
        k = i // len(pictures)
        top = (37 * k) % (pic.shape[0] - h)
        left = (53 * k) % (pic.shape[1] - w)
        out.append(pic[top:top + h, left:left + w].transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def test_tensor_peak_counts_live_storages():
    meter = memory.TensorPeak()
    with meter:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB live
        del a
        c = b + 1  # 8 MB live again: a was freed
        v = c[:10]  # a view allocates nothing
        del b, c, v
    assert meter.peak == 8_000_000 and meter.live == 0


def test_rows_follow_the_budget_and_the_cap():
    def run(n):  # 1 MB per row, nothing fixed
        return torch.zeros(n, 2**18)

    cpu = torch.device("cpu")
    rows = memory.rows_within(run, cpu, "test", memory_mb=100)
    assert rows == int(memory.SAFETY * 100)  # the linear fit recovers 1 MB per row exactly
    assert memory.rows_within(run, cpu, "test", cap=7, memory_mb=100) == 7
    with pytest.raises(memory.EvalMemoryError, match="eval.memory_mb"):
        memory.rows_within(run, cpu, "test", memory_mb=0.5)


def test_chunking_changes_memory_not_results(tmp_path, fmnist_root):
    # HVAE: two noise draws per sample; Bernoulli: the binarisation is keyed too.
    cfg = tiny_config(tmp_path, "model.arch=hvae", "prior.kind=bype", "train.cost_estimate=false")
    from bype.train.loop import Trainer

    trainer = Trainer(cfg)
    model, test = trainer.model, trainer.data.test.head(13)
    whole = importance_sampled_ll(model, test, 24)
    chunked = importance_sampled_ll(model, test, 24, max_rows=7)  # samples of one example split 4 ways
    # float32 networks on batches of different sizes: rounding differs, relative 1e-6 of ~500 nats
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    v1, v2 = validation_loss(model, test), validation_loss(model, test, batch_size=5)
    # kl is a small difference of terms as large as the loss: rounding scales with the loss, not with kl
    assert v1 == pytest.approx(v2, abs=1e-6 * abs(v1["loss"]))


def _release_free_heap() -> None:
    """Give freed heap back to the OS, so the resident peak measures this evaluation, not reused pages."""
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


def test_one_evaluation_of_celeba_sized_photos_stays_within_the_budget(tmp_path):
    budget_mb = 96
    cfg = load_config(None, ["data.dataset=celeba", "data.source=shards", "data.shards=unused",
                             "model.likelihood=logistic", "model.hidden=32", "model.latent_dim=8",
                             "prior.kind=bype", "prior.components=8"])
    shape = (3, *CELEBA_HW)
    torch.manual_seed(0)
    model = build_model(cfg, shape)
    photos = photo_crops(12)
    model.prior.init_from_data(photos[4:].reshape(8, -1).float() / 255, 100)
    test, reference = Split(photos[:1], torch.zeros(1, dtype=torch.long)), Split(photos, torch.zeros(12, dtype=torch.long))
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    n_samples = 100  # unchunked: 100 rows x ~116k pixels and a dozen [rows, D] temporaries, over 500 MB

    _release_free_heap()
    meter = MemoryMeter(torch.device("cpu"))
    if not meter.method.startswith("VmHWM"):
        pytest.skip("needs /proc/self/clear_refs to reset the resident high-water mark")
    report = evaluate(model, test, reference, n_samples, None, [1], log=lambda *_: None, memory_mb=budget_mb)
    _, added_mb = meter.read()
    assert np.isfinite(report["test_nll"]) and report["bits_per_dim"] > 0
    # The budget bounds the chunks; beside them live the model, one chunk's inputs and the per-example results.
    allowed_mb = budget_mb + model_bytes / 2**20 + 32
    assert added_mb <= allowed_mb, f"evaluation added {added_mb:.0f} MB resident, budget {budget_mb} MB"
    rows = memory.rows_within(lambda k: model.log_weights_is(photos[:1].reshape(1, -1).float() / 255, k),
                                   torch.device("cpu"), "check", memory_mb=budget_mb)
    assert rows < n_samples / 4  # the budget did cut the work into several chunks per example
