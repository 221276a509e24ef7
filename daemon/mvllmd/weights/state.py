"""The weights a server serves now: one object per server, shared by reference.

Its instance holds it (the monitor does not judge a held engine's progress: it makes nothing on
purpose), and so does its Endpoint in the dispatcher (nothing new is sent to a held server, it is
not judged hung, and the tokens read from it are labelled with `version`). Only an update, a sleep
or a wake (weights/updates.py) changes it. A server without weight updates has version "" and is
never held.
"""

from __future__ import annotations

from dataclasses import dataclass

UPDATING = "updating its weights"
ASLEEP = "asleep"


@dataclass
class Weights:
    version: str = ""
    held: str = ""  # why it is paused on purpose (UPDATING, ASLEEP); "" when it is not
    sleep_level: int = 0  # 0: awake

    @property
    def updating(self) -> bool:
        """Paused for an update: a request sent now waits in its queue for a second or so, and runs on
        the new weights (the front door's last resort when every server of a model is held)."""
        return self.held == UPDATING
