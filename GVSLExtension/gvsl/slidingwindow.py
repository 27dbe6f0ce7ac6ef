"""Streaming Gaussian sliding-window inference: MONAI's blend, emitted in z-slabs, bounded memory.

``stream_sliding_window(model, x, roi, consumer)`` gives the same class scores as
``monai.inferers.sliding_window_inference(x, roi, sw_batch_size, model, overlap, mode="gaussian")``
(sigma_scale 0.125, constant 0 padding of axes shorter than the window, then cropped) followed
by a softmax over classes -- the same window lattice (``dense_patch_slices`` with MONAI's scan
interval), the same importance map (``compute_importance_map``), the same sums in the same order,
so equal to float rounding (tested against MONAI) -- but never holds the whole output:

* windows run in MONAI's order, which is z-row order (all windows of one z start, then the next);
* a **rolling buffer** covers only the open z-range, the current row's window depth ``Wz``:
  blended scores ``(C, Wz, Y', X')`` and the blend weights ``(1, Wz, Y', X')`` (``Y', X'`` the
  padded grid size), float32 on the model's device;
* after each row the planes no later window touches (up to the next row's z start) are final:
  divided by their weights, cropped, softmax over classes, moved to the CPU and handed to
  ``consumer(z0, probs)`` as ``(C, dz, Y, X)`` float32 slabs of at most ``slab_planes`` planes
  (``z0``: index of the slab's first plane on the unpadded grid), in increasing z, each plane once;
  then the buffer rolls.

Memory held (besides the input and one window forward): the buffer
``(C + 1) * Wz * Y' * X' * 4`` bytes on the device, plus one emitted slab
``C * slab_planes * Y * X * 4`` bytes (twice on a GPU: device and CPU copy). Examples (MONAI's
full output + weight map in brackets, ``(C + 1) * Z * Y * X * 4`` bytes): 256 x 256 x 200 grid,
8 classes, window 96: 9 * 96 * 65536 * 4 B = 216 MiB (450 MiB); 29 classes, 256^3 brain grid:
720 MiB (1.9 GiB); 512 x 512 x 300 CT, 8 classes: 864 MiB (2.6 GiB). The buffer stays float32
(MONAI's sums to float rounding; half precision would move the argmax near ties) and is as deep
as the window, not the volume.

``consumer.start(None, shape_zyx)`` (when the consumer has it; the class count is known only
after the first window) is called before the first slab of every pass, so a caller that reruns the pass (``gvsl.inference.Inference.run`` after a
CUDA out-of-memory error) gets a clean restart. ``cancel`` (a :class:`gvsl.progress.CancelToken`)
is checked before each window row; ``progress`` (a :class:`gvsl.progress.Progress`) gets one
``"window_row"`` event per finished row.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

SIGMA_SCALE = 0.125


def scan_interval(image_size: Sequence[int], roi: Sequence[int], overlap: float) -> Tuple[int, ...]:
    """MONAI's scan interval (``monai.inferers.utils._get_scan_interval``) for a padded size."""
    out = []
    for size, r in zip(image_size, roi):
        if r == size:
            out.append(int(r))
        else:
            step = int(r * (1 - overlap))
            out.append(step if step > 0 else 1)
    return tuple(out)


