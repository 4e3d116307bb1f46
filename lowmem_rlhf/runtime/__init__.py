"""What keeps a run going: optimizers and the optimizer step, the single-adapter trainers (plain torch, ZeRO-3), out-of-memory recovery, checkpoints, run folders, signals."""
