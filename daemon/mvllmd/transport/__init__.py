"""How the daemon talks to the servers: its HTTP/1.1 client (http), generation requests and their
answers (requests), streamed answers and moved samples (streams), and /metrics gauges (gauges)."""
