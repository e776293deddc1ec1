"""Errors a user can cause. The CLI prints these as one line and exits with status 2."""


class LatentDiffError(Exception):
    """Base class for every error caused by input (a config, a file, a flag), not by a bug."""


class ConfigError(LatentDiffError):
    """A config file, key or value is wrong."""


class DataError(LatentDiffError):
    """A dataset folder, image or caption is missing or unusable."""


class CheckpointError(LatentDiffError):
    """A checkpoint is missing, malformed, or does not fit the stages it is loaded with."""


class TrainingDiverged(LatentDiffError):
    """Training produced non-finite gradients, weights or measurements (usually: the learning rate is too high)."""


def short_list(items, limit: int = 8) -> str:
    """`[a, b, ...] (n)`: the first `limit` of `items`, sorted, and how many there are, for one-line messages."""
    items = sorted(map(str, items))
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"
