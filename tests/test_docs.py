"""The README and the docs site: built strictly, the flags page generated, and every command they show
either run (the quick start on generated data) or, where it needs real data, a GPU or a cluster, parsed
by the program it calls, so a renamed flag fails here."""
import html
import re
import shlex
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from bench.page import records

from conftest import ROOT, TINY, env, run, summary, train_once

pytestmark = pytest.mark.timeout(300)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands() -> list[tuple[str, str]]:
    """(page, command) for every line of every ```bash block (continuations joined, comments dropped)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    found.append((page.name, line))
    return found


def train_args(command: str) -> list[str] | None:
    """The train.py flags of a command that trains (accelerate launch, python -m, sbatch, the launcher)."""
    words = shlex.split(command.split("&&")[0])
    while words and "=" in words[0]:  # VAR=value before the command
        words = words[1:]
    for script in ("cifar_dist/train.py", "cifar_dist.train", "slurm/train.sh"):
        if script in words:
            return words[words.index(script) + 1:]
    if words[:3] == ["python", "-m", "launcher"] and "--" in words:
        return words[words.index("--") + 1:]
    return None


def test_the_docs_site_builds_strictly_and_a_broken_anchor_fails_it(tmp_path):
    built = run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], 120, cwd=ROOT,
                env=env())
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "flags.html").is_file() and (tmp_path / "site" / "results" / "search-pbt.png").is_file()
    results = (tmp_path / "site" / "results.html").read_text()
    assert "<!-- records:" not in results  # every marker became its table
    for record in records("accuracy") + records("budget"):  # the numbers are the records', with their command
        assert html.escape(record["command"], quote=False) in results
    for record in records("accuracy"):  # (one seed: no spread)
        assert f"{record['mean']:.2f} {'± ' + format(record['std'], '.2f') + ' ' if record['n'] > 1 else ''}%" in results
    for row in records("budget")[-1]["rows"]:
        assert f"{row['wall_s']} s</td>" in results and f"{row['test_acc']} %</td>" in results
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "bench", copy / "bench")
    shutil.copy(ROOT / "mkdocs.yml", copy)
    page = copy / "docs" / "training.md"
    page.write_text(page.read_text() + "\nSee [the flags](flags.md#no-such-section).\n")
    broken = run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "s2")], 120, cwd=copy,
                 env=env())
    assert broken.returncode != 0 and "no-such-section" in broken.stderr


def test_the_flags_page_is_the_config_and_the_readme_a_front_page():
    from cifar_dist.config import flags_markdown

    assert flags_markdown() in (ROOT / "docs" / "flags.md").read_text()  # `python -m cifar_dist.config` writes it
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_training_and_search_command_shown_parses(monkeypatch, tmp_path):
    from cifar_dist.config import ConfigError, resolve
    from cifar_dist.search.cli import check_args, parse_args

    monkeypatch.setenv("SLURM_JOB_ID", "1")  # `--time-budget slurm` is checked as inside a job
    monkeypatch.chdir(tmp_path)  # where the pages' folder of pictures is
    for name in ("cat", "dog"):
        (tmp_path / "my_photos" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "my_photos" / name / "1.png")
    shown = commands()
    trains = [(page, c, args) for page, c in shown if (args := train_args(c)) is not None]
    searches = [(page, c) for page, c in shown if c.startswith("python tune/search.py")]
    assert len(trains) >= 10 and len(searches) >= 3  # what the pages show today, at least
    for page, command, args in trains:
        try:
            resolve(args)
        except (SystemExit, ConfigError) as e:
            pytest.fail(f"{page}: {command}: {e}")
    for page, command in searches:
        try:
            check_args(parse_args(shlex.split(command)[2:]))
        except SystemExit:
            pytest.fail(f"{page}: {command}")


def test_the_readme_quick_start_trains_and_predicts_as_shown(tmp_path):
    """The README's train command on generated data, through the real `accelerate launch`, then its
    predict command on two photos of the user's."""
    shown = dict((c.split()[2], c) for page, c in commands() if page == "README.md" and "synthetic" in c
                 or page == "README.md" and c.startswith("python -m cifar_dist.predict"))
    train, predict = shown["cifar_dist/train.py"], shown["cifar_dist.predict"]
    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "my_cat.jpg")
    (tmp_path / "holiday_photos").mkdir()
    Image.new("RGB", (40, 40), (20, 60, 200)).save(tmp_path / "holiday_photos" / "sea.png")
    words = shlex.split(train)
    words[words.index("cifar_dist/train.py")] = str(ROOT / "cifar_dist" / "train.py")
    trained = run(words, 240, cwd=tmp_path, env=env(ACCELERATE_USE_CPU="1"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "epoch   2/2 |" in trained.stdout and (tmp_path / "runs" / "try" / "model.pt").is_file()
    predicted = run([sys.executable, *shlex.split(predict)[1:]], 120, cwd=tmp_path, env=env())
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("holiday_photos/sea.png") is not lines[1].startswith("holiday")


def test_the_docs_quick_commands_run_as_shown(tmp_path):
    """Every command of the docs pages that trains on generated data through accelerate launch, run as
    shown (the README's is the quick start above; the sbatch ones are what the SLURM tests submit)."""
    quick = [(page, c) for page, c in commands()
             if page != "README.md" and "--dataset synthetic" in c and "accelerate launch" in c]
    assert quick  # docs/distributed.md's two CPU processes, today
    for page, command in quick:
        words, extra = shlex.split(command), {}
        while "=" in words[0]:  # VAR=value before the command
            name, value = words.pop(0).split("=", 1)
            extra[name] = value
        words[words.index("cifar_dist/train.py")] = str(ROOT / "cifar_dist" / "train.py")
        r = run(words, 240, cwd=tmp_path, env=env(**extra))
        assert r.returncode == 0, f"{page}: {command}\n{r.stderr[-3000:]}"
        assert "done: test acc" in r.stdout, f"{page}: {command}\n{r.stdout[-3000:]}"


def test_the_results_pictures_are_drawn_from_the_records_and_a_runs_own(tmp_path):
    """`python -m bench.page`: the accuracy-against-FLOPs plot from the committed records; `--run`: a
    finished run's own pictures and a record of the run, which the results page's table then shows."""
    from bench import page

    out = page.plot(page.RESULTS, tmp_path / "plot.png")
    picture = np.asarray(Image.open(out).convert("L"), dtype=float)
    assert picture.shape[0] > 300 and picture.std() > 10  # drawn, not blank
    run_dir = tmp_path / "run"
    train_once([*TINY, "--epochs", "1", "--train-subset", "400", "--test-subset", "100", "--output-dir", str(run_dir)])
    results = tmp_path / "results"
    results.mkdir()
    copied = page.publish_run(run_dir, "tiny", results)
    maps = ["feature_maps/final/stem.png", "feature_maps/final/block0.png"]  # blocks 0 and 1: the middle one
    assert [p.name for p in copied] == ["tiny-curves.png", "tiny-samples.png", "tiny-confusion_matrix.png",
                                        "tiny-feature-map-stem.png", "tiny-feature-map-block0.png"]
    assert all(p.read_bytes() == (run_dir / name).read_bytes() for p, name in zip(copied, page.RUN_PICTURES + maps))
    (record,) = page.records("pictures", results)
    assert record["test_acc"] == summary(run_dir)["test_acc"] and record["epochs"] == 1
    assert f"{100 * record['test_acc']:.2f} %" in page.render("pictures", results)


def test_a_record_made_before_its_recipe_changed_names_the_flags_that_give_it_back():
    from bench import page

    old = dict(preset="seed3", recipe="seed", date="2026-12-07 13:59 UTC", train_args=["--recipe", "seed"],
               epochs=20, train_flops=1e15, mean=89.33, std=0.0, n=1, test_acc=[89.33], command="c", machine="m")
    spelled = {**old, "train_args": ["--recipe", "seed", "--optimizer", "sgd"]}
    new = {**old, "date": "2026-12-08 04:03 UTC"}
    labels = [row["preset / recipe"] for row in page.accuracy_rows([old, spelled, new])]
    assert labels == ["`seed3` / seed before 2026-12-08 (now `--recipe seed --optimizer sgd`)", "`seed3` / seed",
                      "`seed3` / seed"]
