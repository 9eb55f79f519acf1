"""qtclean: find backdoor-poisoned samples in an image-classification training set (Quarantine Training).

The library API the CLI is a thin layer over::

    from qtclean import load_dataset, scan, QTConfig
    result = scan(load_dataset("./data"), qt_config=QTConfig())      # in memory: scores, flags, model
    run = scan_to_run("./data", out="./data.qtclean")                 # what `qtclean scan` writes
    export(run.run_dir, clean_out="./clean")                         # what `qtclean export` writes
"""

__version__ = "0.1.0"

from .data import Dataset, load_dataset  # noqa: E402
from .evaluate import evaluate_run  # noqa: E402
from .export import export  # noqa: E402
from .qt import QTConfig  # noqa: E402
from .runs import scan_to_run  # noqa: E402
from .scan import ScanResult, TrainConfig, scan  # noqa: E402

__all__ = ["Dataset", "load_dataset", "scan", "ScanResult", "QTConfig", "TrainConfig", "scan_to_run", "export",
           "evaluate_run", "__version__"]
