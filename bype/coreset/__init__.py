"""The pseudocoreset: everything that fits the ByPE prior's pseudodata U and weights w.

- `gradients`: Monte Carlo gradients of the paper's KL(pi_Uw || pi_X) (eq. 18-19);
- `estimate`: one step's estimate sharded over ranks, and its diagnostics;
- `data_term`: sum_n log p(x_n | z) over the training set (exact from sufficient statistics, or minibatch);
- `posterior`: `fit`, the paper's update on its own (Adam, constraints, safeguard);
- `exemplar`: `fit_exemplar`, the coreset fitted to the Exemplar prior by cross-entropy;
- `optimizer`: `PseudocoresetOptimizer`, either objective inside training.

May import: kernels, bype.models, bype.parallel, bype.seeds. Never the loop: the trainer calls it.
docs/CORESET.md has the mathematics and what each objective can change.
"""
from bype.coreset.exemplar import fit_exemplar
from bype.coreset.gradients import kl_estimate, kl_gradients, likelihood_gradients
from bype.coreset.optimizer import OBJECTIVES, PseudocoresetOptimizer
from bype.coreset.posterior import Adam, FitOptions, fit, project_weights

__all__ = ["Adam", "FitOptions", "OBJECTIVES", "PseudocoresetOptimizer", "fit", "fit_exemplar", "kl_estimate",
           "kl_gradients", "likelihood_gradients", "project_weights"]
