"""The stages, each one scaffold (stages/scaffold.py) plus its step functions: sft, rm, ppo, and auto, which chains them."""
