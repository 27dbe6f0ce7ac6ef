"""GVSL's data augmentation: the appearance transformation T and the paired spatial augmentation.

Pre-training (Algorithm 1) corrupts x_A with T (the restoration target is x_A) and warps x_A,
t(x_A) and x_B with ONE random spatial transform per pair, so the registration task between
x_A and x_B is unchanged by the augmentation. All three functions take volumes (B, 1, D, H, W) =
(B, 1, z, y, x) with intensities in [0, 1], on any device, and never modify their inputs.

Randomness: every random draw comes from the ``torch.Generator`` passed in, which must be a CPU
generator (its state goes into checkpoints, so a resumed run continues with the same draws). Small
draws (probabilities, box and block positions, Bézier control points, affine parameters, the
coarse elastic noise) are made on the CPU from that generator and moved to the volume's device.
Per-voxel draws (the shuffling permutation keys and the in-painting noise) come from a *child*
generator on the volume's device, seeded by one 62-bit integer drawn from the passed generator,
so the passed generator advances identically on every device and nothing big crosses to the GPU.
Same generator state + same device -> identical outputs (bit-identical on CPU; tested). CPU and
GPU runs draw the same parameters but different per-voxel noise.

Appearance transformation T (the paper; the published ``AppearanceTransform``; in this order):

* Local pixel shuffling, probability ``p_shuffle`` = 0.8. Blocks of side ``max(1, dim // 20)``
  voxels per axis; the voxels inside each block are randomly permuted (each block its own
  permutation). The reference draws 5000 block origins uniformly for 128^3 crops, which lets
  blocks overlap (the last one written wins, so values get duplicated/lost). Here blocks are the
  cells of a lattice of period = block side with a random offset per axis, a random subset of the
  cells is shuffled, and they never overlap: the multiset of intensities is preserved and the
  vectorised write (one index_put with unique indices) is deterministic on every device. The
  number of blocks keeps the reference's expected shuffled fraction of the volume,
  ``SHUFFLE_FRACTION = 1 - exp(-5000 * 6^3 / 128^3) = 0.402``: ``n = round(0.402 * voxels /
  block_voxels)`` (3908 blocks of 6^3 at 128^3, 3908 of 3^3 at 64^3, 4250 of 2^3 at 48x44x40), so
  every volume has the same fraction of shuffled voxels as a 128^3 reference crop, never more.
  Below 40 voxels per axis the block side is 1 along that axis (as in the reference); a 1-voxel
  block is a no-op, so a volume under 40 voxels along every axis is not shuffled.
* Non-linear intensity mapping, probability ``p_bezier`` = 0.9: a cubic Bézier curve with end
  points (0, 0), (1, 1) and two inner control points uniform in [0, 1]^2; its sampled x and y
  values are sorted separately (as the published GVSL code does), which gives a monotone
  non-decreasing map with f(0) = 0 and f(1) = 1, applied by linear interpolation in a 4097-entry
  table. Models Genesis additionally uses a decreasing (flipped) curve half the time; the published
  GVSL code does not, so ``p_bezier_invert`` defaults to 0 (when drawn, the map is 1 - f(x)).
* In-painting: the published loop ``while boxes < 30 and random() < 0.95`` (always run; its
  unused ``paint_rate``/``inpaint_rate`` arguments play no role): each box has sides uniform
  integers in [dim // 10, dim // 5) (at least 1 voxel), an origin at least 3 voxels from the
  border where the volume allows, and is filled with uniform noise in [0, 1). ``p_inpaint`` is the
  loop's continue probability (0 disables in-painting), ``max_inpaint_boxes`` its cap.
* The result is clipped to [0, 1].

Spatial augmentation (published ``SpatialTransform`` settings of ``Train_GVSL.py``): an affine with
rotation uniform in ±π/9 about each axis, scale uniform in [0.75, 1.25] per axis, translation
uniform in ±5 % of the size along each axis (``TRANSLATION_FRACTION``, derived below), shear
uniform in ±π/18 (6 terms), built with
:func:`gvsl.geometry.affine_matrix` (matrix = Shear · Scale · Rz · Ry · Rx about the volume centre);
and a Simard elastic deformation with alpha uniform in [0, 512] and sigma uniform in [10, 13]
voxels. Translation, from the published normalisation: ``SpatialTransform.rand_coords`` draws
``t = U(-0.1, 0.1) * N`` (N = the crop size) into the last column of the matrix, and
``AffineTransformer`` divides that column by N before ``F.affine_grid``, which works in
normalised [-1, 1] coordinates where 2 units span the N voxels (align_corners=False): one unit
is N/2 voxels. So the sampling grid moves by U(-0.1, 0.1) units = U(-0.1, 0.1) * N/2 voxels =
U(-0.05, 0.05) * N: ±5 % of the size, not the ±10 % that the settings' numbers suggest (the
same factor 0.5 that :mod:`gvsl.checkpoint` applies to the published ``fc_trans``). The published code applies both to every pair, so ``p_affine`` and ``p_elastic`` default
to 1. They are composed into ONE displacement ``phi(p) = A(p + u(p))`` with
:func:`gvsl.geometry.fuse` (the elastic field u first, then the affine), so each volume is
interpolated once (the reference interpolates twice). Elastic field: the classic one is
``alpha * G_sigma * U[-1, 1]`` (per-voxel uniform noise, Gaussian-smoothed, radius 4 sigma), which
needs ~100-tap convolutions of the full volume (slow on a CPU). It is a linear functional of white
noise, so here it is computed as the same Gaussian summed over uniform noise on a coarse lattice
of spacing h = sigma / 2 (noise scaled by h^1.5 so each coarse sample carries the variance of the
h^3 voxels it stands for), evaluated directly at every voxel with three small separable matrix
products. Its covariance equals the full-resolution field's (Poisson summation: relative error
< 1e-8 at h = sigma / 2); the test compares displacement and gradient RMS against a direct
full-resolution implementation. The noise lattice extends 4 sigma beyond the volume, so the field
is not attenuated at the borders (the reference's zero-padded convolution halves its amplitude
near the faces: a reference artefact we do not copy). Typical size: RMS displacement per
component = alpha * sqrt(1/3) * (2 sqrt(pi) sigma)^-1.5, i.e. 1.40 voxels at alpha 512, sigma 10.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from gvsl import geometry
from gvsl.errors import GVSLError

Range = Union[float, Tuple[float, float]]

REFERENCE_SIZE = 128           # the published code's crop side, voxels
REFERENCE_SHUFFLE_BLOCKS = 5000  # its number of shuffled blocks per 128^3 crop
SHUFFLE_FRACTION = 1.0 - math.exp(-REFERENCE_SHUFFLE_BLOCKS * (REFERENCE_SIZE // 20) ** 3 / REFERENCE_SIZE ** 3)
BEZIER_CURVE_SAMPLES = 10001
BEZIER_TABLE_SIZE = 4097
ELASTIC_LATTICE_SPACING = 0.5  # coarse noise spacing h, in units of sigma
ELASTIC_RADIUS = 4.0           # Gaussian support, in sigmas (as the reference / scipy)
TRANSLATION_FRACTION = 0.05      # published ±0.1·N through its [-1, 1] normalisation: ±5 % of the size


class AugmentError(GVSLError, ValueError):
    """Invalid input to the augmentation functions, with what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise AugmentError(f"generator must be a torch.Generator, got {type(generator).__name__}; "
                           "pass torch.Generator().manual_seed(seed)")
    if generator.device.type != "cpu":
        raise AugmentError(f"generator must be a CPU torch.Generator (its state is checkpointed), got one "
                           f"on {generator.device}; pass torch.Generator().manual_seed(seed) - the "
                           "volumes may still live on the GPU")


