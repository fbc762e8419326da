import getpass
import os
import tempfile

import pytest
import torch

# Triton fixes interpret-vs-compile when it is first imported. Without a CUDA device the Triton
# kernels can only run interpreted on CPU tensors; with one, they must run compiled on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Inductor's on-disk cache does not key its C++ kernels by ATEN_CPU_CAPABILITY: two suites run at once under
# different capabilities compile each other's vector code with the wrong flags (compile errors, NaN losses).
# One cache per capability keeps them apart.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY', 'native')}"))
# OMP_NUM_THREADS, when set, decides (the suite must pass with 1 and 2 threads); else at most 2.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, min(2, os.cpu_count() or 1)))

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fmnist_root():
    if not os.path.isdir(FMNIST):
        pytest.fail(f"{FMNIST} missing: run launch/bootstrap.sh (installs dataset-fashion-mnist)")
    return FMNIST
