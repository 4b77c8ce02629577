"""The results page's tables and its accuracy-against-FLOPs plot, made from the records in bench/results/
(so a figure in the docs is always the one a bench script wrote, with its machine, date and command).

    python -m bench.page                 # bench/results/accuracy_vs_flops.png from the records
    python -m bench.page --table budget  # one table as the docs show it
    python -m bench.page --run /tmp/auto-table/fast-8 --name fast  # a run's own pictures, and a record of it

The docs site's hook (docs/hooks.py) puts `render(kind)` where a page says `<!-- records: kind -->`.
No torch here: the docs build imports this.
"""
from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from textwrap import shorten
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PLOT = "accuracy_vs_flops.png"
# A finished run's own pictures that the results page shows (as <name>-<picture>.png), and the feature maps
# of its stem and of its middle block
RUN_PICTURES = ["curves.png", "samples.png", "confusion_matrix.png"]


def records(kind: str, results: Path = RESULTS) -> list[dict[str, Any]]:
    path = results / f"{kind}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table; a `|` inside a cell (a shell pipe) escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "&#124;")
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows])


def joined(values: list[Any]) -> str:
    return ", ".join(map(str, values))


def where(r: dict[str, Any]) -> dict[str, str]:
    """The columns every figure carries: when, on what, by which command."""
    # <code> rather than backticks: a `|` escaped inside backticks shows its backslash
    command = html.escape(r["command"], quote=False)
    return {"date": r["date"], "machine": r["machine"], "command": f"<code>{command}</code>"}


# Recipes changed after records were made with them: the recipe, the date its new settings began, and the
# flags that give its old settings back. A record from before, spelling none of them out, says so.
RECIPE_CHANGES = [("seed", "2026-12-08 04:00 UTC", "--optimizer sgd")]


def recipe_label(r: dict[str, Any]) -> str:
    for recipe, since, flags in RECIPE_CHANGES:
        if r["recipe"] == recipe and r["date"] < since and flags.split()[0] not in r.get("train_args", []):
            return f"{recipe} before {since[:10]} (now `--recipe {recipe} {flags}`)"
    return r["recipe"]


def accuracy_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def spread(r: dict[str, Any]) -> str:
        seconds = r.get("train_seconds") or []
        if len(seconds) > 1:
            return f"{min(seconds):,}–{max(seconds):,} s"
        return f"{seconds[0]:,} s" if seconds else ""
    return [{"preset / recipe": f"`{r['preset']}` / {recipe_label(r)}", "epochs": r["epochs"],
             "training PFLOP": f"{r['train_flops'] / 1e15:.3f}",
             "test accuracy": (f"**{r['mean']:.2f} ± {r['std']:.2f} %** (n={r['n']}: {joined(r['test_acc'])})"
                               if r["n"] > 1 else f"**{r['mean']:.2f} %** (n=1)"),
             "time per run": spread(r), **where(r)} for r in rs]


def budget_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row a budget; records before 12/05 17:00 planned whole epochs and only shortened them."""
    return [{"budget": row["budget"], "trained": row.get("training", "`fast`"),
             "epochs (planned)": f"{row['epochs']} ({row['planned']})",
             "plan moved": (f"{row['changes']}x, in steps" if "changes" in row else
                            f"{row['shortened']}x, in whole epochs"), "wall-clock": f"{row['wall_s']} s",
             "of the budget": row["vs_budget"], "test accuracy": f"{row['test_acc']} %", **where(r)}
            for r in rs for row in r["rows"]]


def auto_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"training": row["candidate"], "epochs": row["epochs"], "test accuracy": f"{100 * row['test_acc']:.2f} %",
             "seconds": row["seconds"], "precision": row["mixed_precision"], **where(r)}
            for r in rs[-1:] for row in r["rows"]]


def time_to_accuracy_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def target(r: dict[str, Any], name: str) -> float:
        return r["high_target"] if name == "94" else r["target"]
    return [{"row": name, "target": f"{100 * target(r, name):.1f} %",
             "seconds": "never reached" if row["seconds"] is None else f"{row['seconds']:,.0f}",
             "precision": row["precision"], **where(r)} for r in rs for name, row in r.get("rows", {}).items()]


def throughput_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"tutorial's loop": f"{r['median_tutorial']:,.0f} img/s", "ours": f"{r['median_ours']:,.0f} img/s",
             "ours / tutorial": f"{r['ratio']}x", "bare step, best": ceiling(r),
             **where(r)} for r in rs]


def ceiling(r: dict[str, Any]) -> str:
    best = max((max(c["fp32"], c["bf16"]) for c in r.get("ceiling", [])), default=None)
    return f"{best:,} img/s" if best else "(not measured)"


def folders_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"pictures": f"{r['images']:,}", "written": f"{r['written_s']} s",
             "first decode": f"{r['first_decode_s']} s",
             "cached start": f"{r['cached_s']} s", "same pixels, labels, order": all(r["same"].values()),
             "same weights after an epoch": r["same_weights"], **where(r)} for r in rs]


def elastic_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"preset": r["preset"],  # the world it started in, then the one of each resume
             "world sizes": " → ".join(str(w) for w in [r["resumes"][0]["saved_by"],
                                                         *(x["world_size"] for x in r["resumes"])]),
             "test accuracy": f"{r['test_acc']} %", "uninterrupted seeds": joined(r["uninterrupted"]),
             "wall-clock": f"{r['wall_seconds']:,} s", **where(r)} for r in rs]


def search_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"scheduler": r["scheduler"], "trials": r["trials"], "epochs trained": r["trial_epochs"],
             "exploits": r["exploits"], "best val accuracy": f"{100 * r['best_val_acc']:.1f} %",
             "wall-clock": f"{r['wall_seconds']:,} s", **where(r)} for r in rs]


def pictures_rows(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"pictures": r["name"], "run": f"`{r['preset']}` / {r['recipe']}, {r['epochs']} epochs, {r['precision']}",
             "test accuracy": f"{100 * r['test_acc']:.2f} %", "seconds": f"{r['seconds']:,}", **where(r)} for r in rs]


ROWS: dict[str, Callable[[list[dict[str, Any]]], list[dict[str, Any]]]] = {
    "accuracy": accuracy_rows, "budget": budget_rows, "auto": auto_rows, "time_to_accuracy": time_to_accuracy_rows,
    "throughput": throughput_rows, "folders": folders_rows, "elastic": elastic_rows, "search": search_rows,
    "pictures": pictures_rows}


def render(kind: str, results: Path = RESULTS) -> str:
    """The markdown table of bench/results/<kind>.jsonl's records, oldest first (`auto`: the newest, the
    table the code reads; `time_to_accuracy`: the records with rows, the bench's format since 11/28)."""
    rows = ROWS[kind](records(kind, results))
    return table(rows, list(rows[0])) if rows else f"(no records in bench/results/{kind}.jsonl yet)"


