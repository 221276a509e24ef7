"""mvllmd's HTTP front door: one OpenAI-compatible URL for every server the daemon runs.

- servers.py: per model, a lane on each READY server, over the jobs' endpoint table and least-loaded
  policy (one state per server, shared with the jobs);
- proxy.py: one request forwarded, and sent elsewhere if its server fails before the answer begins;
- app.py: the HTTP routes, tokens and errors (translation only).
"""
