"""One-off studies behind the README's choices (kept images, loss against outcome, mask quality, sweeps, costs, localisation)."""
