"""Errors of the tiered tensor store. Each message names the cause and the fix."""


class StoreError(RuntimeError):
    """Any failure of the tensor store (IO error, misuse)."""


class StoreConfigError(StoreError, ValueError):
    """Bad store configuration: a missing or unwritable nvme_path, too little free space, bad sizes."""


class StoreFullError(StoreError):
    """The medium ran out of space. Tensors committed before the failing write are intact."""


class BuffersExhaustedError(StoreError):
    """Every IO buffer is held by a resident tensor, so nothing can be read or staged."""
