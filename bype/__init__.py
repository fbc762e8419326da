"""bype: distributed training of ByPE-VAE and its baselines. docs/ARCHITECTURE.md maps the packages."""
