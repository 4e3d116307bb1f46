"""The model layer: loading by inspection (quantized or not), the shared base with named adapters and heads, the embedded default, export, tiny random models for tests."""