def _check_volume(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise AugmentError(f"{name} must be a torch.Tensor (B, 1, D, H, W), got {type(x).__name__}")
    if x.dim() != 5 or x.shape[1] != 1:
        raise AugmentError(f"{name} must have shape (B, 1, D, H, W) (one channel, z, y, x), got "
                           f"{tuple(x.shape)}; add the missing axes with x[None, None] or x.unsqueeze(1)")
    if not x.is_floating_point():
        raise AugmentError(f"{name} must be a floating-point tensor with intensities in [0, 1], got "
                           f"{x.dtype}; normalise it first (e.g. x.float() / x.max())")
    if min(x.shape[2:]) < 2:
        raise AugmentError(f"{name} has a spatial size {tuple(x.shape[2:])} below 2 voxels along an axis; "
                           "augment volumes of at least 2 voxels per axis")


def _check_probability(p: float, name: str) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise AugmentError(f"{name} must be a probability in [0, 1], got {p}")
    return p


def _as_range(value: Range, name: str, symmetric: bool = True) -> Tuple[float, float]:
    """A number r -> (-r, r) (or (r, r) when not symmetric); a pair (lo, hi) stays."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise AugmentError(f"{name} must be a number or a (low, high) pair, got {value!r}")
        lo, hi = float(value[0]), float(value[1])
    else:
        lo, hi = (-abs(float(value)), abs(float(value))) if symmetric else (float(value), float(value))
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise AugmentError(f"{name} must satisfy low <= high (finite), got ({lo}, {hi})")
    return lo, hi


def _uniform(generator: torch.Generator, lo: float, hi: float, n: int) -> torch.Tensor:
    """n floats uniform in [lo, hi) (float64, CPU)."""
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def _coin(generator: torch.Generator, p: float) -> bool:
    """True with probability p; always consumes one draw (as the reference's random() < p)."""
    return bool(torch.rand((), generator=generator, dtype=torch.float64) < p)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer uniform in [low, high) (high > low)."""
    return int(torch.randint(low, high, (1,), generator=generator))


def _child_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one draw of ``generator`` (for per-voxel noise)."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    child = torch.Generator(device=device)
    child.manual_seed(seed)
    return child


# ----------------------------------------------------------------------------------------
# appearance transformation T
# ----------------------------------------------------------------------------------------
def _shuffle_blocks(v: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Local pixel shuffling of one volume v (D, H, W): a new tensor, v untouched."""
    shape = tuple(int(s) for s in v.shape)
    side = [max(1, s // 20) for s in shape]
    block_voxels = side[0] * side[1] * side[2]
    out = v.clone()
    if block_voxels == 1:
        return out
    offset = [_randint(generator, 0, s) for s in side]
    cells = [(n - o) // s for n, o, s in zip(shape, offset, side)]
    n_cells = cells[0] * cells[1] * cells[2]
    n_blocks = min(n_cells, max(1, round(SHUFFLE_FRACTION * v.numel() / block_voxels)))
    if n_blocks == 0:
        return out
    chosen = torch.randperm(n_cells, generator=generator)[:n_blocks]
    child = _child_generator(generator, v.device)
    cz = chosen // (cells[1] * cells[2])
    cy = (chosen // cells[2]) % cells[1]
    cx = chosen % cells[2]
    d, h, w = shape
    origin = ((offset[0] + cz * side[0]) * h + (offset[1] + cy * side[1])) * w + (offset[2] + cx * side[2])
    kz, ky, kx = torch.meshgrid(*[torch.arange(s, device=v.device) for s in side], indexing="ij")
    within = ((kz * h + ky) * w + kx).reshape(-1)  # flat offsets inside one block
    index = origin.to(v.device)[:, None] + within[None, :]  # (n_blocks, block_voxels) flat indices
    keys = torch.rand(index.shape, generator=child, device=v.device)
    source = index.gather(1, keys.argsort(dim=1, stable=True))
    flat_out = out.view(-1)
    flat_out[index.reshape(-1)] = v.reshape(-1)[source.reshape(-1)]
    return out


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for sorted xp (1-D): piecewise-linear, clamped to the end values."""
    i = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    dx = x1 - x0
    w = torch.where(dx > 0, (x - x0) / torch.where(dx > 0, dx, torch.ones_like(dx)), torch.zeros_like(dx))
    return y0 + w.clamp(0, 1) * (y1 - y0)


def _bezier_table(generator: torch.Generator, invert: bool) -> torch.Tensor:
    """The intensity map as a (BEZIER_TABLE_SIZE,) float64 table over [0, 1] (CPU)."""
    x1, y1, x2, y2 = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    t = torch.linspace(0.0, 1.0, BEZIER_CURVE_SAMPLES, dtype=torch.float64)
    b1, b2, b3 = 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3
    xs = torch.sort(b1 * x1 + b2 * x2 + b3).values
    ys = torch.sort(b1 * y1 + b2 * y2 + b3).values
    table = _interp(torch.linspace(0.0, 1.0, BEZIER_TABLE_SIZE, dtype=torch.float64), xs, ys)
    table[0], table[-1] = 0.0, 1.0  # exact end points (they are, up to rounding)
    return 1.0 - table if invert else table


def _apply_table(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Map v (any shape, [0, 1]) through a table over [0, 1] by linear interpolation."""
    table = table.float().to(v.device)
    k = table.numel() - 1
    pos = v.clamp(0.0, 1.0) * k
    i0 = pos.floor().long().clamp_(0, k - 1)
    lo = table[i0]
    return torch.lerp(lo, table[i0 + 1], pos - i0)


def _draw_inpaint_boxes(shape: Sequence[int], generator: torch.Generator, p_continue: float,
                        max_boxes: int) -> list:
    """The in-painting boxes [(origin_zyx, size_zyx), ...] in voxels, drawn as the reference does."""
    boxes = []
    while len(boxes) < max_boxes and _coin(generator, p_continue):
        size, origin = [], []
        for n in shape:
            lo = max(1, n // 10)
            size.append(_randint(generator, lo, max(lo + 1, n // 5)))
        for n, s in zip(shape, size):
            lo, hi = 3, n - s - 3
            if hi <= lo:
                lo, hi = 0, n - s + 1
            origin.append(_randint(generator, lo, hi))
        boxes.append((tuple(origin), tuple(size)))
    return boxes


def _inpaint(v: torch.Tensor, generator: torch.Generator, p_continue: float, max_boxes: int) -> torch.Tensor:
    """In-painting of one volume v (D, H, W): a new tensor, v untouched."""
    boxes = _draw_inpaint_boxes(v.shape, generator, p_continue, max_boxes)
    out = v.clone()
    if not boxes:
        return out
    child = _child_generator(generator, v.device)
    for (z, y, x), (sz, sy, sx) in boxes:
        out[z:z + sz, y:y + sy, x:x + sx] = torch.rand((sz, sy, sx), generator=child, device=v.device,
                                                        dtype=v.dtype)
    return out


def appearance_transform(x: torch.Tensor, generator: torch.Generator, *, p_shuffle: float = 0.8,
                         p_bezier: float = 0.9, p_inpaint: float = 0.95, p_bezier_invert: float = 0.0,
                         max_inpaint_boxes: int = 30) -> torch.Tensor:
    """The paper's appearance transformation t(x): shuffle -> Bézier intensity -> in-painting.

    x (B, 1, D, H, W) = (z, y, x), intensities in [0, 1], any device and float dtype; each batch
    item gets its own draws. ``p_shuffle``: probability of local pixel shuffling; ``p_bezier``:
    of the non-linear intensity map (``p_bezier_invert``: of using its decreasing variant
    1 - f); ``p_inpaint``: the in-painting loop's continue probability (up to
    ``max_inpaint_boxes`` boxes). See the module docstring for the recipe. Returns a new tensor
    of x's shape, dtype and device, clipped to [0, 1]; x is not modified.
    """
    _check_generator(generator)
    _check_volume(x, "x")
    p_shuffle = _check_probability(p_shuffle, "p_shuffle")
    p_bezier = _check_probability(p_bezier, "p_bezier")
    p_inpaint = _check_probability(p_inpaint, "p_inpaint")
    p_bezier_invert = _check_probability(p_bezier_invert, "p_bezier_invert")
    if int(max_inpaint_boxes) < 0:
        raise AugmentError(f"max_inpaint_boxes must be >= 0, got {max_inpaint_boxes}")
    items = []
    for b in range(x.shape[0]):
        v = x[b, 0].float().contiguous()
        if _coin(generator, p_shuffle):
            v = _shuffle_blocks(v, generator)
        if _coin(generator, p_bezier):
            invert = _coin(generator, p_bezier_invert)
            v = _apply_table(v, _bezier_table(generator, invert))
        v = _inpaint(v, generator, p_inpaint, int(max_inpaint_boxes))
        items.append(v.clamp_(0.0, 1.0))
    return torch.stack(items).unsqueeze(1).to(x.dtype)


# ----------------------------------------------------------------------------------------
# spatial augmentation
# ----------------------------------------------------------------------------------------
def _gaussian_lattice_matrix(n: int, sigma: float, spacing: float, radius: float) -> torch.Tensor:
    """(n, m) float64: 1-D Gaussian (unit integral, std ``sigma`` voxels) between the n voxels of an
    axis and the m nodes of a noise lattice of ``spacing`` voxels reaching ``radius`` beyond it."""
    pad = math.ceil(radius / spacing)
    m = math.ceil((n - 1) / spacing) + 1 + 2 * pad
    nodes = (torch.arange(m, dtype=torch.float64) - pad) * spacing
    r = torch.arange(n, dtype=torch.float64)[:, None] - nodes[None, :]
    return torch.exp(-0.5 * (r / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)


def _elastic_displacement(shape: Sequence[int], alpha: float, sigma: float, generator: torch.Generator,
                          device=None) -> torch.Tensor:
    """Simard elastic displacement (3, D, H, W) voxels, channels (z, y, x), on ``device``.

    Statistically equal to ``alpha * G_sigma * U[-1, 1]`` (per-voxel uniform noise smoothed by a
    normalised Gaussian of std ``sigma`` voxels, each component independently), computed from
    uniform noise on a coarse lattice (spacing sigma / 2, drawn on the CPU from ``generator``)
    with separable Gaussian matrices. See the module docstring.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    spacing = ELASTIC_LATTICE_SPACING * sigma
    radius = ELASTIC_RADIUS * sigma
    mats = [_gaussian_lattice_matrix(int(n), sigma, spacing, radius) for n in shape]
    noise = torch.rand((3,) + tuple(m.shape[1] for m in mats), generator=generator) * 2.0 - 1.0
    noise = noise.to(device) * float(alpha * spacing ** 1.5)
    az, ay, ax = (m.float().to(device) for m in mats)
    field = torch.matmul(noise, ax.T)                                       # (3, mz, my, W)
    field = torch.matmul(ay, field)                                         # (3, mz, H, W)
    field = torch.matmul(az, field.reshape(3, az.shape[1], -1))             # (3, D, H*W)
    return field.reshape(3, *[int(n) for n in shape])


def random_spatial_transform(batch: int, shape: Sequence[int], generator: torch.Generator, device=None, *,
                             rotation: Range = math.pi / 9, scale: Range = (0.75, 1.25),
                             translation: Range = TRANSLATION_FRACTION, shear: Range = math.pi / 18,
                             elastic_alpha: Range = (0.0, 512.0), elastic_sigma: Range = (10.0, 13.0),
                             p_affine: float = 1.0, p_elastic: float = 1.0) -> torch.Tensor:
    """One random spatial transform per batch item, as ONE displacement (B, 3, D, H, W).

    ``shape`` = (D, H, W) = (z, y, x) voxels. Returns voxel displacements, channels (z, y, x), on
    ``device`` in the :mod:`gvsl.geometry` (pull) convention: apply it with
    ``geometry.warp(volume, displacement)``, identically to every volume of the pair.

    Ranges: a number r means uniform in [-r, r] (``scale``: a number s means exactly s), a pair
    (low, high) is used as is. ``rotation`` rad about x, y and z; ``scale`` per axis;
    ``translation`` as a fraction of the size along each axis; ``shear`` rad for each of the 6
    terms (tangents in the matrix); ``elastic_alpha`` (strength) and ``elastic_sigma`` (smoothness,
    voxels) of the Simard elastic field. With probability ``p_affine`` the affine is drawn (else
    identity) and with probability ``p_elastic`` the elastic field (else none); the elastic field
    acts first, then the affine (``geometry.fuse``): output p samples the input at A(p + u(p)).
    """
    _check_generator(generator)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise AugmentError(f"shape must be (D, H, W) with at least 2 voxels per axis, got {shape}")
    if int(batch) < 1:
        raise AugmentError(f"batch must be >= 1, got {batch}")
    rot = _as_range(rotation, "rotation")
    scl = _as_range(scale, "scale", symmetric=False)
    if scl[0] <= 0:
        raise AugmentError(f"scale must be positive, got {scale!r}; the published range is (0.75, 1.25)")
    tra = _as_range(translation, "translation")
    she = _as_range(shear, "shear")
    if max(abs(she[0]), abs(she[1])) >= math.pi / 2:
        raise AugmentError(f"shear must stay inside (-pi/2, pi/2), got {shear!r}")
    alp = _as_range(elastic_alpha, "elastic_alpha", symmetric=False)
    sig = _as_range(elastic_sigma, "elastic_sigma", symmetric=False)
    if alp[0] < 0 or sig[0] <= 0:
        raise AugmentError(f"elastic_alpha must be >= 0 and elastic_sigma > 0, got {elastic_alpha!r}, "
                           f"{elastic_sigma!r}; the published ranges are (0, 512) and (10, 13)")
    p_affine = _check_probability(p_affine, "p_affine")
    p_elastic = _check_probability(p_elastic, "p_elastic")
    device = torch.device(device) if device is not None else torch.device("cpu")

    size_xyz = torch.tensor(shape[::-1], dtype=torch.float64)
    params = {k: [] for k in ("rotation", "scale", "translation", "shear")}
    flows = []
    for _ in range(int(batch)):
        if _coin(generator, p_affine):
            params["rotation"].append(_uniform(generator, *rot, 3))
            params["scale"].append(_uniform(generator, *scl, 3))
            params["translation"].append(_uniform(generator, *tra, 3) * size_xyz)
            params["shear"].append(_uniform(generator, *she, 6))
        else:
            params["rotation"].append(torch.zeros(3, dtype=torch.float64))
            params["scale"].append(torch.ones(3, dtype=torch.float64))
            params["translation"].append(torch.zeros(3, dtype=torch.float64))
            params["shear"].append(torch.zeros(6, dtype=torch.float64))
        flow = None
        if _coin(generator, p_elastic):
            alpha = float(_uniform(generator, *alp, 1))
            sigma = float(_uniform(generator, *sig, 1))
            if alpha > 0:
                flow = _elastic_displacement(shape, alpha, sigma, generator, device)
        flows.append(flow)
    mat = geometry.affine_matrix(*(torch.stack(params[k]).float()
                                   for k in ("rotation", "scale", "translation", "shear"))).to(device)
    if all(f is None for f in flows):
        return geometry.affine_displacement(mat, shape)
    zero = torch.zeros((3,) + shape, device=device)
    elastic = torch.stack([zero if f is None else f for f in flows])
    return geometry.fuse(mat, elastic)


def augment_pair(x_a: torch.Tensor, x_b: torch.Tensor, generator: torch.Generator, *, spatial: bool = True,
                 appearance: bool = True, appearance_options: Optional[dict] = None,
                 spatial_options: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GVSL's training-pair augmentation: returns (x_a_aug, t_x_a_aug, x_b_aug).

    x_a, x_b (B, 1, D, H, W) = (z, y, x) in [0, 1], same shape and device. First t(x_a) =
    :func:`appearance_transform` (as the published trainer does, before any warp), then one
    :func:`random_spatial_transform` draw per batch item is applied identically to x_a[b],
    t(x_a)[b] and x_b[b] with one trilinear :func:`gvsl.geometry.warp` (zero padding, so values
    stay in [0, 1]). ``appearance_options`` / ``spatial_options``: keyword arguments passed to
    those functions. With ``spatial=False`` / ``appearance=False`` that part is skipped (the
    outputs are then copies). Outputs have the inputs' dtype and device; inputs are not modified.
    """
    _check_generator(generator)
    _check_volume(x_a, "x_a")
    _check_volume(x_b, "x_b")
    if x_a.shape != x_b.shape:
        raise AugmentError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} must have the same shape; "
                           "crop or resample both to one grid first")
    if x_a.device != x_b.device:
        raise AugmentError(f"x_a is on {x_a.device} and x_b on {x_b.device}; move both to one device")
    if appearance:
        t_x_a = appearance_transform(x_a, generator, **(appearance_options or {}))
    else:
        t_x_a = x_a.clone()
    if not spatial:
        return x_a.clone(), t_x_a, x_b.clone()
    shape = tuple(int(s) for s in x_a.shape[2:])
    displacement = random_spatial_transform(x_a.shape[0], shape, generator, x_a.device, **(spatial_options or {}))
    stacked = torch.cat([x_a.float(), t_x_a.float(), x_b.float()], dim=1)
    warped = geometry.warp(stacked, displacement).to(x_a.dtype)
    return warped[:, 0:1].contiguous(), warped[:, 1:2].contiguous(), warped[:, 2:3].contiguous()
