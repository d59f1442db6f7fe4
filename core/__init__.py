"""The bottom layer: config schema, trial types, errors, row readers, eval data types, store layout.

It imports nothing else of the project; `runners` and `objectives` build on it, `sweeps` orchestrates.
"""
