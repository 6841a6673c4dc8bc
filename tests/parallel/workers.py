"""A pool of processes joined in one gloo group, kept for a test module: ``pool.run(fn, *args)``
runs ``fn(*args)`` on every rank at once and returns each rank's result (a failure on any rank
fails the call with that rank's traceback). Starting processes and a group costs seconds; running a
case on a kept pool costs what the case costs, so hypothesis can drive many cases through one pool.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, size: int, port: int, inbox: Any, outbox: Any) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=60))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args = job
        try:
            outbox.put((rank, True, fn(*args)))
        except BaseException:  # noqa: BLE001 - handed to the test process whole
            outbox.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    def __init__(self, size: int) -> None:
        self.size = size
        self._start()

    def _start(self) -> None:
        size = self.size
        context = mp.get_context("spawn")
        port = _free_port()
        self.inboxes = [context.Queue() for _ in range(size)]
        self.outbox = context.Queue()
        self.processes = [context.Process(target=_serve, args=(rank, size, port, self.inboxes[rank], self.outbox),
                                          daemon=True) for rank in range(size)]
        for p in self.processes:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 180) -> list[Any]:
        for inbox in self.inboxes:
            inbox.put((fn, args))
        results: list[Any] = [None] * self.size
        failures = []
        for _ in range(self.size):
            try:
                rank, ok, value = self.outbox.get(timeout=timeout)
            except queue.Empty:
                self.close()
                self._start()
                raise TimeoutError(f"{fn.__name__} did not finish on every rank in {timeout} s (a rank stuck in a "
                                   f"collective the others never made?)") from None
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:  # a rank left waiting in a collective broke the group: the next call gets a new one
            self.close()
            self._start()
            raise AssertionError("\n".join(failures))
        return results

    def close(self) -> None:
        for inbox, p in zip(self.inboxes, self.processes):
            if p.is_alive():
                inbox.put(None)
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
