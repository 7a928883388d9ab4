"""Maps f applied to a source state before it is patched: identity, scaling, affine.

The affine map is fitted by least squares (with a bias) from paired states, e.g. block ℓ's
output to the last block's output (the affine "tuned" lens, both taken before the final norm)
or one model's block to another model's block (cross-model patching).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch

from patchscan.errors import UserError
from patchscan.models.fingerprints import note_maps
from patchscan.runs.store import write_atomic

log = logging.getLogger(__name__)


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
        data = {"kind": self.kind, "weight": self.weight, "bias": self.bias}
        write_atomic(path, lambda tmp: torch.save(data, tmp))


def load_mapping(path: str | Path, shape: tuple[int, int] | None = None) -> Affine:
    """The affine map saved at `path` (of weight shape (d_in, d_out) when given); a truncated,
    unreadable, non-tensor or wrong-shape file is one UserError line. Never unpickles code
    (weights_only)."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged or hostile file
        raise UserError(f"map file {path} is truncated or unreadable ({str(exc).splitlines()[0][:120]})") from None
    weight, bias = (data.get("weight"), data.get("bias")) if isinstance(data, dict) else (None, None)
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise UserError(f"map file {path} holds no weight and bias tensors")
    if weight.dim() != 2 or bias.shape != (weight.shape[1],) or (shape is not None and tuple(weight.shape) != shape):
        want = f"; expected {shape}" if shape is not None else ""
        raise UserError(f"map file {path} has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}{want}")
    return Affine(weight, bias)


def map_folder(root: str | Path, kind: str, names: Sequence[str], key: str) -> Path:
    """The one map-cache layout: ROOT/KIND-NAMES-KEY/ (KEY: `fingerprints.map_cache_key` of all the
    maps depend on), one file per map inside."""
    label = "--".join(str(n).replace(os.sep, "_") for n in names)
    return Path(root) / f"{kind}-{label}-{key}"


def cached_maps(
    folder: Path, files: dict[Hashable, str], shape: tuple[int, int], fit: Callable[[], dict[Hashable, Affine]]
) -> dict[Hashable, Affine]:
    """The maps `files` names (map -> file name in `folder`), loaded when all are there and sound;
    otherwise fitted with `fit()` and saved. A damaged file is recomputed with one warning line.
    The folder's name and key are recorded as an input of the active run."""
    note_maps(folder.name.rsplit("-", 1)[0], folder.name.rsplit("-", 1)[-1])
    if all((folder / name).is_file() for name in files.values()):
        try:
            return {m: load_mapping(folder / name, shape) for m, name in files.items()}
        except UserError as exc:
            log.warning("%s; fitting the maps again", exc)
    maps = fit()
    try:
        for m, name in files.items():
            maps[m].save(folder / name)
    except OSError as exc:
        raise UserError(f"cannot write the map cache {folder}: {exc.strerror or exc}") from None
    return maps
