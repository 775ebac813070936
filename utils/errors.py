"""Bad input raises an :class:`InputError`; the scripts print its message as one line and exit with status 2."""


class InputError(Exception):
    """Bad user input: a flag, a file or a dataset the run cannot use."""


class DataError(InputError):
    """A dataset folder, split file, CSV or image is missing or unusable."""


class CheckpointError(InputError):
    """A checkpoint is missing, truncated, unsafe or does not fit the model."""


class OptionError(InputError):
    """A command-line flag, or a combination of flags, is invalid."""


class TrainingDiverged(Exception):
    """A loss became NaN or infinite; nothing was written over the last good checkpoint."""
