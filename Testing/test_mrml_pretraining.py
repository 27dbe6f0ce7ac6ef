"""GVSLPretrainingLib on real MRML (slicer-core): the recorded end-to-end run of the panel's logic.

Three phantom volumes as nodes -> background `gvsl pretrain` with progress and a live loss chart
-> Cancel -> Resume -> the finished checkpoint registered as the current model -> used by
GVSLRegistrationLib.register_volumes. Tiny sizes: 32-voxel phantoms, a reduced-width network.
"""
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")

import gvsl_mrml  # noqa: E402
from gvsl_mrml import testing as mrml_testing  # noqa: E402
from gvsl_slicer.models import ModelStore  # noqa: E402

import GVSLPretrainingLib as lib  # noqa: E402

TINY = dict(crop=16, batch_size=1, spacing_mm=2.5, device="cpu", save_every=1,
            model_channels=(8, 8, 16, 16, 32, 16, 16, 8, 8))


@pytest.fixture
def scene():
    return mrml_testing.headless_scene()


def phantom_nodes(scene, n=3, size=32):
    from gvsl.phantoms import make_heart_phantom
    return [gvsl_mrml.sitk_to_volume_node(make_heart_phantom(size=size, seed=i)[0], scene, f"heart {i}")
            for i in range(n)]


def test_volumes_and_options_are_checked(scene, tmp_path):
    nodes = phantom_nodes(scene, n=2, size=32)
    assert "at least two" in lib.volumes_problem(nodes[:1])
    assert "twice" in lib.volumes_problem([nodes[0], nodes[0]])
    assert lib.volumes_problem(nodes) == ""
    with pytest.raises(lib.PretrainingInputError, match="multiples of 8"):
        lib.start_pretraining(nodes, tmp_path, model_channels=(4, 8, 16, 32, 64, 32, 16, 8, 8))
    with pytest.raises(lib.PretrainingInputError, match="Nothing to resume"):
        lib.start_pretraining(nodes, tmp_path, resume=True)
    before = slicer.util.arrayFromVolume(nodes[0]).copy()
    paths = lib.export_volumes(nodes, tmp_path / "export")
    assert [p.name for p in paths] == ["000_heart_0.nrrd", "001_heart_1.nrrd"]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes[0]), before)
    import SimpleITK as sitk
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(paths[0]))), before)


@pytest.mark.slow
def test_pretrain_cancel_resume_current_model_then_register(scene, tmp_path, monkeypatch):
    import GVSLRegistrationLib
    monkeypatch.setenv("GVSL_MODELS_DIR", str(tmp_path / "models"))
    store = ModelStore()
    nodes = phantom_nodes(scene)
    out = tmp_path / "run"
    records = []
    run = lib.start_pretraining(nodes, out, steps=200, store=store, on_event=records.append, **TINY)
    t0 = time.monotonic()
    while run.poll() == "running" and run.progress()["step"] < 2:
        assert time.monotonic() - t0 < 180, list(run.job.log)
        time.sleep(0.05)
    assert run.state == "running", run.error
    assert run.progress()["step"] >= 2 and run.progress()["total"] == 200
    assert "Step" in run.status_text()
    run.cancel()
    assert run.wait(timeout=120) == "cancelled", run.error
    stopped = run.summary["step"]
    assert run.checkpoint.endswith(lib.LAST) and lib.can_resume(out)
    assert store.current() is None  # nothing half-trained becomes the current model
    chart = run.chart
    assert chart.alive() and chart.values("step")[:2] == [1.0, 2.0]
    assert len(chart.series) == 4 and chart.chart.GetNumberOfPlotSeriesNodes() == 4
    assert all(np.isfinite(chart.values("loss")))
    assert not lib.inputs_folder(out).exists()  # the exported copies are removed

    with pytest.raises(lib.PretrainingInputError, match="volumes of the interrupted run"):
        lib.start_pretraining(nodes[::-1], out, steps=stopped + 2, resume=True, store=store, **TINY)

    run2 = lib.start_pretraining(nodes, out, steps=stopped + 2, resume=True, store=store, **TINY)
    assert run2.wait(timeout=180) == "done", run2.error
    assert any(r.get("event") == "resumed" for r in run2.job.events)
    assert run2.summary["step"] == stopped + 2
    current = store.current()
    assert current is not None and current.id == run2.model_entry.id and current.steps == stopped + 2
    assert current.kind == "pretrain" and len(current.sha256) == 64
    assert "Done" in run2.status_text()

    outputs = GVSLRegistrationLib.register_volumes(nodes[0], nodes[1], store.current_path(), "cpu")
    assert outputs.warped_volume is not None and outputs.deformable_transform is not None
    assert np.isfinite(outputs.metrics["ncc_after"])
    assert all(r.get("event") != "error" for r in records)


@pytest.mark.slow
def test_module_logic_and_selftest_run_headless(scene, monkeypatch, tmp_path):
    """GVSLPretraining.py's Logic and its in-Slicer self-test with Qt and the scripted-module base
    classes stubbed (the wheel has neither): catches errors in the module file itself."""
    import importlib.util
    import sys
    import types
    import unittest
    from pathlib import Path

    base = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            pass

    base.ScriptedLoadableModule = base.ScriptedLoadableModuleWidget = type("Stub", (), {})
    base.ScriptedLoadableModuleLogic = type("StubLogic", (), {})
    base.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None,
                                                             testingEnabled=lambda: True), raising=False)
    monkeypatch.setenv("GVSL_MODELS_DIR", str(tmp_path / "models"))
    path = Path(__file__).resolve().parents[1] / "GVSLExtension" / "GVSLPretraining.py"
    spec = importlib.util.spec_from_file_location("GVSLPretraining_headless", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.GVSLPretrainingLogic().ensureDependencies() == []
    case = module.GVSLPretrainingTest("test_PretrainCancelResume")
    case.setUp()
    case.test_PretrainCancelResume()
    assert not (tmp_path / "models").exists()  # the self-test used its own temporary models folder
