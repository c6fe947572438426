"""Nothing is written before the inputs are known good; a trajectory is validated whole.

Every bad input goes through the installed console script: one line on stderr,
exit status 2, and the results file byte for byte as it was (or not created).
Command lines that do not parse go through the same entry point in this process.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from curvkit.cli import main as cli_main

from curvkit.datasets import bundled_file
from curvkit.store import ResultsStore

MLP = str(bundled_file("digits_mlp.pt"))
QUICK = ["--top-k", "1", "--max-samples", "200"]

USER_MODELS = Path(__file__).with_name("user_models.py")
"""Models of the kinds that stopped users, copied next to the data as ``usermodels.py``."""


def user_models():
    """The module of :data:`USER_MODELS`, imported in this process."""
    spec = importlib.util.spec_from_file_location("user_models_for_tests", USER_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with a good results file, user models, data and bad checkpoints."""
    folder = tmp_path_factory.mktemp("validation")
    shutil.copy(USER_MODELS, folder / "usermodels.py")
    generator = torch.Generator().manual_seed(0)
    torch.save(
        {"X": torch.randn(40, 8, generator=generator), "y": torch.randint(0, 3, (40,), generator=generator)},
        folder / "small.pt",
    )
    torch.manual_seed(0)
    module = user_models()
    torch.save(module.Streaming().state_dict(), folder / "streaming.pt")
    torch.save(module.PartlyFrozen().state_dict(), folder / "frozen.pt")
    encoder = module.SpeakerEncoder().state_dict()
    training = {  # Resemblyzer's pretrained.pt: a training dict, in the old (non-zip) format
        "step": 315000,
        "model_state": {
            **encoder,
            "similarity_weight": torch.tensor([10.0]),
            "similarity_bias": torch.tensor([-5.0]),
        },
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
    }
    torch.save(training, folder / "pretrained.pt", _use_new_zipfile_serialization=False)
    torch.save({"model": encoder, "ema": encoder, "epoch": 3}, folder / "with_ema.pt")
    torch.save(
        {"X": torch.randn(24, 5, 6, generator=generator), "y": torch.randn(24, 4, generator=generator)},
        folder / "frames.pt",
    )
    (folder / "corrupt.pt").write_bytes(open(MLP, "rb").read()[:5000])
    np.savez(folder / "wrong.npz", X=np.zeros((10, 7), dtype=np.float32), y=np.zeros(10, dtype=np.int64))
    ckpt = torch.load(MLP, weights_only=True)  # finite weights whose logits overflow: an Inf/NaN loss
    ckpt["model_state_dict"]["4.weight"] = torch.full_like(ckpt["model_state_dict"]["4.weight"], 3e38)
    torch.save(ckpt, folder / "overflow.pt")
    for name in ("a.pt", "b.pt"):
        shutil.copy(MLP, folder / name)
    # --ihvp-vector files that are not a floating-point [P] tensor of the digits MLP (P = 3,466)
    torch.save(torch.randn(10, generator=generator), folder / "short.pt")
    torch.save(torch.arange(3466), folder / "integers.pt")
    torch.save(torch.randn(3466, 1, generator=generator), folder / "column.pt")
    return folder


@pytest.fixture(scope="module")
def good_results(workdir):
    """A results file written by a good command (bytes to compare against)."""
    import subprocess
    import sys

    out = workdir / "good.h5"
    subprocess.run(
        [sys.executable, "-m", "curvkit.cli.main", "analyze", MLP, *QUICK, "-o", str(out), "--quiet"],
        check=True,
        cwd=workdir,
        capture_output=True,
    )
    return out.read_bytes()


ENCODER = ["--model", "usermodels:SpeakerEncoder", "--data", "frames.pt", "--loss", "mse", "--top-k", "1"]
STREAMING = ["streaming.pt", "--model", "usermodels:Streaming", "--data", "small.pt", "--top-k", "1"]

