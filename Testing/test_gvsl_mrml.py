"""gvsl_mrml against real MRML (slicer-core wheel): volumes, label maps, segmentations,
linear/grid transform nodes and their hierarchy, storage round trips.

Every geometry check compares with an independent computation: SimpleITK's own index ->
physical mapping (LPS) against the node's IJKToRAS matrix with x and y negated, and
SimpleITK's TransformPoint / Resample against the nodes' VTK transforms.
"""
import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

import gvsl_mrml  # noqa: E402
from gvsl_mrml import testing as mrml_testing  # noqa: E402
from gvsl_mrml.volumes import MRMLConversionError, vtk_matrix_to_array  # noqa: E402

FLIP = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS


@pytest.fixture
def scene():
    return mrml_testing.headless_scene()


def oblique_image(size=(14, 11, 9), spacing=(0.8, 1.3, 2.1), origin=(12.5, -30.0, 7.25),
                  axis=(0.3, -0.5, 0.8), angle=0.4, dtype=np.float32, seed=0, flip_z=False):
    rng = np.random.RandomState(seed)
    arr = (rng.rand(*size[::-1]) * 100).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    direction = np.array(sitk.VersorTransform(axis, angle).GetMatrix()).reshape(3, 3)
    if flip_z:  # a left-handed grid
        direction = direction @ np.diag([1.0, 1.0, -1.0])
    img.SetDirection(direction.ravel().tolist())
    return img


def node_ijk_to_ras(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return vtk_matrix_to_array(m)


def smooth_field(reference, amplitude=2.0, seed=1):
    """A smooth vector displacement image (LPS mm) on ``reference``'s grid."""
    rng = np.random.RandomState(seed)
    k, j, i = reference.GetSize()[::-1]
    zz, yy, xx = np.mgrid[0:k, 0:j, 0:i].astype(np.float64)
    phases = rng.rand(3, 3) * 6.0
    comps = [amplitude * np.sin(xx / 4.0 + phases[c, 0]) * np.cos(yy / 5.0 + phases[c, 1])
             * np.cos(zz / 3.0 + phases[c, 2]) for c in range(3)]
    field = sitk.GetImageFromArray(np.stack(comps, -1), isVector=True)
    field.CopyInformation(reference)
    return field


def random_affine(seed=2):
    rng = np.random.RandomState(seed)
    aff = sitk.AffineTransform(3)
    rot = np.array(sitk.VersorTransform((0.2, 0.9, -0.4), 0.15).GetMatrix()).reshape(3, 3)
    aff.SetMatrix((rot @ (np.eye(3) + 0.05 * rng.randn(3, 3))).ravel().tolist())
    aff.SetTranslation((rng.randn(3) * 4).tolist())
    aff.SetCenter((rng.randn(3) * 10).tolist())
    return aff


def interior_points(image, n=40, margin=1.5, seed=3):
    """(n, 3) LPS points at random continuous indices at least ``margin`` voxels inside."""
    rng = np.random.RandomState(seed)
    size = np.array(image.GetSize(), dtype=np.float64)
    idx = margin + rng.rand(n, 3) * (size - 1 - 2 * margin)
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flip_z", [False, True])
def test_volume_round_trip_oblique_geometry(scene, flip_z):
    img = oblique_image(flip_z=flip_z)
    node = gvsl_mrml.sitk_to_volume_node(img, scene, "oblique")
    ijk_to_ras = node_ijk_to_ras(node)
    # independent: SimpleITK's index -> LPS, negated x/y, vs the node's IJKToRAS
    for index in [(0, 0, 0), (13, 0, 0), (0, 10, 0), (0, 0, 8), (5, 7, 3), (13, 10, 8)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(index))
        ras = ijk_to_ras @ np.array(list(index) + [1.0])
        np.testing.assert_allclose(ras[:3], lps * FLIP, atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), sitk.GetArrayFromImage(img))
    np.testing.assert_allclose(node.GetSpacing(), img.GetSpacing(), rtol=1e-12)

    back = gvsl_mrml.volume_node_to_sitk(node)
    assert back.GetPixelID() == img.GetPixelID()
    np.testing.assert_allclose(back.GetOrigin(), img.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


def test_volume_node_built_in_slicer_terms(scene):
    """A node whose geometry is set through Slicer's own API (origin, spacing, RAS directions)."""
    arr = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # (k, j, i)
    node = slicer.util.addVolumeFromArray(arr, name="native")
    theta = 0.3
    dirs = [[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]]
    node.SetIJKToRASDirections(dirs)
    node.SetSpacing(0.7, 1.1, 2.5)
    node.SetOrigin(-4.0, 9.0, 33.0)
    img = gvsl_mrml.volume_node_to_sitk(node)
    ijk_to_ras = node_ijk_to_ras(node)
    for index in [(0, 0, 0), (6, 5, 4), (2, 3, 1)]:
        ras = ijk_to_ras @ np.array(list(index) + [1.0])
        np.testing.assert_allclose(np.array(img.TransformIndexToPhysicalPoint(index)), ras[:3] * FLIP, atol=1e-9)
    assert sitk.GetArrayViewFromImage(img)[4, 5, 6] == arr[4, 5, 6]  # (z, y, x) on both sides
    assert img.GetPixelID() == sitk.sitkInt16


def test_volume_conversion_leaves_node_untouched_and_uses_world_geometry(scene):
    img = oblique_image()
    node = gvsl_mrml.sitk_to_volume_node(img, scene, "moved")
    rigid = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    to_parent = np.eye(4)
    to_parent[:3, :3] = np.array(sitk.VersorTransform((1, 0, 0), 0.2).GetMatrix()).reshape(3, 3)
    to_parent[:3, 3] = [5.0, -2.0, 1.0]
    slicer.util.updateTransformMatrixFromArray(rigid, to_parent)
    node.SetAndObserveTransformNodeID(rigid.GetID())
    before = (node.GetMTime(), node.GetImageData().GetMTime(), node_ijk_to_ras(node).copy(),
              slicer.util.arrayFromVolume(node).copy())
    world = gvsl_mrml.volume_node_to_sitk(node)
    local = gvsl_mrml.volume_node_to_sitk(node, apply_parent_transform=False)
    assert node.GetMTime() == before[0] and node.GetImageData().GetMTime() == before[1]
    np.testing.assert_array_equal(node_ijk_to_ras(node), before[2])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before[3])
    index = (3, 4, 5)
    expected_ras = to_parent @ node_ijk_to_ras(node) @ np.array(list(index) + [1.0])
    np.testing.assert_allclose(world.TransformIndexToPhysicalPoint(index), expected_ras[:3] * FLIP, atol=1e-9)
    np.testing.assert_allclose(local.TransformIndexToPhysicalPoint(index),
                               img.TransformIndexToPhysicalPoint(index), atol=1e-9)
    # the returned image is a copy
    sitk.GetArrayViewFromImage(world)  # no exception; now change the copy
    world[0, 0, 0] = -1.0
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] == before[3][0, 0, 0]


