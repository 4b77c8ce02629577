"""The distribution backends: the accelerate config files in launcher/ (ddp, deepspeed-zero1, -zero2,
-zero2-offload). The launcher hands one to `accelerate launch`; the search builds Accelerate's own
DeepSpeedPlugin from it for its Ray Train workers. Light to import: the launcher starts before torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# A new backend is a new accelerate config file there.
BACKENDS = {p.stem: p for p in sorted((Path(__file__).resolve().parents[1] / "launcher").glob("*.yaml"))}


def backend_config(backend: str) -> dict[str, Any]:
    return yaml.safe_load(BACKENDS[backend].read_text())


def is_deepspeed(backend: str) -> bool:
    return backend_config(backend).get("distributed_type") == "DEEPSPEED"


def deepspeed_plugin(backend: str) -> Any:
    """Accelerate's DeepSpeedPlugin for a DeepSpeed backend (None for the others), for processes that
    `accelerate launch` did not start: the Ray Train workers of a Tune trial."""
    if not is_deepspeed(backend):
        return None
    from accelerate.utils import DeepSpeedPlugin

    ds = backend_config(backend).get("deepspeed_config") or {}
    return DeepSpeedPlugin(zero_stage=ds.get("zero_stage", 2),
                           gradient_accumulation_steps=ds.get("gradient_accumulation_steps", 1),
                           offload_optimizer_device=ds.get("offload_optimizer_device", "none"),
                           offload_param_device=ds.get("offload_param_device", "none"),
                           zero3_init_flag=ds.get("zero3_init_flag", False))
