"""Where Tune keeps a search's state: the local disk, every file written whole or not at all.

Tune writes its experiment state (`experiment_state-*.json`, every trial's config and status) by copying
it from a staging folder into the search folder, over the last one. A search killed during that copy (an
OOM kill, `kill -9`) left the file empty, and `--resume` then restored a trial with an
empty config: it would have trained another model in the trial's folder (refused there, as every run
with another config is). Written through this file system, each file goes to a temporary name and is
renamed over the real one once complete, so after a killed process a reader finds the old file or the new
one, never a part. (Not a machine's power loss: nothing is fsynced, which would slow every checkpoint.)

Tune also rewrites its staging copy of the experiment state in place (open "w", then json.dump) while a
background upload of the previous one may still be reading it: under load (the upload slower than the
time between two saves) that upload read an empty file and put it in place whole, and `--resume` then
found nothing to restore, and Ray started the search anew in the old folder. So an experiment state
is put in place only if Ray could restore it (`unreadable`: one whole JSON document, with trials); a cut
one is dropped, and the next save brings the state on (`state_problem` is the check `--resume` makes
before Ray reads it).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

PARTIAL = ".partial-"  # a file being written: <name>.partial-<random>, renamed to <name> when complete
UMASK = os.umask(0o022)  # read once (the only way), and put back
os.umask(UMASK)


@cache
def state_pattern() -> str:
    """Tune's experiment state files, `experiment_state-<session>.json` (Ray's own template)."""
    from ray.tune.execution.tune_controller import TuneController

    return TuneController.CKPT_FILE_TMPL.format("*")


def unreadable(path: str | Path) -> str | None:
    """Why an experiment state file cannot be restored (empty, cut short, no trials), or None."""
    try:
        data = Path(path).read_bytes()
        if not data.strip():
            return "it is empty"
        state = json.loads(data)  # Ray's own reader is a json.JSONDecoder too
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return str(e).splitlines()[0]
    if not isinstance(state, dict) or "runner_data" not in state or not state.get("trial_data"):
        return "it holds no trials"  # Ray's restore fails on it (and would start the search anew)
    return None


def state_problem(experiment_dir: Path) -> str | None:
    """What keeps Ray from restoring this experiment (it would start it anew), and what to do, or None:
    the state file it reads (the newest by name, as Ray takes it) missing or unreadable."""
    states = sorted(p for p in experiment_dir.iterdir() if fnmatch.fnmatch(p.name, state_pattern()))
    if not states:
        return (f"no Tune experiment state in {experiment_dir}: the search stopped before Tune saved one; "
                "start it again in another --output-dir")
    if why := unreadable(states[-1]):
        then = ("move it aside to resume from the one before" if len(states) > 1
                else "start the search again in another --output-dir")
        return f"Tune's experiment state {states[-1]} cannot be read ({why}); {then}"
    return None


class _Whole:
    """A file object that writes `path` under a temporary name beside it and renames it into place on
    close; a write or close that fails removes the temporary file and leaves `path` as it was. An
    experiment state that Ray could not restore is dropped (see the module's docstring)."""

    def __init__(self, path: str) -> None:
        directory, name = os.path.split(path)
        self.checked = fnmatch.fnmatch(name, state_pattern())  # (before the file: an import that fails leaks none)
        fd, self.tmp = tempfile.mkstemp(prefix=name + PARTIAL, dir=directory or ".")
        os.chmod(self.tmp, 0o666 & ~UMASK)  # as open() would make it (mkstemp's is 0600)
        self.path, self.f, self.closed = path, os.fdopen(fd, "wb", buffering=0), False  # pyarrow buffers

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except BaseException:
            self.discard()
            raise

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.f.close()
            if self.checked and unreadable(self.tmp):
                self.discard()  # a staging file read while Tune rewrote it; the previous state stays
                return
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self.closed = True

    def discard(self) -> None:
        self.closed = True
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class WholeFiles(pafs.FileSystemHandler):
    """pyarrow's local file system, except that a file written or copied appears whole or not at all."""

    def __init__(self) -> None:
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WholeFiles)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(WholeFiles)

    def get_type_name(self) -> str:
        return "cifar-dist-whole-files"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("cifar-dist will not empty the root directory")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        whole = _Whole(dest)
        try:
            with open(src, "rb") as f:
                shutil.copyfileobj(f, whole.f)
        except BaseException:
            whole.discard()
            raise
        whole.close()

    def open_input_stream(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> Any:
        return pa.PythonFile(_Whole(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> Any:
        return self.fs.open_append_stream(path)


def whole_files() -> pafs.FileSystem:
    """The file system a search gives Tune for its storage."""
    return pafs.PyFileSystem(WholeFiles())
