"""Memory planning before any weights load: hardware presets and detection, weight-free model specs, the analytic estimator, the planner."""
