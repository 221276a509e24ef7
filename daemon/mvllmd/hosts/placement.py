"""Where a fleet launch's instances go: how many on each host, from the room each host reported for the
request (InstanceManager.room: its free devices of the engine's kind, in groups of the request's TP).

Packed (the default) fills the hosts in the order given, each before the next: fewer hosts, whole
hosts left free for other models. Spread puts one on each host with room in turn: a host lost takes
the fewest instances with it.
"""

from __future__ import annotations

from mvllmd.errors import ResourceExhausted


def place(rooms: dict[str, int], count: int, tp: int, spread: bool) -> dict[str, int]:
    """Instances per host (hosts with none left out); ResourceExhausted, saying what each host has room
    for, when the request does not fit."""
    if sum(rooms.values()) < count:
        each = ", ".join(f"{host} room for {n}" for host, n in rooms.items())
        raise ResourceExhausted(f"{count} x TP{tp} does not fit on the hosts chosen ({each}); nothing was started")
    placed = dict.fromkeys(rooms, 0)
    left = count
    if not spread:
        for host, n in rooms.items():
            placed[host] = min(n, left)
            left -= placed[host]
    while left:
        for host, n in rooms.items():
            if left and placed[host] < n:
                placed[host] += 1
                left -= 1
    return {host: n for host, n in placed.items() if n}
