"""Test-time refinement (instance optimisation) of a GVSL registration on the pair itself.

The network predicts, on the network grid, an affine voxel matrix ``A`` (4x4 on (x, y, z) voxels
about the grid centre) and a deformable flow ``u`` (3, z, y, x) voxels, fused as
``phi(p) = A(p + u(p))`` (:func:`gvsl.geometry.fuse`). Refinement keeps ``A`` and optimises a
correction ``delta`` of the flow, ``u' = u + delta``, for ``steps`` Adam steps on

    loss = (1 - mean local squared NCC(moving o phi', fixed))  [inside the optional fixed mask]
           + smooth_weight * mean |grad u'|^2                  (u' in voxels, per voxel)
           + fold_weight * mean relu(0.05 - det(I + grad u'))  (only where it folds or nearly)

The folding term (default weight 10) leaves smooth regions alone and pushes back only where the
map folds: measured on the demo's inter-subject 64^3 heart-phantom pair (150 CPU steps, untrained
network) folding 2.3 % -> 0.03 % of voxels with Dice 0.785 -> 0.788; a 3x smoothness weight
instead reached 0.18 % folding at Dice 0.762.

Why this parametrisation
------------------------
* **Same exported kinds, exact exports.** The result is again "affine + displacement field on the
  network grid", composed ``A(p + u'(p))``, so :mod:`gvsl.registration` exports it with the very
  code that exports the network's prediction (and the SimpleITK/MRML exactness tests cover it).
  Keeping ``A`` fixed costs nothing: any change the optimiser would make to ``A`` is a smooth
  field, which ``delta`` represents.
* **Starts from the network.** ``delta = 0`` at step 0: the network's prediction is the initial
  transform (what was predicted stays visible as the "network-only" result), and a good network
  leaves refinement little to do.
* **Fast on a CPU: multi-resolution, dense correction with smoothing by averaging.** ``delta``
  is a dense field on a coarse grid (``levels``: downsampling factors, coarse to fine; CPU
  default 45 % of the steps at quarter, 45 % at half and a short 10 % finish at full
  resolution; GPU 35/40/25 %).
  Coarse levels see Gaussian-smoothed, resampled images; the loss is evaluated on the level's
  grid only (the full-resolution field is never touched while optimising), and the correction
  is upsampled trilinearly to the full network grid at the end (so it is smooth by
  construction). The last level, when coarser than the network grid, samples the *sharp*
  full-resolution images at its lattice shifted by a random sub-lattice offset each step (as
  elastix samples voxels): every voxel's edges count, at the cost of the coarse level (measured on
  a 96^3 brain-phantom pair, 150 steps, quarter + half resolution only: Dice 0.941 with blurred
  half-resolution images, 0.951 with jittered sharp sampling, 0.973 adding a cosine learning-rate
  decay, as constant-step Adam jitters by about its step size). A short full-resolution finish
  does better for the same time (same pair: Dice 0.983, TRE 0.08 mm), so it is the default; the
  jittered sampling then serves configurations whose finest level is coarser than the grid. The parameter is passed
  through two 3^3 box averages before use (as in ConvexAdam, Siebert et al. 2021): Adam's
  per-voxel steps would otherwise make it noisy, and averaging couples neighbours like a
  coarser B-spline grid without its bookkeeping. Sampling at a level needs no rescaling: with
  ``align_corners=True`` a normalised coordinate is the same at every resolution, so the
  level's sample points ``p`` (in full-grid voxels) map to ``phi'(p)`` normalised by the full
  grid size and sample the level's moving image directly.
* **Units.** ``delta`` and ``u`` are in full network-grid voxels at every level; smoothness uses
  derivatives per full-grid voxel (level differences divided by the level spacing), so
  ``smooth_weight`` means the same at every level and matches GVSL's training smoothness term.

Progress: one ``step`` record per Adam step (a :class:`gvsl.progress.Progress` sharing the
caller's stream/callback, task of the caller, ``stage="refine"``, ``level``, ``loss``, ``ncc``).
Cancel: the token is checked before every step; :class:`gvsl.progress.Cancelled` is raised and
nothing is returned (the caller writes nothing).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_STEPS_CPU = 150  # 96^3 grid: ~10 s on one busy CPU core (Testing/Benchmarks/bench_classical.py)
DEFAULT_STEPS_GPU = 400  # GPUs also run a full-resolution level (see default_settings)


@dataclass(frozen=True)
class RefineSettings:
    """How to refine. ``levels``: ((factor, share of the steps), ...) coarse to fine; ``windows``:
    local-NCC window per level (level voxels, odd); ``lr``: Adam step in full-grid voxels (x factor/2
    per level, cosine-decayed to ``final_lr_fraction``); ``smooth_weight`` / ``fold_weight``: the
    loss weights of the module docstring; ``cpu_threads``: torch threads while
    optimising on a CPU (None = leave torch's setting): the tensors are small (a 96^3 grid's
    half level is 49^3), and intra-op threads cost more than they give when the cores are shared
    (measured on a loaded 2-core machine, 100 steps at 64^3: 4.0 s with 1 thread, 79 s with 2)."""

    levels: Tuple[Tuple[int, float], ...] = ((4, 0.45), (2, 0.45), (1, 0.1))
    windows: Tuple[int, ...] = (5, 7, 9)
    lr: float = 0.5
    smooth_weight: float = 1.0
    average_passes: int = 2
    blur: float = 0.5
    seed: int = 0
    cpu_threads: Optional[int] = 1
    final_lr_fraction: float = 0.05
    fold_weight: float = 10.0

    def split(self, steps: int) -> list:
        """Steps per level, summing to ``steps`` (the last level takes the rounding)."""
        counts = [int(round(steps * share)) for _, share in self.levels[:-1]]
        counts.append(max(0, steps - sum(counts)))
        return counts


def default_steps(device: torch.device) -> int:
    """A sensible number of refinement steps for ``device`` (CPU: 150, GPU: 400)."""
    return DEFAULT_STEPS_CPU if torch.device(device).type == "cpu" else DEFAULT_STEPS_GPU


def default_settings(device: torch.device) -> RefineSettings:
    """CPU: mostly quarter + half resolution, a short full-resolution finish; GPU: a longer one."""
    if torch.device(device).type == "cpu":
        return RefineSettings()
    return RefineSettings(levels=((4, 0.35), (2, 0.4), (1, 0.25)), windows=(5, 7, 9))


@dataclass
class Refined:
    """The refined flow (3, z, y, x) float64 voxels, channels (z, y, x), on the network grid, and
    what the optimiser did: ``loss``/``ncc`` per step (ncc = mean local squared NCC on the level
    grid), ``level`` per step, ``seconds``."""

    flow: np.ndarray
    loss: list = field(default_factory=list)
    ncc: list = field(default_factory=list)
    level: list = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
def _box_sum_axis(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sum over a centred window of ``k`` (odd) along ``dim``, zero padding, via a cumulative sum
    (O(n) per axis: PyTorch's CPU avg_pool3d is ~10x slower for this)."""
    p = k // 2
    pad = [0, 0] * (x.dim() - dim - 1) + [p + 1, p]
    c = torch.cumsum(F.pad(x, pad), dim)
    n = x.shape[dim]
    return c.narrow(dim, k, n) - c.narrow(dim, 0, n)


