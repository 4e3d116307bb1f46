"""Measuring: tensor byte counts, phase peaks, estimated-vs-measured reports, the meta-device allocation tracker and simulation, estimator validation, plots."""
