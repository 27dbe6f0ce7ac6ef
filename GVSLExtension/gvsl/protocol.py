"""The paper's transfer protocol as one command: ``gvsl protocol`` / :func:`run_protocol`.

GVSL's claim (He et al., CVPR 2023, Table 1) is that its pre-trained backbone transfers better
than no pre-training, measured by fine-tuning (all weights) and linear evaluation (frozen
backbone) on three tasks. This module runs that comparison on the user's copy of a dataset:

1. **Data** (:mod:`gvsl.datasets`): MM-WHS CT, ASOCA, CANDI or a plain images/labels folder.
2. **Split** (:func:`gvsl.datasets.make_splits`): the paper's train/val/test numbers per task
   (:data:`PAPER_SPLITS`: heart 15/5/rest, coronary 15/5/20, brain 40/20/43; ``rest`` = all
   remaining cases, at least 1), or ``--split``; a NumPy ``default_rng(seed)`` permutation of the
   cases sorted by id. Written to ``<out>/splits.json`` (ids and paths per split, seed, rule);
   a re-run with a different split of the same folder is refused.
3. **Runs**: every initialisation (each ``--pretrained`` checkpoint, named by its file stem, and
   ``scratch``) x every mode (``finetune``, ``linear``) is one :func:`gvsl.segtrain.finetune` on the
   train cases with the val cases for validation (``seg_best.pt`` kept), with the same steps,
   crop, batch, lr, seed and network width for all (scratch takes the pre-trained backbone's width
   unless ``--model-channels``); the preprocessing is the task's default (ct for heart/coronary,
   mr for brain) unless the checkpoint records its own spec (segtrain's rule). Then every test
   case is segmented with the best checkpoint (:func:`gvsl.seginfer.segment`) and evaluated
   (:func:`gvsl.segeval.evaluate`: Dice and HD95 per structure). Each run lives in
   ``<out>/runs/<init>-<mode>/`` (the trainer's files, ``predictions/<case>.nii.gz``,
   ``results.json``).
4. **Resume**: a run whose ``results.json`` is complete (and was made with the same settings) is
   skipped, saying so; an interrupted training continues exactly from its ``seg_last.pt``. Cancel
   (a :class:`CancelToken`, ``--cancel-file``, SIGINT/SIGTERM) stops after the current step or
   test case; completed runs stay, and the report then covers them (marked incomplete).
   ``--overwrite`` redoes every run (each run's earlier folder is removed when that run starts).
5. **Report** (:mod:`gvsl.protocol_report`): ``results.json``, ``report.md`` (a Table-1-like
   table and the paper's numbers, labelled as such), ``dice_bars.png``. All writes atomic.

Progress: a ``stage`` event per run (``run``, ``skipped`` or ``test``) from the ``protocol`` task,
plus the trainer's own ``finetune`` events.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gvsl.datasets import (PAPER_SPLITS, TASK_OF_LAYOUT, Dataset, DatasetLayoutError, SplitError, make_splits,
                           parse_split, read_dataset)
from gvsl.errors import GVSLError
from gvsl.progress import CancelToken, Progress, cancel_on_signals, json_safe

TASKS = ("heart", "coronary", "brain")
MODES = ("finetune", "linear")
SCRATCH = "scratch"
RESULTS = ("splits.json", "results.json", "report.md", "dice_bars.png", "remap.tsv")


class ProtocolError(GVSLError, ValueError):
    """A protocol option or state that the user can fix; the message says how."""


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------
@dataclass
class ProtocolConfig:
    """Options of ``gvsl protocol`` (see :func:`run_protocol`)."""

    task: str
    data: str
    out: str
    pretrained: List[str] = field(default_factory=list)
    layout: str = "auto"
    split: Optional[str] = None          # default: PAPER_SPLITS[task]
    seed: int = 0
    steps: int = 2000
    crop: int = 96
    batch_size: int = 2
    lr: float = 1e-4
    lr_schedule: str = "constant"        # the paper's; "poly" (nnU-Net's decay) for short runs
    spacing_mm: Optional[float] = None   # default: the task's preprocessing spacing (1 mm)
    val_every: Optional[int] = None      # default: max(1, steps // 10)
    modes: List[str] = field(default_factory=lambda: list(MODES))
    model_channels: Optional[List[int]] = None
    device: str = "auto"
    precision: str = "auto"
    ignore_unknown_labels: bool = False
    progress: str = "bar"
    overwrite: bool = False

    def __post_init__(self):
        if self.task not in TASKS:
            raise ProtocolError(f"--task must be one of {', '.join(TASKS)} (got {self.task!r}).")
        self.data = str(Path(self.data).expanduser().absolute())
        self.out = str(Path(self.out).expanduser().absolute())
        if isinstance(self.pretrained, (str, Path)):
            self.pretrained = [self.pretrained]
        self.pretrained = [str(Path(p).expanduser().absolute()) for p in (self.pretrained or [])]
        if isinstance(self.modes, str):
            self.modes = [m.strip() for m in self.modes.split(",") if m.strip()]
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ProtocolError(f"--modes must be a comma-separated list of {', '.join(MODES)} (got {self.modes!r}).")
        self.modes = list(dict.fromkeys(self.modes))
        self.split = self.split or PAPER_SPLITS[self.task]
        parse_split(self.split)
        if self.val_every is None:
            self.val_every = max(1, int(self.steps) // 10)
        if self.progress not in ("json", "bar", "none"):
            raise ProtocolError(f"--progress must be json, bar or none (got {self.progress!r}).")

    def to_dict(self) -> dict:
        return asdict(self)


def init_names(pretrained: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """[(run name, checkpoint path or None)]: each checkpoint by file stem (``<folder>-<stem>``
    when stems repeat, then numbered), then ``scratch``."""
    stems = [Path(p).name.split(".")[0] or "pretrained" for p in pretrained]
    names = []
    for p, stem in zip(pretrained, stems):
        name = stem if stems.count(stem) == 1 else f"{Path(p).parent.name}-{stem}"
        name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        if name == SCRATCH:
            name = "scratch-pretrained"
        base, k = name, 2
        while name in [n for n, _ in names]:
            name, k = f"{base}-{k}", k + 1
        names.append((name, p))
    return names + [(SCRATCH, None)]


def _network_channels(config: ProtocolConfig) -> Optional[List[int]]:
    """One width for every run: --model-channels, else the pre-trained backbones' (all equal)."""
    from gvsl.checkpoint import CheckpointError, load_checkpoint
    widths = {}
    for path in config.pretrained:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            raise ProtocolError(f"--pretrained: {exc}") from None
        widths[path] = list(ckpt.get("model_config", {}).get("channels") or [])
    if config.model_channels:
        return list(config.model_channels)
    distinct = {tuple(w) for w in widths.values()}
    if len(distinct) > 1:
        listing = "; ".join(f"{Path(p).name}: {w}" for p, w in widths.items())
        raise ProtocolError(f"the --pretrained checkpoints have different network widths ({listing}); one protocol "
                            "compares one width (scratch trains that width too): run it once per width.")
    return list(distinct.pop()) if distinct else None