def _box(x: torch.Tensor, k: int) -> torch.Tensor:
    """Separable k^3 box mean of (B, C, D, H, W), zero padding (the padding counts), same size."""
    for dim in (2, 3, 4):
        x = _box_sum_axis(x, k, dim)
    return x / float(k ** 3)


def local_ncc_map(a: torch.Tensor, b: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Local squared NCC per voxel of (1, 1, D, H, W) images over a ``window``^3 box, zero padded:
    ``cross^2 / (var_a var_b + eps)`` with window sums, the definition of MONAI's
    LocalNormalizedCrossCorrelationLoss (rectangular kernel) that :class:`gvsl.losses.NCCLoss`
    uses (tested equal). Returns (1, 1, D, H, W) in [0, 1]."""
    vol = float(window ** 3)
    s = _box(torch.cat([a, b, a * a, b * b, a * b], 1), window) * vol
    sa, sb, saa, sbb, sab = s.unbind(1)
    cross = sab - sa * sb / vol
    va = torch.clamp(saa - sa * sa / vol, min=eps)
    vb = torch.clamp(sbb - sb * sb / vol, min=eps)
    return (cross * cross / (va * vb + eps)).unsqueeze(1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return x


def _resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)


def _level_shape(shape: Sequence[int], factor: int) -> tuple:
    return tuple(max(2, int(round((n - 1) / factor)) + 1) for n in shape)


def _average(x: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` separable 3^3 box means of (B, C, D, H, W) with replicated borders."""
    for _ in range(passes):
        for dim in (2, 3, 4):
            n = x.shape[dim]
            if n < 3:
                continue
            mid = x.narrow(dim, 1, n - 2)
            inner = (x.narrow(dim, 0, n - 2) + mid + x.narrow(dim, 2, n - 2)) / 3.0
            first = (2.0 * x.narrow(dim, 0, 1) + x.narrow(dim, 1, 1)) / 3.0
            last = (x.narrow(dim, n - 2, 1) + 2.0 * x.narrow(dim, n - 1, 1)) / 3.0
            x = torch.cat([first, inner, last], dim)
    return x


def _smoothness(u: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """mean squared forward differences of u (full-grid voxels) per full-grid voxel, /3."""
    dz = (u[:, :, 1:] - u[:, :, :-1]) / spacing[0]
    dy = (u[:, :, :, 1:] - u[:, :, :, :-1]) / spacing[1]
    dx = (u[:, :, :, :, 1:] - u[:, :, :, :, :-1]) / spacing[2]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


def _folding(u: torch.Tensor, spacing: Sequence[float], eps: float = 0.05) -> torch.Tensor:
    """mean of relu(eps - det(I + grad u)) over the level grid: a penalty only where the map
    ``p -> p + u(p)`` (full-grid voxels) folds or nearly folds (forward differences per full-grid
    voxel, as :func:`_smoothness`). ``A`` is fixed with det(A) > 0, so this is the folding of
    ``A(p + u(p))``."""
    d = [(u[:, :, 1:, :-1, :-1] - u[:, :, :-1, :-1, :-1]) / spacing[0],
         (u[:, :, :-1, 1:, :-1] - u[:, :, :-1, :-1, :-1]) / spacing[1],
         (u[:, :, :-1, :-1, 1:] - u[:, :, :-1, :-1, :-1]) / spacing[2]]
    # j[r][c] = d u_r / d axis_c + delta_rc, axes/components in (z, y, x) order
    j = [[d[c][:, r] + (1.0 if r == c else 0.0) for c in range(3)] for r in range(3)]
    det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
           - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    return F.relu(eps - det).mean()


def _normalised(pos_zyx: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(1, 3, ...) positions in full-grid voxels (z, y, x) -> grid_sample grid (1, ..., 3) (x, y, z)."""
    return (pos_zyx.permute(0, 2, 3, 4, 1) * norm - 1.0).flip(-1)


def _as_tensor(x, device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.detach().to(device=device, dtype=torch.float32)


@contextmanager
def _torch_threads(n: Optional[int]):
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def refine(fixed_zyx, moving_zyx, mat, flow, steps: int, *, fixed_mask_zyx=None,
           settings: Optional[RefineSettings] = None, device="cpu", progress=None, cancel=None) -> Refined:
    """Refine the network's deformable flow on one pair (see the module docstring).

    fixed_zyx, moving_zyx: (z, y, x) float arrays/tensors on the network grid (normalised
        intensities, as the network saw them). mat: (4, 4) voxel affine. flow: (3, z, y, x)
        voxels, channels (z, y, x). fixed_mask_zyx: optional (z, y, x) bool/0-1 mask where the
        similarity counts (default everywhere). steps: Adam steps in total (0 returns ``flow``).
    Returns :class:`Refined` with the new flow (float64 numpy). Raises
    :class:`gvsl.progress.Cancelled` when ``cancel`` is set.
    """
    t0 = time.perf_counter()
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"refinement steps must be >= 0 (got {steps}).")
    dev = torch.device(device)
    settings = settings or default_settings(dev)
    if len(settings.windows) != len(settings.levels):
        raise ValueError("RefineSettings.windows needs one window per level.")
    flow_t = _as_tensor(flow, dev)
    if flow_t.dim() == 5:
        flow_t = flow_t[0]
    shape = tuple(flow_t.shape[1:])
    fixed_t = _as_tensor(fixed_zyx, dev).reshape(1, 1, *shape)
    moving_t = _as_tensor(moving_zyx, dev).reshape(1, 1, *shape)
    mask_t = None if fixed_mask_zyx is None else _as_tensor(fixed_mask_zyx, dev).reshape(1, 1, *shape)
    if steps == 0:
        return Refined(flow=flow_t.double().cpu().numpy(), seconds=time.perf_counter() - t0)
    with _torch_threads(settings.cpu_threads if dev.type == "cpu" else None):
        return _optimise(fixed_t, moving_t, mask_t, flow_t, mat, steps, settings, dev, progress, cancel, t0)


def _optimise(fixed_t, moving_t, mask_t, flow_t, mat, steps, settings, dev, progress, cancel, t0) -> Refined:
    from gvsl.progress import Progress

    shape = tuple(flow_t.shape[1:])

    m = torch.as_tensor(np.asarray(mat, dtype=np.float64), dtype=torch.float32, device=dev).reshape(4, 4)
    lin_zyx = m[:3, :3].flip(0).flip(1)  # acts on (z, y, x) vectors
    t_zyx = m[:3, 3].flip(0)
    n = torch.tensor(shape, dtype=torch.float32, device=dev)
    centre = ((n - 1) / 2).view(3, 1, 1, 1)
    norm = (2.0 / torch.clamp(n - 1, min=1)).view(1, 1, 1, 3)

    child = None
    if progress is not None:
        child = Progress(steps, mode=progress.mode, stream=progress.stream, callback=progress.callback,
                         task=progress.task)
    out = Refined(flow=None)
    gen = torch.Generator().manual_seed(int(settings.seed))
    param = None  # the correction on the current level grid, (1, 3, *level_shape), full-grid voxels
    done = 0
    for index, ((factor, _), window, count) in enumerate(zip(settings.levels, settings.windows,
                                                              settings.split(steps))):
        lshape = _level_shape(shape, factor)
        sigma = settings.blur * factor if factor > 1 and index < len(settings.levels) - 1 else 0.0
        fixed_l = _resize(_gaussian_blur(fixed_t, sigma), lshape)
        # the last level samples the full-resolution (sharp) moving image at its points
        moving_l = moving_t if sigma == 0.0 else _resize(_gaussian_blur(moving_t, sigma), lshape)
        mask_l = None if mask_t is None else (_resize(mask_t, lshape) > 0.5).float()
        flow_l = _resize(flow_t[None], lshape)
        spacing = [(a - 1) / max(b - 1, 1) for a, b in zip(shape, lshape)]
        axes = [torch.linspace(0, a - 1, b, device=dev) for a, b in zip(shape, lshape)]
        base = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, *lshape) full-grid voxels (z, y, x)
        affine_base = torch.einsum("ij,jzyx->izyx", lin_zyx, base - centre) + centre + t_zyx.view(3, 1, 1, 1)
        if param is None:
            param = torch.zeros((1, 3) + lshape, device=dev)
        else:
            param = _resize(_average(param, settings.average_passes), lshape)
        param = param.detach().requires_grad_(True)
        opt = torch.optim.Adam([param], lr=settings.lr * factor / 2.0)
        # the last level (unless full resolution) samples the sharp full-resolution images at its
        # lattice shifted by a random sub-lattice offset each step, so every voxel contributes
        jitter = sigma == 0.0 and factor > 1
        half = torch.tensor(spacing, device=dev).view(3, 1, 1, 1) / 2.0
        lr0 = settings.lr * factor / 2.0
        for i in range(count):
            if cancel is not None:
                cancel.raise_if_cancelled()
            # cosine decay to final_lr_fraction: Adam's constant step would leave ~lr of jitter
            frac = settings.final_lr_fraction
            opt.param_groups[0]["lr"] = lr0 * (frac + (1 - frac) * 0.5 * (1 + math.cos(math.pi * i / max(count, 1))))
            delta = _average(param, settings.average_passes)
            if jitter:
                with torch.no_grad():
                    off = (torch.rand(3, 1, 1, 1, generator=gen) * 2.0 - 1.0).to(dev) * half
                    pts = torch.minimum(torch.clamp(base + off, min=0.0), (n - 1).view(3, 1, 1, 1))
                    pts_grid = _normalised(pts[None], norm)
                    fixed_s = F.grid_sample(fixed_t, pts_grid, mode="bilinear", align_corners=True)
                    flow_s = F.grid_sample(flow_t[None], pts_grid, mode="bilinear", align_corners=True)
                    affine_s = (torch.einsum("ij,jzyx->izyx", lin_zyx, pts - centre) + centre
                                + t_zyx.view(3, 1, 1, 1))
                    mask_s = None if mask_t is None else (
                        F.grid_sample(mask_t, pts_grid, mode="nearest", align_corners=True) > 0.5).float()
            else:
                fixed_s, flow_s, affine_s, mask_s = fixed_l, flow_l, affine_base, mask_l
            u = flow_s + delta
            phi = affine_s + torch.einsum("ij,bjzyx->bizyx", lin_zyx, u)  # (1, 3, ...) (z, y, x)
            warped = F.grid_sample(moving_l, _normalised(phi, norm), mode="bilinear", padding_mode="zeros",
                                   align_corners=True)
            cc = local_ncc_map(warped, fixed_s, window)
            sim = cc.mean() if mask_s is None else (cc * mask_s).sum() / mask_s.sum().clamp(min=1.0)
            loss = (1.0 - sim) + settings.smooth_weight * _smoothness(u, spacing)
            if settings.fold_weight:
                loss = loss + settings.fold_weight * _folding(u, spacing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            out.loss.append(float(loss.detach()))
            out.ncc.append(float(sim.detach()))
            out.level.append(int(factor))
            if child is not None:
                child.update(done, stage="refine", level=int(factor), loss=out.loss[-1], ncc=out.ncc[-1])
    with torch.no_grad():
        delta = _resize(_average(param, settings.average_passes), shape)[0]
        out.flow = (flow_t + delta).double().cpu().numpy()
    out.seconds = time.perf_counter() - t0
    return out
