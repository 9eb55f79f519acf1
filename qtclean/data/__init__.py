"""Data formats: each reader returns a :class:`Dataset` (uint8 images, labels, ids, classes)."""

from .cifar import SafeUnpickler, load_cifar, safe_load
from .dataset import Dataset, Unreadable
from .detect import detect_format, load_dataset
from .folder import IMG_EXTENSIONS, load_folder

__all__ = ["Dataset", "Unreadable", "load_dataset", "detect_format", "load_folder", "load_cifar",
           "SafeUnpickler", "safe_load", "IMG_EXTENSIONS"]
