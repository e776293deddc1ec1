"""Errors a user can cause. The CLI prints these as one line and exits with status 2."""


class LatentDiffError(Exception):
    """Base class for every error caused by input (a config, a file, a flag), not by a bug."""


class ConfigError(LatentDiffError):
    """A config file, key or value is wrong."""


class DataError(LatentDiffError):
    """A dataset folder, image or caption is missing or unusable."""


class CheckpointError(LatentDiffError):
    """A checkpoint is missing, malformed, or does not fit the stages it is loaded with."""
