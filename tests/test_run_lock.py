"""RUN/.lock: a second `cai run` (or `cai report`) on a run directory another process is writing into stops with a
one-line error instead of racing it; a holder that ends, even by a kill, leaves nothing that blocks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_pipeline import FakeStages

from cai import pipeline
from cai.cli.main import main
from cai.config.load import load_recipe
from cai.errors import UserError
from cai.runtime.rundir import LOCK, run_lock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="no fcntl: the lock is a no-op")

# a child process (flock locks belong to an open file, so a second one in this process would not say much)
# that takes the lock, says so, and holds it until its stdin closes or it is killed
HOLD = "import sys\nfrom cai.runtime.rundir import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"


@contextmanager
def held_elsewhere(run_dir: Path):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_second_lock_names_the_directory_and_the_holder(tmp_path):
    rdir = tmp_path / "run"
    with held_elsewhere(rdir) as child:
        with pytest.raises(UserError) as err:
            with run_lock(rdir):
                pass
        msg = str(err.value)
        assert "\n" not in msg and str(rdir) in msg and f"pid {child.pid}" in msg
        assert "wait for it or pass another run directory" in msg
        assert json.loads((rdir / LOCK).read_text())["pid"] == child.pid
        child.stdin.close()  # the holder leaves its `with`: the lock is free again
        assert child.wait(timeout=60) == 0
    with run_lock(rdir):
        assert json.loads((rdir / LOCK).read_text())["pid"] != child.pid


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    rdir = tmp_path / "run"
    with held_elsewhere(rdir) as child:
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
        assert (rdir / LOCK).is_file()  # the file stays; the OS dropped the lock with the process
        with run_lock(rdir):
            with run_lock(tmp_path / "other"):  # another run directory is another lock
                pass


def test_cai_run_and_cai_report_refuse_a_run_directory_in_use(tmp_path, root, monkeypatch, capsys):
    monkeypatch.chdir(root)
    rdir = tmp_path / "run"
    fake = FakeStages(rdir)
    monkeypatch.setattr(pipeline, "_load_stage", fake.load)
    pipeline.run(
        load_recipe(root / "recipes/tiny.yaml", [f"run_dir={rdir}"]), quiet=True
    )  # takes and frees it
    fake.calls.clear()
    manifests = {p: p.read_bytes() for p in rdir.rglob("manifest.json")}
    with held_elsewhere(rdir) as child:
        assert main(["run", "recipes/tiny.yaml", "--run-dir", str(rdir), "--force"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert str(rdir) in err and f"pid {child.pid}" in err
        assert fake.calls == []  # no stage was reset or run
        assert main(["report", str(rdir)]) == 2  # it would write RUN/report
        assert f"pid {child.pid}" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in rdir.rglob("manifest.json")} == manifests
    pipeline.run(load_recipe(root / "recipes/tiny.yaml", [f"run_dir={rdir}"]), quiet=True)
    assert fake.calls == []  # the lock file changes nothing the run compares: every stage is up to date