def test_volume_conversion_refuses_vector_and_nonlinear_and_empty(scene):
    vec = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb photo")
    slicer.util.updateVolumeFromArray(vec, np.zeros((3, 4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match=r"rgb photo.*Vector to Scalar Volume"):
        gvsl_mrml.volume_node_to_sitk(vec)
    # a scalar node with 3 components in its image data
    odd = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "three components")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    odd.SetAndObserveImageData(image)
    with pytest.raises(MRMLConversionError, match="3 components"):
        gvsl_mrml.volume_node_to_sitk(odd)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty one")
    with pytest.raises(MRMLConversionError, match="empty one.*no image data"):
        gvsl_mrml.volume_node_to_sitk(empty)
    node = gvsl_mrml.sitk_to_volume_node(oblique_image(), scene, "under grid")
    grid = gvsl_mrml.displacement_to_grid_transform_node(smooth_field(oblique_image()), scene, "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(MRMLConversionError, match="Harden"):
        gvsl_mrml.volume_node_to_sitk(node)
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine")
    with pytest.raises(MRMLConversionError, match="sequence"):
        gvsl_mrml.volume_node_to_sitk(seq)


def test_labelmap_volume_round_trip_keeps_values(scene):
    labels = sitk.GetImageFromArray(np.random.RandomState(0).randint(0, 900, (6, 7, 8)).astype(np.int32))
    labels.SetSpacing((1.0, 2.0, 3.0))
    labels.SetOrigin((1.0, 2.0, 3.0))
    node = gvsl_mrml.sitk_to_volume_node(labels, scene, "lab", node_class="vtkMRMLLabelMapVolumeNode")
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    back = gvsl_mrml.volume_node_to_sitk(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))
    # 64-bit integers are stored as 32-bit (VTK/Slicer do not display long long)
    node64 = gvsl_mrml.sitk_to_volume_node(sitk.Cast(labels, sitk.sitkInt64), scene, "lab64",
                                           node_class="vtkMRMLLabelMapVolumeNode")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node64), sitk.GetArrayFromImage(labels))


