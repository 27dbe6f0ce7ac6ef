"""gvsl.inference: one path for running a model (memory format, precision, OOM fallback)."""
import numpy as np
import torch

from gvsl.device import choose_precision
from gvsl.inference import Inference
from gvsl.network import GVSL, ModelConfig

TINY = ModelConfig(channels=(8, 16, 16, 16, 16, 16, 16, 16, 8))


def test_cpu_inference_is_channels_last_and_equals_contiguous():
    """The CPU default (channels-last 3D, chosen because it is faster: bench_inference.py) gives
    the same registration outputs as contiguous fp32 within a stated tolerance."""
    assert choose_precision(torch.device("cpu"), "inference").channels_last
    assert choose_precision(torch.device("cpu"), "inference", "fp32").channels_last
    assert not choose_precision(torch.device("cpu"), "training").channels_last
    torch.manual_seed(0)
    model = GVSL(TINY)
    rng = np.random.default_rng(0)
    a, b = (rng.random((20, 24, 28), dtype=np.float32) for _ in range(2))
    with torch.no_grad():
        ref = model.register(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None])
    inf = Inference(model, "cpu", precision="fp32")
    assert inf.precision.name == "fp32" and inf.precision.channels_last
    mat, flow, la = inf.run(lambda m, x, y: m.register(x, y), a, b)
    assert flow.shape == (1, 3, 20, 24, 28) and flow.dtype == torch.float32 and flow.device.type == "cpu"
    np.testing.assert_allclose(mat.numpy(), ref[0].numpy(), atol=1e-5)
    scale = float(ref[1].abs().max())
    assert float((flow - ref[1]).abs().max()) <= 1e-4 * max(scale, 1e-3) + 1e-7
    np.testing.assert_allclose(la.numpy(), ref[2].numpy(), atol=1e-4 * float(ref[2].abs().max()))


def test_training_flag_is_restored():
    model = GVSL(TINY).train()
    Inference(model, "cpu").run(lambda m, x: m.encode(x)[1], np.zeros((16, 16, 16), np.float32))
    assert model.training


def test_out_of_memory_falls_back_to_cpu(monkeypatch):
    """(moved from test_register) A CUDA/MPS out-of-memory error re-runs on the CPU with a warning."""
    calls = []
    real = Inference._call

    def fake(self, fn, arrays):
        calls.append(self.device.type)
        if self.device.type != "cpu":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, fn, arrays)

    monkeypatch.setattr(Inference, "_call", fake)
    records = []

    class P:
        def event(self, name, **kw):
            records.append((name, kw))

    inf = Inference(GVSL(TINY), torch.device("mps"), progress=P())
    out = inf.run(lambda m, x: m.encode(x)[1], np.zeros((16, 16, 16), np.float32))
    assert calls == ["mps", "cpu"] and inf.device.type == "cpu" and out.shape == (1, 8, 16, 16, 16)
    assert any("out of memory" in w for w in inf.warnings)
    assert records and records[0][0] == "warning"


def test_other_errors_are_not_swallowed(monkeypatch):
    import pytest

    def boom(model, x):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        Inference(GVSL(TINY), "cpu").run(boom, np.zeros((16, 16, 16), np.float32))
