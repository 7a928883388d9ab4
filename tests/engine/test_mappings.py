import torch

from patchscan.engine import Affine, Identity, Scale, load_mapping


def test_affine_fit_recovers_a_known_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 5, generator=g), torch.randn(5, generator=g)
    x = torch.randn(200, 8, generator=g)
    fitted = Affine.fit(x, x @ w + b)
    assert torch.allclose(fitted.weight, w, atol=1e-4) and torch.allclose(fitted.bias, b, atol=1e-4)
    fitted.save(tmp_path / "m.pt")
    loaded = load_mapping(tmp_path / "m.pt")
    assert torch.allclose(loaded(x[:3]), x[:3] @ w + b, atol=1e-4)


def test_identity_and_scale():
    x = torch.arange(4.0)
    assert torch.equal(Identity()(x), x)
    assert torch.equal(Scale(2.5)(x), x * 2.5)
