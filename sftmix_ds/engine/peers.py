"""Which ranks are still there: every rank beats a counter in the rendezvous store (the TCPStore
that rank 0 serves at MASTER_ADDR:MASTER_PORT) from a thread of its own, and watches the others'.

A rank whose process is killed on a live node closes its sockets, and its peers' next collective
fails at once; a rank lost with its node (power, kernel, network) sends nothing, and its peers
would sit in a collective for deepspeed.timeout_minutes (30 by default: long, because rank 0's
evaluation or generation may keep the others waiting at a barrier). The heartbeat tells the two
apart from "busy": a rank whose counter has not moved for deepspeed.peer_timeout_s is lost, and
every rank that sees it logs which rank and host it was and exits with EXIT_PEER_LOST, which
launch/slurm/train.sbatch answers with a requeue.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: worth retrying, on what is left
LEFT = -1  # a counter's value once its rank has exited through the interpreter (clean or not)


class PeerWatch:
    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = min(2.0, timeout_s / 5)
        # A client of its own: the process group's may be busy in the main thread.
        self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                   timeout=timedelta(seconds=max(self.interval_s, 1.0)), wait_for_workers=False)
        self.store.set(_host_key(rank), socket.gethostname())
        self.store.add(_beat_key(rank), 1)
        self.hosts: list[str] = []
        self.pid = os.getpid()
        self.store_answered = True
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Once every rank has registered (after a barrier in the process group)."""
        self.hosts = [self.store.get(_host_key(r)).decode() for r in range(self.world_size)]
        self._thread = threading.Thread(target=self._watch, name="sftmix-peer-watch", daemon=True)
        self._thread.start()
        atexit.register(self.leave)

    def name(self, rank: int) -> str:
        return f"rank {rank} on {self.hosts[rank]}" if rank < len(self.hosts) else f"rank {rank}"

    def _counts(self) -> Optional[list[int]]:
        """Every rank's counter, after beating this one's; None when the store does not answer."""
        try:
            self.store.add(_beat_key(self.rank), 1)
            counts = [int(v) for v in self.store.multi_get([_beat_key(r) for r in range(self.world_size)])]
        except Exception:  # the store's host (rank 0) is gone or unreachable
            counts = None
        self.store_answered = counts is not None
        return counts

    def _watch(self) -> None:
        seen: dict[int, tuple[int, float]] = {}
        # torch logs every failed store request with a C++ backtrace: while the store is silent, ask
        # it five times per timeout rather than every beat (rank 0's loss is then told within 1.2x).
        while not self._stop.wait(self.interval_s if self.store_answered else max(self.interval_s, self.timeout_s / 5)):
            now = time.monotonic()
            counts = self._counts()
            # Without the store, rank 0 (its host) is the one not heard from; the others cannot be told.
            heard = dict(enumerate(counts)) if counts is not None else {0: None}
            for r, count in heard.items():
                if r == self.rank or count == LEFT:
                    continue
                if r not in seen or seen[r][0] != count:
                    seen[r] = (count, now)
                elif now - seen[r][1] > self.timeout_s:
                    self._give_up([r], f"no heartbeat for {now - seen[r][1]:.0f} s "
                                       f"(deepspeed.peer_timeout_s={self.timeout_s:g})")

    def stalled(self) -> list[int]:
        """The ranks whose counters do not move over three beats (a few seconds): asked after a
        collective failed, to say whether a peer's loss is why."""
        first = self._counts()
        time.sleep(3 * self.interval_s)
        last = self._counts()
        if first is None or last is None:
            return [0] if self.rank != 0 else []
        return [r for r in range(self.world_size) if r != self.rank and last[r] != LEFT and first[r] == last[r]]

    def _give_up(self, lost: list[int], why: str) -> None:
        names = ", ".join(self.name(r) for r in lost)
        message = (f"lost {names}: {why}. Its node or process is gone; this {self.name(self.rank)} stops "
                   f"(exit {EXIT_PEER_LOST}); resume=auto continues from the last checkpoint on the ranks left")
        log.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)  # the main thread may be blocked in a collective that never returns

    def report_if_peer_lost(self) -> None:
        """Called with an exception on its way out: when a peer has stopped, that is the error."""
        lost = self.stalled()
        if lost:
            self._give_up(lost, "a collective failed and its heartbeat has stopped")

    def leave(self) -> None:
        """On the way out through the interpreter: the others stop watching this rank (their next
        collective with it fails, if they have one left)."""
        if os.getpid() != self.pid:  # a forked child exiting through the interpreter is not this rank
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s + 1)
        if not self.store_answered:  # rank 0 has gone first: nobody is left to tell
            return
        try:
            self.store.set(_beat_key(self.rank), str(LEFT))
        except Exception:
            pass


def _beat_key(rank: int) -> str:
    return f"sftmix/beat/{rank}"


def _host_key(rank: int) -> str:
    return f"sftmix/host/{rank}"


_watch: Optional[PeerWatch] = None


def watch_peers(rank: int, world_size: int, timeout_s: float) -> None:
    """Start this process's watch (once; between the process group's start and a barrier)."""
    global _watch
    if _watch is None and world_size > 1 and timeout_s > 0:
        _watch = PeerWatch(rank, world_size, timeout_s)
        dist.barrier()
        _watch.start()


def current_watch() -> Optional[PeerWatch]:
    return _watch
