"""What every bench script shares: the machine's name, the command that reproduced a figure, and
appending a result to a JSON-lines file under bench/results/."""
from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from cifar_dist.machine import hardware

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    """The machine a figure was measured on: the same words as a run's summary.json and model card."""
    return f"{hardware(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))}, torch {torch.__version__}"


def command() -> str:
    """The command that reproduced a figure: `python -m bench.<script> ...`."""
    module = os.path.relpath(sys.argv[0], ROOT).removesuffix(".py").replace(os.sep, ".")
    return "python -m " + shlex.join([module, *sys.argv[1:]])


def append_result(name: str, record: dict) -> Path:
    """Append to bench/results/<name> (or to <name> itself when it is an absolute path)."""
    path = Path(name) if Path(name).is_absolute() else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine(),
                  command=command(), **record)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return path
