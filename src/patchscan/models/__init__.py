"""Model loading and the uniform view of a decoder-only model."""

from patchscan.models.loading import load_model
from patchscan.models.view import ModelView

__all__ = ["load_model", "ModelView"]
