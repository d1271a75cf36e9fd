"""Reserved for the analysis issue (Dask methods over the store)."""
