"""Unit backends: what runs an instance's engine. One protocol, `UnitBackend` (protocol.py), and two
implementations: `SystemdBackend` (units of a systemd manager, systemd.py) and `ProcessBackend` (mvllmd's
own process supervisor, process.py). `pick_backend` (choice.py) resolves the `--unit-manager` flag
(`[daemon] unit_manager`) to a `BackendKind`.

Nothing is imported here: the launcher imports packages above it at every engine start.
"""
