"""Run the benchmarks: ``python -m benchmarks [--only hvp,matmat,ggn,kfac,eigen,trace,density] [--quick]``.

Run from the repository root. Writes ``benchmarks/RESULTS.md`` and
``benchmarks/results.json`` (or into ``--out``) and prints the Markdown report.
A full run takes about five minutes on 2 cores; ``--quick`` (fewer rounds and
seeds, spectral sections on the MLP only) about a minute.
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
from pathlib import Path  # noqa: E402

from benchmarks.ggn import evaluate_ggn_goals, run_ggn  # noqa: E402
from benchmarks.hvp import ProblemResult, evaluate_goals, run_hvp, run_matmat  # noqa: E402
from benchmarks.kfac import KFAC_PROBLEMS, evaluate_kfac_goals, run_kfac  # noqa: E402
from benchmarks.peers import peer_versions  # noqa: E402
from benchmarks.problems import PROBLEMS, build_problems  # noqa: E402
from benchmarks.report import render_markdown, write_results  # noqa: E402
from benchmarks.spectral import (  # noqa: E402
    SPECTRAL_SECTIONS,
    evaluate_spectral_goals,
    run_spectral,
)
from benchmarks.timing import OtherLoad, configure_threads, machine_info  # noqa: E402
from curvkit.choice import AUTO_TRIALS  # noqa: E402

SECTIONS = ("hvp", "matmat", "ggn", "kfac", *SPECTRAL_SECTIONS)


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return items

    return parse


def _commit() -> str | None:
    """The checked-out commit (with ``+changes`` if the tree differs from it), or ``None``."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain"]
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
        help="sections, e.g. hvp,matmat, ggn or eigen,trace,density (default: all)",
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
        help="few rounds: a smoke run (spectral sections on the MLP only unless --problems says otherwise)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPU cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="where to write the results")
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
        "spectral_settings": None if spectral is None else spectral.to_dict()["settings"],
        "wall_s": time.perf_counter() - start,
        "other_load": whole_run.stop(),
    }
    goals = (
        evaluate_goals(results)
        + evaluate_ggn_goals(ggn_results)
        + evaluate_kfac_goals(kfac_results)
        + (evaluate_spectral_goals(spectral) if spectral else [])
    )
    write_results(args.out, meta, results, goals, spectral, ggn_results, kfac_results)
    print(render_markdown(meta, results, goals, spectral, ggn_results, kfac_results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
