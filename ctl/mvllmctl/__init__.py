"""mvllmctl: the command line of mvllmd."""

import os

# gRPC's C core logs connection failures (a refused TLS handshake, say) to stderr on its own; mvllmctl
# reports every failure as one line of its own, so the core is quiet unless the user asks otherwise.
# Set before anything imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
