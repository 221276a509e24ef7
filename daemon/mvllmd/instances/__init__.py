"""Instances: engine servers (vLLM or the simulator) on this host's devices, run by a unit backend.

Nothing is imported here: the launcher (launcher.py) runs at every engine start and imports only the
standard library and spec.py.
"""