# ---------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------
def _roundtrip(value):
    return json.loads(json.dumps(json_safe(value)))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class _Protocol:
    """The state of one :func:`run_protocol` call."""

    def __init__(self, config: ProtocolConfig, dataset: Dataset, splits: dict, channels, remap_path,
                 progress: Progress, callback, cancel: CancelToken):
        self.config, self.dataset, self.splits = config, dataset, splits
        self.channels, self.remap_path = channels, remap_path
        self.progress, self.callback, self.cancel = progress, callback, cancel
        self.out = Path(config.out)

    def settings(self, pretrained: Optional[str], mode: str) -> dict:
        c = self.config
        return _roundtrip({
            "task": c.task, "layout": self.dataset.layout, "pretrained": pretrained, "mode": mode,
            "steps": c.steps, "crop": c.crop, "batch_size": c.batch_size, "lr": c.lr, "lr_schedule": c.lr_schedule,
            "spacing_mm": c.spacing_mm, "seed": c.seed, "val_every": c.val_every, "model_channels": self.channels, "precision": c.precision,
            "ignore_unknown_labels": self.dataset.ignore_unknown, "remap": self.dataset.remap,
            "split": {k: [e["id"] for e in self.splits[k]] for k in ("train", "val", "test")}})

    def run(self, index: int, total: int, name: str, pretrained: Optional[str], mode: str) -> Optional[dict]:
        """Train + test one init x mode -> its results (None when cancelled)."""
        from gvsl.segtrain import FinetuneConfig, finetune
        c = self.config
        run_name = f"{name}-{mode}"
        folder = self.out / "runs" / run_name
        settings = self.settings(pretrained, mode)
        saved = _read_json(folder / "results.json")
        if saved is not None and saved.get("complete") and not c.overwrite:
            if saved.get("settings") != settings:
                changed = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
                raise ProtocolError(
                    f"{folder} holds a finished run made with other settings ({', '.join(changed)} differ): "
                    "pass --overwrite to redo every run, or choose another --out.")
            self.progress.event("stage", stage="skipped", run=run_name, index=index, total=total,
                                message=f"run {index}/{total} {run_name}: already complete "
                                        f"({folder / 'results.json'}), skipped")
            return saved
        if c.overwrite and folder.exists():
            shutil.rmtree(folder)
        resume = (folder / "seg_last.pt").exists()
        # a run that stopped before its first checkpoint left nothing to resume (config.json at most)
        restart = folder.exists() and not resume
        self.progress.event("stage", stage="run", run=run_name, index=index, total=total, resume=resume,
                            message=f"run {index}/{total} {run_name}: {mode} from "
                                    f"{Path(pretrained).name if pretrained else 'scratch'}, {c.steps} steps"
                                    + (" (resuming its seg_last.pt)" if resume else ""))
        split = self.splits
        cfg = FinetuneConfig(
            task=c.task, images=[e["image"] for e in split["train"]], labels=[e["label"] for e in split["train"]],
            val_images=[e["image"] for e in split["val"]] or None, val_labels=[e["label"] for e in split["val"]] or None,
            out=str(folder), pretrained=pretrained, mode=mode, steps=c.steps, crop=c.crop, batch_size=c.batch_size,
            lr=c.lr, lr_schedule=c.lr_schedule, spacing_mm=c.spacing_mm, validate_every=c.val_every,
            save_every=c.val_every,
            ignore_unknown_labels=self.dataset.ignore_unknown, remap=self.remap_path, device=c.device,
            precision=c.precision, seed=c.seed, progress=c.progress, resume=resume, overwrite=restart,
            model_channels=self.channels)
        t0 = time.perf_counter()
        summary = finetune(cfg, callback=self.callback, cancel=self.cancel)
        train_s = time.perf_counter() - t0
        if summary["status"] != "done":
            return None
        best = folder / "seg_best.pt"
        checkpoint_path = best if best.exists() else Path(summary["checkpoint"])
        tested = self.test(run_name, folder, checkpoint_path, index, total)
        if tested is None:
            return None
        from gvsl.protocol_report import summarise_cases
        from gvsl.checkpoint import load_checkpoint
        ckpt = load_checkpoint(checkpoint_path)
        result = {"complete": True, "run": run_name, "init": name, "pretrained": pretrained, "mode": mode,
                  "settings": settings, "checkpoint": str(checkpoint_path),
                  "checkpoint_is": "best validation" if checkpoint_path == best else "final (no validation ran)",
                  "best_validation": summary.get("best"), "train_seconds": round(train_s, 2),
                  "device": summary.get("device"), "preprocessing": ckpt.get("preprocessing"),
                  "cases": tested, **summarise_cases(tested)}
        from gvsl.fsio import atomic_write_text
        atomic_write_text(folder / "results.json", json.dumps(json_safe(result), indent=2) + "\n")
        return _roundtrip(result)

    def test(self, run_name: str, folder: Path, checkpoint_path: Path, index: int, total: int) -> Optional[dict]:
        """Segment + evaluate every test case -> {case id: metrics} (None when cancelled)."""
        from gvsl.checkpoint import load_model
        from gvsl.io import read_volume, write_image_atomic
        from gvsl.progress import Cancelled
        from gvsl.segdata import SegmentationDataError
        from gvsl.segeval import evaluate
        from gvsl.seginfer import segment
        model = load_model(checkpoint_path, "cpu", kind="segmentation")
        cases = {}
        tests = self.splits["test"]
        for k, entry in enumerate(tests, start=1):
            if self.cancel.cancelled:
                return None
            self.progress.event("stage", stage="test", run=run_name, index=index, total=total, case=entry["id"],
                                message=f"run {index}/{total} {run_name}: test case {k}/{len(tests)} {entry['id']}")
            try:
                image = read_volume(entry["image"])
                pred = segment(image, model, self.config.device, precision=self.config.precision,
                               cancel=self.cancel).labels
                truth = read_volume(entry["label"])
                metrics = evaluate(pred, truth, self.config.task, ignore_unknown=self.dataset.ignore_unknown,
                                   remap=self.dataset.remap)
            except Cancelled:
                return None
            except SegmentationDataError as exc:
                raise ProtocolError(f"test case {entry['id']} ({entry['label']}): {exc}") from None
            path = write_image_atomic(pred, folder / "predictions" / f"{entry['id']}.nii.gz")
            cases[entry["id"]] = {"prediction": str(path), "mean_dice": metrics["mean_dice"],
                                  "mean_hd95_mm": metrics["mean_hd95_mm"],
                                  "unknown_truth_voxels": metrics.get("unknown_truth_voxels", 0),
                                  "structures": {n: {"dice": m["dice"], "hd95_mm": m["hd95_mm"],
                                                     "truth_voxels": m["truth_voxels"]}
                                                 for n, m in metrics["structures"].items()}}
        return cases


