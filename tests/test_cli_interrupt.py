"""Interrupting ``curvkit analyze`` (Ctrl-C, ``kill``, ``kill -9``) loses nothing and resumes.

Each test starts the installed console script on the bundled MLP, waits until the
first analysis (``eigen/largest``) is in the results file, signals the process while
it computes a long trace, then runs the same command again and checks that the
file ends complete, with the finished analysis skipped and every value equal to an
uninterrupted run's.

The tests synchronise on the file's state alone: the store moves an analysis into
place together with its request in one link operation, so the moment
``eigen/largest`` is visible it is resumable; the poll interval only bounds how
soon the signal follows, and the trace after it takes seconds. (Before the store
wrote the request with the result, a signal between the two made the resume
recompute ``eigen/largest``: the flaky failure of issue 8.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import weakref

import h5py
import pytest
from curvkit.cli.analyze import AnalysisInterruptedError
from curvkit.cli.main import app
from typer.testing import CliRunner

import curvkit.runs
from curvkit.datasets import bundled_file
from curvkit.store import ResultsStore

MLP = str(bundled_file("digits_mlp.pt"))
ANALYSES = ["--top-k", "5", "--trace", "hutchinson", "--trace-matvecs", "1500"]
"""The trace is long enough (1500 products, seconds) to be interrupted in."""
KEYS = {"eigen/largest", "trace/hutchinson"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "results.h5"
    result = CliRunner().invoke(app, ["analyze", MLP, *ANALYSES, "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        return {key: run.read(key) for key in KEYS}


def _stored_keys(path) -> set[str]:
    """Analyses in the file so far, read without the writer's lock (the writer flushes each one).

    The writer does not use SWMR, so a read that overlaps a write can see a
    half-written object (a link whose group is not yet readable comes back as
    ``None``) or fail in h5py: either way the poll just tries again.
    """
    try:
        with h5py.File(path, "r", locking=False) as f:
            keys = set()
            runs = f.get("runs")
            for name in runs if runs is not None else ():
                run = runs.get(name)
                for kind in ("eigen", "trace"):
                    group = run.get(kind) if run is not None else None
                    for analysis in group if group is not None else ():
                        if not analysis.startswith("_"):
                            keys.add(f"{kind}/{analysis}")
            return keys
    except Exception:  # caught mid-write (OSError, KeyError, RuntimeError...): try again
        return set()


def _interrupt_after_first_analysis(command, out, env, cwd, signum) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [*command, "analyze", MLP, *ANALYSES, "-o", str(out)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while "eigen/largest" not in _stored_keys(out):
        assert proc.poll() is None, f"analyze ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "eigen/largest never appeared"
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"]
)
def test_interrupted_analyze_keeps_finished_work_and_resumes(
    tmp_path, signum, uninterrupted, curvkit_command, script_env, run_curvkit
):
    out = tmp_path / "results.h5"
    stopped = _interrupt_after_first_analysis(curvkit_command, out, script_env, tmp_path, signum)
    if signum == signal.SIGKILL:
        assert stopped.returncode == -signal.SIGKILL
        expected_status, expected_error = "interrupted", None  # nobody could mark it: found running
    else:
        assert stopped.returncode == 130, stopped.stderr
        assert "Traceback" not in stopped.stderr
        lines = stopped.stderr.strip().splitlines()
        assert len(lines) == 1 and "interrupted" in lines[0] and "run the same command again" in lines[0]
        assert str(out) in lines[0]
        expected_status, expected_error = "failed", "interrupted"
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        assert run.status == expected_status
        assert run.error == expected_error
        assert set(run.analyses()) == {"eigen/largest"}

    resumed = run_curvkit("analyze", MLP, *ANALYSES, "-o", str(out), "--json", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (summary,) = json.loads(resumed.stdout)["runs"]
    assert summary["resumed"] == ["eigen/largest"]
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.error is None
        assert run.attempts == 2
        assert set(run.analyses()) == KEYS
        top, trace = run.read("eigen/largest"), run.read("trace/hutchinson")
    assert top.values.tolist() == uninterrupted["eigen/largest"].values.tolist()
    # The trace's 64-column products go through the "auto" HVP strategy, which picks
    # the looped or the batched backward pass by timing them; the two round float32
    # differently, so a recomputed trace matches to float32's rounding, not bit for bit.
    whole = uninterrupted["trace/hutchinson"]
    assert trace.estimate == pytest.approx(whole.estimate, rel=1e-6)
    assert trace.stderr == pytest.approx(whole.stderr, rel=1e-6)


class _Collectable:
    """An object whose collection runs a weakref callback."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_signal_swallowed_by_a_weakref_callback_still_stops_the_run(tmp_path, monkeypatch):
    """A signal handled inside a weakref callback (autograd frees objects all the time)
    has its ``KeyboardInterrupt`` printed and swallowed by Python; analyze must stop anyway."""
    real_run_plan = curvkit.runs.run_checked_plan

    def run_plan(*args, progress, **kwargs):
        def signal_during_trace(key, counters):
            if key.startswith("trace/"):
                obj = _Collectable()
                ref = weakref.ref(obj, lambda _: signal.raise_signal(signal.SIGTERM))
                del obj  # the callback runs the handler; its KeyboardInterrupt is swallowed
                assert ref() is None
            progress(key, counters)

        return real_run_plan(*args, progress=signal_during_trace, **kwargs)

    monkeypatch.setattr(curvkit.runs, "run_checked_plan", run_plan)
    out = tmp_path / "results.h5"
    result = CliRunner().invoke(app, ["analyze", MLP, *ANALYSES, "-o", str(out), "--quiet"])
    assert isinstance(result.exception, AnalysisInterruptedError), result.output
    assert result.exception.exit_code == 130  # main() turns it into one line and this status
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        assert (run.status, run.error) == ("failed", "interrupted")
        assert set(run.analyses()) == {"eigen/largest"}
