"""The transfer protocol's report: numbers per run, ``results.json``, ``report.md``, ``dice_bars.png``.

Definitions (Dice as a fraction in the JSON, in % in the report, as in the paper):

* **Structure Dice** of a run: the mean over the test cases whose truth holds the structure
  (``gvsl.segeval.evaluate``'s Dice), with its sd over those cases (``ddof=1``; 0 for one case).
* **Per-case mean Dice**: the mean over the structures present in that case's truth
  (``evaluate``'s ``mean_dice``); the run's ``mean_dice`` ± ``sd_dice`` are their mean and sd
  over the test cases. This is the Table-1 number.
* **HD95** (mm): the same two levels, over the structures present in both maps.

The paper's numbers (He et al., CVPR 2023, Table 1, mean Dice %) are printed beside ours,
labelled as the paper's: they come from the full datasets, the paper's budget (2x10^5
pre-training iterations, full-width network), not from this run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from gvsl.progress import json_safe

PAPER_DICE = {  # He et al., CVPR 2023, Table 1: mean Dice % (GVSL pre-trained vs scratch)
    "heart": {"gvsl": {"finetune": 91.2, "linear": 68.4}, "scratch": {"finetune": 87.8, "linear": 21.9}},
    "coronary": {"gvsl": {"finetune": 81.3, "linear": 28.7}, "scratch": {"finetune": 80.4, "linear": 10.0}},
    "brain": {"gvsl": {"finetune": 90.0, "linear": 79.9}, "scratch": {"finetune": 89.7, "linear": 56.4}},
}
PAPER_DATA = {"heart": "MM-WHS CT", "coronary": "ASOCA", "brain": "CANDI"}


def _stats(values: List[float]) -> dict:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def summarise_cases(cases: Dict[str, dict]) -> dict:
    """{case id: {mean_dice, mean_hd95_mm, structures: {name: {dice, hd95_mm, truth_voxels}}}} ->
    dice_per_structure / hd95_per_structure ({name: {mean, sd, n}}), mean_dice, sd_dice,
    mean_hd95_mm, sd_hd95_mm, n_cases (module docstring)."""
    names: List[str] = []
    for c in cases.values():
        names.extend(n for n in c["structures"] if n not in names)
    dice = {n: _stats([c["structures"][n]["dice"] for c in cases.values()
                       if n in c["structures"] and c["structures"][n]["truth_voxels"] > 0]) for n in names}
    hd = {n: _stats([c["structures"][n]["hd95_mm"] for c in cases.values()
                     if n in c["structures"] and c["structures"][n]["truth_voxels"] > 0]) for n in names}
    per_case = _stats([c["mean_dice"] for c in cases.values()])
    per_case_hd = _stats([c["mean_hd95_mm"] for c in cases.values()])
    return {"dice_per_structure": dice, "hd95_per_structure": hd, "mean_dice": per_case["mean"],
            "sd_dice": per_case["sd"], "mean_hd95_mm": per_case_hd["mean"], "sd_hd95_mm": per_case_hd["sd"],
            "n_cases": len(cases)}


def _pct(v, sd=None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _budget(config, channels, splits) -> dict:
    return {"steps": config.steps, "batch_size": config.batch_size, "crop_voxels": config.crop, "lr": config.lr,
            "lr_schedule": config.lr_schedule, "spacing_mm": config.spacing_mm or "the task's (1 mm)",
            "optimizer": "Adam", "loss": "Dice + cross-entropy", "validate_every": config.val_every,
            "kept": "best validation Dice (seg_best.pt)", "seed": config.seed,
            "model_channels": channels or "the published width (32 64 128 256 512 256 128 64 32)",
            "device": config.device, "split": {"rule": splits["rule"], **splits["counts"]}}


def paper_line(task: str) -> str:
    p = PAPER_DICE[task]
    return (f"**The paper's numbers, for reference only** (He et al., CVPR 2023, Table 1, {PAPER_DATA[task]}, mean "
            f"Dice %; their full dataset, budget and full-width network, not this run): GVSL fine-tune "
            f"{p['gvsl']['finetune']}, linear {p['gvsl']['linear']}; scratch fine-tune {p['scratch']['finetune']}, "
            f"linear {p['scratch']['linear']}.")


def report_markdown(config, dataset, splits, runs: List[dict], n_planned: int, status: str, channels) -> str:
    structures: List[str] = []
    for r in runs:
        structures.extend(n for n in r["dice_per_structure"] if n not in structures)
    b = _budget(config, channels, splits)
    c = splits["counts"]
    state = "complete" if status == "done" and len(runs) == n_planned else \
        f"INCOMPLETE ({status}): {len(runs)} of {n_planned} runs finished; run the same command again to resume"
    lines = [f"# GVSL transfer protocol: {config.task}", "",
             f"* Data: `{dataset.root}` ({dataset.layout} layout, {len(dataset.cases)} cases); split "
             f"{splits['rule']} (seed {splits['seed']}): train {c['train']}, val {c['val']}, test {c['test']}"
             + (f", unused {c['unused']}" if c.get("unused") else "") + " (`splits.json`).",
             f"* Budget of every run: {b['steps']} steps of {b['batch_size']} patch(es) of {b['crop_voxels']}^3 voxels, "
             f"Adam lr {b['lr']:g} ({b['lr_schedule']}), grid spacing {b['spacing_mm']} mm, Dice + cross-entropy, validation every {b['validate_every']} steps with the best "
             f"checkpoint kept, seed {b['seed']}, network channels {b['model_channels']}.",
             f"* Status: {state}.", "",
             "## Dice (%) on the test cases", "",
             "| init | mode | " + " | ".join(structures) + " | mean ± sd | HD95 mm |",
             "|---|---|" + "---:|" * (len(structures) + 2)]
    for r in runs:
        cells = [_pct(r["dice_per_structure"].get(n, {}).get("mean")) for n in structures]
        hd = "-" if r.get("mean_hd95_mm") is None else f"{r['mean_hd95_mm']:.2f}"
        lines.append(f"| {r['init']} | {r['mode']} | " + " | ".join(cells) +
                     f" | {_pct(r.get('mean_dice'), r.get('sd_dice'))} | {hd} |")
    lines += ["", "Structure columns: mean Dice over the test cases whose truth holds the structure. mean ± sd: "
              "the per-case mean Dice (over the structures present in the case) averaged over the test cases, sd "
              "over the cases. HD95: 95th-percentile Hausdorff distance in mm, per-case mean over the structures found in "
              "both the prediction and the truth (a structure the model missed has no HD95; its Dice counts as 0).", "",
              paper_line(config.task), "",
              "## Runs", "", "| run | init checkpoint | model used | best val Dice (step) | preprocessing | train s |",
              "|---|---|---|---:|---|---:|"]
    for r in runs:
        best = r.get("best_validation") or {}
        val = f"{_pct(best.get('value'))} ({best.get('step')})" if best.get("value") is not None else "-"
        pre = r.get("preprocessing") or {}
        pre_txt = f"{pre.get('preset', '?')}, {pre.get('spacing_mm', '?')} mm"
        lines.append(f"| {r['run']} | {Path(r['pretrained']).name if r.get('pretrained') else 'none (scratch)'} | "
                     f"{Path(r['checkpoint']).name} ({r.get('checkpoint_is')}) | {val} | {pre_txt} | "
                     f"{r.get('train_seconds', '-')} |")
    notes = list(dataset.notes)
    for r in runs:
        unknown = sum(int(cse.get("unknown_truth_voxels") or 0) for cse in r["cases"].values())
        if unknown:
            notes.append(f"{r['run']}: {unknown} test-truth voxels had label values outside the {config.task} table "
                         "and counted as background.")
            break
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in notes]
    lines += ["", "Files: `results.json` (every number, per case), `dice_bars.png`, `runs/<init>-<mode>/` "
              "(checkpoints, curves, `predictions/`, `results.json`).", ""]
    return "\n".join(lines)


def dice_bars(runs: List[dict], path, title: str = "") -> Path:
    """Two panels: the per-case mean Dice per run (grouped by init, a bar per mode, error bar =
    sd over cases), and Dice per structure (horizontal groups, a bar per run, error bar = sd)."""
    from gvsl.pictures import _new_figure, _save
    inits = list(dict.fromkeys(r["init"] for r in runs))
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    structures: List[str] = []
    for r in runs:
        structures.extend(n for n in r["dice_per_structure"] if n not in structures)
    colour = {i: f"C{k % 10}" for k, i in enumerate(inits)}
    hatch = {m: ("" if k == 0 else "//") for k, m in enumerate(modes)}
    alpha = {m: (1.0 if k == 0 else 0.55) for k, m in enumerate(modes)}
    n_runs = max(len(runs), 1)
    height_struct = min(30.0, 0.8 + len(structures) * (0.16 * n_runs + 0.12))
    fig = _new_figure(10.5, 3.2 + height_struct)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3.2, height_struct]})
    width = 0.8 / max(len(modes), 1)
    for k, m in enumerate(modes):
        for j, i in enumerate(inits):
            r = next((x for x in runs if x["init"] == i and x["mode"] == m), None)
            if r is None or r.get("mean_dice") is None:
                continue
            x = j + (k - (len(modes) - 1) / 2) * width
            top.bar(x, 100 * r["mean_dice"], width * 0.95, yerr=100 * (r.get("sd_dice") or 0), capsize=3,
                    color=colour[i], alpha=alpha[m], hatch=hatch[m], edgecolor="black", linewidth=0.5)
            top.text(x, 100 * r["mean_dice"] + 100 * (r.get("sd_dice") or 0) + 1.5, f"{100 * r['mean_dice']:.1f}",
                     ha="center", va="bottom", fontsize=7)
    top.set_xticks(range(len(inits)), inits, fontsize=9)
    top.set_ylim(0, 112)
    top.set_ylabel("mean Dice (%)", fontsize=9)
    top.set_title("per-case mean Dice on the test cases (error bar: sd over cases)", fontsize=9)
    top.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch
    handles = [Patch(facecolor="white", edgecolor="black", hatch=hatch[m], label=m) for m in modes]
    top.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="mode",
               title_fontsize=8)
    bar_h = 0.8 / n_runs
    ys = np.arange(len(structures))[::-1]
    for k, r in enumerate(runs):
        means = [r["dice_per_structure"].get(n, {}).get("mean") for n in structures]
        sds = [r["dice_per_structure"].get(n, {}).get("sd") or 0 for n in structures]
        y = ys + ((n_runs - 1) / 2 - k) * bar_h
        bottom.barh(y, [100 * (v or 0) for v in means], bar_h * 0.95, xerr=[100 * s for s in sds], capsize=2,
                    color=colour[r["init"]], alpha=alpha[r["mode"]], hatch=hatch[r["mode"]], edgecolor="black",
                    linewidth=0.4, error_kw={"elinewidth": 0.7}, label=f"{r['init']} / {r['mode']}")
    bottom.set_yticks(ys, structures, fontsize=8)
    bottom.set_ylim(-0.6, len(structures) - 0.4)
    bottom.set_xlim(0, 105)
    bottom.set_xlabel("Dice (%)", fontsize=9)
    bottom.set_title("Dice per structure (mean over test cases, error bar: sd)", fontsize=9)
    bottom.grid(True, axis="x", alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="init / mode", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def write_report(out: Path, config, dataset, splits: dict, runs: List[dict], n_planned: int, status: str,
                 channels) -> Dict[str, Path]:
    """Write ``results.json``, ``report.md`` and (with at least one run) ``dice_bars.png`` into
    ``out`` (atomically) -> {results, report, chart}."""
    from gvsl.fsio import atomic_write_text
    out = Path(out)
    complete = status == "done" and len(runs) == n_planned
    record = {"task": config.task, "status": "complete" if complete else "incomplete", "n_runs_planned": n_planned,
              "n_runs_done": len(runs), "data": dataset.to_dict(),
              "split": {"rule": splits["rule"], "seed": splits["seed"], "counts": splits["counts"],
                        "file": str(out / "splits.json")},
              "budget": _budget(config, channels, splits), "paper_dice_percent": PAPER_DICE[config.task],
              "definitions": __doc__.split("Definitions", 1)[1].split("The paper's numbers")[0].strip(),
              "runs": runs}
    files = {"results": atomic_write_text(out / "results.json", json.dumps(json_safe(record), indent=2) + "\n"),
             "report": atomic_write_text(out / "report.md",
                                         report_markdown(config, dataset, splits, runs, n_planned, status, channels))}
    if runs:
        files["chart"] = dice_bars(runs, out / "dice_bars.png", title=f"GVSL transfer protocol: {config.task} "
                                             f"({splits['counts']['test']} test cases, {config.steps} steps per run)")
    return files


__all__ = ["PAPER_DICE", "dice_bars", "paper_line", "report_markdown", "summarise_cases", "write_report"]
