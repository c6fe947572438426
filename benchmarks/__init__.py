"""curvkit's benchmark suite: curvkit beside raw PyTorch and the peer libraries.

Run from the repository root with ``python -m benchmarks`` (see
:mod:`benchmarks.__main__`); results go to ``benchmarks/RESULTS.md`` and
``benchmarks/results.json``. The suite is not part of the tests.

Modules:

* :mod:`benchmarks.problems`: the models and data, defined once.
* :mod:`benchmarks.timing`: medians of repeated calls, thread settings, machine facts.
* :mod:`benchmarks.methods`: Hessian-vector products with curvkit and raw PyTorch.
* :mod:`benchmarks.peers`: the same product through each peer library.
* :mod:`benchmarks.hvp`: the rows (gradient, HVP, matmat) and their goals.
* :mod:`benchmarks.spectral_methods`: top-5 eigenvalues, trace estimates and spectral
  densities with curvkit and the peers, with products counted at the operator.
* :mod:`benchmarks.spectral`: the spectral rows (``eigen``, ``trace``, ``density``),
  their references and goals.
* :mod:`benchmarks.ggn`, :mod:`benchmarks.kfac`: the GGN / Fisher and KFAC rows.
* :mod:`benchmarks.solvers`: inverse-HVP solvers against curvlinops' inverse
  operators: products and time to a relative residual of 1e-6, and what each
  returns on an indefinite system.
* :mod:`benchmarks.newton`, :mod:`benchmarks.optimizers`, :mod:`benchmarks.training`:
  NewtonSummary and the optimizers trained side by side with the peers'.
* :mod:`benchmarks.distributed`: two gloo processes against one.
* :mod:`benchmarks.resnet`: ResNet-18 on one device (``--device``): HVP against a
  gradient and top-5 eigenvalues, curvkit and the peers.
* :mod:`benchmarks.report`: ``RESULTS.md`` and ``results.json``; a run of some
  sections (``--only``) merges them into the recorded ones
  (:data:`~benchmarks.report.LIST_SECTIONS`: how each per-problem section is read
  back, merged, rendered and judged).
"""
