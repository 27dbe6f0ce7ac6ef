"""What the fixed registration panel relies on, on real MRML (slicer-core), without Qt:
background registration (same nodes as in-process, GUI never blocked, Cancel within a second),
the session that owns the outputs (node removal, scene close), GVSL's own transform above the
moving volume (recognised, removed, never hardened), no colour-table litter, unnamed/duplicate
colour names."""
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")

import gvsl_mrml  # noqa: E402
from gvsl_mrml import testing as mrml_testing  # noqa: E402
from gvsl_mrml.segmentations import label_names  # noqa: E402

import GVSLRegistrationLib as lib  # noqa: E402
from test_mrml_registration import FIXED_GEOM, MOVING_GEOM, SHIFT, blobs, geometry_image, labels_of  # noqa: E402

SMALL_CHANNELS = (8, 16, 32, 64, 128, 64, 32, 16, 8)


@pytest.fixture
def scene():
    return mrml_testing.headless_scene()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from gvsl import GVSL, ModelConfig, save_checkpoint
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("models") / "gvsl_random.pt", GVSL(ModelConfig(channels=SMALL_CHANNELS)))


@pytest.fixture
def inputs(scene):
    fixed = gvsl_mrml.sitk_to_volume_node(geometry_image(fn=blobs, **FIXED_GEOM), scene, "fixed CT")
    moving = gvsl_mrml.sitk_to_volume_node(geometry_image(fn=lambda p: blobs(p, SHIFT), **MOVING_GEOM), scene, "moving CT")
    moving_seg = gvsl_mrml.sitk_labels_to_segmentation(
        geometry_image(fn=lambda p: labels_of(p, SHIFT), dtype=np.uint8, **MOVING_GEOM), scene, "moving organs",
        moving, {1: "liver", 2: "kidney"})
    fixed_seg = gvsl_mrml.sitk_labels_to_segmentation(
        geometry_image(fn=labels_of, dtype=np.uint8, **FIXED_GEOM), scene, "fixed organs", fixed,
        {1: "liver", 2: "kidney"})
    return fixed, moving, moving_seg, fixed_seg


def color_nodes(scene):
    return {scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetName()
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))}


@pytest.mark.slow
def test_background_registration_matches_in_process_and_never_blocks(scene, inputs, checkpoint):
    fixed, moving, moving_seg, fixed_seg = inputs
    colors_before = color_nodes(scene)
    stages = []
    job = lib.start_registration(fixed, moving, str(checkpoint), "cpu", moving_segmentation=moving_seg,
                                 fixed_segmentation=fixed_seg, on_event=stages.append)
    longest = 0.0
    while True:
        t0 = time.perf_counter()
        state = job.poll()
        longest = max(longest, time.perf_counter() - t0)
        if state != "running":
            break
        time.sleep(0.02)
    assert state == "done", job.error
    assert longest < 0.5  # the GUI thread's work per poll (includes making the nodes)
    assert [r["stage"] for r in stages if r.get("event") == "stage"][:2] == ["resample", "network"]
    bg = job.outputs
    ref = lib.register_volumes(fixed, moving, checkpoint, "cpu", moving_segmentation=moving_seg,
                               fixed_segmentation=fixed_seg)
    for name in ("warped_volume", "warped_affine_volume", "jacobian_volume"):
        np.testing.assert_allclose(slicer.util.arrayFromVolume(getattr(bg, name)),
                                   slicer.util.arrayFromVolume(getattr(ref, name)), atol=1e-3)
    np.testing.assert_allclose(slicer.util.arrayFromTransformMatrix(bg.affine_transform),
                               slicer.util.arrayFromTransformMatrix(ref.affine_transform), atol=1e-5)
    assert bg.metrics["dice_after_by_segment"].keys() == ref.metrics["dice_after_by_segment"].keys()
    assert bg.propagated_segmentation is not None
    assert color_nodes(scene) == colors_before  # no "<name>_ColorTable" litter
    assert bg.affine_transform.GetNodeReference(lib.REFERENCE_MOVING) is moving


@pytest.mark.slow
def test_background_registration_cancels_within_a_second(scene, inputs, checkpoint):
    fixed, moving, _, _ = inputs
    job = lib.start_registration(fixed, moving, str(checkpoint), "cpu")
    time.sleep(0.5)  # the child is starting (importing torch)
    n_nodes = scene.GetNumberOfNodes()
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(timeout=30) == "cancelled"
    assert time.monotonic() - t0 < 2.5
    assert scene.GetNumberOfNodes() == n_nodes and job.outputs is None


