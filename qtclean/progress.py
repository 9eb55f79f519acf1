"""Progress and summaries on stderr (rich on a terminal; plain lines when stderr is not a TTY or NO_COLOR is set).

The library reports through a ``progress(event, **info)`` callback; :class:`Reporter` is the CLI's callback.
Nothing here writes to stdout.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def make_console() -> Console:
    """The one stderr console; no colour or live display when NO_COLOR is set or stderr is not a terminal."""
    plain = bool(os.environ.get("NO_COLOR")) or not sys.stderr.isatty()
    return Console(stderr=True, no_color=plain, highlight=False, force_terminal=None if not plain else False,
                   soft_wrap=True)


def is_live(console: Console) -> bool:
    return console.is_terminal and not console.no_color


class Reporter:
    """Turns scan events into a phase line, a bar per epoch (img/s, live quarantine counts) or plain lines."""

    def __init__(self, console: Console):
        self.console = console
        self.live = is_live(console)
        self.progress: Progress | None = None
        self.task = None
        self.epoch_t0 = 0.0
        self.seen = 0
        self.last_quarantined = ""

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _bar(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                                     TextColumn("{task.fields[note]}"), console=self.console, transient=False)
            self.progress.start()
        return self.progress

    def __call__(self, event: str, **info) -> None:
        handler = getattr(self, f"on_{event}", None)
        if handler is not None:
            handler(**info)

    def on_phase(self, name: str, **info) -> None:
        detail = f" ({info['epochs']} epochs)" if "epochs" in info else (f": {info['path']}" if "path" in info else "")
        if "why" in info:  # a phase the run chose to add (the second quarantine pass)
            detail += f": {info['why']}"
        self.close()
        self.console.print(f"[bold]{name}[/bold]{detail}" if self.live else f"{name}{detail}")

    def on_loaded(self, num_samples: int, num_classes: int, image_shape, unreadable: int, format: str) -> None:
        c, h, w = image_shape
        msg = f"{num_samples} images, {num_classes} classes, {c}x{h}x{w}, format {format}"
        if unreadable:
            msg += f", {unreadable} unreadable (see unreadable.csv)"
        self.console.print(msg)

    def on_epoch_start(self, phase: str, epoch: int, total: int, num_samples: int) -> None:
        self.epoch_t0 = time.perf_counter()
        self.seen = 0
        if self.live:
            bar = self._bar()
            self.task = bar.add_task(f"{phase} {epoch}/{total}", total=num_samples, speed="",
                                     note=self.last_quarantined)

    def on_batch(self, n: int) -> None:
        self.seen += n
        if self.live and self.task is not None:
            rate = self.seen / max(time.perf_counter() - self.epoch_t0, 1e-9)
            self.progress.update(self.task, advance=n, speed=f"{rate:,.0f} img/s")

    def on_epoch_end(self, **stat) -> None:
        note = ""
        if "quarantined" in stat:
            note = f"quarantined {stat['quarantined']}"
            if stat.get("releases"):
                note += ", released " + ", ".join(f"class {r['class']} ({r['released']})" for r in stat["releases"])
        elif "pre_quarantine_size" in stat:
            note = f"pre-quarantine set {stat['pre_quarantine_size']}"
            expanded = [f"class {c} {e['seed']} -> {e['group']}" for c, e in stat.get("seed_expansion", {}).items()
                        if e["accepted"]]
            if expanded:
                note += " (seed expanded: " + ", ".join(expanded) + ")"
        self.last_quarantined = note
        if self.live and self.task is not None:
            self.progress.update(self.task, note=note, speed=f"{stat['img_per_s']:,.0f} img/s")
        else:
            self.console.print(f"  {stat['phase']} epoch {stat['epoch']}: loss {stat['loss']:.4f}, "
                               f"{stat['img_per_s']:,.0f} img/s, {stat['seconds']:.1f}s"
                               + (f", {note}" if note else ""))


def summary_table(run) -> Table:
    """Samples, flagged per class, time and the RUN path."""
    ds, res = run.dataset, run.result
    method = run.run_info["settings"].get("method", "qt")
    title = "qtclean scan" if method == "qt" else f"qtclean scan --method {method} (baseline)"
    table = Table(title=title, title_justify="left")
    table.add_column("class")
    table.add_column("samples", justify="right")
    table.add_column("flagged", justify="right")
    table.add_column("share", justify="right")
    per_class = run.run_info["flagged_per_class"]
    import numpy as np

    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    for k, name in enumerate(ds.classes):
        share = per_class[k] / counts[k] if counts[k] else 0.0
        table.add_row(f"{k} {name}", str(int(counts[k])), str(per_class[k]), f"{share:.1%}")
    total_flagged = int(res.flagged.sum())
    table.add_row("all", str(ds.num_samples), str(total_flagged), f"{total_flagged / max(ds.num_samples, 1):.1%}",
                  style="bold")
    withdrawn = run.run_info.get("flags_withdrawn")
    kept = run.run_info.get("flags_kept_relabelled")
    outliers = sum(run.run_info.get("score_outliers", {}).get("added_per_class", {}).values())
    own_looking = [sum(run.run_info.get("own_looking_flags", {}).get(key, {}).values())
                   for key in ("withdrawn_per_class", "added_per_class")]
    elsewhere = sum(run.run_info.get("flagged_in_another_quarantine_class", []))
    by_residual = sum(run.run_info.get("trigger_residual", {}).get("added_per_class", {}).values())
    residual_completed = sum(run.run_info.get("trigger_residual", {}).get("completed_per_class", {}).values())
    trigger_free = sum(run.run_info.get("trigger_free_flags", {}).get("withdrawn_per_class", {}).values())
    lookalikes = sum(v["added"] for v in run.run_info.get("confident_lookalikes", {}).values())
    by_class_residual = sum(v["added"] for v in run.run_info.get("residual_in_flagged_classes", {}).values())
    residual_ranked = run.run_info.get("residual_ranked_scores", {}).get("ranked", False)
    class_bound = sum(v["added"] for v in run.run_info.get("class_bound_blocks", {}).get("per_class", {}).values())
    by_values = sum(run.run_info.get("value_residual", {}).get("added_per_class", {}).values())
    against_values = sum(run.run_info.get("value_move", {}).get("withdrawn_per_class", {}).values())
    common = sum(run.run_info.get("common_blocks", {}).get("added_per_class", {}).values())
    palette = sum(run.run_info.get("palette_holes", {}).get("added_per_class", {}).values())
    out_of_frame = sum(run.run_info.get("out_of_frame", {}).get("added_per_class", {}).values())
    by_blocks = [sum(v[key] for v in run.run_info.get("shared_blocks", {}).get("per_class", {}).values())
                 for key in ("withdrawn", "added")]
    # the caption says what step 3's rules did; the run folder gets a line of its own
    table.caption = (f"{len(ds.unreadable)} unreadable, device {res.device}, {run.run_info['total_seconds']:.1f}s; "
                     f"{res.stop_reason}."
                     + (f" Flagged in another class's quarantine class: {elsewhere} (run.json: "
                        "flagged_in_another_quarantine_class)." if elsewhere else "")
                     + (f" Flags withdrawn (run.json: quarantine_ambiguity): {withdrawn}." if withdrawn else "")
                     + (f" Kept although ambiguous (run.json: quarantine_ambiguity): {kept}." if kept else "")
                     + (f" {outliers} of the flags are score outliers of a flagged class (run.json: "
                        "score_outliers)." if outliers else "")
                     + (f" {lookalikes} of the flags look like images of other classes yet the model labels them as "
                        "surely as its own (run.json: confident_lookalikes)." if lookalikes else "")
                     + (f" {by_class_residual} of the flags carry the trigger the class's other flags show in "
                        "their pixels (run.json: residual_in_flagged_classes)." if by_class_residual else "")
                     + (f" Samples that look like their own class, decided by their score: {own_looking[0]} "
                        f"flags withdrawn, {own_looking[1]} added (run.json: own_looking_flags)."
                        if any(own_looking) else "")
                     + (f" {by_residual} flags in classes without a quarantine, by the trigger their pixels carry"
                        + (f", and {residual_completed} more there scored like them" if residual_completed else "")
                        + " (run.json: trigger_residual)." if by_residual else "")
                     + (f" {trigger_free} flags withdrawn that carry no trigger in their pixels where the other "
                        "flags do (run.json: trigger_free_flags)." if trigger_free else "")
                     + (f" {class_bound} flags carry a block of pixels exactly as most of their class does and "
                        "other classes do not (run.json: class_bound_blocks)." if class_bound else "")
                     + (f" By a block of pixels most flags carry exactly: {by_blocks[0]} flags withdrawn, "
                        f"{by_blocks[1]} added (run.json: shared_blocks)." if any(by_blocks) else "")
                     + (f" {common} flags carry a block of pixels a large share of the whole set carries exactly "
                        "and look like other classes (run.json: common_blocks)." if common else "")
                     + (f" {by_values} flags whose pixel values moved the way the other flags' did (run.json: "
                        "value_residual)." if by_values else "")
                     + (f" {against_values} flags withdrawn whose pixel values moved against the way the other "
                        "flags' did (run.json: value_move)." if against_values else "")
                     + (f" {palette} flags that hold no pixel at the values the flags' filter skips (run.json: "
                        "palette_holes)." if palette else "")
                     + (f" {out_of_frame} flags whose content sits apart from where the set frames its images "
                        "(run.json: out_of_frame)." if out_of_frame else "")
                     + (" Below the flags, samples rank by the trigger their pixels carry where that ranks them "
                        "higher (run.json: residual_ranked_scores)." if residual_ranked else ""))
    table.caption_justify = "left"
    return table


def export_table(result) -> Table:
    """Kept / removed per class, bytes written and where."""
    ds = result.dataset
    title = "qtclean export (dry run: nothing written)" if result.dry_run else "qtclean export"
    table = Table(title=title, title_justify="left")
    for name, justify in (("class", "left"), ("kept", "right"), ("removed", "right")):
        table.add_column(name, justify=justify)
    for k, name in enumerate(ds.classes):
        table.add_row(f"{k} {name}", str(result.kept_per_class[k]), str(result.removed_per_class[k]))
    table.add_row("all", str(sum(result.kept_per_class)), str(sum(result.removed_per_class)), style="bold")
    lines = [f"{what}: {path} ({_size(result.bytes_written[what])})" for what, path in result.written.items()]
    if ds.unreadable:
        lines.append(f"{len(ds.unreadable)} unreadable samples not copied (see unreadable.csv)")
    if not result.dry_run:
        lines.append(f"removed samples listed in {result.run_dir / 'removed.csv'}")
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""


def evaluation_table(result: dict) -> Table:
    """Per-class and overall detection figures of `qtclean evaluate`."""
    table = Table(title=f"qtclean evaluate: AUROC {result['auroc']:.4f}", title_justify="left")
    for name in ("class", "samples", "poisoned", "flagged", "TPR", "FPR", "precision"):
        table.add_column(name, justify="left" if name == "class" else "right")

    def pct(x: float) -> str:
        return "-" if x != x else f"{x:.1%}"  # NaN when there is nothing to divide by

    for c in result["per_class"]:
        table.add_row(f"{c['label']} {c['class']}", str(c["samples"]), str(c["poisoned"]), str(c["flagged"]),
                      pct(c["tpr"]), pct(c["fpr"]), pct(c["precision"]))
    table.add_row("all", str(result["samples"]), str(result["positives"]), str(result["flagged"]),
                  pct(result["tpr"]), pct(result["fpr"]), pct(result["precision"]), style="bold")
    return table


def test_table(result: dict) -> Table:
    """The model on a triggered test set: clean accuracy, attack success rate, triggered inputs quarantined."""
    table = Table(title=f"qtclean evaluate --test {result['test']}", title_justify="left")
    for name in ("test samples", "clean", "triggered", "ACC", "ASR", "quarantined"):
        table.add_column(name, justify="right")

    def pct(x: float) -> str:
        return "-" if x != x else f"{x:.1%}"

    table.add_row(str(result["samples"]), str(result["clean"]), str(result["triggered"]), pct(result["acc"]),
                  pct(result["asr"]), pct(result["quarantined"]))
    table.caption = ("ACC: clean samples predicted as their label (quarantine class y+K read as y). ASR: triggered "
                     "samples predicted as the attacker's label. quarantined: predicted in that label's quarantine "
                     "class instead.")
    table.caption_justify = "left"
    return table
