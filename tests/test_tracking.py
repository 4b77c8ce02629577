"""W&B (offline) and TensorBoard through Accelerate, feature maps, plots, summary, ONNX export."""

import numpy as np
import pytest
from PIL import Image

from conftest import accelerate_launch, assert_one_line_error, metrics, run_train, summary
from wandb_history import history

pytestmark = pytest.mark.timeout(300)


def image(path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def assert_picture(path) -> None:
    a = image(path)
    assert a.ndim == 3 and a.shape[0] > 16 and a.shape[1] > 16
    assert a.max() > a.min(), f"{path} is a constant image"


def tb_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [p.parent for p in folder.rglob("events.out.tfevents.*")]
    values = []
    for run in set(runs):
        acc = EventAccumulator(str(run))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(values)


def no_wandb_key_env(tmp_path) -> dict:
    home = tmp_path / "home"  # no ~/.netrc, no API key, no WANDB_MODE: must go offline by itself
    home.mkdir()
    return dict(HOME=str(home), WANDB_MODE=None, WANDB_API_KEY=None)


def test_a_two_process_ddp_run_is_one_world_and_logs_one_wandb_run_tensorboard_and_pictures(tmp_path, tiny_args):
    """Real 2-process CPU DDP through `accelerate launch` (gloo), with both trackers on: one world whose
    ranks keep the same weights, and one W&B run, one TensorBoard log and one set of pictures, from the
    main process only. (One launch for both: each costs two ranks' start-up.)"""
    out = tmp_path / "run"
    env = no_wandb_key_env(tmp_path)
    r = accelerate_launch([*tiny_args, "--epochs", "2", "--tracker", "wandb,tensorboard", "--feature-maps-every", "1",
                           "--output-dir", str(out)], tmp_path, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("W&B: no API key and no WANDB_MODE set: logging offline") == 1
    rows = metrics(out)
    digests = summary(out)["rank_weight_digests"]
    assert summary(out)["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]  # DDP kept them equal
    assert [m["epoch"] for m in rows] == [1, 2] and rows[-1]["test_acc"] > 0.3
    assert r.stdout.count("epoch   1/2 |") == 1  # one line per epoch, from the main process only

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs  # only the main process logs
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    hist = history(files[0])
    logged = {row["epoch"]: row["test/acc"] for row in hist if "test/acc" in row}
    assert logged == {m["epoch"]: m["test_acc"] for m in rows}
    steps = [row["_step"] for row in hist]
    assert steps == sorted(steps)
    layers = ["stem", "block0", "block1"]  # the tiny model has two residual blocks
    for epoch in (1, 2):
        row = next(row for row in hist if row.get("epoch") == epoch and "features/stem/path" in row)
        for layer in layers:
            assert_picture(runs[0] / "files" / row[f"features/{layer}/path"])
    assert any("confusion_matrix/path" in row for row in hist) and any("samples/path" in row for row in hist)

    tb = tb_scalars(out / "tensorboard", "test/acc")
    assert [s for s, _ in tb] == [m["step"] for m in rows]
    assert np.allclose([v for _, v in tb], [m["test_acc"] for m in rows])
    assert len(tb_scalars(out / "tensorboard", "train/loss")) == 2

    for png in ["curves.png", "confusion_matrix.png", "samples.png",
                *[f"feature_maps/{t}/{layer}.png" for t in ("epoch-0001", "final") for layer in layers]]:
        assert_picture(out / png)
    assert not (out / "feature_maps" / "epoch-0002").exists()  # the last epoch's maps are the final ones
    s = summary(out)
    assert set(s["per_class_test_acc"]) == {f"class{i}" for i in range(10)}
    assert f"total parameters: {s['params']:,}" in (out / "model_summary.txt").read_text()


def test_wandb_respects_dir_project_name_group(tmp_path, tiny_args):
    from wandb.proto import wandb_internal_pb2 as pb

    from wandb_history import payloads

    wdir = tmp_path / "wandb-dir"
    wdir.mkdir()
    out = tmp_path / "run"
    r = run_train([*tiny_args, "--epochs", "1", "--tracker", "wandb", "--run-name", "trial-7", "--group", "search-1",
                   "--output-dir", str(out)], tmp_path, WANDB_DIR=str(wdir), WANDB_PROJECT="my-proj")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "wandb").exists()
    (file,) = wdir.glob("wandb/offline-run-*/run-*.wandb")
    runs = []
    for data in payloads(file):
        rec = pb.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "run":
            runs.append(rec.run)
    assert runs and runs[0].display_name == "trial-7" and runs[0].run_group == "search-1"
    assert runs[0].project == "my-proj"


def test_resume_continues_the_step_axis(tmp_path, tiny_args):
    out = tmp_path / "run"
    args = [*tiny_args, "--tracker", "tensorboard,wandb", "--log-every", "2", "--output-dir", str(out)]
    assert run_train([*args, "--epochs", "1"], tmp_path).returncode == 0
    r = run_train([*args, "--epochs", "3"], tmp_path)  # a longer run in the same directory resumes
    assert r.returncode == 0 and "resumed from" in r.stdout
    rows = metrics(out)
    assert [m["epoch"] for m in rows] == [1, 2, 3]
    tb = tb_scalars(out / "tensorboard", "test/acc")
    assert [s for s, _ in tb] == [m["step"] for m in rows]  # no duplicated or rewound steps
    step_losses = [s for s, _ in tb_scalars(out / "tensorboard", "train/step_loss")]
    assert step_losses == sorted(set(step_losses))
    ids = {p.name for p in (out / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(ids) == 1  # the resumed W&B run is the same run


def test_onnx_export_passes_checker_and_matches_pytorch(tmp_path, tiny_args, train_here):
    import onnxruntime

    from cifar_dist.export import export, main

    out = tmp_path / "run"
    assert train_here(["--dataset", "synthetic", "--preset", "seed3", "--epochs", "1", "--train-subset", "500",
                       "--output-dir", str(out)]).returncode == 0
    assert main([str(out)]) == 0
    assert (out / "model.onnx").is_file() and not list(out.glob("*.onnx.data"))  # one file
    diff, rel = export(out)
    assert rel <= 1e-4, (diff, rel)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7):
        assert session.run(None, {"images": np.random.rand(n, 3, 32, 32).astype(np.float32)})[0].shape == (n, 10)


def test_export_of_a_non_run_is_one_line(tmp_path, capsys):
    from cifar_dist.export import main

    assert main([str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


def test_unknown_tracker_is_refused(tmp_path, tiny_args, main_in_process):
    from cifar_dist import train

    code, err = main_in_process(train.main, [*tiny_args, "--tracker", "mlflow", "--output-dir", str(tmp_path / "o")])
    assert_one_line_error(code, err, "unknown tracker 'mlflow'")
    assert not (tmp_path / "o").exists()


def test_a_search_is_logged_as_a_wandb_run_of_its_group(tmp_path, monkeypatch):
    """tune/search.py's last step, in this process: search.png and the results table, as one W&B run
    (job type search) in the group of the search's trials."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    from cifar_dist import pictures, tracking

    from wandb_history import payloads

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    reports = {"t1": [dict(epoch=1, val_acc=0.3, exploits=0), dict(epoch=2, val_acc=0.5, exploits=0)],
               "t2": [dict(epoch=1, val_acc=0.1, exploits=0), dict(epoch=2, val_acc=0.45, exploits=1)]}
    picture = pictures.search_figure(reports, {"t1": (1000, 0.5, "completed"), "t2": (2000, 0.45, "completed")}, "t1")
    rows = [dict(trial="t1", val_acc=0.5, params=1000), dict(trial="t2", val_acc=0.45, params=2000)]
    tracking.log_search(["wandb"], tmp_path, "search-9", {"search": picture}, rows)
    # What the end of tune/search.py's process does: wait for W&B's service to have written the run's file
    # (run.finish() can return before; a CI run once read only part of it)
    wandb.teardown()
    (file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run = next(r.run for r in map(pb.Record.FromString, payloads(file)) if r.WhichOneof("record_type") == "run")
    assert (run.run_group, run.job_type, run.display_name) == ("search-9", "search", "search-9-search")
    (row,) = history(file)
    assert row["search/_type"] == "image-file" and row["results/_type"] == "table-file"
    assert (row["results/nrows"], row["results/ncols"]) == (2, 3)
    (png,) = file.parent.glob("files/media/images/search_*.png")
    assert_picture(png)
