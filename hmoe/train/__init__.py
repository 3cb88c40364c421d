"""Training: state (`state`), optimizer (`optimizer`), the pure steps (`step`), evaluation (`evaluation`), the loop
(`loop.train_and_evaluate`), checkpoints (`checkpoint`) and metrics files (`metrics`)."""
