"""``curvkit analyze --nproc 2``: two data-parallel processes, one results file, one report, resumable.

The console script launches two gloo processes (as ``torchrun --standalone`` does);
process 0 writes the file and prints, the other computes silently. The results
equal a one-process run's to rounding (float64), a bad input is one line and exit
status 2, and Ctrl-C marks the run interrupted so that the same command resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from curvkit.datasets import bundled_file, load_dataset
from curvkit.store import ResultsStore

MLP = str(bundled_file("digits_mlp.pt"))
ANALYSES = ["--top-k", "3", "--trace", "hutchinson", "--trace-matvecs", "30", "--dtype", "float64"]
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def _read(path):
    with ResultsStore(path, mode="r") as store:
        (run,) = store.runs()
        assert run.provenance["command_line"].startswith("curvkit analyze")
        return run.status, run.read("eigen/largest"), run.read("trace/hutchinson")


def test_two_processes_write_one_file_equal_to_one_process(tmp_path, run_curvkit):
    one = run_curvkit(
        "analyze", MLP, *ANALYSES, "-o", str(tmp_path / "one.h5"), "--json", "--quiet", cwd=tmp_path
    )
    two = run_curvkit(
        "analyze",
        MLP,
        *ANALYSES,
        "--nproc",
        "2",
        "-o",
        str(tmp_path / "two.h5"),
        "--json",
        "--quiet",
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    document = json.loads(two.stdout)  # one document: process 1 printed nothing
    assert len(document["runs"]) == 1
    status, top, trace = _read(tmp_path / "two.h5")
    _, top_one, trace_one = _read(tmp_path / "one.h5")
    assert status == "complete"
    with ResultsStore(tmp_path / "two.h5", mode="r") as store:
        assert "--nproc 2" in store.runs()[0].provenance["command_line"]
    assert top.converged
    assert torch.allclose(torch.as_tensor(top.values), torch.as_tensor(top_one.values), rtol=1e-10, atol=0)
    assert trace.estimate == pytest.approx(trace_one.estimate, rel=1e-10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_joined_by_torchrun_rendezvous_write_one_file(tmp_path, run_curvkit):
    """The multi-node command of docs/distributed.md, two torchrun launches on this machine as the nodes."""
    port = _free_port()
    launches = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
                *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"),
                *("-m", "curvkit.cli.main", "analyze", MLP, *ANALYSES),
                *("-o", str(tmp_path / f"node{node}.h5"), "--json", "--quiet"),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for node in (0, 1)
    ]
    outputs = [launch.communicate(timeout=240) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], [err for _, err in outputs]
    written = sorted(p.name for p in tmp_path.glob("node*.h5"))
    assert len(written) == 1  # process 0 of the whole job alone writes, on its node
    assert sum(bool(out.strip()) for out, _ in outputs) == 1  # and prints
    one = run_curvkit("analyze", MLP, *ANALYSES, "-o", str(tmp_path / "one.h5"), "--quiet", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    _, top, trace = _read(tmp_path / written[0])
    _, top_one, trace_one = _read(tmp_path / "one.h5")
    assert torch.allclose(torch.as_tensor(top.values), torch.as_tensor(top_one.values), rtol=1e-10, atol=0)
    assert trace.estimate == pytest.approx(trace_one.estimate, rel=1e-10)


def test_a_bad_input_is_one_line_from_process_0(tmp_path, run_curvkit):
    done = run_curvkit("analyze", MLP, "--curvature", "no-such-estimator", "--nproc", "2", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvkit: error:") and "no-such-estimator" in lines[0], (
        done.stderr
    )


@pytest.mark.parametrize("bad", ["shard", "empty"])
def test_a_failure_of_one_process_s_data_is_one_line(tmp_path, run_curvkit, bad):
    """Bad samples in process 1's shard only, or no batch for process 0: one line, the failure's,
    whichever process met it (process 0 reports), and the others end with it instead of a traceback."""
    if bad == "shard":
        X, y = load_dataset("digits")
        y = y[:64].clone()
        y[40:] = 11  # the second half of 64 samples: process 1's shard
        torch.save({"inputs": X[:64], "targets": y}, tmp_path / "bad.pt")
        options, expected = ["--data", "bad.pt", "--batch-size", "16"], "process 1 of 2: cross_entropy: class"
    else:
        options, expected = ["--max-samples", "1"], "process 0 of 2 has no batch of the data"
    done = run_curvkit("analyze", MLP, *options, "--top-k", "1", "--nproc", "2", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvkit: error: ") and expected in lines[0], done.stderr


def test_nproc_must_be_positive(tmp_path, run_curvkit):
    done = run_curvkit("analyze", MLP, "--nproc", "0", cwd=tmp_path)
    assert done.returncode == 2 and "--nproc must be an integer >= 1, got 0" in done.stderr


@pytest.mark.slow
def test_ctrl_c_ends_every_process_and_the_command_resumes(
    tmp_path, curvkit_command, script_env, run_curvkit
):
    out = tmp_path / "results.h5"
    long = ["--top-k", "3", "--trace", "hutchinson", "--trace-matvecs", "1500", "--dtype", "float64"]
    command = [*curvkit_command, "analyze", MLP, *long, "--nproc", "2", "-o", str(out)]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=script_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.monotonic() + 240
    while not _has_eigen(out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the launcher and both processes
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "interrupted" in lines[0], stderr
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        assert run.status == "failed" and run.error == "interrupted"
    resumed = run_curvkit(*command[len(curvkit_command) :], "--json", "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (summary,) = json.loads(resumed.stdout)["runs"]
    assert summary["resumed"] == ["eigen/largest"]
    with ResultsStore(out, mode="r") as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.attempts == 2


def _has_eigen(path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return any("largest" in f["runs"][name].get("eigen", {}) for name in f["runs"])
    except Exception:  # not yet there, or caught mid-write: try again
        return False
