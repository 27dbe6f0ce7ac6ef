"""gvsl_slicer without Slicer: dependency decisions and installs (with fakes of Slicer's APIs),
the models folder, the device list."""
import os
import types
from pathlib import Path

import pytest

from gvsl_slicer import dependencies as deps
from gvsl_slicer.devices import list_devices
from gvsl_slicer.models import ModelStore, ModelStoreError, default_models_dir

SMALL = (8, 8, 16, 16, 32, 16, 16, 8, 8)


# -- dependencies ---------------------------------------------------------------------------------
def test_version_requirements():
    assert deps.satisfies("2.4.0", ">=2.4") and deps.satisfies("2.13.0+cpu", ">=2.4")
    assert not deps.satisfies("2.3.1+cu121", ">=2.4")  # an older torch is not accepted
    assert not deps.satisfies(None, ">=2.4")
    assert deps.satisfies("1.6.1", ">=1.4,<2") and not deps.satisfies("2.0", ">=1.4,<2")
    assert deps.torch_problem("2.1.0") == "PyTorch 2.1.0 is installed but GVSL needs torch>=2.4"
    assert deps.torch_problem(None) == "PyTorch is not installed"
    assert deps.torch_problem("2.13.0") is None
    assert deps.split_requirement("monai>=1.4") == ("monai", ">=1.4")


def test_cuda_build_warning():
    assert "CPU-only build" in deps.cuda_build_warning(None, driver_present=True)
    assert deps.cuda_build_warning("12.4", driver_present=True) is None
    assert deps.cuda_build_warning(None, driver_present=False) is None
    assert deps.cuda_build_warning(None, driver_present=True, platform_is_mac=True) is None


def test_constraints_pin_slicers_own_packages():
    import numpy
    import SimpleITK
    text = deps.constraints_text()
    assert f"numpy=={numpy.__version__}" in text
    assert f"SimpleITK=={deps.installed_version('SimpleITK')}" in text
    assert SimpleITK  # imported


class FakeSlicer:
    """The parts of slicer that ensure() uses, recording calls."""

    def __init__(self, testing=False, packaging=True):
        self.calls = []
        self.app = types.SimpleNamespace(testingEnabled=lambda: testing)
        self.util = types.SimpleNamespace(pip_install=lambda args: self.calls.append(("pip_install", args)),
                                          confirmOkCancelDisplay=lambda text: True)
        if packaging:
            def pip_ensure(reqs, constraints=None, prompt_install=True, requester=None, skip_in_testing=True):
                self.calls.append(("pip_ensure", list(reqs), Path(constraints).read_text(), prompt_install))
            self.packaging = types.SimpleNamespace(pip_ensure=pip_ensure)


class FakeTorchLogic:
    def __init__(self):
        self.calls = []

    def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
        self.calls.append((askConfirmation, torchVersionRequirement))
        return object()


def test_nothing_missing_means_no_dialog_and_no_install():
    fake = FakeSlicer()
    assert deps.make_plan().empty  # this environment has torch, MONAI, matplotlib
    warnings = deps.ensure(confirm=lambda text: pytest.fail("asked"), slicer_module=fake)
    assert fake.calls == [] and isinstance(warnings, list)


def test_one_confirmation_lists_every_package_and_installs_them():
    fake, torch_logic = FakeSlicer(), FakeTorchLogic()
    plan = deps.InstallPlan(torch="PyTorch is not installed", pip=["monai>=1.4", "matplotlib>=3.7"])
    asked = []
    deps.ensure(confirm=lambda text: asked.append(text) or True, slicer_module=fake, torch_logic=torch_logic,
                plan=plan)
    assert len(asked) == 1
    for name in ("torch>=2.4", "monai>=1.4", "matplotlib>=3.7", "numpy, SimpleITK, vtk"):
        assert name in asked[0]
    assert torch_logic.calls == [(False, ">=2.4")]  # already confirmed: no second dialog
    (kind, reqs, constraints, prompt), = fake.calls
    assert kind == "pip_ensure" and reqs == ["monai>=1.4", "matplotlib>=3.7"] and prompt is False
    assert "numpy==" in constraints


def test_older_slicer_uses_pip_install_with_constraints():
    fake = FakeSlicer(packaging=False)
    deps.ensure(confirm=lambda text: True, slicer_module=fake, plan=deps.InstallPlan(pip=["monai>=1.4"]))
    (kind, args), = fake.calls
    assert kind == "pip_install" and args[:1] == ["monai>=1.4"] and args[1] == "-c"


