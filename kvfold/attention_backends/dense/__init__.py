"""KVFOLD_DENSE: full-precision paged attention, the oracle and template for compressed methods."""
