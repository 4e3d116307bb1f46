"""What one step of each stage computes, as functions a stage and the simulation both call: the SFT completion loss, the RM pair scores, PPO's experience, math and update, and the rewards."""
