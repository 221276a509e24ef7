"""mvllmd: owns a host's accelerators and the vLLM servers on them, and runs rollout jobs across them."""

import os

# gRPC's fork handlers off (its own advice for a program that only ever forks to exec), before grpc is
# first imported, where it reads this. mvllmd starts systemctl and engines; on uvloop's loop a
# subprocess is a plain fork(), which runs those handlers, and with them on, mvllmd's gRPC server
# refused a call now and then while units were restarted (README, "Choices").
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
