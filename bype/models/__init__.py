"""The model: architectures (VAE, HVAE, ConvHVAE), decoder likelihoods and the priors p(z).

`build_model(cfg, input_shape)` assembles one. The models know no loop and no process group of their own:
a sharded prior gets its row shard attached from outside (bype.parallel.attach_row_shard), and every random
draw takes its noise as an argument. May import: kernels, bype.parallel, bype.memory, bype.seeds.
"""
from bype.models.vae import build_model

__all__ = ["build_model"]