def test_testing_mode_never_installs_and_declining_installs_nothing():
    plan = deps.InstallPlan(pip=["monai>=1.4"])
    fake = FakeSlicer(testing=True)
    with pytest.raises(deps.DependencyError, match="testing mode never installs.*monai"):
        deps.ensure(confirm=lambda text: True, slicer_module=fake, plan=plan)
    fake = FakeSlicer()
    with pytest.raises(deps.DependencyError, match="declined"):
        deps.ensure(confirm=lambda text: False, slicer_module=fake, plan=plan)
    assert fake.calls == []


def test_upgrading_torch_asks_for_a_restart():
    fake, torch_logic = FakeSlicer(), FakeTorchLogic()
    plan = deps.InstallPlan(torch="PyTorch 2.1.0 is installed but GVSL needs torch>=2.4", torch_version="2.1.0")
    with pytest.raises(deps.DependencyError, match="restart Slicer"):
        deps.ensure(confirm=lambda text: True, slicer_module=fake, torch_logic=torch_logic, plan=plan)
    assert torch_logic.calls


def test_modules_do_not_install_or_import_heavy_packages_at_load():
    root = Path(__file__).resolve().parents[1]
    for path in [root / "GVSLExtension" / "GVSLPretraining.py", root / "GVSLRegistration" / "GVSLRegistration.py",
                 *sorted((root / "GVSLExtension" / "gvsl_slicer").glob("*.py"))]:
        top = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in top if any(m in line for m in ("torch", "monai", "pip_install", "gvsl."))], path


# -- devices --------------------------------------------------------------------------------------
def test_device_list_without_gpu():
    devices = list_devices()
    assert devices[0][0] == "auto" and devices[-1] == ("cpu", "cpu")
    assert "no GPU" in devices[0][1]  # this machine


# -- models folder --------------------------------------------------------------------------------
def test_models_dir_env_var_and_platform_default(monkeypatch, tmp_path):
    monkeypatch.setenv("GVSL_MODELS_DIR", str(tmp_path / "m"))
    assert default_models_dir() == tmp_path / "m"
    monkeypatch.delenv("GVSL_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and not os.uname().sysname == "Darwin":
        assert default_models_dir() == tmp_path / "xdg" / "GVSL" / "models"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torch

    from gvsl import GVSL, ModelConfig, save_checkpoint
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = GVSL(ModelConfig(channels=SMALL))
    reference = {k: v for k, v in GVSL().state_dict().items()}  # the published layout (plain state_dict)
    torch.save(reference, folder / "GVSL_official.pth")
    return {"pretrain": save_checkpoint(folder / "run1" / "gvsl_final.pt", model, step=7,
                                        preprocessing={"preset": "ct", "spacing_mm": 1.0}),
            "segmentation": save_checkpoint(folder / "seg.pt", model, kind="segmentation", task="heart",
                                            labels={"1": "myocardium"}),
            "published": folder / "GVSL_official.pth", "folder": folder}


def test_store_add_list_current_and_dedupe(tmp_path, weights):
    from gvsl.checkpoint import load_model
    store = ModelStore(tmp_path / "models")
    assert store.list() == [] and store.current() is None and store.current_path() == ""
    entry = store.add(weights["pretrain"], expected_kind="pretrain", make_current=True)
    assert entry.name == "run1" and entry.steps == 7 and entry.kind == "pretrain"
    assert entry.preprocessing == {"preset": "ct", "spacing_mm": 1.0} and len(entry.sha256) == 64
    assert Path(entry.path).parent.parent == tmp_path / "models"
    assert store.current().id == entry.id
    assert load_model(store.current_path()).config.channels == SMALL  # the copy loads
    assert store.add(weights["pretrain"]).id == entry.id and len(store.list()) == 1  # same file: same entry
    published = store.import_weights(weights["published"])
    assert published.source == "reference" and published.kind == "pretrain"
    seg = store.add(weights["segmentation"])
    assert seg.kind == "segmentation" and seg.task == "heart" and seg.labels == {"1": "myocardium"}
    assert {e.id for e in store.list("pretrain")} == {entry.id, published.id}
    store.set_current(published)
    assert ModelStore(tmp_path / "models").current().id == published.id  # persisted
    store.remove(published.id)
    assert store.current() is None and len(store.list()) == 2


def test_import_refuses_wrong_kind_and_broken_files(tmp_path, weights):
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="'segmentation' model, but a pre-training checkpoint"):
        store.import_weights(weights["segmentation"])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelStoreError, match="cannot import broken.pt.*truncated, corrupt"):
        store.import_weights(broken)
    import torch
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelStoreError, match="not GVSL weights"):
        store.import_weights(tmp_path / "other.pt")
    assert store.list() == [] and not list((tmp_path / "models").glob("*/model.pt"))