def variant(r: dict[str, Any]) -> str:
    """The training flags of an accuracy record beyond its preset and recipe (what tells two points apart);
    the data's folder, the evaluation's frequency and the recipe's name change nothing trained."""
    words, kept = iter(r.get("train_args", [])), []
    for word in words:
        if word in ("--data-dir", "--eval-every", "--recipe"):
            next(words, None)
        else:
            kept.append(word)
    return " ".join(kept)


def plot(results: Path, out: Path) -> Path:
    """Test accuracy against training FLOPs: the newest accuracy record of each preset, recipe and epoch
    count (mean, its seeds' spread) and the `--preset auto` table's trainings at their epoch counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    newest = {(r["preset"], r["recipe"], r["epochs"], variant(r)): r for r in records("accuracy", results)}
    fig, ax = plt.subplots(figsize=(9, 7.5), dpi=110)
    for (preset, recipe, epochs, flags), r in newest.items():
        ax.errorbar(r["train_flops"], r["mean"], yerr=r["std"], fmt="o", capsize=3,
                    label=shorten(f"{preset} / {recipe} {flags}".strip(), 70) + f", {epochs} epochs (n={r['n']})")
    table_rows = [row for r in records("auto", results)[-1:] for row in r["rows"]]  # the newest: the table's
    for name in sorted({row["candidate"] for row in table_rows}):
        rows = [row for row in table_rows if row["candidate"] == name]
        ax.plot([row["train_flops"] for row in rows], [100 * row["test_acc"] for row in rows], "--.",
                label=f"{name} (auto table)")
    ax.set(xscale="log", xlabel="training FLOPs", ylabel="test accuracy (%)",
           title="Real CIFAR-10: test accuracy against training FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)  # below: the labels are long
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def publish_run(run: Path, name: str, results: Path) -> list[Path]:
    """A finished run's pictures (drawn by the run itself) into bench/results/, and pictures.jsonl's record
    of the run they come from: its preset, accuracy, epochs, machine and time."""
    summary = json.loads((run / "summary.json").read_text())
    blocks = sorted((run / "feature_maps" / "final").glob("block*.png"))
    maps = [run / "feature_maps" / "final" / "stem.png", blocks[(len(blocks) - 1) // 2]]
    copied = []
    for picture in [run / p for p in RUN_PICTURES] + maps:
        target = results / f"{name}-{'feature-map-' if picture in maps else ''}{picture.name}"
        shutil.copyfile(picture, target)
        copied.append(target)
    record = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": summary["hardware"],
              "command": "python -m " + " ".join(["bench.page", *sys.argv[1:]]), "name": name,
              "preset": summary["preset"], "recipe": summary["recipe"], "epochs": summary["epochs_completed"],
              "test_acc": summary["test_acc"], "precision": summary["mixed_precision"],
              "seconds": round(summary["total_seconds"]), "pictures": [p.name for p in copied]}
    with (results / "pictures.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    return copied


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="the records' folder")
    p.add_argument("--out", default=str(RESULTS / PLOT), help="where the plot goes")
    p.add_argument("--table", choices=sorted(ROWS), help="print this table instead of drawing the plot")
    p.add_argument("--run", help="a finished run whose pictures the results page shows (with --name)")
    p.add_argument("--name", default="fast", help="the name its pictures take in bench/results/")
    a = p.parse_args()
    if a.run:
        for path in publish_run(Path(a.run), a.name, Path(a.results)):
            print(f"wrote {path}")
        return 0
    if a.table:
        print(render(a.table, Path(a.results)))
        return 0
    print(f"wrote {plot(Path(a.results), Path(a.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
