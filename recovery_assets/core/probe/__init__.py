"""The linear probe of docs/method.md §4: fitting a transform W to odd-one-out choices.

Features X (n x p) are mapped to Z = X W^T; the similarity of concepts a and b is
s_ab = z_a . z_b. For a triplet (i, j, k) the logits are [s_jk, s_ik, s_ij] / T, so position 0
("i is the odd one out") is scored by the similarity of the other pair. The objective is the mean
cross-entropy over the training triplets plus lambda * R(W), R not divided by the triplet count:

- shrinkage:  R = ||W - (tr W / p) I||_F^2   (towards any scaled identity)
- frobenius:  R = ||W||_F^2
- l1:         R = sum |W_ij|

Families: ``full`` (W is p x p), ``diagonal`` (W = diag(w)), ``rank:k`` (W is k x p, initialised
to eye(k, p); shrinkage acts on W^T W), ``zero_shot`` (W = I, nothing fitted) and ``pca:k`` (the
features are replaced by their centred scores on the k leading principal axes, (X - mean) P, as
``sklearn.decomposition.PCA.transform`` gives up to the sign of each axis, the mean and axes
taken over all n concepts; then a full k x k W is fitted, so Z = (X - mean) P W_k^T).

Every fit starts from the identity; the optimiser's first move is an exact 1-D search along the
scaled identities c I (``objective._scale_search``), then L-BFGS (FISTA for L1). Fitting is
batched: many problems (candidate models x lambdas x folds) advance together in one optimiser (see
``optim``), on any torch device. ``full`` and ``pca:k`` with the shrinkage or Frobenius penalty
are fitted through an exact r x r reduction (docs/exact-fit.md).

The package, by concept:

- ``spec``: ``ProbeSpec`` (family and penalty), FAMILIES, PENALTIES, ``resolve_device``;
- ``data_term``: the cross-entropy of the choices and its gradient, dense or on sparse pair
  patterns (docs/exact-fit.md, "The data term: dense or sparse"); ``pair_index``,
  ``logits_from_similarity``, ``choice_metrics``;
- ``penalties``: one object per penalty (value, gradient, plain formula), ``PENALTY``;
- ``reduction``: the exact reduction and its basis tricks, ``row_space_basis``, ``features_for``,
  ``pca_axes`` (docs/exact-fit.md, "The reduction to an r x r problem", "CPU specifics");
- ``kernels``: the CPU matmul helpers of an iteration (docs/exact-fit.md, "CPU specifics");
- ``objective``: the batched objective, the scale search and one batch's fit (docs/exact-fit.md,
  "The optimiser");
- ``batching``: ``fit_probes`` and ``FitProblem``: preparing, packing and running the batches;
- ``fitted``: ``FittedProbe``, ``probe_metrics`` and ``probe_objective``;
- ``inputs``: ``check_probe_inputs``, the checks of one problem's arrays (pure numpy: ``recovery
  fit-probe`` validates without importing scikit-learn).

The tuning constants are re-exported here. Each is read at call time from the module that
defines and uses it, so change one (tests, benchmarks) there, e.g.
``monkeypatch.setattr(probe.kernels, "LOOP_MM_MIN", 0)``. Setting one on the package sets it on
that module too (``_Package``), but a value set on the module is not seen here. Private functions
are not re-exported: replace them on the module that calls them (``probe.batching._fit_context``).
"""

from __future__ import annotations

import sys
import types

from recovery_assets.core.probe import (
    batching,
    data_term,
    fitted,
    kernels,
    objective,
    penalties,
    reduction,
    spec,
)
from recovery_assets.core.probe.batching import CPU_BATCH_FLOPS, FitProblem, fit_probes
from recovery_assets.core.probe.data_term import (
    SAMPLE_RATIO,
    SPARSE_DEVICES,
    SPARSE_RATIO,
    choice_metrics,
    logits_from_similarity,
    pair_index,
)
from recovery_assets.core.probe.fitted import FittedProbe, probe_metrics, probe_objective
from recovery_assets.core.probe.kernels import GRAM_ROWS, LOOP_MM_MIN, TRI_ROWS
from recovery_assets.core.probe.objective import PRECOND_FLAT, PRECOND_LAMBDA
from recovery_assets.core.probe.penalties import PENALTY, Penalty
from recovery_assets.core.probe.reduction import (
    PAD_MIN,
    PAD_TO,
    TRI_MIN,
    features_for,
    pca_axes,
    row_space_basis,
)
from recovery_assets.core.probe.spec import FAMILIES, PENALTIES, ProbeSpec, resolve_device

__all__ = [
    "CPU_BATCH_FLOPS",
    "FAMILIES",
    "GRAM_ROWS",
    "LOOP_MM_MIN",
    "PAD_MIN",
    "PAD_TO",
    "PENALTIES",
    "PENALTY",
    "PRECOND_FLAT",
    "PRECOND_LAMBDA",
    "SAMPLE_RATIO",
    "SPARSE_DEVICES",
    "SPARSE_RATIO",
    "TRI_MIN",
    "TRI_ROWS",
    "FitProblem",
    "FittedProbe",
    "Penalty",
    "ProbeSpec",
    "batching",
    "choice_metrics",
    "data_term",
    "features_for",
    "fit_probes",
    "fitted",
    "kernels",
    "logits_from_similarity",
    "objective",
    "pair_index",
    "pca_axes",
    "penalties",
    "probe_metrics",
    "probe_objective",
    "reduction",
    "resolve_device",
    "row_space_basis",
    "spec",
]

# Where each re-exported constant is defined and read.
_HOMES = {
    "CPU_BATCH_FLOPS": batching,
    "FAMILIES": spec,
    "GRAM_ROWS": kernels,
    "LOOP_MM_MIN": kernels,
    "PAD_MIN": reduction,
    "PAD_TO": reduction,
    "PENALTIES": spec,
    "PENALTY": penalties,
    "PRECOND_FLAT": objective,
    "PRECOND_LAMBDA": objective,
    "SAMPLE_RATIO": data_term,
    "SPARSE_DEVICES": data_term,
    "SPARSE_RATIO": data_term,
    "TRI_MIN": reduction,
    "TRI_ROWS": kernels,
}


class _Package(types.ModuleType):
    """The package module: a re-exported constant set here is set on the module that reads it as
    well, so that ``monkeypatch.setattr(probe, "SPARSE_RATIO", 0)`` still takes effect."""

    def __setattr__(self, name: str, value) -> None:
        home = _HOMES.get(name)
        if home is not None:
            setattr(home, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
