"""Every exception the library raises on bad input, in one place.

The library raises; only the scripts (``sample.py``, ``train.py``, ``tools/...``) turn a
:class:`PixArtError` into a one-line message and an exit code (``pixart.cli.run``). Each
class is a ``ValueError``, so code that guards a call with ``except ValueError`` keeps working.

    PixArtError
    ├── ConfigError              a flag, YAML key or option value that cannot be used
    ├── InputError               a value given to a model or pipeline (size, latents, steps)
    ├── ModelLoadError           a model folder or weight file that cannot be loaded
    │   ├── CheckpointFormatError   a .ckpt that is not in MindSpore's format
    │   ├── SafetensorsError        a .safetensors file that is not in the format
    │   └── TorchCheckpointError    a .pth/.pt that is not a readable PyTorch checkpoint
    ├── DatasetError             a label file or image folder that cannot give a training set
    │   └── CacheError              a feature-cache entry that is missing or inconsistent
    ├── TrainingError            a training run that cannot start or continue
    ├── OutputError              an output that cannot be written (folder, full disk)
    └── RequestError             a web-demo request answered with a message instead of images
"""


class PixArtError(ValueError):
    """Base of the project's errors: the message alone tells the user what is wrong."""


class ConfigError(PixArtError):
    """A config file, flag or option value that is missing, unreadable or invalid."""


class InputError(PixArtError):
    """A value passed to a model, sampler or pipeline that it cannot use."""


class ModelLoadError(PixArtError):
    """A model folder or weight file that cannot be loaded: missing, incomplete, or not
    matching its config. The message names the folder or file and says what was expected and
    what was found."""


class CheckpointFormatError(ModelLoadError):
    """A ``.ckpt`` that is missing, truncated, encrypted or not in MindSpore's format."""


class SafetensorsError(ModelLoadError):
    """A ``.safetensors`` file that is missing, truncated or not in the format."""


class TorchCheckpointError(ModelLoadError):
    """A file that is not a readable PyTorch zip checkpoint."""


class DatasetError(PixArtError):
    """A label file or image folder that cannot give a training set."""


class CacheError(DatasetError):
    """A feature-cache entry that is missing, unreadable or inconsistent."""


class TrainingError(PixArtError):
    """A training run that cannot start or continue (nothing to train, a resume that does not
    fit, an output folder holding another run)."""


class OutputError(PixArtError):
    """An output that cannot be written: a folder that is a file or read-only, a full disk. What
    was already written stays complete; nothing half-written is left."""


class RequestError(PixArtError):
    """A web-demo request the page answers with this message instead of images."""
