"""The HDF5 results store: round trips, resume after a kill, one writer, bad files, export."""

from __future__ import annotations

import csv
import dataclasses
import errno
import gc
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import pytest
import torch

import curvkit
import curvkit.checks
from curvkit import EigenResult, LayerTable, TraceResult
from curvkit.checks import CheckResult
from curvkit.comparison import compare_spectra
from curvkit.store import CSV_COLUMNS, SCHEMA_VERSION, ResultsStore, StoreError, make_run_id
from curvkit.testing import get_case

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def results():
    """One result of every type, from the real library."""
    torch.manual_seed(0)
    M = torch.randn(12, 12, dtype=torch.float64)
    A = curvkit.DenseOperator(M + M.T)
    eig = curvkit.eigenvalues(A, k=3)
    H = curvkit.curvature("hessian", get_case("tanh-mlp-ce").problem())
    B = curvkit.DenseOperator(M @ M.T)
    compared = compare_spectra(
        eig,
        curvkit.eigenvalues(B, k=3),
        curvkit.trace(A, method="hutch++", matvecs=6),
        curvkit.trace(B, method="hutch++", matvecs=6),
        estimator="a",
        baseline_name="b",
        matvecs=12,
        reused=("eigenpairs",),
    )
    return {
        "eigen": eig,
        "trace": curvkit.trace(A, method="hutch++", matvecs=6),
        "density": curvkit.density(A, steps=10, runs=2),
        "check": curvkit.checks.check_symmetry(A),
        "check_info": curvkit.checks.condition_number(eig),  # passed=None, no threshold
        "per_layer": curvkit.per_layer(H),
        "compare": compared,
    }


@pytest.fixture
def path(tmp_path):
    return tmp_path / "results.h5"


def assert_same(a, b):
    """Field-by-field equality of result dataclasses (tensors exactly, with their dtype; nan == nan)."""
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype, field.name
            assert torch.equal(x.cpu(), y), field.name
        elif field.name == "rows":
            assert len(x) == len(y)
            for r, s in zip(x, y):
                assert_same(r, s)
        elif isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), field.name
        else:
            assert x == y and type(x) is type(y), (field.name, x, y)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def small_eigen(values=(3.0, 2.0)) -> EigenResult:
    v = torch.tensor(values, dtype=torch.float64)
    return EigenResult(v, None, torch.full_like(v, 1e-9), 10, None, True, "largest", "lanczos", 1e-6, 0)


def small_trace(estimate=5.0) -> TraceResult:
    return TraceResult(estimate, 0.1, "hutch++", 30, None, 0)


CHILD = """
import sys, time, torch
from curvkit import EigenResult, TraceResult
from curvkit.store import ResultsStore

store = ResultsStore(sys.argv[1])
provenance = {"checkpoint": "epoch_1.pt", "checkpoint_sha256": "ab" * 32}
run = store.begin_run("epoch_1.pt-hessian", provenance, index=0)
v = torch.tensor([3.0, 2.0], dtype=torch.float64)
r = torch.full_like(v, 1e-9)
run.write_eigen("largest", EigenResult(v, None, r, 10, None, True, "largest", "lanczos", 1e-6, 0))
run.write("trace/hutch++", TraceResult(5.0, 0.1, "hutch++", 30, None, 0))
run.write_timing("eigen/largest", 1.5)
run._group.create_group("_partial-killed")  # as if killed in the middle of a third write
store._flush()
print("written", flush=True)
time.sleep(120)
"""


