"""Weights: our checkpoints and the published state-dict layout load safely; bad files fail clearly."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gvsl.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from gvsl.network import GVSL


def official_state_dict(data_dir, seed=0):
    """Random tensors with the published key names and shapes (from the reference TSV)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for line in (data_dir / "gvsl_official_state_dict.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        dims = [int(s) for s in shape.split("x")]
        state[key] = torch.randn(*dims, generator=g) * 0.05
    return state


class ReferenceUNet(nn.Module):
    """An independent re-statement of the published backbone's forward pass, for comparison:
    nn.Upsample(align_corners=True) modules and the published pad/crop arithmetic."""

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True)

    def block(self, prefix, x):
        s = self.state
        for i in (0, 3):
            x = F.conv3d(x, s[f"{prefix}.{i}.weight"], s[f"{prefix}.{i}.bias"], padding=1)
            c = x.shape[1]
            x = F.group_norm(x, c // 8, s[f"{prefix}.{i + 1}.weight"], s[f"{prefix}.{i + 1}.bias"])
            x = F.leaky_relu(x, 0.2)
        return x

    def forward(self, x):
        Z, Y, X = x.shape[2:]
        dz, dy, dx = (16 - Z % 16) % 16, (16 - Y % 16) % 16, (16 - X % 16) % 16
        x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2, dz // 2, dz - dz // 2])
        x1 = self.block("unet.inc.double_conv", x)
        x2 = self.block("unet.down1.maxpool_conv.1.double_conv", F.max_pool3d(x1, 2))
        x3 = self.block("unet.down2.maxpool_conv.1.double_conv", F.max_pool3d(x2, 2))
        x4 = self.block("unet.down3.maxpool_conv.1.double_conv", F.max_pool3d(x3, 2))
        x5 = self.block("unet.down4.maxpool_conv.1.double_conv", F.max_pool3d(x4, 2))
        y = self.block("unet.up1.conv.double_conv", torch.cat([x4, self.up(x5)], 1))
        y = self.block("unet.up2.conv.double_conv", torch.cat([x3, self.up(y)], 1))
        y = self.block("unet.up3.conv.double_conv", torch.cat([x2, self.up(y)], 1))
        y = self.block("unet.up4.conv.double_conv", torch.cat([x1, self.up(y)], 1))
        return x5, y[:, :, dz // 2:Z + dz // 2, dy // 2:Y + dy // 2, dx // 2:X + dx // 2]


def test_official_layout_loads_and_backbone_matches_reference(tmp_path, data_dir):
    state = official_state_dict(data_dir)
    path = tmp_path / "GVSL_epoch_1000.pth"
    torch.save(state, path)
    model = load_model(path)
    assert model.info["source"] == "reference"
    x = torch.rand(1, 1, 30, 34, 20)
    with torch.no_grad():
        g, l = model.encode(x)
        g_ref, l_ref = ReferenceUNet(state)(x)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l, l_ref, atol=1e-4, rtol=1e-4)
    # the translation head is converted to voxel units (documented factor 0.5), nothing else
    torch.testing.assert_close(model.fc_trans.weight, state["fc_trans.weight"] * 0.5)
    torch.testing.assert_close(model.fc_rot.weight, state["fc_rot.weight"])


def test_dataparallel_prefix_is_accepted(tmp_path, data_dir):
    state = {"module." + k: v for k, v in official_state_dict(data_dir).items()}
    torch.save(state, tmp_path / "w.pth")
    assert load_model(tmp_path / "w.pth").info["source"] == "reference"


def test_own_checkpoint_round_trip_is_atomic(tmp_path):
    model = GVSL()
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", model, step=7, preprocessing={"preset": "ct"},
                           train_config={"lr": 1e-4})
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["preprocessing"] == {"preset": "ct"} and ckpt["format_version"] == 2
    loaded = load_model(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.info["source"] == "gvsl" and not loaded.training


def test_format_1_checkpoint_still_loads(tmp_path):
    """A checkpoint written by gvsl 0.1 (format 1, preprocessing {preset, spacing_mm}) loads; its
    spec is the documented default with its preset and spacing."""
    from gvsl.preprocessing import PreprocessSpec, spec_from_checkpoint
    model = GVSL()
    path = save_checkpoint(tmp_path / "v1.pt", model, preprocessing={"preset": "mr", "spacing_mm": 1.5})
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 1
    torch.save(payload, path)
    loaded = load_model(path)
    assert spec_from_checkpoint(loaded.info) == (PreprocessSpec(preset="mr", spacing_mm=1.5), "checkpoint-v1")


def test_failed_save_keeps_previous_file(tmp_path):
    model = GVSL()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, step=1)
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(Exception):
        save_checkpoint(path, model, step=2, broken=Boom())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_mismatched_shape_names_first_offending_key(tmp_path, data_dir):
    state = official_state_dict(data_dir)
    state["f_conv.double_conv.0.weight"] = torch.zeros(256, 512, 3, 3, 3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"f_conv\.double_conv\.0\.weight.*\(256, 512, 3, 3, 3\)"):
        load_model(tmp_path / "w.pth")


def test_missing_key_is_named(tmp_path, data_dir):
    state = official_state_dict(data_dir)
    del state["out_flow.weight"]
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="out_flow.weight"):
        load_model(tmp_path / "w.pth")


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", GVSL(), step=1)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_model(tmp_path / "cut.pt")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_foreign_bytes(tmp_path, content):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="could not read"):
        load_model(tmp_path / "x.pt")


def test_foreign_state_dict(tmp_path):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not GVSL weights"):
        load_model(tmp_path / "resnet.pth")


def test_other_kind_of_checkpoint_is_refused(tmp_path):
    save_checkpoint(tmp_path / "seg.pt", GVSL(), kind="segmentation")
    with pytest.raises(CheckpointError, match="'segmentation' checkpoint"):
        load_model(tmp_path / "seg.pt")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_model(tmp_path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['GVSL_PWNED']}",))


def test_loading_never_executes_pickled_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GVSL_PWNED", str(marker))
    torch.save({"state_dict": {"unet.x": _Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()