# ---------------------------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------------------------
def _label_image(reference):
    arr = np.zeros(reference.GetSize()[::-1], np.int32)
    arr[1:4, 2:6, 3:8] = 205
    arr[4:8, 5:9, 6:12] = 500
    arr[2:5, 7:10, 1:3] = 850
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


def test_labels_to_segmentation_and_back(scene):
    from gvsl.labels import load_task_table
    ref_img = oblique_image()
    reference = gvsl_mrml.sitk_to_volume_node(ref_img, scene, "ref")
    labels = _label_image(ref_img)
    table = load_task_table("heart")
    seg = gvsl_mrml.sitk_labels_to_segmentation(labels, scene, "heart", reference, label_table=table)
    segmentation = seg.GetSegmentation()
    names = gvsl_mrml.segment_names(seg)
    assert names == [table[205].name, table[500].name, table[850].name]
    first = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(table[205].name))
    np.testing.assert_allclose(first.GetColor(), table[205].color_float, atol=1e-6)
    tag = vtk.reference("")
    assert first.GetTag(first.GetTerminologyEntryTagName(), tag)
    assert str(tag) == table[205].terminology_tag() and "SCT^74281007" in str(tag)
    # temporary nodes are gone
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0
    assert not any(scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetName() == "GVSL temporary labels"
                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")))

    mtime = seg.GetMTime()
    back, values = gvsl_mrml.segmentation_to_sitk_labels(seg, reference)
    assert seg.GetMTime() == mtime
    assert values == {names[0]: 1, names[1]: 2, names[2]: 3}
    expected = np.select([sitk.GetArrayViewFromImage(labels) == v for v in (205, 500, 850)], [1, 2, 3], 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), expected)
    np.testing.assert_allclose(back.GetDirection(), ref_img.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(back.GetOrigin(), ref_img.GetOrigin(), atol=1e-9)

    # original values through a name -> value mapping; a hidden segment is left out
    mapping = {t.name: t.value for t in table}
    seg.GetDisplayNode().SetSegmentVisibility(segmentation.GetSegmentIdBySegmentName(names[2]), False)
    back2, values2 = gvsl_mrml.labelmap_node_or_segmentation_to_sitk(seg, reference, segment_values=mapping)
    assert values2 == {names[0]: 205, names[1]: 500}
    expected2 = sitk.GetArrayFromImage(labels)
    expected2[expected2 == 850] = 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back2), expected2)


def test_labels_to_segmentation_fills_node_and_adds_empty_segments(scene):
    ref_img = oblique_image()
    reference = gvsl_mrml.sitk_to_volume_node(ref_img, scene, "ref")
    labels = _label_image(ref_img)
    table = {205: "myo", 500: ("lv", (255, 0, 0)), 850: {"name": "pa", "color": (0, 0, 1.0)}, 9: "absent"}
    seg = gvsl_mrml.sitk_labels_to_segmentation(labels, scene, "first", reference, label_table={1: "x"})
    assert gvsl_mrml.segment_names(seg) == ["Label 205", "Label 500", "Label 850"]
    same = gvsl_mrml.sitk_labels_to_segmentation(labels, scene, "ignored", reference, label_table=table,
                                                 node=seg, include_empty=True)
    assert same is seg and seg.GetName() == "first"
    assert gvsl_mrml.segment_names(seg) == ["absent", "myo", "lv", "pa"]
    segmentation = seg.GetSegmentation()
    np.testing.assert_allclose(segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("lv")).GetColor(),
                               (1, 0, 0))
    back, values = gvsl_mrml.segmentation_to_sitk_labels(seg, reference, segment_values={"myo": 205, "lv": 500,
                                                                                         "pa": 850, "absent": 9})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labels))


