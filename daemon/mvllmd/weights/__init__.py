"""Weight updates, sleep and wake of the instances launched with weight updates on."""
