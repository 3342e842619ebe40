"""One-off studies behind the README's choices: kept images, loss against outcome, masks, sweeps, costs, the gate."""
