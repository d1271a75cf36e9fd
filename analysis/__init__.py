"""analysis: language-neuron selection over a harvested store (Dask), masks and their published formats,
importers of published statistics and reports. Imports from harvester only."""
