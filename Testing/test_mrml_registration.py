"""GVSLRegistrationLib against real MRML (slicer-core wheel) with a random-weight GVSL model.

The registration result is checked against the engine (:func:`gvsl.register` run on
the same SimpleITK images): transform nodes map points like its composite, Slicer's own
resampling through the node hierarchy reproduces its warped image, and the input nodes are
left exactly as they were.
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

import gvsl_mrml  # noqa: E402
from gvsl_mrml import testing as mrml_testing  # noqa: E402
from gvsl_mrml.volumes import vtk_matrix_to_array  # noqa: E402

import GVSLRegistrationLib as lib  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])
SMALL_CHANNELS = (8, 16, 32, 64, 128, 64, 32, 16, 8)


@pytest.fixture
def scene():
    return mrml_testing.headless_scene()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch

    from gvsl import GVSL, ModelConfig, save_checkpoint
    torch.manual_seed(0)
    model = GVSL(ModelConfig(channels=SMALL_CHANNELS))
    folder = tmp_path_factory.mktemp("models")
    return {"pretrain": save_checkpoint(folder / "gvsl_random.pt", model, step=0),
            "segmentation": save_checkpoint(folder / "seg.pt", model, kind="segmentation")}


def geometry_image(size, spacing, origin, axis, angle, fn, dtype=np.float32):
    direction = np.array(sitk.VersorTransform(axis, angle).GetMatrix()).reshape(3, 3)
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction.ravel().tolist())
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)  # (x, y, z)
    pts = (np.array(origin) + (idx * np.array(spacing)) @ direction.T)
    arr = fn(pts).reshape(size).transpose(2, 1, 0).astype(dtype)  # -> (z, y, x)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def blobs(pts, shift=(0.0, 0.0, 0.0)):
    q = pts - np.asarray(shift)
    a = np.exp(-(((q - [3, -2, 1]) / [7, 6, 5]) ** 2).sum(-1)) * 200
    b = np.exp(-(((q - [-6, 4, -3]) / [4, 5, 4]) ** 2).sum(-1)) * 120
    return a + b + 20.0


def labels_of(pts, shift=(0.0, 0.0, 0.0)):
    q = pts - np.asarray(shift)
    out = np.zeros(len(pts))
    out[(((q - [3, -2, 1]) / [6, 5, 4]) ** 2).sum(-1) < 1] = 1
    out[(((q - [-6, 4, -3]) / [3.5, 4, 3.5]) ** 2).sum(-1) < 1] = 2
    return out


FIXED_GEOM = dict(size=(20, 18, 16), spacing=(1.25, 1.3, 1.4), origin=(-12.0, -11.0, -10.5),
                  axis=(0.0, 0.0, 1.0), angle=0.15)
MOVING_GEOM = dict(size=(19, 20, 15), spacing=(1.3, 1.2, 1.5), origin=(-11.0, -12.0, -10.0),
                   axis=(1.0, 0.2, 0.0), angle=-0.1)
SHIFT = (1.5, -1.0, 0.5)


@pytest.fixture
def inputs(scene):
    fixed = geometry_image(fn=blobs, **FIXED_GEOM)
    moving = geometry_image(fn=lambda p: blobs(p, SHIFT), **MOVING_GEOM)
    fixed_labels = geometry_image(fn=labels_of, dtype=np.uint8, **FIXED_GEOM)
    moving_labels = geometry_image(fn=lambda p: labels_of(p, SHIFT), dtype=np.uint8, **MOVING_GEOM)
    fixed_node = gvsl_mrml.sitk_to_volume_node(fixed, scene, "fixed CT")
    moving_node = gvsl_mrml.sitk_to_volume_node(moving, scene, "moving CT")
    table = {1: {"name": "liver", "color": (200, 120, 90),
                 "terminology": "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical "
                                "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"},
             2: ("kidney", (0, 0, 255))}
    moving_seg = gvsl_mrml.sitk_labels_to_segmentation(moving_labels, scene, "moving organs", moving_node, table)
    fixed_seg = gvsl_mrml.sitk_labels_to_segmentation(fixed_labels, scene, "fixed organs", fixed_node,
                                                      {1: "liver", 2: "kidney"})
    return dict(fixed=fixed, moving=moving, fixed_node=fixed_node, moving_node=moving_node,
                moving_seg=moving_seg, fixed_seg=fixed_seg, fixed_labels=fixed_labels,
                moving_labels=moving_labels)


def snapshot(node):
    state = {"mtime": node.GetMTime(), "parent": node.GetTransformNodeID(), "name": node.GetName()}
    if node.IsA("vtkMRMLVolumeNode"):
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        state.update(ijk=vtk_matrix_to_array(m), array=slicer.util.arrayFromVolume(node).copy(),
                     image_mtime=node.GetImageData().GetMTime())
    else:
        labels, names = gvsl_mrml.segmentation_to_sitk_labels(node, node.GetNodeReference(
            node.GetReferenceImageGeometryReferenceRole()))
        state.update(labels=sitk.GetArrayFromImage(labels), names=names)
    return state


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], np.ndarray):
            np.testing.assert_array_equal(before[key], after[key])
        else:
            assert before[key] == after[key], key


def test_register_volumes_end_to_end(scene, inputs, checkpoints):
    import gvsl.registration
    from gvsl.checkpoint import load_model

    ins = inputs
    watched = [ins["fixed_node"], ins["moving_node"], ins["moving_seg"], ins["fixed_seg"]]
    before = [snapshot(n) for n in watched]
    records = []
    out = lib.register_volumes(ins["fixed_node"], ins["moving_node"], str(checkpoints["pretrain"]), "cpu",
                               moving_segmentation=ins["moving_seg"], fixed_segmentation=ins["fixed_seg"],
                               progress=records.append)
    after = [snapshot(n) for n in watched]
    for b, a in zip(before, after):
        assert_same(b, a)

    # names, classes, references
    expected = {"warped_volume": ("moving CT warped (GVSL)", "vtkMRMLScalarVolumeNode"),
                "warped_affine_volume": ("moving CT warped affine (GVSL)", "vtkMRMLScalarVolumeNode"),
                "jacobian_volume": ("moving CT Jacobian (GVSL)", "vtkMRMLScalarVolumeNode"),
                "affine_transform": ("moving CT affine (GVSL)", "vtkMRMLLinearTransformNode"),
                "deformable_transform": ("moving CT deformable (GVSL)", "vtkMRMLGridTransformNode"),
                "propagated_segmentation": ("moving organs propagated (GVSL)", "vtkMRMLSegmentationNode")}
    nodes = out.nodes()
    assert set(nodes) == set(expected)
    for key, (name, cls) in expected.items():
        assert nodes[key].GetName() == name and nodes[key].IsA(cls), key
        assert nodes[key].GetScene() is scene
        assert nodes[key].GetNodeReference(lib.REFERENCE_FIXED) is ins["fixed_node"]
        assert nodes[key].GetNodeReference(lib.REFERENCE_MOVING) is ins["moving_node"]
    assert out.affine_transform.GetParentTransformNode() is out.deformable_transform
    assert out.warped_volume.GetParentTransformNode() is None

    # metrics
    m = out.metrics
    for key in ("ncc_before", "ncc_affine", "ncc_after", "folding_percent", "jacobian_min", "timings_s"):
        assert key in m, key
    assert m["segment_values"] == {"liver": 1, "kidney": 2}
    assert set(m["dice_after_by_segment"]) == {"liver", "kidney", "mean"}
    assert 0.0 < m["dice_before_by_segment"]["liver"] <= 1.0
    assert json.loads(out.deformable_transform.GetAttribute(lib.ATTRIBUTE_METRICS))["segment_values"]["kidney"] == 2
    assert [r["stage"] for r in records if r.get("event") == "stage"] == list(gvsl.registration.STAGES)
    assert "NCC: before" in lib.format_metrics(m)

    # the engine on the same images, same model: transforms and images must agree
    model = load_model(checkpoints["pretrain"], "cpu")
    ref = gvsl.registration.register(ins["fixed"], ins["moving"], model, "cpu",
                                     moving_labels=ins["moving_labels"])
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.warped_volume), sitk.GetArrayFromImage(ref.warped),
                               atol=1e-4)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.warped_affine_volume),
                               sitk.GetArrayFromImage(ref.warped_affine), atol=1e-4)
    size = np.array(ins["fixed"].GetSize())
    rng = np.random.RandomState(0)
    pts = np.array([ins["fixed"].TransformContinuousIndexToPhysicalPoint(p.tolist())
                    for p in 1 + rng.rand(30, 3) * (size - 3)])
    mapped = gvsl_mrml.transform_points_from_world(out.affine_transform, pts * FLIP)
    expected_pts = np.array([ref.composite.TransformPoint(p.tolist()) for p in pts]) * FLIP
    assert np.abs(mapped - expected_pts).max() < 1e-3
    motion = np.abs(expected_pts - pts * FLIP).max()
    assert motion > 0.01  # the random model does move points, so the comparison means something

    # Slicer resampling a copy of the moving volume placed under the affine node == warped
    clone = gvsl_mrml.sitk_to_volume_node(ins["moving"], scene, "moving clone")
    clone.SetAndObserveTransformNodeID(out.affine_transform.GetID())
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(clone, ins["fixed_node"])
    ones = sitk.Image(ins["moving"].GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(ins["moving"])
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, ins["fixed"], ref.composite, sitk.sitkNearestNeighbor)) > 0
    inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False
    assert inside.mean() > 0.3
    diff = np.abs(slicer.util.arrayFromVolume(resampled) - sitk.GetArrayFromImage(ref.warped))[inside]
    assert diff.max() < 0.05 * float(sitk.GetArrayViewFromImage(ins["moving"]).max())
    assert np.median(diff) < 1e-3

    # propagated segmentation: same names/colours/terminology, on the fixed grid, = engine's labels
    assert gvsl_mrml.segment_names(out.propagated_segmentation) == ["liver", "kidney"]
    seg = out.propagated_segmentation.GetSegmentation()
    np.testing.assert_allclose(seg.GetSegment(seg.GetSegmentIdBySegmentName("kidney")).GetColor(), (0, 0, 1))
    tags = gvsl_mrml.segmentations.segment_terminology(out.propagated_segmentation)
    assert "SCT^10200004^Liver" in tags["liver"]
    labels, values = gvsl_mrml.segmentation_to_sitk_labels(out.propagated_segmentation, ins["fixed_node"],
                                                           segment_values={"liver": 1, "kidney": 2})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(ref.warped_labels))
    # jacobian
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.jacobian_volume), sitk.GetArrayFromImage(ref.jacobian),
                               atol=1e-5)


def test_register_volumes_fills_given_nodes(scene, inputs, checkpoints):
    ins = inputs
    given = lib.RegistrationOutputs(
        warped_volume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped"),
        affine_transform=scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "my affine"),
        deformable_transform=scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "my grid"))
    counts = {c: scene.GetNumberOfNodesByClass(c) for c in ("vtkMRMLLinearTransformNode", "vtkMRMLGridTransformNode")}
    out = lib.register_volumes(ins["fixed_node"], ins["moving_node"], checkpoints["pretrain"], "cpu", outputs=given)
    assert out is given
    assert out.warped_volume.GetName() == "my warped" and out.affine_transform.GetName() == "my affine"
    assert out.warped_affine_volume.GetName() == "moving CT warped affine (GVSL)"
    assert {c: scene.GetNumberOfNodesByClass(c) for c in counts} == counts
    assert out.propagated_segmentation is None and "dice_after" not in out.metrics
    assert slicer.util.arrayFromVolume(out.warped_volume).shape == tuple(ins["fixed"].GetSize()[::-1])
    with pytest.raises(lib.RegistrationInputError, match="one of the input nodes"):
        lib.register_volumes(ins["fixed_node"], ins["moving_node"], checkpoints["pretrain"], "cpu",
                             outputs=lib.RegistrationOutputs(warped_volume=ins["moving_node"]))


def test_bad_inputs_give_clear_errors(scene, inputs, checkpoints, tmp_path):
    from gvsl.checkpoint import CheckpointError
    ins = inputs
    fixed, moving = ins["fixed_node"], ins["moving_node"]
    assert lib.validate_inputs(fixed, moving, str(checkpoints["pretrain"])) is None
    assert "fixed volume" in lib.validate_inputs(None, moving, "x")
    assert "same node" in lib.validate_inputs(fixed, fixed, str(checkpoints["pretrain"]))
    assert "Choose a GVSL model" in lib.validate_inputs(fixed, moving, "")
    assert "folder" in lib.validate_inputs(fixed, moving, str(tmp_path))

    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "color photo")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((4, 5, 6, 3), np.uint8))
    reason = lib.validate_inputs(fixed, rgb, str(checkpoints["pretrain"]))
    assert "color photo" in reason and "Vector to Scalar" in reason
    with pytest.raises(ValueError, match="color photo.*Vector to Scalar"):
        lib.register_volumes(fixed, rgb, checkpoints["pretrain"], "cpu")
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="Model file not found"):
        lib.register_volumes(fixed, moving, str(missing), "cpu")
    with pytest.raises(CheckpointError, match="'segmentation' checkpoint"):
        lib.register_volumes(fixed, moving, checkpoints["segmentation"], "cpu")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        lib.register_volumes(fixed, moving, broken, "cpu")
    # nothing was created by the failed calls
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 0


def test_overlay_and_dvf_display(scene, inputs, checkpoints):
    ins = inputs
    views = mrml_testing.add_slice_views(scene)
    out = lib.register_volumes(ins["fixed_node"], ins["moving_node"], checkpoints["pretrain"], "cpu")
    assert lib.show_overlay(out.fixed_volume, out.warped_volume, 0.4) == 3
    for v in views:
        assert v.GetBackgroundVolumeID() == ins["fixed_node"].GetID()
        assert v.GetForegroundVolumeID() == out.warped_volume.GetID()
        assert v.GetForegroundOpacity() == pytest.approx(0.4)
    assert lib.choose_overlay(out, "affine") is out.warped_affine_volume
    assert all(v.GetForegroundVolumeID() == out.warped_affine_volume.GetID() for v in views)
    lib.choose_overlay(out, "deformable")
    assert all(v.GetForegroundVolumeID() == out.warped_volume.GetID() for v in views)
    with pytest.raises(ValueError, match="affine, deformable"):
        lib.choose_overlay(out, "both")

    display_class = slicer.vtkMRMLTransformDisplayNode
    for mode, constant in (("glyph", display_class.VIS_MODE_GLYPH), ("grid", display_class.VIS_MODE_GRID),
                           ("contour", display_class.VIS_MODE_CONTOUR)):
        display = lib.set_dvf_display(out.deformable_transform, mode)
        assert display.GetVisualizationMode() == constant
        assert display.GetVisibility() and display.GetVisibility2D() and display.GetVisibility3D()
        assert display.GetRegionNode() is ins["fixed_node"]
    display = lib.set_dvf_display(out.deformable_transform, "none")
    assert not display.GetVisibility() and not display.GetVisibility2D()
    with pytest.raises(ValueError, match="glyph"):
        lib.set_dvf_display(out.deformable_transform, "arrows")


def test_module_logic_and_selftest_run_headless(scene, monkeypatch):
    """GVSLRegistration.py's Logic and its in-Slicer self-test, with Qt and the scripted-module
    base classes stubbed (the wheel has neither): catches errors in the module file itself."""
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
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")  # not in the wheel either
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: (low, high)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", wrapper)
    path = Path(__file__).resolve().parents[1] / "GVSLRegistration" / "GVSLRegistration.py"
    spec = importlib.util.spec_from_file_location("GVSLRegistration_headless", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.GVSLRegistrationLogic().ensureTorch(askConfirmation=False)
    case = module.GVSLRegistrationTest("test_RegisterSyntheticVolumes")
    case.setUp()
    case.test_RegisterSyntheticVolumes()
    assert scene.GetFirstNodeByName("moving warped (GVSL)") is not None


def test_register_volumes_refined_is_exact_in_mrml(scene, inputs, checkpoints):
    """With refine=N the nodes hold the refined registration (Slicer's own resampling through the
    transform hierarchy reproduces the engine's refined warped image), the network's prediction
    is kept as its own volume, and the overlay can switch between them."""
    import gvsl.registration
    from gvsl.checkpoint import load_model

    ins = inputs
    views = mrml_testing.add_slice_views(scene)
    out = lib.register_volumes(ins["fixed_node"], ins["moving_node"], str(checkpoints["pretrain"]), "cpu",
                               moving_segmentation=ins["moving_seg"], fixed_segmentation=ins["fixed_seg"],
                               refine=8)
    assert out.warped_network_volume.GetName() == "moving CT warped network (GVSL)"
    assert out.warped_network_volume.GetNodeReference(lib.REFERENCE_FIXED) is ins["fixed_node"]
    m = out.metrics
    assert m["refine"]["steps"] == 8 and "ncc_network" in m and "dice_network_by_segment" in m
    assert "network prediction" in lib.format_metrics(m) and "before -> network -> refined" in lib.format_metrics(m)
    ref = gvsl.registration.register(ins["fixed"], ins["moving"], load_model(checkpoints["pretrain"], "cpu"), "cpu",
                                     moving_labels=ins["moving_labels"], refine=8)
    # (float32 optimisation run twice: measured max difference 2.7e-4 on values 20..200)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.warped_volume), sitk.GetArrayFromImage(ref.warped),
                               atol=2e-3)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out.warped_network_volume),
                               sitk.GetArrayFromImage(ref.network.warped), atol=1e-4)
    assert np.abs(sitk.GetArrayFromImage(ref.warped) - sitk.GetArrayFromImage(ref.network.warped)).max() > 1e-3
    # Slicer resampling a copy of the moving volume under the affine node == the refined warped image
    clone = gvsl_mrml.sitk_to_volume_node(ins["moving"], scene, "moving clone")
    clone.SetAndObserveTransformNodeID(out.affine_transform.GetID())
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(clone, ins["fixed_node"])
    ones = sitk.Image(ins["moving"].GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(ins["moving"])
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, ins["fixed"], ref.composite, sitk.sitkNearestNeighbor)) > 0
    inside[[0, -1]] = inside[:, [0, -1]] = inside[:, :, [0, -1]] = False
    assert inside.mean() > 0.3
    diff = np.abs(slicer.util.arrayFromVolume(resampled) - sitk.GetArrayFromImage(ref.warped))[inside]
    assert diff.max() < 0.05 * float(sitk.GetArrayViewFromImage(ins["moving"]).max())
    assert np.median(diff) < 1e-3
    # overlay switch: network prediction vs final
    assert lib.choose_overlay(out, "network") is out.warped_network_volume
    assert all(v.GetForegroundVolumeID() == out.warped_network_volume.GetID() for v in views)
    assert lib.choose_overlay(out, "deformable") is out.warped_volume
