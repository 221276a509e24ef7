"""Word of changes, to every subscriber: a queue each, filled as changes happen (the instances' states,
the external servers', the peers'); fleet.py's Subscription waits on several at once."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Broadcast(Generic[T]):
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[T]] = set()

    def subscribe(self) -> asyncio.Queue[T]:
        queue: asyncio.Queue[T] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[T]) -> None:
        self._subscribers.discard(queue)

    def send(self, item: T) -> None:
        for queue in self._subscribers:
            queue.put_nowait(item)
