"""The heartbeat watch (sftmix_ds/engine/peers.py) against a real TCPStore, with two watches in one
process standing for two ranks; and the first host of a Slurm node list."""
import atexit
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from sftmix_ds.common import free_port
from sftmix_ds.engine.collectives import first_host
from sftmix_ds.engine.peers import PeerWatch

TIMEOUT_S = 2.0  # beats every 0.4 s


@pytest.fixture
def two_watches(monkeypatch):
    port = free_port()
    # Rank 0's process serves the store; dropping the last reference stops it, as rank 0's death would.
    server = [dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    watches = [PeerWatch(rank, 2, TIMEOUT_S) for rank in (0, 1)]
    given_up = []

    def record(self, lost, why):
        given_up.append((self.rank, lost, why))
        self._stop.set()  # ends the watch, as os._exit would end the process

    monkeypatch.setattr(PeerWatch, "_give_up", record)
    for w in watches:
        w.start()
    yield watches, given_up, server
    for w in watches:
        w._stop.set()
        w._thread.join()
        atexit.unregister(w.leave)  # the store is gone with the test


def test_a_rank_that_stops_beating_is_named_within_the_timeout(two_watches):
    (w0, w1), given_up, _ = two_watches
    assert w0.hosts == w1.hosts and len(w0.hosts) == 2
    time.sleep(3 * TIMEOUT_S)
    assert given_up == []  # beating ranks are never lost, however long the run
    w1._stop.set()  # rank 1 goes silent without leaving: its process or node is gone
    stopped = time.monotonic()
    while not given_up and time.monotonic() - stopped < 3 * TIMEOUT_S:
        time.sleep(0.05)
    waited = time.monotonic() - stopped
    assert given_up and given_up[0][:2] == (0, [1]) and "no heartbeat" in given_up[0][2]
    assert TIMEOUT_S - w0.interval_s <= waited <= TIMEOUT_S + 2 * w0.interval_s + 0.5
    assert w0.name(1) == f"rank 1 on {w0.hosts[1]}"


def test_a_rank_that_leaves_is_not_lost_and_stalled_names_only_silent_ones(two_watches):
    (w0, w1), given_up, _ = two_watches
    assert w0.stalled() == []  # both beating
    w1.leave()
    time.sleep(TIMEOUT_S + 3 * w0.interval_s)
    assert given_up == [] and w0.stalled() == []


def test_stalled_after_a_failed_collective_names_the_silent_rank(two_watches):
    (w0, w1), given_up, _ = two_watches
    w1._stop.set()
    w1._thread.join()
    assert w0.stalled() == [1]


def test_when_rank_0_and_its_store_are_gone_the_others_name_rank_0(two_watches):
    (w0, w1), given_up, server = two_watches
    w0._stop.set()
    w0._thread.join()
    server.clear()
    stopped = time.monotonic()
    while not given_up and time.monotonic() - stopped < 4 * TIMEOUT_S:
        time.sleep(0.05)
    # Each unanswered request costs up to the client's timeout (1 s here), so allow a few beats more.
    assert given_up and given_up[0][:2] == (1, [0]), given_up
    assert time.monotonic() - stopped <= TIMEOUT_S + 4 * max(w1.interval_s, 1.0)
    assert w1.stalled() == [0]


@pytest.mark.parametrize("nodelist,first", [("node[03-08,11],gpu2", "node03"), ("node1,node2", "node1"),
                                            ("gpu-a100-7", "gpu-a100-7"), ("n[001]", "n001"), ("a[1-2]", "a1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first
