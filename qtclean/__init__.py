"""qtclean: find backdoor-poisoned samples in an image-classification training set (Quarantine Training)."""

__version__ = "0.1.0"