# ---------------------------------------------------------------------------------------
# the whole protocol
# ---------------------------------------------------------------------------------------
def _check_out_vs_data(config: ProtocolConfig) -> None:
    out, data = Path(config.out).resolve(), Path(config.data).resolve()
    if out == data or data in out.parents:
        raise ProtocolError(f"--out {config.out} lies inside --data {config.data}: the predictions would mix with "
                            "the dataset (and be read as cases next time). Choose an --out outside --data.")


def _write_splits(out: Path, splits: dict, dataset: Dataset, overwrite: bool) -> Path:
    from gvsl.fsio import atomic_write_text
    path = out / "splits.json"
    record = _roundtrip({**splits, "layout": dataset.layout, "data": str(dataset.root)})
    previous = _read_json(path)
    if previous is not None and not overwrite:
        def ids(rec, k):
            return [e.get("id") for e in rec.get(k) or []]
        if any(ids(previous, k) != ids(record, k) for k in ("train", "val", "test")) or \
                (previous.get("rule"), previous.get("seed")) != (record["rule"], record["seed"]):
            raise ProtocolError(f"{path} holds another split (rule {previous.get('rule')}, seed {previous.get('seed')}, "
                                f"{previous.get('n_cases')} cases) than this run's (rule {record['rule']}, seed "
                                f"{record['seed']}, {record['n_cases']} cases): the data, --split or --seed changed. "
                                "Pass --overwrite to start over, or choose another --out.")
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def _remap_file(out: Path, remap: Dict[int, int]) -> Optional[str]:
    if not remap:
        return None
    from gvsl.fsio import atomic_write_text
    text = "source\ttarget\n" + "".join(f"{k}\t{v}\n" for k, v in sorted(remap.items()))
    return str(atomic_write_text(out / "remap.tsv", text))