def test_labelmap_node_names_from_color_table(scene):
    ref_img = oblique_image()
    labels = _label_image(ref_img)
    node = gvsl_mrml.sitk_to_volume_node(labels, scene, "lm", node_class="vtkMRMLLabelMapVolumeNode")
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "names")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(900)
    colors.SetColor(205, "myo", 1, 0, 0, 1)
    colors.SetColor(500, "lv", 0, 1, 0, 1)
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    image, names = gvsl_mrml.labelmap_node_or_segmentation_to_sitk(node)
    assert names == {"myo": 205, "lv": 500, "Label 850": 850}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels))
    with pytest.raises(MRMLConversionError, match="non-integer"):
        gvsl_mrml.sitk_labels_to_segmentation(sitk.Cast(labels, sitk.sitkFloat32) * 0.5 + 0.25, scene, "bad",
                                              None)


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
def test_linear_node_from_parent_is_the_engine_affine_in_ras(scene):
    aff = random_affine()
    node = gvsl_mrml.affine_to_linear_transform_node(aff, scene, "affine")
    from_parent = node.GetTransformFromParent()
    points = np.random.RandomState(5).randn(25, 3) * 30
    for p in points:
        expected = FLIP * np.array(aff.TransformPoint((FLIP * p).tolist()))
        np.testing.assert_allclose(from_parent.TransformPoint(p.tolist()), expected, atol=1e-4)
    # ToParent is the inverse (moves the moving volume onto the fixed one)
    q = np.array(from_parent.TransformPoint(points[0].tolist()))
    np.testing.assert_allclose(node.GetTransformToParent().TransformPoint(q.tolist()), points[0], atol=1e-6)
    # and back to the engine
    again = gvsl_mrml.linear_transform_node_to_sitk(node)
    for p in points[:5]:
        np.testing.assert_allclose(again.TransformPoint(p.tolist()), aff.TransformPoint(p.tolist()), atol=1e-6)
    # a rigid Euler transform works too, and filling keeps the node
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.05, (3.0, -1.0, 2.0))
    same = gvsl_mrml.affine_to_linear_transform_node(euler, scene, "ignored", node=node)
    assert same is node
    np.testing.assert_allclose(node.GetTransformFromParent().TransformPoint([1.0, 2.0, 3.0]),
                               FLIP * np.array(euler.TransformPoint([-1.0, -2.0, 3.0])), atol=1e-6)


@pytest.mark.parametrize("as_transform", [False, True])
def test_grid_node_maps_points_like_displacement_field_transform(scene, as_transform):
    fixed = oblique_image(size=(16, 13, 11), spacing=(1.1, 0.9, 1.7))
    field = smooth_field(fixed)
    dft = sitk.DisplacementFieldTransform(sitk.Image(field))
    before = sitk.GetArrayFromImage(field)
    node = gvsl_mrml.displacement_to_grid_transform_node(dft if as_transform else field, scene, "deformable")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(field), before)  # input untouched
    from_parent = node.GetTransformFromParent()
    errors = []
    for p_lps in interior_points(fixed):
        expected = FLIP * np.array(dft.TransformPoint(p_lps.tolist()))
        errors.append(np.abs(np.array(from_parent.TransformPoint((FLIP * p_lps).tolist())) - expected).max())
    assert max(errors) < 1e-4, max(errors)
    # the exported transform still works (not emptied by the conversion)
    assert np.isfinite(dft.TransformPoint((0.0, 0.0, 0.0))).all()
    # back to SimpleITK: same field
    again = gvsl_mrml.grid_transform_node_to_sitk(node)
    np.testing.assert_allclose(sitk.GetArrayFromImage(again.GetDisplacementField()), before, atol=1e-5)
    np.testing.assert_allclose(again.GetDisplacementField().GetDirection(), field.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(again.GetDisplacementField().GetOrigin(), field.GetOrigin(), atol=1e-9)


def _hierarchy(scene, fixed, aff, field):
    linear = gvsl_mrml.affine_to_linear_transform_node(aff, scene, "affine")
    grid = gvsl_mrml.displacement_to_grid_transform_node(field, scene, "deformable")
    gvsl_mrml.nest_affine_under_deformable(linear, grid)
    return linear, grid


def test_linear_under_grid_reproduces_composite_and_resampling(scene):
    fixed = oblique_image(size=(18, 16, 12), spacing=(1.2, 1.0, 1.5), origin=(-10.0, -8.0, -9.0))
    moving = oblique_image(size=(20, 17, 13), spacing=(1.1, 1.25, 1.4), origin=(-12.0, -9.0, -8.0),
                           axis=(0.0, 1.0, 0.2), angle=-0.2, seed=4)
    # smooth moving intensities, so linear interpolation differences stay tiny
    k, j, i = moving.GetSize()[::-1]
    zz, yy, xx = np.mgrid[0:k, 0:j, 0:i]
    smooth = sitk.GetImageFromArray((np.sin(xx / 3.0) + np.cos(yy / 4.0) + zz / 6.0).astype(np.float32))
    smooth.CopyInformation(moving)
    moving = smooth
    aff = random_affine(seed=7)
    aff.SetTranslation((1.0, -0.5, 0.7))
    field = smooth_field(fixed, amplitude=1.5)
    dft = sitk.DisplacementFieldTransform(sitk.Image(field))
    composite = sitk.CompositeTransform([aff, dft])
    linear, grid = _hierarchy(scene, fixed, aff, field)

    moving_node = gvsl_mrml.sitk_to_volume_node(moving, scene, "moving")
    fixed_node = gvsl_mrml.sitk_to_volume_node(fixed, scene, "fixed")
    moving_node.SetAndObserveTransformNodeID(linear.GetID())
    from_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, linear, from_world)
    pts = interior_points(fixed)
    mapped = gvsl_mrml.transform_points_from_world(linear, pts * FLIP)
    for p, m in zip(pts, mapped):
        expected = FLIP * np.array(composite.TransformPoint(p.tolist()))
        assert np.abs(m - expected).max() < 1e-4
        assert np.abs(np.array(from_world.TransformPoint((FLIP * p).tolist())) - expected).max() < 1e-4

    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving_node, fixed_node)
    ours = slicer.util.arrayFromVolume(resampled)
    reference = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0))
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = sitk.GetArrayFromImage(sitk.Resample(ones, fixed, composite, sitk.sitkNearestNeighbor, 0)) > 0
    inside[[0, -1], :, :] = inside[:, [0, -1], :] = inside[:, :, [0, -1]] = False
    assert inside.sum() > 0.3 * inside.size
    assert np.abs(ours - reference)[inside].max() < 1e-3


