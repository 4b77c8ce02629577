"""An epoch's progress on the main process: a tqdm bar on a terminal; in a log (a SLURM job's output,
nohup, CI), where a bar is unreadable and nothing else would show between epoch lines, a plain line
about every 10 % of the epoch."""
from __future__ import annotations

import sys
import time

import torch
from tqdm.auto import tqdm

PLAIN_EVERY = 0.1  # of an epoch, between two plain lines


class Progress:
    def __init__(self, main: bool, label: str, total: int, start: int, batch_size: int, min_seconds: float):
        self.tty = main and sys.stderr.isatty()
        self.plain = main and not self.tty
        self.bar = tqdm(initial=start, total=total, desc=label, leave=False, disable=not self.tty)
        self.label, self.total, self.start, self.done = label, total, start, start
        self.batch_size, self.min_seconds = batch_size, min_seconds
        self.gap = max(1, round(total * PLAIN_EVERY))
        self.next = start + self.gap
        self.t0 = self.last = time.perf_counter()

    def step(self, sums: torch.Tensor) -> None:
        """After an optimizer step; `sums` holds the main process's loss sum and image count of the epoch so
        far (after a mid-epoch resume, with the whole world's before it); reading them syncs the device,
        once per plain line."""
        self.done += 1
        self.bar.update(1)
        if not self.plain or self.done < self.next or self.done >= self.total:
            return
        self.next = self.done + self.gap
        now = time.perf_counter()
        if now - self.last < self.min_seconds:
            return
        self.last = now
        loss_sum, _, count = sums.tolist()
        rate = (self.done - self.start) * self.batch_size / (now - self.t0)
        left = (self.total - self.done) * self.batch_size / rate
        print(f"  {self.label} step {self.done}/{self.total} | loss {loss_sum / max(count, 1):.4f} | "
              f"{rate:,.0f} img/s | {left:.0f}s left in the epoch", flush=True)

    def show(self, **values: str) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()