def run_protocol(config: Optional[ProtocolConfig] = None, callback: Optional[Callable[[dict], None]] = None,
                 cancel: Optional[CancelToken] = None, **options) -> dict:
    """Run the transfer protocol: ``run_protocol(ProtocolConfig(...))`` or ``run_protocol(task=...,
    data=..., out=..., pretrained=[...], **options)`` (the fields of :class:`ProtocolConfig`).

    Returns {status ("done" | "cancelled"), out, splits, results, report, chart, runs: [per-run
    results], skipped: [run names]}. ``callback`` receives every progress record (protocol stages
    and the trainer's events); ``cancel`` (or SIGINT/SIGTERM in the main thread) stops cleanly.
    """
    from gvsl.outputs import RunFolder
    from gvsl.protocol_report import write_report
    if config is None:
        config = ProtocolConfig(**options)
    elif options:
        raise TypeError("pass either a ProtocolConfig or keyword options, not both")
    cancel = cancel or CancelToken()
    progress = Progress(1, mode=config.progress, callback=callback, task="protocol")
    dataset = read_dataset(config.data, config.layout, task=config.task, ignore_unknown=config.ignore_unknown_labels)
    expected = TASK_OF_LAYOUT.get(dataset.layout)
    if expected and expected != config.task:
        progress.event("warning", message=f"the {dataset.layout} layout holds {expected} data but --task is "
                                          f"{config.task}: its labels are read with the {config.task} table")
    splits = make_splits(dataset.cases, config.split, config.seed)
    _check_out_vs_data(config)
    channels = _network_channels(config)
    runs = [(name, path, mode) for name, path in init_names(config.pretrained) for mode in config.modes]
    progress.total = len(runs)
    results: List[dict] = []
    skipped: List[str] = []
    status = "done"
    with cancel_on_signals(cancel):
        with RunFolder(config.out, "protocol", inputs={"--data": config.data, "--pretrained": config.pretrained},
                       overwrite=config.overwrite, resume=not config.overwrite, lock=True, results=RESULTS):
            out = Path(config.out)
            splits_path = _write_splits(out, splits, dataset, config.overwrite)
            remap_path = _remap_file(out, dataset.remap)
            progress.event("start", task_name=config.task, layout=dataset.layout, n_cases=len(dataset.cases),
                           counts=splits["counts"], runs=[f"{n}-{m}" for n, _, m in runs], splits=str(splits_path),
                           notes=dataset.notes)
            state = _Protocol(config, dataset, splits, channels, remap_path, progress, callback, cancel)
            for i, (name, path, mode) in enumerate(runs, start=1):
                if cancel.cancelled:
                    status = "cancelled"
                    break
                was_complete = (_read_json(out / "runs" / f"{name}-{mode}" / "results.json") or {}).get("complete")
                result = state.run(i, len(runs), name, path, mode)
                if result is None:
                    status = "cancelled"
                    break
                if was_complete and not config.overwrite:
                    skipped.append(result["run"])
                results.append(result)
                progress.update(i, run=result["run"], mean_dice=result.get("mean_dice"))
            files = write_report(out, config, dataset, splits, results, n_planned=len(runs), status=status,
                                 channels=channels)
    summary = {"status": status, "out": config.out, "splits": str(splits_path), **{k: str(v) for k, v in files.items()},
               "runs": [{"run": r["run"], "mean_dice": r.get("mean_dice"), "sd_dice": r.get("sd_dice")} for r in results],
               "skipped": skipped}
    if status == "cancelled":
        summary["stopped_by"] = cancel.reason or "request"
    progress.event(status, **summary)
    return summary


