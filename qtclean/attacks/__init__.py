"""Attack lab: backdoor poisoning of a clean dataset, for measuring detectors on known truth."""

from .patch import ATTACKS, poison

__all__ = ["ATTACKS", "poison"]
