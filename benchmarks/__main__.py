"""Run the benchmarks: ``python -m benchmarks [--only SECTION,...] [--problems mlp,...] [--quick]``.

Sections: hvp, matmat, ggn, kfac, eigen, trace, density, solvers, newton, optimizers, distributed,
resnet (default: all). Every section runs on the CPU but ``resnet`` (ResNet-18's HVP against a
gradient and its top-5 eigenvalues, curvkit and the peers), which runs on ``--device`` (default:
CUDA when available) and takes about ten minutes on 2 CPU cores.
Run from the repository root. Writes ``benchmarks/RESULTS.md`` and
``benchmarks/results.json`` (or into ``--out``) and prints the Markdown report.
A full run takes about twenty minutes on 2 cores (the ``solvers`` section about
five, ``newton`` about ten); ``--quick`` (fewer rounds and seeds, spectral and solver sections on the
MLP only) a few.

A run of some sections or problems (``--only`` or ``--problems``) **merges**
into the results already in ``--out``: the (section, problem) entries it
measured replace the recorded ones, every other recorded entry is kept, and
``results.json`` records per section which run measured which problems
(``provenance``: commit, date, command and that run's settings; shown as a
table in ``RESULTS.md`` when sections come from different runs). The goals are
evaluated again over the merged results. A run of everything (neither option)
writes the results afresh, as does ``--no-merge``. For example, to record the
solver section alone into the committed results::

    python -m benchmarks --only solvers
"""

from __future__ import annotations

import os

# SciPy's BLAS (pulled in by peers) must not compete with torch's threads; set
# before anything imports NumPy or SciPy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.distributed import run_distributed  # noqa: E402
from benchmarks.ggn import run_ggn  # noqa: E402
from benchmarks.hvp import ProblemResult, run_hvp, run_matmat  # noqa: E402
from benchmarks.kfac import KFAC_PROBLEMS, run_kfac  # noqa: E402
from benchmarks.newton import FIGURE as NEWTON_FIGURE  # noqa: E402
from benchmarks.newton import run_newton  # noqa: E402
from benchmarks.optimizers import FIGURE as OPTIMIZERS_FIGURE  # noqa: E402
from benchmarks.optimizers import run_optimizers  # noqa: E402
from benchmarks.peers import backend_versions, peer_versions  # noqa: E402
from benchmarks.problems import PROBLEMS, build_problems  # noqa: E402
from benchmarks.report import (  # noqa: E402
    Recorded,
    all_goals,
    load_recorded,
    merge_recorded,
    render_markdown,
    write_results,
)
from benchmarks.resnet import run_resnet  # noqa: E402
from benchmarks.solvers import run_solvers  # noqa: E402
from benchmarks.spectral import SPECTRAL_SECTIONS, run_spectral  # noqa: E402
from benchmarks.timing import OtherLoad, configure_threads, machine_info  # noqa: E402
from curvkit.choice import AUTO_TRIALS  # noqa: E402

SECTIONS = (
    "hvp",
    "matmat",
    "ggn",
    "kfac",
    *SPECTRAL_SECTIONS,
    "solvers",
    "newton",
    "optimizers",
    "distributed",
    "resnet",
)


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items

    return parse


RECORDS = (
    "benchmarks/RESULTS.md",
    "benchmarks/results.json",
    f"benchmarks/{OPTIMIZERS_FIGURE}",
    f"benchmarks/{NEWTON_FIGURE}",
)
"""The files a run writes (its records and figures): changes to them alone do not make the measured
tree differ from its commit."""


