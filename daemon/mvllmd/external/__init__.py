"""External servers: servers that mvllmd did not launch (vLLM under Slurm or Kubernetes, another team's),
attached by URL, kept in the state directory, and health-checked like instances; never restarted."""
