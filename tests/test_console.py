"""The console (lsm_dist.console): bars and tables on the console, everything else in the log."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tqdm import tqdm

from lsm_dist import console
from lsm_dist.utils import get_logger

ROOT = Path(__file__).resolve().parents[1]


def _noisy(tmp_path):
    """What libraries do: log, warn, print, draw their own bars, run a subprocess."""
    lib = logging.getLogger("somelib")
    lib.warning("somelib warning")
    warnings.warn("a python warning", UserWarning, stacklevel=1)
    print("a print from a library")
    for _ in tqdm(range(3), desc="library bar"):
        pass
    subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child stderr line\\n')"], check=True)
    os.write(2, b"c-level write\n")


def test_session_sends_everything_but_bars_and_tables_to_the_log(tmp_path, capfd):
    log = get_logger("lsm.test")
    handler = logging.StreamHandler(sys.stderr)  # a library's handler bound to the real stderr
    logging.getLogger("boundlib").addHandler(handler)
    old = sys.stdout, sys.stderr
    try:
        with console.session(tmp_path / "run.log", verbose=False) as s:
            log.info("project info")
            log.warning("project warning")
            logging.getLogger("boundlib").error("bound error")
            _noisy(tmp_path)
            with console.stage("[1/2] one"):
                for _ in console.progress(range(4), unit="thing"):
                    for _ in console.progress(range(2), desc="nested"):  # silent: nested
                        pass
                with console.progress(total=3) as bar:  # a second call feeds the same bar
                    bar.update(3)
            with console.stage("[2/2] two"):
                pass
            console.echo("| the table |")
    finally:
        logging.getLogger("boundlib").removeHandler(handler)
    assert (sys.stdout, sys.stderr) == old
    out, err = capfd.readouterr()
    assert out == "| the table |\n"
    screen = [seg for line in err.splitlines() for seg in line.split("\r") if seg.strip()]
    assert any("project warning" in s for s in screen)  # the project's warnings stay visible
    assert {s.split(":")[0] for s in screen if s.startswith("[")} == {"[1/2] one", "[2/2] two"}
    assert any("[1/2] one" in s and "7/7" in s for s in screen)  # 4 + 3 in one bar
    assert any(s.startswith("[2/2] two: done in") for s in screen)
    for gone in ("project info", "somelib", "python warning", "a print", "library bar", "child stderr",
                 "c-level", "bound error", "nested"):
        assert gone not in err + out, gone
    text = (tmp_path / "run.log").read_text()
    for kept in ("INFO lsm.test: project info", "WARNING somelib: somelib warning", "UserWarning: a python warning",
                 "stdout: a print from a library", "stderr: library bar: 100%", "terminal: child stderr line",
                 "terminal: c-level write", "bound error"):
        assert kept in text, kept
    assert "library bar:  33%" not in text  # a bar's redraws collapse to its last state
    assert all(line[:4].isdigit() for line in text.splitlines())
    assert s.warnings >= 3  # somelib, the python warning, boundlib (the project's own not counted)
    # after the session: the console and the library handler behave as before
    logging.getLogger("boundlib").addHandler(handler)
    try:
        log.info("after")
        logging.getLogger("boundlib").error("bound after")
    finally:
        logging.getLogger("boundlib").removeHandler(handler)
    err = capfd.readouterr().err
    assert "after" in err and "bound after" in err


def test_verbose_redirects_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("LSM_VERBOSE", "1")
    with console.session(tmp_path / "run.log"):
        get_logger("lsm.test").info("project info")
        print("a print")
    out, err = capfd.readouterr()
    assert "a print" in out and "project info" in err
    assert not (tmp_path / "run.log").exists()


def test_error_goes_to_the_log_and_the_console_says_where(tmp_path, capfd):
    with pytest.raises(ZeroDivisionError), console.session(tmp_path / "run.log", verbose=False):
        print("before the error")
        1 / 0  # noqa: B018
    err = capfd.readouterr().err
    assert f"(full log: {tmp_path / 'run.log'})" in err
    text = (tmp_path / "run.log").read_text()
    assert "before the error" in text and "ZeroDivisionError" in text and "Traceback" in text


def test_bar_outside_a_stage_and_silent_when_disabled(capsys):
    for _ in console.progress(range(2), desc="alone", unit="x"):
        pass
    for _ in console.progress(range(2), desc="off", disable=True):
        pass
    err = capsys.readouterr().err
    assert "alone" in err and "2/2" in err and "off" not in err


def test_two_worker_convert_leaks_no_semaphores(tiny_zoo, tmp_path):
    """A 2-worker conversion in its own interpreter: nothing about leaked semaphores at exit
    (the resource tracker's warning came from progress bars inside the spawned workers)."""
    models = [f"{n}={tiny_zoo[n]}" for n in ("llama-tiny-base", "llama-tiny-arith")]
    code = ("from lsm_dist.corpus import ConvertConfig, run_convert\n"
            f"run_convert(ConvertConfig(models={models!r}, out_dir={str(tmp_path / 'c')!r}, tokens=8, chunk=64,"
            " block_samples=16, shard_samples=32, num_workers=2))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "leaked" not in res.stderr and "resource_tracker" not in res.stderr, res.stderr
    assert "convert: 100%" in res.stderr and "3/3" in res.stderr  # one bar, counted by the parent