def run_cli(args) -> int:
    """Handler of ``gvsl protocol``."""
    config = ProtocolConfig(
        task=args.task, data=args.data, out=args.out, pretrained=args.pretrained or [], layout=args.layout,
        split=args.split, seed=args.seed, steps=args.steps, crop=args.crop, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, spacing_mm=args.spacing, val_every=args.val_every, modes=args.modes, model_channels=args.model_channels, device=args.device,
        precision=args.precision, ignore_unknown_labels=args.ignore_unknown_labels, progress=args.progress,
        overwrite=args.overwrite)
    summary = run_protocol(config, cancel=CancelToken(watch_file=getattr(args, "cancel_file", None)))
    if args.progress != "json":
        lines = [f"{r['run']}: mean Dice {r['mean_dice']:.4f}" if r["mean_dice"] is not None else
                 f"{r['run']}: no Dice (no structure in the test truth)" for r in summary["runs"]]
        print("\n".join(lines + [f"{k}: {summary[k]}" for k in ("report", "chart", "results") if k in summary]))
    if summary["status"] == "cancelled":
        print(f"protocol stopped by {summary['stopped_by']}; run the same command again to resume "
              f"(completed runs are skipped)")
        return 130 if summary["stopped_by"] == "SIGINT" else 143
    return 0


__all__ = ["PAPER_SPLITS", "DatasetLayoutError", "ProtocolConfig", "ProtocolError", "SplitError", "init_names",
           "make_splits", "parse_split", "run_protocol"]
