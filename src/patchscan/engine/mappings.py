"""Maps f applied to a source state before it is patched: identity, scaling, affine.

The affine map is fitted by least squares (with a bias) from paired states, e.g. block ℓ's
output to the last block's output (the affine "tuned" lens, both taken before the final norm)
or one model's block to another model's block (cross-model patching).
"""

from __future__ import annotations

from pathlib import Path

import torch


class Identity:
    kind = "identity"

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h


class Scale:
    kind = "scale"

    def __init__(self, factor: float):
        self.factor = float(factor)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.factor


class Affine:
    """h -> h @ weight + bias, with weight of shape (d_in, d_out)."""

    kind = "affine"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight, self.bias = weight.float(), bias.float()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        dtype, device = h.dtype, h.device
        return (h.float() @ self.weight.to(device) + self.bias.to(device)).to(dtype)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> Affine:
        """Least squares on (n, d_in) -> (n, d_out) pairs, in float64 for a stable solve."""
        x64 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], dim=1)
        y64 = y.double()
        if ridge > 0:
            gram = x64.T @ x64 + ridge * torch.eye(x64.shape[1], dtype=torch.float64, device=x.device)
            solution = torch.linalg.solve(gram, x64.T @ y64)
        else:
            solution = torch.linalg.lstsq(x64.cpu(), y64.cpu(), driver="gelsd").solution
        solution = solution.float().cpu()
        return cls(solution[:-1], solution[-1])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"kind": self.kind, "weight": self.weight, "bias": self.bias}, tmp)
        tmp.replace(path)


def load_mapping(path: str | Path) -> Affine:
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    return Affine(data["weight"], data["bias"])
