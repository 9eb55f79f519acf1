"""The README's demo, end to end on real images: the shipped Fashion-MNIST sample with 10 % BadNets.

The one test on real data with default settings (about 20 s on 2 CPU cores): tiny synthetic sets cannot show a
regression in how the algorithm behaves on real images (one slipped through once: a default change left the demo's
pre-quarantine seed at 12 samples and nothing was flagged).
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qtclean.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_the_demo_scan_finds_the_planted_poison_and_nothing_else(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    scanned = runner.invoke(app, ["scan", str(SAMPLES / "fashion-mnist-demo"), "--out", str(run)])
    assert scanned.exit_code == 0, scanned.stderr
    evaluated = runner.invoke(app, ["evaluate", str(run), "--truth", str(SAMPLES / "fashion-mnist-demo.truth.csv"),
                                    "--json", "-"])
    assert evaluated.exit_code == 0, evaluated.stderr
    figures = json.loads(evaluated.stdout)
    assert figures["positives"] == 200
    assert figures["auroc"] >= 0.99 and figures["tpr"] >= 0.95 and figures["fpr"] <= 0.01
