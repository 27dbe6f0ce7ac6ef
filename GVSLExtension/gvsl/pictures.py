"""PNG pictures: a registration overview sheet, loss curves, mid-slice montages.

Matplotlib with the Agg canvas only (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``): no
pyplot, no global state, safe in threads and without a display. Files are written atomically
(:func:`gvsl.fsio.atomic_write`, verified).

Orientation of volume pictures (radiological convention, as Slicer's slice views): a SimpleITK
image is first permuted/flipped to the closest LPS axis order with ``sitk.DICOMOrient`` (no
resampling; an oblique volume is therefore shown in its own, slightly tilted, frame). Then

* axial (mid z): patient right on the picture's left, anterior at the top;
* coronal (mid y): patient right on the left, superior at the top;
* sagittal (mid x): anterior on the left, superior at the top.

Pixels are drawn with their physical size (axes in mm), so anisotropic spacing keeps the true
aspect. Plain NumPy arrays are taken as (z, y, x) with 1 mm voxels in that same frame.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

VIEWS = ("axial", "coronal", "sagittal")
DPI = 100


# ---------------------------------------------------------------------------------------------
# Slicing volumes into display orientation
# ---------------------------------------------------------------------------------------------
class _Volume:
    """A volume in closest-LPS axis order: ``array`` (z, y, x[, 3]) and ``spacing`` (x, y, z) mm.

    Vector volumes (displacements, LPS mm) are re-expressed along the oriented image axes."""

    def __init__(self, image: Union[sitk.Image, np.ndarray]):
        if isinstance(image, sitk.Image):
            if image.GetDimension() != 3:
                raise ValueError(f"pictures need 3D images (got {image.GetDimension()}D); pass a volume.")
            oriented = sitk.DICOMOrient(image, "LPS")
            arr = sitk.GetArrayFromImage(oriented)
            if arr.ndim == 4:
                d_inv = np.linalg.inv(np.array(oriented.GetDirection(), dtype=np.float64).reshape(3, 3))
                arr = arr @ d_inv.T
            self.array = arr
            self.spacing = tuple(float(s) for s in oriented.GetSpacing())
        else:
            arr = _as_numpy(image)
            while arr.ndim > 3 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3:
                raise ValueError(f"pictures need (z, y, x) arrays (got shape {arr.shape}).")
            self.array = arr
            self.spacing = (1.0, 1.0, 1.0)

    @property
    def is_vector(self) -> bool:
        return self.array.ndim == 4

    def view(self, name: str):
        """-> (slice 2D [or (h, w, 3)], extent for imshow(origin='upper'), (u_axis, v_axis, v_sign)).

        ``u_axis``/``v_axis`` index the oriented (x, y, z) component shown horizontally/vertically
        (``v_sign`` -1 where the picture's rows run against the axis)."""
        a = self.array
        sx, sy, sz = self.spacing
        nz, ny, nx = a.shape[:3]
        if name == "axial":
            sl, (w, h), axes = a[nz // 2], (nx * sx, ny * sy), (0, 1, 1.0)
        elif name == "coronal":
            sl, (w, h), axes = a[::-1, ny // 2], (nx * sx, nz * sz), (0, 2, -1.0)
        elif name == "sagittal":
            sl, (w, h), axes = a[::-1, :, nx // 2], (ny * sy, nz * sz), (1, 2, -1.0)
        else:
            raise ValueError(f"unknown view {name!r}; choose one of {VIEWS}")
        return np.asarray(sl), (0.0, w, h, 0.0), axes


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _window(arr: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> tuple:
    finite = np.asarray(arr, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, (lo_pct, hi_pct))
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _scaled(sl: np.ndarray, window: tuple) -> np.ndarray:
    lo, hi = window
    return np.clip((np.asarray(sl, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    h, w = a.shape
    t = max(1, int(math.ceil(max(h, w) / tiles)))
    rr, cc = np.meshgrid(np.arange(h) // t, np.arange(w) // t, indexing="ij")
    return np.where((rr + cc) % 2 == 0, a, b)


def _new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    from gvsl.fsio import atomic_write
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _style(ax, title: Optional[str] = None, ylabel: Optional[str] = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)


# ---------------------------------------------------------------------------------------------
# Registration overview
# ---------------------------------------------------------------------------------------------
def _fmt(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def registration_overview(fixed: sitk.Image, moving: sitk.Image, result, path) -> Path:
    """One PNG sheet for a :class:`gvsl.registration.RegistrationResult` -> the written path.

    Rows: axial / coronal / sagittal mid slices of the fixed grid. Columns: fixed; moving on the
    fixed grid (physical alignment only); warped (affine only); warped (affine + deformable);
    checkerboards fixed/moving before and after; |displacement| in mm (colour bar) with in-plane
    displacement arrows (composite(p) - p, the pull direction: where each fixed point samples
    the moving image); Jacobian determinant (diverging map centred at 1, black contour at 0 =
    folding). The title holds NCC before/affine/after, folding and Dice. A refined result
    (``result.network`` set) gets two more columns, the network's own prediction and its
    checkerboard, beside the refined ones, and the title gives both results' NCC and Dice.
    """
    m = result.metrics
    network = getattr(result, "network", None)
    moving_phys = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, sitk.Transform(3, sitk.sitkIdentity),
                                sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    vols = {
        "fixed": _Volume(fixed),
        "moving": _Volume(moving_phys),
        "affine": _Volume(result.warped_affine),
        "warped": _Volume(result.warped),
        "network": _Volume(network.warped if network is not None else result.warped),
        "disp": _Volume(result.displacement),
        "jac": _Volume(result.jacobian),
    }
    win_f = _window(vols["fixed"].array)
    win_m = _window(np.concatenate([vols["moving"].array.ravel(), vols["warped"].array.ravel()]))
    mag = np.sqrt((vols["disp"].array ** 2).sum(-1))
    mag_max = max(float(mag.max()), 1e-6)
    jac = vols["jac"].array
    j_lo = min(float(jac.min()), 1.0 - 1e-3)
    j_hi = max(float(jac.max()), 1.0 + 1e-3)
    jnorm = TwoSlopeNorm(vcenter=1.0, vmin=j_lo, vmax=j_hi)

    if network is None:
        columns = ["fixed", "moving (physical)", "warped: affine", "warped: affine + deformable",
                   "checkerboard before", "checkerboard after", "|displacement| (mm)", "Jacobian det"]
    else:
        columns = ["fixed", "moving (physical)", "warped: affine", "warped: network prediction",
                   f"warped: refined ({m.get('refine', {}).get('steps', '?')} steps)", "checkerboard before",
                   "checkerboard: network", "checkerboard: refined", "|displacement| (mm)", "Jacobian det"]
    c_disp, c_jac = len(columns) - 2, len(columns) - 1
    fig = _new_figure(2.25 * len(columns) + 1.0, 2.35 * len(VIEWS) + 0.9)
    axes = fig.subplots(len(VIEWS), len(columns), squeeze=False)
    mag_im = jac_im = None
    arrow_note = ""
    for r, view in enumerate(VIEWS):
        fixed_sl, extent, (ua, va, vsign) = vols["fixed"].view(view)
        mov_sl = vols["moving"].view(view)[0]
        aff_sl = vols["affine"].view(view)[0]
        war_sl = vols["warped"].view(view)[0]
        gray = dict(cmap="gray", vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest")
        f_s, m_s = _scaled(fixed_sl, win_f), _scaled(mov_sl, win_m)
        a_s, w_s = _scaled(aff_sl, win_m), _scaled(war_sl, win_m)
        if network is None:
            panels = [f_s, m_s, a_s, w_s, _checkerboard(f_s, m_s), _checkerboard(f_s, w_s)]
        else:
            n_s = _scaled(vols["network"].view(view)[0], win_m)
            panels = [f_s, m_s, a_s, n_s, w_s, _checkerboard(f_s, m_s), _checkerboard(f_s, n_s),
                      _checkerboard(f_s, w_s)]
        for c, img in enumerate(panels):
            axes[r, c].imshow(img, **gray)
        # displacement magnitude + arrows (true mm scale unless too small to see)
        ax = axes[r, c_disp]
        vec = vols["disp"].view(view)[0]
        mag_sl = np.sqrt((vec ** 2).sum(-1))
        mag_im = ax.imshow(mag_sl, cmap="magma", vmin=0.0, vmax=mag_max, extent=extent, interpolation="nearest")
        h, w = mag_sl.shape
        step = max(1, int(round(max(h, w) / 12)))
        rows, cols = np.arange(step // 2, h, step), np.arange(step // 2, w, step)
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        px = extent[1] / w
        py = extent[2] / h
        uu = vec[rr, cc, ua]
        vv = vec[rr, cc, va] * vsign
        spacing_mm = step * min(px, py)
        longest = float(np.sqrt(uu ** 2 + vv ** 2).max()) if uu.size else 0.0
        k = 1.0 if longest >= 0.3 * spacing_mm or longest == 0 else 0.8 * spacing_mm / longest
        if k != 1.0:
            arrow_note = f"arrows x{k:.3g}"
        ax.quiver((cc + 0.5) * px, (rr + 0.5) * py, uu * k, vv * k, angles="xy", scale_units="xy", scale=1.0,
                  color="cyan", width=0.006, headwidth=3.5)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        # Jacobian
        ax = axes[r, c_jac]
        j_sl = vols["jac"].view(view)[0]
        jac_im = ax.imshow(j_sl, cmap="RdBu_r", norm=jnorm, extent=extent, interpolation="nearest")
        if (j_sl <= 0).any():
            yy = (np.arange(h) + 0.5) * py
            xx = (np.arange(w) + 0.5) * px
            ax.contour(xx, yy, j_sl, levels=[0.0], colors="black", linewidths=0.8)
        for c in range(len(columns)):
            _style(axes[r, c], columns[c] if r == 0 else None, view if c == 0 else None)
            axes[r, c].set_aspect("equal")
    cb = fig.colorbar(mag_im, ax=list(axes[:, c_disp]), location="bottom", shrink=0.9, pad=0.01, aspect=15)
    cb.set_label("mm" + (f"; {arrow_note}" if arrow_note else "; arrows: true length"), fontsize=8)
    cb.ax.tick_params(labelsize=7)
    cb = fig.colorbar(jac_im, ax=list(axes[:, c_jac]), location="bottom", shrink=0.9, pad=0.01, aspect=15)
    cb.set_label("det J (1 = volume kept, black line: 0)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    title = (f"NCC before {_fmt(m.get('ncc_before'))}  ->  affine {_fmt(m.get('ncc_affine'))}  ->  after "
             f"{_fmt(m.get('ncc_after'))}     folding {_fmt(m.get('folding_percent'), '{:.2f}')}%  "
             f"(det J {_fmt(m.get('jacobian_min'), '{:.2f}')} .. {_fmt(m.get('jacobian_max'), '{:.2f}')})     "
             f"max |u| {_fmt(m.get('max_displacement_mm'), '{:.1f}')} mm")
    if m.get("dice_after"):
        title += (f"     Dice {_fmt(m['dice_before'].get('mean'))} -> {_fmt(m['dice_after'].get('mean'))}")
    if network is not None:
        title += (f"\nnetwork prediction: NCC {_fmt(m.get('ncc_network'))}"
                  + (f", Dice {_fmt(m['dice_network'].get('mean'))}" if isinstance(m.get('dice_network'), dict) else "")
                  + f"   ->   refined on this pair: NCC {_fmt(m.get('ncc_after'))}"
                  + (f", Dice {_fmt(m['dice_after'].get('mean'))}" if m.get("dice_after") else ""))
    sub = (f"radiological display (patient right on the left); network grid "
           f"{'x'.join(str(v) for v in m.get('network_grid_size', []))} at {m.get('network_spacing_mm', '?')} mm, "
           f"{m.get('device', '')} {m.get('precision', '')}")
    fig.suptitle(title + "\n" + sub, fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Loss curves and generic montages
# ---------------------------------------------------------------------------------------------
def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points (shrinking at the ends, no lag); non-finite
    values are skipped."""
    ok = np.isfinite(values)
    v = np.where(ok, values, 0.0)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    half = window // 2
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    cnt = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (csum[hi] - csum[lo]) / np.maximum(cnt, 1), np.nan)


def loss_curve(history: Dict[str, Sequence[float]], steps: Sequence[int], path, title: str = "") -> Path:
    """One PNG with a panel per loss term vs step: raw values faint, a centred moving average
    (about 1/25 of the points) solid; log-y when all finite values are positive and span at
    least a factor 3 (a narrower range reads better on a linear axis). Each history list aligns
    with ``steps`` (a shorter list is aligned with the last steps)."""
    terms = [k for k, v in history.items() if len(v)]
    if not terms:
        raise ValueError("loss_curve needs at least one non-empty history entry.")
    steps = np.asarray(list(steps), dtype=np.float64)
    ncols = min(len(terms), 4)
    nrows = int(math.ceil(len(terms) / ncols))
    fig = _new_figure(3.6 * ncols, 2.8 * nrows + (0.4 if title else 0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, name in zip(axes, terms):
        y = np.asarray(list(history[name]), dtype=np.float64)
        x = steps[-len(y):] if len(steps) >= len(y) else np.arange(len(y), dtype=np.float64)
        ax.plot(x, y, color="C0", alpha=0.25, linewidth=0.8, label="raw")
        ax.plot(x, _smooth(y, max(1, len(y) // 25)), color="C0", linewidth=1.8, label="smoothed")
        finite = y[np.isfinite(y)]
        if finite.size and (finite > 0).all() and finite.max() >= 3.0 * finite.min():
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3, which="both")
        if finite.size:
            ax.annotate(f"last {finite[-1]:.4g}", xy=(0.98, 0.95), xycoords="axes fraction", ha="right",
                        va="top", fontsize=8)
    for ax in axes[len(terms):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def slices_sheet(images: Dict[str, Union[np.ndarray, sitk.Image]], path, title: str = "") -> Path:
    """Mid-slice montage: a column per image (axial / coronal / sagittal rows), each image with
    its own 1-99 percentile window. SimpleITK images use their spacing and closest-LPS
    orientation; arrays are (z, y, x) (leading singleton axes dropped, e.g. (1, 1, z, y, x)),
    1 mm voxels; vector images show their magnitude."""
    if not images:
        raise ValueError("slices_sheet needs at least one image.")
    vols = {name: _Volume(img) for name, img in images.items()}
    fig = _new_figure(2.4 * len(vols) + 0.4, 2.4 * len(VIEWS) + (0.5 if title else 0.2))
    axes = fig.subplots(len(VIEWS), len(vols), squeeze=False)
    for c, (name, vol) in enumerate(vols.items()):
        arr = np.sqrt((vol.array ** 2).sum(-1)) if vol.is_vector else vol.array
        win = _window(arr)
        for r, view in enumerate(VIEWS):
            sl, extent, _ = vol.view(view)
            if vol.is_vector:
                sl = np.sqrt((sl ** 2).sum(-1))
            axes[r, c].imshow(_scaled(sl, win), cmap="gray", vmin=0, vmax=1, extent=extent,
                              interpolation="nearest")
            _style(axes[r, c], name if r == 0 else None, view if c == 0 else None)
            axes[r, c].set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
