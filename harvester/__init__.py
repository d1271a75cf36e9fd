"""lsn-harvester: exact per-neuron MLP statistics for language-specific neuron research."""

__version__ = "0.1.0"
