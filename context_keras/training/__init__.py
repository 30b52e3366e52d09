"""The training machinery every job shares: the compiled trainer, the run directory, restoring and warm starts,
distribution, quit/pause control, the periodic actions and the controller that runs them."""
