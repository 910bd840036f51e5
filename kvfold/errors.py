"""kvfold's start-up error, importable without the config machinery (pydantic): the kernels' GPU
checks and benchmarks run where only torch and Triton are installed."""


class KvfoldConfigError(ValueError):
    """A kvfold option or selection that cannot work; raised before the engine serves anything."""