BAD = {
    "tol 0": ([MLP, "--tol", "0"], "--tol must be a number in (0, 1) (1 is met by any vector), got 0.0"),
    "tol 1": ([MLP, "--tol", "1"], "--tol must be a number in (0, 1) (1 is met by any vector), got 1.0"),
    "ihvp-tol 2": (
        [MLP, "--ihvp", "cg", "--ihvp-tol", "2"],
        "the ihvp tol must be a number in (0, 1) (1 is met by any vector), got 2.0",
    ),
    "trace-matvecs 0": ([MLP, "--trace", "hutchinson", "--trace-matvecs", "0"], "--trace-matvecs must be"),
    "top-k 0": (
        [MLP, "--top-k", "0"],
        "no analysis asked for (--top-k 0 and nothing else): ask for --top-k, --bottom-k, --trace, "
        "--density, --check, --per-layer, --summary or --ihvp",
    ),
    "top-k above P": ([MLP, "--top-k", "5000"], "--top-k 5000 is larger than the number of parameters"),
    "max-matvecs 0": ([MLP, "--max-matvecs", "0"], "--max-matvecs must be an integer >= 1, got 0"),
    "reorthogonalisation": ([MLP, "--reorthogonalisation", "never"], "unknown reorthogonalisation"),
    "data does not fit": ([MLP, "--data", "wrong.npz"], "cannot be applied"),
    "non-finite loss": (["overflow.pt"], "loss or its gradient is not finite"),
    "params": ([MLP, "--params", "nosuch"], "nosuch"),
    "forward-kwargs json": ([MLP, "--forward-kwargs", "{sr: 1}"], "--forward-kwargs is not valid JSON"),
    "missing forward kwarg": (STREAMING, "cannot be applied"),
    "stateful model": ([*STREAMING, "--forward-kwargs", '{"sr": 16000}'], "changed its buffers state"),
    "trajectory with a bad file": (["a.pt", "corrupt.pt", "b.pt"], "corrupt.pt"),
    "batch size": ([MLP, "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    "extra entries, strict": ([*ENCODER, "pretrained.pt"], "pass --no-strict"),
    "several weights": ([*ENCODER, "with_ema.pt"], "choose one with --weights-key"),
    "missing weights key": ([*ENCODER, "with_ema.pt", "--weights-key", "emaa"], "'emaa' not found"),
    "option syntax": ([MLP, "--option", "strategy"], "--option 'strategy' is not NAME=VALUE"),
    "unknown option": (
        [MLP, "--option", "mc_samples=4"],
        "estimator 'hessian' takes no option 'mc_samples'; its options: strategy",
    ),
    "fisher seed 1.5": (  # taken as 1 before
        [MLP, "--curvature", "fisher", "--option", "fisher.seed=1.5"],
        "fisher.seed must be an integer >= 0 and < 2**63 or None, got 1.5",
    ),
    "d3 seed abc": (  # unused (the direction is the gradient), but part of the run's key
        [MLP, "--curvature", "d3", "--option", "d3.seed=abc"],
        "d3.seed must be an integer >= 0 and < 2**63 or None, got 'abc'",
    ),
    "seed -1": ([MLP, "--seed", "-1"], "--seed must be an integer >= 0 and < 2**63, got -1"),
    "unknown baseline": ([MLP, "--compare-to", "hesian"], "--compare-to: unknown estimator 'hesian'"),
    "options of analyses not asked for": (  # invalid values too: refused, not silently ignored
        [MLP, "--top-k", "1", "--damping", "-5", "--ihvp-vector", "/nonexistent.pt", "--ihvp-maxiter", "0"]
        + ["--summary-damping-int", "-3"],
        "--damping, --ihvp-vector, --ihvp-maxiter apply only with --ihvp SOLVERS: give --ihvp SOLVERS or "
        "leave them out; --summary-damping-int applies only with --summary PARTITION",
    ),
    "ihvp option without --ihvp": (
        [MLP, "--top-k", "1", "--ihvp-tol", "1e-3", "--ihvp-option", "cg.bogus=1"],
        "--ihvp-tol, --ihvp-option apply only with --ihvp SOLVERS",
    ),
    # an --ihvp-vector file: read only when the analysis ran, after the run was begun
    "ihvp vector of another size": (
        [MLP, "--ihvp", "cg", "--ihvp-vector", "short.pt"],
        "--ihvp-vector short.pt: the vector must be a floating-point [P] tensor with P = 3,466, got (10,) "
        "torch.float32",
    ),
    "ihvp vector of integers": (
        [MLP, "--ihvp", "cg", "--ihvp-vector", "integers.pt"],
        "--ihvp-vector integers.pt: the vector must be a floating-point [P] tensor (one dimension), got "
        "(3466,) torch.int64",
    ),
    "ihvp vector of two dimensions": (
        [MLP, "--ihvp", "cg", "--ihvp-vector", "column.pt"],
        "--ihvp-vector column.pt: the vector must be a floating-point [P] tensor (one dimension), got "
        "(3466, 1) torch.float32",
    ),
    # solver option values: checked by the solver alone, after the reference solve, and exit 0
    "lissa batch_size 0": (
        [MLP, "--ihvp", "lissa", "--ihvp-option", "lissa.batch_size=0"],
        "--ihvp-option lissa.batch_size must be an integer >= 1 or None, got 0",
    ),
    "lissa repeats 0": (
        [MLP, "--ihvp", "lissa", "--ihvp-option", "lissa.repeats=0"],
        "--ihvp-option lissa.repeats must be an integer >= 1, got 0",
    ),
    "lissa scale -1": (
        [MLP, "--ihvp", "lissa", "--ihvp-option", "lissa.scale=-1"],
        "--ihvp-option lissa.scale must be a finite number > 0, got -1",
    ),
    "lissa check_every abc": (
        [MLP, "--ihvp", "cg,lissa", "--ihvp-option", "lissa.check_every=abc"],
        "--ihvp-option lissa.check_every must be an integer >= 1 or None, got 'abc'",
    ),
    "lowrank rank 0": (
        [MLP, "--ihvp", "lowrank", "--ihvp-option", "lowrank.rank=0"],
        "--ihvp-option lowrank.rank must be an integer >= 1, got 0",
    ),
    "lowrank rank above P": (
        [MLP, "--ihvp", "lowrank", "--ihvp-option", "lowrank.rank=99999"],
        "--ihvp-option lowrank.rank must be an integer in 1..3466, got 99999",
    ),
    "trace-matvecs without a trace": (
        [MLP, "--top-k", "1", "--trace-matvecs", "5"],
        "--trace-matvecs applies only with --trace METHOD or --compare-to ESTIMATOR: give --trace METHOD "
        "or --compare-to ESTIMATOR or leave it out",
    ),
}


NEW_FILE_TOO = {
    "top-k above P",
    "stateful model",
    "trajectory with a bad file",
    "lowrank rank above P",
    "ihvp vector of another size",
}
"""Cases also run with a new output path, which must not be created."""


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_leaves_the_results_file_as_it_was(workdir, good_results, case, run_curvkit, tmp_path):
    args, fragment = BAD[case]
    out = tmp_path / "results.h5"
    out.write_bytes(good_results)
    new = tmp_path / "new.h5"
    for target in (out, new) if case in NEW_FILE_TOO else (out,):
        proc = run_curvkit("analyze", *args, *QUICK[2:], "-o", str(target), cwd=workdir)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("curvkit: error:"), proc.stderr
        assert fragment in lines[0], lines[0]
    assert out.read_bytes() == good_results
    assert not new.exists()


@pytest.mark.slow
def test_a_bad_ihvp_vector_leaves_a_complete_run_complete(workdir, run_curvkit, tmp_path):
    """The review's case: a second command with a vector file of the wrong size (or dtype) on the run
    of a first one printed ``... [ggn] FAILED: ...`` on stdout and left the run ``failed: ... (2
    attempts)``. It is refused before the results file is opened: one line, nothing printed or changed."""
    out = tmp_path / "r.h5"
    args = [MLP, "--curvature", "ggn", "--ihvp", "cg", "--max-samples", "200", "-o", str(out)]
    first = run_curvkit("analyze", *args, cwd=workdir)
    assert first.returncode == 0, first.stderr
    shown = run_curvkit("show", str(out), cwd=workdir)
    assert shown.returncode == 0 and ": complete (1 attempt)" in shown.stdout, shown.stdout
    written = out.read_bytes()
    for vector in ("short.pt", "integers.pt"):
        proc = run_curvkit("analyze", *args, "--ihvp-vector", vector, cwd=workdir)
        assert proc.returncode == 2 and proc.stdout == "" and "FAILED" not in proc.stdout, proc.stdout
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"curvkit: error: --ihvp-vector {vector}: the vector must be a floating-point")
    assert out.read_bytes() == written
    again = run_curvkit("show", str(out), cwd=workdir)
    assert again.stdout == shown.stdout and "failed" not in again.stdout
    with ResultsStore(out, "r") as store:
        (run,) = store.runs()
        assert run.status == "complete" and run.attempts == 1 and run.error is None


def analyze_json(run_curvkit, *args: str, out, cwd) -> list[dict]:
    """The runs of a successful ``curvkit analyze ... --json``."""
    proc = run_curvkit("analyze", *args, "-o", str(out), "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["runs"]


@pytest.mark.slow
def test_a_stateful_model_can_be_analysed_when_asked(workdir, run_curvkit, tmp_path):
    """The refusal (in BAD above) names the stateful module and the opt-out; the opt-out works."""
    options = ["--forward-kwargs", '{"sr": 16000}', "--no-check-deterministic"]
    (run,) = analyze_json(run_curvkit, *STREAMING, *options, out=tmp_path / "r.h5", cwd=workdir)
    assert run["provenance"]["forward_kwargs"] == {"sr": 16000} and run["status"] == "complete"


@pytest.mark.slow
def test_frozen_parameters_are_reported_and_selectable(workdir, run_curvkit, tmp_path):
    base = ["frozen.pt", "--model", "usermodels:PartlyFrozen", "--data", "small.pt", "--top-k", "1"]
    proc = run_curvkit("analyze", *base, "-o", str(tmp_path / "r.h5"), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "P=51 of 195: 144 frozen" in proc.stdout
    (run,) = analyze_json(run_curvkit, *base, "--params", "all", out=tmp_path / "r.h5", cwd=workdir)
    prov = run["provenance"]
    counts = (prov["parameter_count"], prov["parameter_total"], prov["frozen_parameter_count"])
    assert counts == (195, 195, 144) and prov["parameters"] == "P=195" and prov["params"] == "all"
    selected = ["--params", "head.weight,head.bias"]
    proc = run_curvkit("analyze", *base, *selected, "-o", str(tmp_path / "s.h5"), cwd=workdir)
    assert "P=51 of 195: 144 frozen" in proc.stdout


@pytest.mark.slow
def test_skip_bad_analyses_the_others_and_records_each_bad_one(workdir, run_curvkit, tmp_path):
    out = tmp_path / "r.h5"
    proc = run_curvkit(
        "analyze", "a.pt", "corrupt.pt", "b.pt", *QUICK, "--skip-bad", "-o", str(out), "--quiet", cwd=workdir
    )
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("curvkit: error: 1 of 3 runs failed") and "corrupt.pt" in line
    with ResultsStore(out, mode="r") as store:
        runs = {run.provenance["checkpoint"]: run for run in store.runs()}
        assert [run.status for run in store.runs()] == ["complete", "failed", "complete"]
        assert [run.index for run in store.runs()] == [0, 1, 2]
        assert "corrupt" in runs["corrupt.pt"].error or "truncated" in runs["corrupt.pt"].error


@pytest.mark.slow
def test_checkpoints_keep_the_order_given_folders_and_globs_sort_naturally(workdir, run_curvkit, tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (10, 2):
        shutil.copy(MLP, folder / f"step-{step}.pt")
    (folder / "notes.txt").write_text("not a checkpoint")
    out = tmp_path / "r.h5"
    proc = run_curvkit(
        "analyze",
        str(workdir / "b.pt"),
        str(folder),
        str(workdir / "a.pt"),
        *QUICK,
        "-o",
        str(out),
        "-q",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    with ResultsStore(out, mode="r") as store:
        names = [run.provenance["checkpoint"].rsplit("/", 1)[-1] for run in store.runs()]
    assert names == ["b.pt", "step-2.pt", "step-10.pt", "a.pt"]


def test_plot_refuses_an_unknown_format_in_one_line(workdir, good_results, run_curvkit, tmp_path):
    (tmp_path / "r.h5").write_bytes(good_results)
    proc = run_curvkit("plot", "r.h5", "--formats", "png,jpgg", "-o", "figs", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("curvkit: error: unknown figure format jpgg") and "png" in line
    assert not (tmp_path / "figs").exists()


@pytest.mark.slow
def test_a_training_dict_with_extra_entries_loads_with_no_strict(workdir, run_curvkit, tmp_path):
    """Resemblyzer's checkpoint: weights under 'model_state', plus the loss's two parameters."""
    proc = run_curvkit(
        "analyze", *ENCODER, "pretrained.pt", "--no-strict", "-o", str(tmp_path / "r.h5"), cwd=workdir
    )
    assert proc.returncode == 0, proc.stderr
    (note,) = proc.stderr.strip().splitlines()
    assert note.startswith("curvkit: note: pretrained.pt: ignored 2 checkpoint entries")
    assert "similarity_weight" in note and "similarity_bias" in note
    assert "pretrained.pt [hessian] P=" in proc.stdout
    with ResultsStore(tmp_path / "r.h5", mode="r") as store:
        (run,) = store.runs()
        assert run.provenance["weights_key"] == "model_state" and run.provenance["strict"] is False
        assert run.provenance["checkpoint_info"]["step"] == 315000


@pytest.mark.slow
def test_weights_key_chooses_among_several_sets_of_weights(workdir, run_curvkit, tmp_path):
    args = [*ENCODER, "with_ema.pt", "--weights-key", "ema"]
    (run,) = analyze_json(run_curvkit, *args, out=tmp_path / "r.h5", cwd=workdir)
    assert run["provenance"]["weights_key"] == "ema" and run["key"]["weights_key"] == "ema"


@pytest.mark.slow
def test_a_folder_of_torchscript_files_is_a_trajectory(workdir, run_curvkit, tmp_path):
    folder = tmp_path / "scripted"
    folder.mkdir()
    for step in (1, 2):
        torch.manual_seed(step)
        scripted = torch.jit.script(user_models().PartlyFrozen().requires_grad_(True))
        torch.jit.save(scripted, folder / f"net-{step}.jit")
    args = [str(folder), "--data", str(workdir / "small.pt"), "--top-k", "1"]
    runs = analyze_json(run_curvkit, *args, out="r.h5", cwd=tmp_path)
    assert [r["checkpoint"].rsplit("/", 1)[-1] for r in runs] == ["net-1.jit", "net-2.jit"]
    assert all(r["provenance"]["checkpoint_format"] == "torchscript" for r in runs)


# --------------------------------------------------------------------------- command lines that do not parse
def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``curvkit ARGS`` through the console script's entry point in this process: (status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["curvkit", *args])
    with pytest.raises(SystemExit) as info:
        cli_main.main()
    out, err = capsys.readouterr()
    return info.value.code, out, err


USAGE = {  # click's usage errors: (arguments, the message, the command whose help the line names)
    "unknown option": (
        [MLP, "--topk", "3"],
        "No such option: --topk (Possible options: --bottom-k, --tol, --top-k).",
        "analyze",
    ),
    "unknown command": (["analyse", "x.pt"], "No such command 'analyse'. Did you mean 'analyze'?", ""),
    "bad value": ([MLP, "--top-k", "abc"], "Invalid value for '--top-k'", "analyze"),
    "missing argument": ([], "Missing argument", "analyze"),
    "option without its value": (
        [MLP, "--curvature"],
        "Option '--curvature' requires an argument.",
        "analyze",
    ),
    "unknown option of plugins": (["plugins", "--json"], "No such option: --json.", "plugins"),
    "extra argument": (["show", "a.h5", "b.h5"], "Got unexpected extra argument(s) (b.h5).", "show"),
    "unknown option of curvkit": (["--bogus"], "No such option: --bogus.", ""),
}


@pytest.mark.parametrize("case", list(USAGE), ids=list(USAGE))
def test_a_command_line_that_does_not_parse_is_one_line(case, monkeypatch, capsys):
    args, message, command = USAGE[case]
    if command == "analyze":
        args = ["analyze", *args]
    status, out, err = run_main(monkeypatch, capsys, *args)
    assert status == 2 and out == "", (out, err)
    assert "Traceback" not in err and "\u256d" not in err and "Usage:" not in err, err
    (line,) = err.splitlines()
    assert line.startswith(f"curvkit: error: {message}"), line
    assert line.endswith(f"{command} --help' for help." if command else " --help' for help."), line


def test_the_installed_script_names_the_help_of_the_command(run_curvkit, tmp_path):
    proc = run_curvkit("analyze", MLP, "--topk", "3", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "curvkit: error: No such option: --topk (Possible options: --bottom-k, --tol, --top-k). "
        "Try 'curvkit analyze --help' for help.\n"
    )


def test_curvkit_alone_prints_the_help_and_exits_0(monkeypatch, capsys):
    status, out, err = run_main(monkeypatch, capsys)
    assert (status, err) == (0, "")
    assert "Usage: " in out and " [OPTIONS] COMMAND [ARGS]..." in out and "analyze" in out
    assert run_main(monkeypatch, capsys, "--help") == (0, out, "")


# ------------------------------------------------------------------------ a file that is not a results file
@pytest.mark.parametrize("name", ["notes.txt", "foreign.h5"])
def test_only_a_writer_is_advised_to_choose_another_output_path(name, monkeypatch, capsys, tmp_path):
    """``show``, ``plot`` and ``export`` read the file given: no advice meant for ``analyze -o``."""
    import h5py

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a results file\n")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    what = "is not an HDF5 file" if name == "notes.txt" else "is an HDF5 file written by another tool"
    for command in (["show"], ["plot", "-o", "figs"], ["export"], ["analyze", MLP, *QUICK, "-o"]):
        status, out, err = run_main(monkeypatch, capsys, *command[:1], *command[1:], name)
        assert (status, out) == (2, ""), (command, err)
        (line,) = err.splitlines()
        assert line.startswith(f"curvkit: error: {name} {what}"), line
        assert line.endswith("; choose another output path") == (command[0] == "analyze"), line
    assert not (tmp_path / "figs").exists()
