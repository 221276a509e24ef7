"""`mvllmctl tune`: measure every way to split the devices, on the user's own prompts, and pick the best."""