def window_lattice(shape_zyx: Sequence[int], roi: Sequence[int], overlap: float):
    """-> (pad, padded_zyx, rows): MONAI's padding and window lattice for a (z, y, x) volume.

    pad: ((z_before, z_after), (y_before, y_after), (x_before, x_after)) constant padding of the
    axes shorter than the window (MONAI pads ``diff // 2`` before); rows: list of
    ``(z_start, [window slices (z, y, x)])`` in MONAI's window order, one entry per z start.
    """
    from monai.data.utils import dense_patch_slices
    roi = tuple(int(r) for r in roi)
    shape = tuple(int(s) for s in shape_zyx)
    pad = tuple(((max(r - s, 0)) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(shape, roi))
    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    slices = dense_patch_slices(padded, roi, scan_interval(padded, roi, overlap))
    rows: List[Tuple[int, list]] = []
    for sl in slices:
        if not rows or rows[-1][0] != sl[0].start:
            if rows and sl[0].start < rows[-1][0]:
                raise AssertionError("MONAI's window order is no longer z-row order")
            rows.append((sl[0].start, []))
        rows[-1][1].append(sl)
    return pad, padded, rows


def softmax_inplace(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 0 of (C, z, y, x) scores without a second full-size copy."""
    scores -= scores.max(dim=0, keepdim=True).values
    scores.exp_()
    scores /= scores.sum(dim=0, keepdim=True)
    return scores


def stream_sliding_window(model: Callable, x: torch.Tensor, roi: Sequence[int], consumer: Callable,
                          overlap: float = 0.25, sw_batch_size: int = 1, slab_planes: int = 0,
                          cancel=None, progress=None) -> int:
    """Run ``model`` over ``x`` (1, 1, z, y, x) in Gaussian-blended windows; feed softmax slabs to
    ``consumer(z0, probs (C, dz, y, x) float32 CPU)`` (see the module docstring). Call it inside
    ``Inference.run`` (no_grad, device, autocast). slab_planes: most planes per slab (0: no limit
    beyond the row). Returns the number of windows run.
    """
    if x.dim() != 5 or x.shape[0] != 1:
        raise ValueError(f"stream_sliding_window needs one (1, channels, z, y, x) volume, got {tuple(x.shape)}")
    from monai.data.utils import compute_importance_map
    roi = tuple(int(r) for r in roi)
    shape = tuple(int(s) for s in x.shape[2:])
    pad, padded, rows = window_lattice(shape, roi, overlap)
    if any(p for pair in pad for p in pair):
        flat = [p for pair in reversed(pad) for p in pair]  # F.pad: last axis first
        x = F.pad(x, flat, mode="constant", value=0.0)
    device, dtype = x.device, x.dtype
    weight = compute_importance_map(roi, mode="gaussian", sigma_scale=SIGMA_SCALE, device=device, dtype=dtype)[None, None]
    depth = roi[0]
    num = den = None
    (z_lo, _), (y_lo, _), (x_lo, _) = pad
    crop_y, crop_x = slice(y_lo, y_lo + shape[1]), slice(x_lo, x_lo + shape[2])
    if hasattr(consumer, "start"):
        consumer.start(None, shape)
    n_windows = 0
    for r, (z_start, windows) in enumerate(rows):
        if cancel is not None:
            cancel.raise_if_cancelled()
        for b in range(0, len(windows), max(1, int(sw_batch_size))):
            batch = windows[b:b + max(1, int(sw_batch_size))]
            win = torch.cat([x[(slice(None), slice(None), *sl)] for sl in batch]) if len(batch) > 1 \
                else x[(slice(None), slice(None), *batch[0])]
            out = model(win)
            if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != roi:
                raise ValueError(f"the model must return (batch, classes, {roi}) scores for a window, "
                                 f"got {getattr(out, 'shape', type(out).__name__)}")
            if num is None:
                num = torch.zeros((1, out.shape[1], depth, padded[1], padded[2]), dtype=dtype, device=device)
                den = torch.zeros((1, 1, depth, padded[1], padded[2]), dtype=dtype, device=device)
            out *= weight.to(dtype)  # as MONAI: in the output's dtype, then added in float32
            for i, sl in enumerate(batch):
                local = (slice(None), slice(None), slice(0, depth), sl[1], sl[2])
                num[local] += out[i:i + 1].to(device)
                den[local] += weight
            n_windows += len(batch)
        z_next = rows[r + 1][0] if r + 1 < len(rows) else padded[0]
        # final planes [z_start, z_next) of the padded grid = buffer planes [0, z_next - z_start)
        a = max(z_start, z_lo)
        end = min(z_next, z_lo + shape[0])
        step = int(slab_planes) if slab_planes and slab_planes > 0 else max(end - a, 1)
        while a < end:
            e = min(end, a + step)
            probs = num[0, :, a - z_start:e - z_start, crop_y, crop_x] / den[0, :, a - z_start:e - z_start, crop_y, crop_x]
            consumer(a - z_lo, softmax_inplace(probs).float().cpu())
            del probs
            a = e
        n = z_next - z_start
        if r + 1 < len(rows) and n > 0:
            keep = depth - n
            if keep > 0:
                num[:, :, :keep] = num[:, :, n:].clone()
                den[:, :, :keep] = den[:, :, n:].clone()
            num[:, :, max(keep, 0):] = 0
            den[:, :, max(keep, 0):] = 0
        if progress is not None:
            progress.event("window_row", stage="network", row=r + 1, rows=len(rows), windows=n_windows)
    return n_windows


class GridCollector:
    """A consumer that assembles the whole (C, z, y, x) float32 probability grid (full memory:
    ``C * z * y * x * 4`` bytes; only for callers that want every class everywhere)."""

    def __init__(self):
        self.probs = None
        self._shape = None

    def start(self, n_classes, shape_zyx) -> None:
        self.probs, self._shape = None, tuple(shape_zyx)

    def __call__(self, z0: int, slab: torch.Tensor) -> None:
        if self.probs is None:
            self.probs = torch.empty((slab.shape[0], *self._shape), dtype=torch.float32)
        self.probs[:, z0:z0 + slab.shape[1]] = slab