@pytest.mark.slow
def test_cancel_after_the_child_finished_makes_no_nodes(scene, inputs, checkpoint):
    """Scene closing while the results are being read: the panel cancels; nothing is created."""
    fixed, moving, _, _ = inputs
    job = lib.start_registration(fixed, moving, str(checkpoint), "cpu")
    while job.job.poll() == "running":
        time.sleep(0.05)
    n_nodes = scene.GetNumberOfNodes()
    job.cancel()
    assert job.wait(timeout=30) == "cancelled"
    assert scene.GetNumberOfNodes() == n_nodes and job.outputs is None


@pytest.fixture
def views(scene):
    """Slice composite nodes (singletons: they survive scene.Clear), removed after the test."""
    added = mrml_testing.add_slice_views(scene)
    yield added
    for view in added:
        scene.RemoveNode(view)


def test_session_survives_node_removal_and_scene_close(scene, inputs, checkpoint, views):
    fixed, moving, _, _ = inputs
    session = lib.RegistrationSession(scene)
    assert session.show("deformable", 0.5) is False  # nothing yet: no exception
    session.set_outputs(lib.register_volumes(fixed, moving, checkpoint, "cpu"))
    assert session.show("affine", 0.3) and session.set_opacity(0.7) and session.show_dvf("glyph")
    assert views[0].GetForegroundVolumeID() == session.outputs.warped_affine_volume.GetID()
    scene.RemoveNode(session.outputs.warped_affine_volume)
    assert session.outputs.warped_affine_volume is None
    assert session.show("affine", 0.5) is False and session.show("deformable", 0.5) is True
    scene.RemoveNode(session.outputs.deformable_transform)
    assert session.show_dvf("grid") is False and session.outputs.deformable_transform is None
    scene.RemoveNode(fixed)
    assert session.show("deformable", 0.5) is False
    fixed_again = gvsl_mrml.sitk_to_volume_node(geometry_image(fn=blobs, **FIXED_GEOM), scene, "fixed again")
    session.set_outputs(lib.register_volumes(fixed_again, moving, checkpoint, "cpu"))
    assert session.show("deformable", 0.5)
    scene.Clear(0)  # File > Close Scene
    assert session.outputs is None
    assert not session.show("deformable", 0.5) and not session.set_opacity(0.2) and not session.show_dvf("none")
    session.close()


def test_gvsl_transform_above_the_moving_volume_is_recognised_and_removed(scene, inputs, checkpoint):
    fixed, moving, _, _ = inputs
    out = lib.register_volumes(fixed, moving, checkpoint, "cpu")
    before = slicer.util.arrayFromVolume(moving).copy()
    moving.SetAndObserveTransformNodeID(out.affine_transform.GetID())  # what the help text suggests
    assert lib.gvsl_transform_of(moving) is out.affine_transform
    reason = lib.validate_inputs(fixed, moving, str(checkpoint))
    assert "GVSL's transform" in reason and "Remove GVSL transform" in reason and "Do not harden" in reason
    assert lib.remove_gvsl_transform(moving)
    assert moving.GetParentTransformNode() is None
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), before)  # not hardened
    assert lib.validate_inputs(fixed, moving, str(checkpoint)) is None
    user = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "user transform")
    user.SetAndObserveTransformNodeID(out.affine_transform.GetID())
    moving.SetAndObserveTransformNodeID(user.GetID())
    assert "user transform" in lib.validate_inputs(fixed, moving, str(checkpoint))
    assert not lib.remove_gvsl_transform(moving)  # not its direct parent: left for the user


def test_no_colour_table_litter_from_segment_export(scene, inputs):
    fixed, moving, moving_seg, _ = inputs
    before = color_nodes(scene)
    labels, names = gvsl_mrml.segmentation_to_sitk_labels(moving_seg, moving)
    assert names == {"liver": 1, "kidney": 2}
    assert color_nodes(scene) == before


def test_unnamed_and_duplicate_colour_names(scene):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "labels")
    table.SetTypeToUser()
    table.SetNumberOfColors(8)
    for value, name in ((1, "(none)"), (2, "invalid"), (3, ""), (4, "heart"), (5, "heart"), (6, "Label 1")):
        table.SetColor(value, name, 0.5, 0.5, 0.5, 1.0)
    names = label_names(table, [1, 2, 3, 4, 5, 6, 7])
    assert names == {"Label 1": 1, "Label 2": 2, "Label 3": 3, "heart": 4, "heart (5)": 5,
                     "Label 1 (6)": 6, "Label 7": 7}
    # a label map whose colour table has such names keeps every label apart
    arr = np.zeros((6, 6, 6), np.uint8)
    arr[0, 0, :3] = [1, 2, 3]
    arr[1, 1, :2] = [4, 5]
    image = sitk.GetImageFromArray(arr)
    node = gvsl_mrml.sitk_to_volume_node(image, scene, "lab", node_class="vtkMRMLLabelMapVolumeNode")
    node.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
    _, got = gvsl_mrml.labelmap_node_or_segmentation_to_sitk(node)
    assert sorted(got.values()) == [1, 2, 3, 4, 5] and len(got) == 5
