"""The GVSL network: gradients reach every parameter, any batch size and volume size work."""
import pytest
import torch

from gvsl.network import GVSL, count_parameters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return GVSL()


def test_parameter_count_matches_published_model(model):
    # The published GVSL model has ~32.4 M parameters.
    assert abs(count_parameters(model) - 32.4e6) < 0.1e6


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_every_parameter_gets_a_gradient(model, batch):
    model.zero_grad(set_to_none=True)
    a = torch.rand(batch, 1, 32, 32, 32)
    b = torch.rand(batch, 1, 32, 32, 32)
    restored_a, warped_b, affine, flow = model(a, b)
    assert restored_a.shape == a.shape and warped_b.shape == b.shape
    assert affine.shape == (batch, 4, 4) and flow.shape == (batch, 3, 32, 32, 32)
    loss = (warped_b - a).abs().mean() + restored_a.mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert missing == [], f"parameters without gradient: {missing}"
    for name in ("fc_rot", "fc_scl", "fc_trans", "fc_shear", "f_conv.double_conv.0"):
        assert model.get_parameter(name + ".weight").grad.abs().sum() > 0


def test_odd_non_cubic_size(model):
    a = torch.rand(1, 1, 30, 34, 28)
    b = torch.rand(1, 1, 30, 34, 28)
    with torch.no_grad():
        restored_a, warped_b, affine, flow = model(a, b)
        g, l = model.encode(a)
    assert restored_a.shape == a.shape and warped_b.shape == a.shape
    assert flow.shape == (1, 3, 30, 34, 28)
    assert l.shape == (1, 32, 30, 34, 28) and g.shape == (1, 512, 2, 3, 2)
    assert torch.isfinite(warped_b).all() and torch.isfinite(affine).all()


def test_batch_items_are_independent(model):
    """Batched inference equals per-item inference (GroupNorm is per sample)."""
    a = torch.rand(2, 1, 32, 32, 32)
    b = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        _, wb, mat, flow = model(a, b)
        _, wb1, mat1, flow1 = model(a[1:], b[1:])
    torch.testing.assert_close(mat[1:], mat1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flow[1:], flow1, atol=1e-4, rtol=1e-4)
