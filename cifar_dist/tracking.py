"""Experiment tracking through Accelerate's tracker API: W&B and/or TensorBoard, main process only.

Scalars and images share one step axis: the optimizer step count, which a resume continues (W&B
resumes the same run id; TensorBoard purges events past the checkpoint's step), so a resumed run
never rewinds or duplicates steps.
"""
from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

TRACKERS = ("wandb", "tensorboard")
PROJECT = "cifar-dist"


def parse(spec: str) -> list[str]:
    """'none' | 'wandb' | 'tensorboard' | 'wandb,tensorboard' -> list of tracker names."""
    names = [s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose from none, {', '.join(TRACKERS)}")
    return names


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def offline_without_key(out: Path, announce: bool) -> None:
    """No API key and no WANDB_MODE: W&B logs offline, and says where to sync from."""
    if not _wandb_has_key() and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        if announce:
            where = f"{os.environ.get('WANDB_DIR', out)}/wandb/offline-run-*"
            print(f"W&B: no API key and no WANDB_MODE set: logging offline (upload later with `wandb sync {where}`)",
                  flush=True)


def wandb_dir(out: Path) -> str | None:
    """W&B's files under the run's (or search's) own folder, unless WANDB_DIR says where (None)."""
    return None if os.environ.get("WANDB_DIR") else str(out)


def log_search(names: list[str], folder: Path, group: str, images: dict[str, np.ndarray],
               rows: list[dict[str, Any]]) -> None:
    """A finished search as a W&B run of its own (job type "search") in the group of its trials' runs:
    its pictures and its results table."""
    if "wandb" not in names:
        return
    import wandb

    offline_without_key(folder, True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), group=group, name=f"{group}-search",
                     job_type="search", dir=wandb_dir(folder))
    table = wandb.Table(columns=list[str | int](keys), data=[[row.get(k) for k in keys] for row in rows])
    run.log({**{k: wandb.Image(v) for k, v in images.items()}, "results": table})
    run.finish()


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> flat scalars (TensorBoard's hparams take no lists or dicts)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flat_config(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = ",".join(map(str, v)) if isinstance(v, list) else v
    return flat


def start(accelerator: Accelerator, names: list[str], config: dict[str, Any], out: Path, step: int,
          run_name: str, group: str) -> None:
    """init_trackers with the run's resolved config; call on every rank (Accelerate picks main)."""
    if not names:
        return
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        offline_without_key(out, accelerator.is_main_process)
        id_file = out / "wandb_run_id"
        if accelerator.is_main_process and not id_file.exists():
            id_file.write_text(secrets.token_hex(4))  # W&B run ids: short lowercase alphanumerics
        accelerator.wait_for_everyone()
        kwargs["wandb"] = dict(name=run_name or out.name, id=id_file.read_text().strip(), resume="allow",
                               **({"group": group} if group else {}), dir=wandb_dir(out))
    if "tensorboard" in names:
        accelerator.project_configuration.logging_dir = str(out / "tensorboard")
        # a resumed run drops what a killed attempt logged after the checkpoint's step
        kwargs["tensorboard"] = {"purge_step": step + 1} if step else {}
    accelerator.init_trackers(os.environ.get("WANDB_PROJECT", PROJECT), config=flat_config(config),
                              init_kwargs=kwargs)


def finish_failed(accelerator: Accelerator) -> None:
    """After an error: close the trackers, a W&B run marked failed (exit code 1), not finished."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.run.finish(exit_code=1)
        else:
            tracker.finish()


def log_images(accelerator: Accelerator, names: list[str], images: dict[str, np.ndarray], step: int) -> None:
    """uint8 HWC arrays (float arrays in [0, 1] come out black in wandb.Image: we never pass them)."""
    if not accelerator.is_main_process:
        return
    for name in names:
        tracker = accelerator.get_tracker(name, unwrap=True)
        if name == "wandb":
            import wandb

            tracker.log({k: wandb.Image(v) for k, v in images.items()}, step=step)
        else:
            for k, v in images.items():
                tracker.add_image(k, v, step, dataformats="HWC")
