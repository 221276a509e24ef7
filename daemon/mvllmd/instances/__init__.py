"""Instances: engine servers (vLLM or the simulator) on this host's devices, under a unit manager."""
