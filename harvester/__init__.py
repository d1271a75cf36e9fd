"""harvester: exact per-neuron MLP statistics for language-specific neuron research, from corpora through
a model (HF or vLLM, on Ray or in-process) into a Zarr store. The bottom layer: it imports no other package
of lsn-harvester (analysis, jobs and the lsn command build on it)."""

__version__ = "0.1.0"
