"""The dispatcher, in parts: the loop (loop.py: take work, pick a lane, send, deliver), one server's
shared state (endpoint.py, with its breaker.py) and the table of them that reads their gauges and
watches for hangs (endpoints.py), a job's own accounting (flights.py), the policies (policies/),
and the tail of a least-loaded job (tail.py)."""