def _commit() -> str | None:
    """The checked-out commit, with ``+changes`` if the tree differs from it (:data:`RECORDS` aside)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--", ".", *(f":(exclude){path}" for path in RECORDS)]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty.strip() else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        type=_csv(SECTIONS),
        default=list(SECTIONS),
        help="sections, e.g. hvp,matmat, ggn, eigen,trace,density, solvers or newton (default: all); merges "
        "into the results in --out",
    )
    parser.add_argument(
        "--problems", type=_csv(list(PROBLEMS)), default=None, help="e.g. mlp,cnn (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15, quick 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds before timing (default 1, quick 0)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few rounds: a smoke run (spectral and solver sections on the MLP only unless --problems says "
        "otherwise)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPU cores)")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="device of the resnet section (default auto: CUDA when available); the others run on the CPU",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="where to write the results")
    parser.add_argument(
        "--no-merge",
        action="store_true",
        help="with --only or --problems: write only this run's results, dropping those recorded in --out",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections on the selected problems and write the report."""
    args = parse_args(argv)
    commit = _commit()  # before the run: the code that is measured
    configure_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 15)
    matmat_repeats = 1 if args.quick else max(3, repeats // 2)
    warmup = (0 if args.quick else 1) if args.warmup is None else args.warmup
    # curvkit's "auto" product times its first 2 * AUTO_TRIALS products with K columns
    # (the untimed check product is one): warm up past them, so the timed rounds
    # measure the strategy it settled on, not its trials
    matmat_warmup = warmup if args.quick else max(warmup, 2 * AUTO_TRIALS - 1)
    machine = machine_info()
    start = time.perf_counter()
    whole_run = OtherLoad().start()
    results = []
    hvp_sections = [s for s in args.only if s in ("hvp", "matmat")]
    for problem in build_problems(args.problems) if hvp_sections else []:
        res = ProblemResult(problem.name, problem.description, problem.dim, problem.num_samples)
        print(f"[{problem.name}] P={problem.dim:,}", file=sys.stderr, flush=True)
        load = OtherLoad().start()
        if "hvp" in args.only:
            res.gradient_ms, res.hvp = run_hvp(problem, repeats, warmup)
        if "matmat" in args.only:
            res.matmat = run_matmat(problem, matmat_repeats, matmat_warmup)
        res.other_load = load.stop()
        results.append(res)
    ggn_results = []
    for problem in build_problems(args.problems) if "ggn" in args.only else []:
        print(f"[{problem.name}] GGN and Fisher, P={problem.dim:,}", file=sys.stderr, flush=True)
        load = OtherLoad().start()
        # past the auto strategies' timed trials (three ways, AUTO_TRIALS products each)
        ggn_warmup = warmup if args.quick else max(warmup, 3 * AUTO_TRIALS)
        res = run_ggn(problem, repeats, matmat_repeats, ggn_warmup)
        res.other_load = load.stop()
        ggn_results.append(res)
    kfac_results = []
    kfac_problems = [p for p in (args.problems or KFAC_PROBLEMS) if p in KFAC_PROBLEMS]
    for problem in build_problems(kfac_problems) if "kfac" in args.only and kfac_problems else []:
        print(f"[{problem.name}] KFAC, P={problem.dim:,}", file=sys.stderr, flush=True)
        load = OtherLoad().start()
        res = run_kfac(problem, repeats, warmup)
        res.other_load = load.stop()
        kfac_results.append(res)
    spectral_sections = [s for s in args.only if s in SPECTRAL_SECTIONS]
    spectral = run_spectral(spectral_sections, args.problems, args.quick) if spectral_sections else None
    solver_results, solver_settings = (
        run_solvers(args.problems, args.quick) if "solvers" in args.only else ([], None)
    )
    newton_results = run_newton(args.problems, args.quick, args.out) if "newton" in args.only else []
    optimizer_results = (
        run_optimizers(args.problems, args.quick, args.out) if "optimizers" in args.only else []
    )
    distributed_results = run_distributed(args.problems, args.quick) if "distributed" in args.only else []
    resnet_results = run_resnet(args.device, args.quick) if "resnet" in args.only else []
    meta = {
        "commit": commit,
        "command": " ".join(
            ["python -m benchmarks", shlex.join(argv if argv is not None else sys.argv[1:])]
        ).strip(),
        "machine": machine,
        "load_average_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "repeats": repeats,
        "matmat_repeats": matmat_repeats,
        "warmup": warmup,
        "matmat_warmup": matmat_warmup,
        "ggn_warmup": max(warmup, 3 * AUTO_TRIALS) if not args.quick else warmup,
        "quick": args.quick,
        "sections": args.only,
        "peers": peer_versions(),
        "peer_backends": backend_versions(),
        "spectral_settings": None if spectral is None else spectral.to_dict()["settings"],
        "solver_settings": None if solver_settings is None else asdict(solver_settings),
        "wall_s": time.perf_counter() - start,
        "other_load": whole_run.stop(),
    }
    lists = {
        "ggn": ggn_results,
        "kfac": kfac_results,
        "solvers": solver_results,
        "newton": newton_results,
        "optimizers": optimizer_results,
        "distributed": distributed_results,
        "resnet": resnet_results,
    }
    run = Recorded(results, spectral, lists)
    partial = set(args.only) != set(SECTIONS) or args.problems is not None
    old = load_recorded(args.out / "results.json") if partial and not args.no_merge else None
    merged = merge_recorded(old, run, args.only, meta)
    goals = all_goals(merged)
    parts = (merged.results, goals, merged.spectral, merged.lists, merged.provenance)
    write_results(args.out, meta, *parts)
    print(render_markdown(meta, *parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
