"""The trigger residual in a kept quarantine's class (``readout.flag_residual_in_flagged_classes``) with its gate
and its bar at other quantiles (issue 6, session 32): saved runs read out again with today's defaults and once
per pair, by ``benchmarks/readout.py``'s replay. The gate (``FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE``) is the
quantile of the classes without flags that the flags' own median cosine must pass (the trigger is in their
pixels); the bar (``FLAGGED_CLASS_RESIDUAL_QUANTILE``) the one an unflagged sample of the class must pass to be
flagged. Both default to 0.9999. Only one-target runs can differ (the rule stays out where half of the classes
hold flags).

    python benchmarks/residual_gate.py benchmarks/results/s32held1/ramp-0.1-20000-cpu-s1.logits.npz \\
        --pairs 0.999:0.9999,0.99:0.9999,0.999:0.999
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from readout import read_again  # noqa: E402  (benchmarks/readout.py)

from qtclean import QTConfig, readout  # noqa: E402


def parse_pairs(text: str) -> dict[str, tuple[float, float]]:
    """'GATE:BAR,...' -> {'gGATE:bBAR': (gate, bar), ...}."""
    pairs = {}
    for item in text.split(","):
        gate, bar = (float(x) for x in item.split(":"))
        pairs[f"g{gate}:b{bar}"] = (gate, bar)
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logits", nargs="+", type=Path, help="RESULT.logits.npz files (detection.py --save-logits)")
    ap.add_argument("--pairs", default="0.999:0.9999,0.995:0.9999,0.99:0.9999,0.999:0.999",
                    help="GATE:BAR quantile pairs, each read out after the defaults")
    args = ap.parse_args()
    pairs = parse_pairs(args.pairs)

    @contextmanager
    def quantiles(name: str):
        saved = readout.FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE, readout.FLAGGED_CLASS_RESIDUAL_QUANTILE
        if name in pairs:
            readout.FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE, readout.FLAGGED_CLASS_RESIDUAL_QUANTILE = pairs[name]
        try:
            yield
        finally:
            readout.FLAGGED_CLASS_RESIDUAL_GATE_QUANTILE, readout.FLAGGED_CLASS_RESIDUAL_QUANTILE = saved

    variants = {"default": QTConfig(), **{name: QTConfig() for name in pairs}}
    for path in args.logits:
        print(f"{path.name}\n  " + "\n  ".join(read_again(path, variants, around=quantiles)), flush=True)


if __name__ == "__main__":
    main()
