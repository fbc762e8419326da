from bype.models.vae import build_model

__all__ = ["build_model"]
