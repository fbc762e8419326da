"""Evaluation of trained models: everything `bype eval` and `bype sample` report.

- `evaluate`: importance-sampled test NLL, ELBO, bits/dim, validation loss, kNN accuracy, sharded over ranks;
- `noise`: the evaluation's random numbers keyed by example and sample index (chunk- and rank-independent);
- `priors`: a run's test NLL under other priors, its networks fixed (`bype eval --priors`);
- `pictures`: sample grids, the coreset images, training curves.

May import: kernels, bype.models, bype.data, bype.parallel, bype.memory, bype.seeds. Never the training loop.
"""