def start_writer(path: Path) -> subprocess.Popen:
    """A process that writes two analyses, leaves its run running and keeps the file open."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CURVKIT_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),  # outside the checkout: the installed curvkit is imported
    )
    line = proc.stdout.readline().strip()
    if line != "written":
        proc.kill()
        raise AssertionError(f"writer failed: {line!r} {proc.stderr.read()}")
    return proc


# --------------------------------------------------------------------------- round trips


def test_every_result_type_round_trips(path, results):
    with ResultsStore(path) as store:
        with store.begin_run("r", {"checkpoint": "a.pt"}) as run:
            run.write_eigen("largest", results["eigen"], vectors=True)
            run.write_eigen("no-vectors", results["eigen"])
            run.write("trace/hutch++", results["trace"])
            run.write("density/slq", results["density"])
            run.write("checks/symmetry", results["check"])
            run.write("checks/condition", results["check_info"])
            run.write("per_layer/module", results["per_layer"])
            run.write("per_layer/empty", LayerTable([]))
            run.write("compare/b", results["compare"])
    with ResultsStore(path, "r") as store:
        run = store.run("r")
        assert run.analyses() == [
            "eigen/largest",
            "eigen/no-vectors",
            "trace/hutch++",
            "density/slq",
            "checks/symmetry",
            "checks/condition",
            "per_layer/module",
            "per_layer/empty",
            "compare/b",
        ]
        assert_same(run.read_eigen("largest", vectors=True), results["eigen"])
        assert_same(run.read("compare/b"), results["compare"])
        assert run.read_eigen("largest").vectors is None  # vectors only on request
        assert run.read_eigen("no-vectors", vectors=True).vectors is None
        assert_same(run.read("trace/hutch++"), results["trace"])
        assert_same(run.read("density/slq"), results["density"])
        assert run.read_eigen("largest").stop_reason == "converged"
        assert_same(run.read("checks/symmetry"), results["check"])
        assert_same(run.read("checks/condition"), results["check_info"])
        assert results["check_info"].passed is None and math.isnan(results["check_info"].threshold)
        assert_same(run.read("per_layer/module"), results["per_layer"])
        assert len(results["per_layer"]) >= 2
        assert_same(run.read("per_layer/empty"), LayerTable([]))
        assert_same(run.read("density/slq"), results["density"])


def test_optional_and_odd_fields_round_trip(path):
    eig32 = EigenResult(
        torch.tensor([2.0, 1.0]),
        torch.eye(4, 2),
        torch.tensor([1e-6, 2e-6]),
        7,
        3,
        False,
        "both_ends",
        "power",
        1e-3,
        5,
    )
    trace_nan = TraceResult(4.0, math.nan, "hutchinson", 1, 1, 7)
    check = CheckResult(
        "psd", False, -0.5, 1e-6, "lambda_min / lambda_max", {"lambda_min": -1.0, "lambda_max": 2.0}
    )
    with ResultsStore(path) as store, store.begin_run("r") as run:
        run.write_eigen("both", eig32, vectors=True)
        run.write("trace/one-probe", trace_nan)
        run.write("checks/psd", check)
        run.write_eigen("bf16", dataclasses.replace(eig32, values=eig32.values.bfloat16(), vectors=None))
    with ResultsStore(path, "r") as store:
        run = store.run("r")
        assert_same(run.read_eigen("both", vectors=True), eig32)  # float32 stays float32
        assert_same(run.read("trace/one-probe"), trace_nan)
        assert_same(run.read("checks/psd"), check)
        assert run.read_eigen("bf16").values.dtype == torch.float32  # documented: bfloat16 stored as float32


def test_trace_fallback_and_sketch_mass_round_trip_and_default_in_older_files(path):
    fell_back = TraceResult(4.0, 0.5, "hutchinson", 30, None, 1, fallback=True, sketch_mass=0.25)
    kept = TraceResult(4.0, 0.1, "xtrace", 30, None, 1, sketch_mass=0.95)
    with ResultsStore(path) as store, store.begin_run("r") as run:
        run.write("trace/hutch++", fell_back)
        run.write("trace/xtrace", kept)
        run.write("trace/old", small_trace())
    with h5py.File(path, "r+") as f:  # as written before the two attributes existed
        del f["runs/r/trace/old"].attrs["fallback"]
        assert "sketch_mass" not in f["runs/r/trace/old"].attrs
    with ResultsStore(path, "r") as store:
        run = store.run("r")
        assert_same(run.read("trace/hutch++"), fell_back)
        assert_same(run.read("trace/xtrace"), kept)
        assert_same(run.read("trace/old"), small_trace())
        rows = {(r["analysis"], r["quantity"]): r["value"] for r in store.csv_rows()}
    assert (rows["trace/hutch++", "fallback"], rows["trace/hutch++", "sketch_mass"]) == (1, 0.25)
    assert rows["trace/old", "fallback"] == 0 and ("trace/old", "sketch_mass") not in rows


def test_provenance_and_timings_round_trip(path):
    provenance = {
        "checkpoint": "runs/epoch_10.pt",
        "checkpoint_sha256": "0" * 64,
        "parameter_count": 1234,
        "sample_count": 512,
        "loss": "cross_entropy",
        "estimator": "ggn",
        "estimator_options": {"mc_samples": 1, "nested": {"a": [1, 2]}},
        "model_kwargs": {},
        "seed": None,
        "lr": 0.1,
        "trust_pickle": False,
        "command": ["curvkit", "analyze", "runs/*.pt"],
        "note_json": "a plain string under a key that ends in _json",
    }
    with ResultsStore(path) as store, store.begin_run("r", provenance, index=3) as run:
        run.write_timing("load", 0.25)
        run.write_timing("trace/hutchinson", 0.5, peak_memory_bytes=2**30)
        run.write_timing("eigen/largest", 1.5, peak_memory_bytes=3 * 2**30)
    with ResultsStore(path, "r") as store:
        run = store.run("r")
        assert run.provenance == provenance
        assert run.timings == {"load": 0.25, "trace/hutchinson": 0.5, "eigen/largest": 1.5}
        assert list(run.peak_memory.items()) == [("trace/hutchinson", 2**30), ("eigen/largest", 3 * 2**30)]
        assert run.to_dict()["peak_memory"] == run.peak_memory  # measured on a GPU only, in written order
        assert ("peak_memory", "eigen/largest", None, 3 * 2**30) in list(run._csv_values())
        assert run.index == 3 and run.status == "complete" and run.error is None and run.attempts == 1
    # non-JSON types are stored as plain values
    with ResultsStore(path) as store, store.begin_run("s", {"path": Path("a/b.pt"), "dtype": torch.float32}):
        pass
    with ResultsStore(path, "r") as store:
        assert store.run("s").provenance == {"path": str(Path("a/b.pt")), "dtype": "torch.float32"}


def test_layout_is_readable_with_plain_h5py(path, results):
    with ResultsStore(path) as store, store.begin_run("r", {"estimator_options": {"k": 5}}, index=0) as run:
        run.write_eigen("largest", results["eigen"])
        run.write("trace/hutch++", results["trace"])
        run.write("per_layer/module", results["per_layer"])
        run.write("checks/symmetry", results["check"])
    with h5py.File(path, "r") as f:
        assert f.attrs["curvkit_schema"] == "curvkit-results"
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 1
        assert f.attrs["created_by"] == f"curvkit {curvkit.__version__}"
        run = f["runs/r"]
        assert run.attrs["status"] == "complete" and run.attrs["index"] == 0 and "error" not in run.attrs
        assert json.loads(run["provenance"].attrs["estimator_options_json"]) == {"k": 5}
        eig = run["eigen/largest"]
        assert eig["values"][:].tolist() == results["eigen"].values.tolist()
        assert eig["residuals"].shape == (3,) and "vectors" not in eig
        assert eig.attrs["converged"] and eig.attrs["which"] == "largest" and eig.attrs["matvecs"] > 0
        assert "data_passes" in eig.attrs  # 0 for a dense operator: present (absent means None)
        assert float(run["trace/hutch++/estimate"][()]) == results["trace"].estimate
        table = run["per_layer/module"]
        assert table["name"].asstr()[:].tolist() == [r.name for r in results["per_layer"]]
        assert json.loads(table["params_json"].asstr()[0]) == list(results["per_layer"].rows[0].params)
        assert bool(run["checks/symmetry"].attrs["passed"]) is True


def test_documented_plain_h5py_example_runs(path, results, capsys, python_blocks):
    with (
        ResultsStore(path) as store,
        store.begin_run("r", {"checkpoint": "a.pt", "estimator": "hessian"}) as run,
    ):
        for kind in ("eigen", "trace", "density"):
            run.write(f"{kind}/x", results[kind])
        run.write("checks/symmetry", results["check"])
        run.write("per_layer/module", results["per_layer"])
        run.write_timing("total", 2.0)
    block = next(b for b in python_blocks(REPO / "docs" / "hdf5-schema.md") if "h5py.File(path" in b.source)
    exec(block.compile(), {"path": str(path)})  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    assert "r complete a.pt hessian" in out and "eigen x" in out and "layer module" in out
    assert "timings {'total'" in out


# --------------------------------------------------------------------------- runs, resume, status


def test_run_ids_are_deterministic_and_readable():
    a = make_run_id("ckpts/epoch 10.pt", "hessian", {"seed": 0, "data": "digits"})
    assert a == make_run_id("ckpts/epoch 10.pt", "hessian", {"data": "digits", "seed": 0})
    assert a == make_run_id(
        os.path.join(".", "ckpts", "epoch 10.pt"), "hessian", {"seed": 0, "data": "digits"}
    )
    assert re.fullmatch(r"epoch_10\.pt-hessian-[0-9a-f]{8}", a)
    assert a != make_run_id("ckpts/epoch 10.pt", "ggn", {"seed": 0, "data": "digits"})
    assert a != make_run_id("ckpts/epoch 10.pt", "hessian", {"seed": 1, "data": "digits"})
    assert a != make_run_id("other/epoch 10.pt", "hessian", {"seed": 0, "data": "digits"})


def test_runs_come_in_trajectory_order(path):
    with ResultsStore(path) as store:
        for run_id, index in [("c", 2), ("none", None), ("a", 0), ("b", 1)]:
            store.begin_run(run_id, index=index).finish()
    with ResultsStore(path, "r") as store:
        assert [r.run_id for r in store.runs()] == ["a", "b", "c", "none"]
        assert len(store) == 4 and "a" in store and "zzz" not in store


def test_resume_keeps_finished_analyses(path):
    with ResultsStore(path) as store:
        run = store.begin_run("r", {"checkpoint": "a.pt", "command": ["first"]}, index=0)
        run.write_eigen("largest", small_eigen())
        run.write_timing("eigen/largest", 1.0)
        assert run.status == "running"  # begun here and not finished
    with ResultsStore(path) as store:
        assert store.run("r").status == "interrupted"
        run = store.begin_run("r", {"checkpoint": "a.pt", "command": ["second"]})
        assert run.status == "running" and run.attempts == 2 and run.index == 0
        assert run.has("eigen/largest") and not run.has("trace/hutch++")
        run.write("trace/hutch++", small_trace())
        run.finish()
    with ResultsStore(path, "r") as store:
        run = store.run("r")
        assert run.status == "complete" and run.complete
        assert run.analyses() == ["eigen/largest", "trace/hutch++"]
        # provenance says how the stored numbers were made: written once, never by a later command
        assert run.provenance["command"] == ["first"] and run.timings == {"eigen/largest": 1.0}
        assert run.info["finished_at"] and run.info["created_at"] <= run.info["started_at"]


def test_a_stored_result_answers_only_the_request_it_was_made_for(path):
    request = {"k": 2, "which": "largest", "tol": 1e-4, "seed": 0}
    with ResultsStore(path) as store, store.begin_run("r", {}) as run:
        run.write("eigen/largest", small_eigen(), request=request)
        run.write("trace/hutch++", small_trace())  # no request recorded
    with ResultsStore(path) as store:
        run = store.begin_run("r", {})
        assert run.request("eigen/largest") == request
        assert run.has("eigen/largest") and run.has("eigen/largest", dict(request))
        assert not run.has("eigen/largest", {**request, "k": 3})
        assert not run.has("eigen/largest", {**request, "tol": 1e-6})
        assert run.has("trace/hutch++") and run.request("trace/hutch++") is None
        assert not run.has("trace/hutch++", {"method": "hutch++", "matvecs": 99, "seed": 0})
        assert not run.has("density/slq", {"steps": 60})
        # rewriting with a new request replaces both
        run.write("eigen/largest", small_eigen(), request={**request, "k": 3})
        assert run.has("eigen/largest", {**request, "k": 3}) and not run.has("eigen/largest", request)
        run.finish()
    with h5py.File(path, "r") as f:  # plain h5py sees the request as JSON text
        assert json.loads(f["runs/r/eigen/largest"].attrs["request_json"])["k"] == 3


def test_a_request_of_numpy_scalars_paths_and_tuples_is_matched_as_it_was_written(path):
    """``has`` normalises the request as ``write`` stores it (numpy and torch scalars, paths, tuples)."""
    import numpy as np

    request = {"k": np.int64(2), "tol": np.float32(0.5), "vector": Path("v.pt"), "solvers": ("cg",)}
    request["scale"] = torch.tensor(0.25)
    with ResultsStore(path) as store, store.begin_run("r", {}) as run:
        run.write("eigen/largest", small_eigen(), request=request)
        assert run.request("eigen/largest") == {
            "k": 2,
            "tol": 0.5,
            "vector": "v.pt",
            "solvers": ["cg"],
            "scale": 0.25,
        }
        assert run.has("eigen/largest", request) and run.has("eigen/largest", run.request("eigen/largest"))
        assert not run.has("eigen/largest", {**request, "k": np.int64(3)})


def test_resume_refuses_a_run_of_other_settings_unless_restarted(path):
    key = {"checkpoint_sha256": "a" * 64, "seed": 0, "data_fingerprint": "f"}
    with ResultsStore(path) as store, store.begin_run("r", {"data": "one"}, key=key) as run:
        run.write_eigen("largest", small_eigen())
    with ResultsStore(path) as store:
        assert store.run("r").key == key
        with pytest.raises(StoreError, match="other settings") as err:
            store.begin_run("r", key={**key, "checkpoint_sha256": "b" * 64, "seed": 1})
        one_line(err)
        assert "checkpoint_sha256, seed" in str(err.value)
        assert store.begin_run("r", key=dict(key)).analyses() == ["eigen/largest"]  # the same key resumes
        run = store.begin_run("r", {"data": "two"}, key={**key, "seed": 1}, restart=True)
        assert run.analyses() == [] and run.attempts == 1
        assert run.provenance == {"data": "two"} and run.key["seed"] == 1


def test_an_unconverged_eigen_solve_keeps_why_it_stopped(path):
    values = torch.tensor([3.0, 2.0], dtype=torch.float64)
    stagnated = EigenResult(
        values,
        None,
        torch.full_like(values, 1e-3),
        56,
        56,
        False,
        "largest",
        "lanczos",
        1e-6,
        0,
        stop_reason="stagnated",
        precision_floor=1.7e-6,
    )
    with ResultsStore(path) as store, store.begin_run("r") as run:
        run.write("eigen/largest", stagnated)
    with ResultsStore(path, "r") as store:
        back = store.run("r").read("eigen/largest")
        assert (back.stop_reason, back.precision_floor, back.converged) == ("stagnated", 1.7e-6, False)
        assert back.to_dict()["stop_reason"] == "stagnated"


def test_a_result_and_its_request_appear_together(path, monkeypatch):
    """A process stopped while an analysis is written leaves it whole, request included, or absent."""
    import curvkit.store as store_module

    with ResultsStore(path) as store, store.begin_run("r") as run:
        seen = []
        real_flush = store_module.ResultsStore._flush

        def flush(self):  # every flush is a state a killed process could leave behind
            group = self._file["runs/r"].get("eigen")
            for name in group if group is not None else ():
                seen.append(("request_json" in group[name].attrs, name))
            real_flush(self)

        monkeypatch.setattr(store_module.ResultsStore, "_flush", flush)
        run.write("eigen/largest", small_eigen(), request={"k": 2})
        assert seen and all(has_request for has_request, _ in seen)


def test_failures_mark_the_run_failed_and_keep_what_was_written(path):
    with pytest.raises(RuntimeError):
        with ResultsStore(path) as store, store.begin_run("r") as run:
            run.write_eigen("largest", small_eigen())
            raise RuntimeError("loss is NaN\nat step 3")
    with pytest.raises(ZeroDivisionError):
        with ResultsStore(path) as store:
            store.begin_run("s")  # not a context manager: the store marks it
            1 / 0  # noqa: B018
    with ResultsStore(path, "r") as store:
        r, s = store.run("r"), store.run("s")
        assert r.status == "failed" and r.error == "RuntimeError: loss is NaN at step 3"
        assert r.has("eigen/largest") and not r.complete
        assert s.status == "failed" and s.error.startswith("ZeroDivisionError")
    with ResultsStore(path) as store:
        run = store.begin_run("r")
        assert run.status == "running" and run.error is None and run.has("eigen/largest")


def test_writes_replace_and_validate(path):
    with ResultsStore(path) as store, store.begin_run("r") as run:
        run.write("trace/t", small_trace(1.0))
        run.write("trace/t", small_trace(2.0))
        assert run.read("trace/t").estimate == 2.0 and run.analyses() == ["trace/t"]
        for bad in ("", "a/b", "_private", "."):
            with pytest.raises(StoreError, match="invalid analysis name"):
                run.write(f"trace/{bad}", small_trace())
        with pytest.raises(TypeError, match="needs an EigenResult"):
            run.write_eigen("x", small_trace())
        with pytest.raises(ValueError, match="no vectors"):
            run.write_eigen("x", small_eigen(), vectors=True)
        with pytest.raises(StoreError, match="has no eigen/missing") as err:
            run.read_eigen("missing")
        assert "trace/t" in one_line(err)
        assert not any(name.startswith("_") for name in run._group)  # failed writes leave nothing
        with pytest.raises(StoreError, match="unknown analysis kind"):
            run.read("spectrum/x")
        with pytest.raises(StoreError, match="'complete' or 'failed'"):
            run.finish("done")


def test_read_only_stores_do_not_write(path):
    with ResultsStore(path) as store, store.begin_run("r"):
        pass
    with ResultsStore(path, "r") as store:
        with pytest.raises(StoreError, match="read-only"):
            store.begin_run("s")
        with pytest.raises(StoreError, match="begin_run first"):
            store.run("r").write("trace/t", small_trace())
        with pytest.raises(StoreError, match="no run 'zzz'"):
            store.run("zzz")
    with pytest.raises(StoreError, match="is closed"):
        store.runs()


def test_malformed_analysis_is_a_store_error(path):
    with ResultsStore(path) as store, store.begin_run("r") as run:
        run.write_eigen("largest", small_eigen())
    with h5py.File(path, "a") as f:
        del f["runs/r/eigen/largest/residuals"]
    with ResultsStore(path, "r") as store, pytest.raises(StoreError, match="malformed") as err:
        store.run("r").read_eigen("largest")
    one_line(err)


# --------------------------------------------------------------------------- kill, lock


def test_killed_writer_loses_nothing_and_the_run_resumes(path):
    proc = start_writer(path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    with ResultsStore(path, "r") as store:  # the lock died with the process
        (run,) = store.runs()
        assert run.status == "interrupted" and not run.complete
        assert run.analyses() == ["eigen/largest", "trace/hutch++"]  # the half-written one is skipped
        assert_same(run.read_eigen("largest"), small_eigen())
        assert run.timings == {"eigen/largest": 1.5}
    with ResultsStore(path) as store:
        run = store.begin_run(
            "epoch_1.pt-hessian", {"checkpoint": "epoch_1.pt", "checkpoint_sha256": "ab" * 32}
        )
        assert run.has("eigen/largest") and run.has("trace/hutch++") and run.attempts == 2
        assert "_partial-killed" not in run._group  # cleaned up on resume
        run.write(
            "density/slq", curvkit.density(curvkit.DenseOperator(torch.eye(3, dtype=torch.float64)), steps=2)
        )
        run.finish()
    with ResultsStore(path, "r") as store:
        assert store.run("epoch_1.pt-hessian").status == "complete"


def test_a_second_writer_in_another_process_is_refused(path):
    proc = start_writer(path)
    try:
        for mode in ("a", "r"):
            with pytest.raises(StoreError, match="in use by another process") as err:
                ResultsStore(path, mode)
            assert one_line(err).endswith(", or use another output file") == (mode == "a")
            assert err.value.__cause__.errno == errno.EAGAIN  # what tells a lock held elsewhere, not its text
        with h5py.File(path, "r", locking=False) as f:  # the documented way to peek meanwhile
            assert "eigen" in f["runs/epoch_1.pt-hessian"]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with ResultsStore(path) as store:  # and it is free once the writer is gone
        assert len(store) == 1


def test_a_second_writer_in_this_process_is_refused(path):
    store = ResultsStore(path)
    for mode in ("a", "r"):
        with pytest.raises(StoreError, match="already open for writing in this process") as err:
            ResultsStore(path, mode)
        one_line(err)
    store.close()
    with ResultsStore(path, "r"), ResultsStore(path, "r"):  # readers may share
        with pytest.raises(StoreError, match="already open for reading in this process"):
            ResultsStore(path, "a")
    store = ResultsStore(path)
    del store  # dropped without close(): the file is released
    gc.collect()
    with ResultsStore(path) as store:
        assert store.schema_version == SCHEMA_VERSION


def test_the_store_module_imports_h5py_only_when_opening():
    code = "import sys, curvkit.store; print('h5py' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir()
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------------- bad files and paths


def test_an_hdf5_file_of_another_tool_is_refused_and_untouched(path):
    with h5py.File(path, "w") as f:
        f["data"] = [1, 2, 3]
        f.attrs["creator"] = "someone else"
    before = path.read_bytes()
    for mode in ("a", "r"):
        with pytest.raises(StoreError, match="written by another tool") as err:
            ResultsStore(path, mode)
        assert one_line(err).endswith("; choose another output path") == (mode == "a")  # a reader is not told
    with pytest.raises(StoreError, match="written by another tool.*; choose another output path$"):
        ResultsStore.check_path(path)  # opens the file read-only, for a writer
    assert path.read_bytes() == before
    with h5py.File(path, "a") as f:
        f.attrs["curvkit_schema"] = "something-else"
    with pytest.raises(StoreError, match="written by another tool"):
        ResultsStore(path)


def test_another_schema_version_is_refused(path):
    ResultsStore(path).close()
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 2
    for mode in ("a", "r"):
        with pytest.raises(StoreError) as err:
            ResultsStore(path, mode)
        assert "schema version 2, this curvkit reads 1: upgrade curvkit" in one_line(err)


def test_an_empty_hdf5_file_is_adopted_for_writing(path):
    h5py.File(path, "w").close()
    with pytest.raises(StoreError, match="another tool"):
        ResultsStore(path, "r")
    with ResultsStore(path) as store:
        assert store.attrs["curvkit_schema"] == "curvkit-results" and len(store) == 0


@pytest.mark.parametrize("content", [b"", b"not hdf5 at all\n" * 10])
def test_a_non_hdf5_file_is_refused_and_untouched(path, content):
    path.write_bytes(content)
    for mode in ("a", "r"):
        with pytest.raises(StoreError, match="is not an HDF5 file") as err:
            ResultsStore(path, mode)
        assert one_line(err).endswith("; choose another output path") == (mode == "a")  # a reader is not told
    assert path.read_bytes() == content


def test_unusable_paths_are_refused(tmp_path):
    cases = [
        (tmp_path / "missing" / "results.h5", "a", "directory .* does not exist"),
        (tmp_path / "results.h5", "r", "no such results file"),
        (tmp_path, "a", "is a directory"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append((tmp_path / "file" / "results.h5", "a", "is not a directory"))
    for p, mode, message in cases:
        with pytest.raises(StoreError, match=message) as err:
            ResultsStore(p, mode)
        one_line(err)
    with pytest.raises(StoreError, match="mode must be"):
        ResultsStore(tmp_path / "results.h5", "w")
    assert not (tmp_path / "results.h5").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions, not root")
def test_unwritable_paths_are_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    ResultsStore(locked / "old.h5").close()
    (locked / "old.h5").chmod(0o444)
    locked.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="permission denied") as err:
            ResultsStore(locked / "new.h5")
        one_line(err)
        with pytest.raises(StoreError, match="permission denied"):
            ResultsStore(locked / "old.h5")
        with ResultsStore(locked / "old.h5", "r") as store:
            assert len(store) == 0
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- export


def _two_runs(path, results):
    with ResultsStore(path) as store:
        with store.begin_run("b", {"checkpoint": "epoch_2.pt", "estimator": "hessian"}, index=1) as run:
            run.write_eigen("largest", results["eigen"])
            run.write("checks/condition", results["check_info"])
            run.write("per_layer/module", results["per_layer"])
            run.write_timing("total", 3.0)
        run = store.begin_run("a", {"checkpoint": "epoch_1.pt", "estimator": "hessian"}, index=0)
        run.write("trace/hutch++", results["trace"])
        run.write("density/slq", results["density"])
        # left running: exported as interrupted


def test_json_export_is_strict_json(path, results):
    _two_runs(path, results)
    with ResultsStore(path, "r") as store:
        data = json.loads(json.dumps(store.to_dict(), allow_nan=False))
    assert data["schema"] == "curvkit-results" and data["schema_version"] == 1
    a, b = data["runs"]
    assert (a["run_id"], a["status"], b["run_id"], b["status"]) == ("a", "interrupted", "b", "complete")
    assert a["analyses"]["trace/hutch++"] == results["trace"].to_dict()
    assert a["analyses"]["density/slq"]["run_steps"] == list(results["density"].run_steps)
    assert b["analyses"]["eigen/largest"]["values"] == results["eigen"].values.tolist()
    assert "vectors" not in b["analyses"]["eigen/largest"]
    assert b["analyses"]["checks/condition"]["threshold"] is None  # nan becomes null
    assert b["analyses"]["checks/condition"]["passed"] is None
    assert b["analyses"]["per_layer/module"]["name"] == [r.name for r in results["per_layer"]]
    assert b["provenance"]["checkpoint"] == "epoch_2.pt" and b["timings"] == {"total": 3.0}


def test_csv_export_has_one_row_per_number(path, results):
    _two_runs(path, results)
    buf = io.StringIO()
    with ResultsStore(path, "r") as store:
        n = store.write_csv(buf)
        rows = store.csv_rows()
    parsed = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(parsed) == n == len(rows)
    assert tuple(parsed[0]) == CSV_COLUMNS
    assert parsed[0]["run_id"] == "a" and parsed[0]["status"] == "interrupted"  # trajectory order
    eig = [r for r in parsed if r["analysis"] == "eigen/largest" and r["quantity"] == "eigenvalue"]
    assert [float(r["value"]) for r in eig] == results["eigen"].values.tolist()
    assert [r["item"] for r in eig] == ["0", "1", "2"]
    assert {r["checkpoint"] for r in eig} == {"epoch_2.pt"} and {r["run_index"] for r in eig} == {"1"}
    density = [r for r in parsed if r["quantity"] == "density"]
    assert len(density) == len(results["density"].grid)
    layers = [r for r in parsed if r["analysis"] == "per_layer/module" and r["quantity"] == "top_eigenvalue"]
    assert [r["item"] for r in layers] == [row.name for row in results["per_layer"]]
    (threshold,) = [r for r in parsed if r["analysis"] == "checks/condition" and r["quantity"] == "threshold"]
    assert threshold["value"] == ""
    (timing,) = [r for r in parsed if r["analysis"] == "timings"]
    assert (timing["quantity"], float(timing["value"])) == ("total", 3.0)