def test_transform_and_volume_files_round_trip(scene, tmp_path):
    fixed = oblique_image(size=(12, 10, 9))
    aff = random_affine()
    field = smooth_field(fixed)
    dft = sitk.DisplacementFieldTransform(sitk.Image(field))
    linear, grid = _hierarchy(scene, fixed, aff, field)
    grid.SetAndObserveTransformNodeID(None)
    linear.SetAndObserveTransformNodeID(None)
    pts = interior_points(fixed, n=15)

    path = gvsl_mrml.save_node(linear, tmp_path / "affine.h5")
    assert path.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the file holds the engine's LPS resampling transform
    from_file = sitk.ReadTransform(str(path))
    for p in pts:
        np.testing.assert_allclose(from_file.TransformPoint(p.tolist()), aff.TransformPoint(p.tolist()), atol=1e-6)
    loaded = gvsl_mrml.load_transform(path, scene)
    assert loaded.IsA("vtkMRMLLinearTransformNode") and loaded.GetName() == "affine"
    for p in pts:
        np.testing.assert_allclose(loaded.GetTransformFromParent().TransformPoint((FLIP * p).tolist()),
                                   FLIP * np.array(aff.TransformPoint(p.tolist())), atol=1e-4)

    for name in ("deformable.h5", "deformable.nrrd"):
        path = gvsl_mrml.save_node(grid, tmp_path / name)
        loaded = gvsl_mrml.load_transform(path, scene)
        assert loaded.IsA("vtkMRMLGridTransformNode")
        for p in pts:
            expected = FLIP * np.array(dft.TransformPoint(p.tolist()))
            np.testing.assert_allclose(loaded.GetTransformFromParent().TransformPoint((FLIP * p).tolist()),
                                       expected, atol=1e-4)

    # the engine's composite file (as `gvsl register` writes it) loads as one transform node
    composite = sitk.CompositeTransform([aff, dft])
    sitk.WriteTransform(composite, str(tmp_path / "composite.h5"))
    loaded = gvsl_mrml.load_transform(tmp_path / "composite.h5", scene)
    for p in pts:
        np.testing.assert_allclose(loaded.GetTransformFromParent().TransformPoint((FLIP * p).tolist()),
                                   FLIP * np.array(composite.TransformPoint(p.tolist())), atol=1e-4)

    volume = gvsl_mrml.sitk_to_volume_node(fixed, scene, "vol")
    path = gvsl_mrml.save_node(volume, tmp_path / "vol.nrrd")
    on_disk = sitk.ReadImage(str(path))  # files are LPS: SimpleITK reads the original geometry
    np.testing.assert_allclose(on_disk.GetDirection(), fixed.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(on_disk.GetOrigin(), fixed.GetOrigin(), atol=1e-5)
    reloaded = gvsl_mrml.load_volume(path, scene)
    np.testing.assert_allclose(node_ijk_to_ras(reloaded), node_ijk_to_ras(volume), atol=1e-5)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(reloaded), sitk.GetArrayFromImage(fixed))

    seg = gvsl_mrml.sitk_labels_to_segmentation(_label_image(fixed), scene, "seg", volume, {205: "a", 500: "b"})
    path = gvsl_mrml.save_node(seg, tmp_path / "seg.seg.nrrd")
    seg2 = gvsl_mrml.load_segmentation(path, scene)
    assert gvsl_mrml.segment_names(seg2) == gvsl_mrml.segment_names(seg)
    a, _ = gvsl_mrml.segmentation_to_sitk_labels(seg, volume)
    b, _ = gvsl_mrml.segmentation_to_sitk_labels(seg2, volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
