"""model_card.md: what a finished run's weights are, for whoever is handed them: the model, the data, the
results, the machine, and the command that trains it again. Made from summary.json alone."""
from __future__ import annotations

from typing import Any


def model_card(s: dict[str, Any]) -> str:
    cfg, main = s["config"], s["main_split"]
    lines = [f"# {cfg['preset']} on {cfg['dataset']}: {main} accuracy {s[f'{main}_acc']:.2%}", "",
             *_model(s), "", *_data(s), "", *_results(s), "", *_training(s), "", *_reproduce(s), "",
             "## Curves", "", "![loss and accuracy per epoch](curves.png)", ""]
    return "\n".join(lines)


def _model(s: dict[str, Any]) -> list[str]:
    cfg = s["config"]
    side = cfg["model"].get("image_size", 32)  # (a run from before --image-size: 32)
    return ["## Model", "",
            f"- preset `{cfg['preset']}`, recipe `{cfg['recipe']}` (the whole config: `config.yaml`)",
            f"- {s['params']:,} parameters, {s['model_bytes'] / 2**20:.2f} MB; "
            f"{s['flops_per_image_forward'] / 1e6:,.1f} MFLOP per image forward",
            "- weights: `model.pt` (`cifar_dist.model.build_model(spec).load_state_dict(...)`); ONNX: "
            "`python -m cifar_dist.export <this folder>`; classify images: `python -m cifar_dist.predict <this "
            "folder> IMAGE...`",
            f"- input: {side}x{side} RGB, normalised with mean {_floats(s['normalization']['mean'])} and std "
            f"{_floats(s['normalization']['std'])} (in [0, 1] units)"]


def _data(s: dict[str, Any]) -> list[str]:
    cfg, images = s["config"], s["images"]
    held = (f"; validation: {images['val']:,} training images held out by seed {cfg['seed']}"
            if images.get("val") else "")
    subset = f" (the first {cfg['train_subset']:,})" if cfg["train_subset"] else ""
    return ["## Data", "",
            f"- {cfg['dataset']}: {images['train']:,} training images{subset}{held}; "
            f"{images.get('test', 0):,} test images" + ("" if "test" in images else " (not evaluated)"),
            f"- classes: {', '.join(s['classes'])}"] + ([f"- {s['data_note']}"] if s.get("data_note") else [])


def _results(s: dict[str, Any]) -> list[str]:
    main = s["main_split"]
    out = ["## Results", "", "| split | final accuracy | best accuracy |", "| --- | --- | --- |"]
    out += [f"| {name} | {s[f'{name}_acc']:.2%} | {s[f'best_{name}_acc']:.2%} |" for name in ("val", "test")
            if f"{name}_acc" in s]
    per_class = sorted(s[f"per_class_{main}_acc"].items(), key=lambda kv: kv[1])
    out += ["", f"Per class ({main}, lowest first): " + ", ".join(f"{c} {a:.1%}" for c, a in per_class)]
    return out


def _training(s: dict[str, Any]) -> list[str]:
    cfg = s["config"]
    resumes = "".join(f"; resumed at epoch {r['epoch']} (batch {r['batch']}) on {r['world_size']} process(es)"
                      for r in s.get("resumes", []))
    threads = f", {s['cpu_threads']} CPU thread(s) each" if s.get("cpu_threads") else ""
    return ["## Training", "",
            f"- {s['epochs_completed']} epoch(s), global batch {cfg['batch_size']}, optimizer {cfg['optimizer']}, "
            f"{_flops(s['train_flops'])} of training",
            f"- precision {s['mixed_precision']}; {s['world_size']} process(es) on {s['device']}{threads}; "
            f"{s.get('hardware', '')}",
            f"- {s['total_seconds']:.0f} s of training and evaluation{resumes}"]


def _reproduce(s: dict[str, Any]) -> list[str]:
    world, config = s["world_size"], f"{s['config']['output_dir'] or '<this folder>'}/config.yaml"
    cpu = "ACCELERATE_USE_CPU=1 " if s["device"] == "cpu" else ""  # else accelerate starts one CPU process
    launch = ("python -m cifar_dist.train" if world == 1 else
              f"{cpu}accelerate launch --multi_gpu --num_processes {world} cifar_dist/train.py")
    return ["## Train it again", "", "```bash",
            f"{launch} --config {config} --output-dir <a new folder>", "```",
            "On the same machine, world size and thread count the weights come out bit-identical (on GPUs add "
            "`--deterministic`); on another world size, with `--sync-bn`, the same global batches and weights "
            "within the tolerance docs/distributed.md's \"Elastic and reproducible\" measures."]


def _flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n / 1e6:,.1f} MFLOP"


def _floats(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
