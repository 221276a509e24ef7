"""The fleet of hosts: this daemon's peers (membership.py), the coordinator's link to each (link.py,
over client.py's mutual-TLS gRPC), the tokens a peer gives coordinators for its per-instance routes
(tokens.py), and all of it as one (hosts.py)."""
