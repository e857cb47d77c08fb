"""Synthetic odd-one-out data for one recovery job (docs/method.md §6).

For a generator ``g`` (a human-fitted probe with calibrated temperature ``T_g``, method §5), a
training size ``N`` and a simulation index ``s``:

1. the concepts are split into 3 folds with seed ``s`` (:func:`~recovery_assets.core.triplets.
   concept_folds`): per fold, test concepts = that fold, the rest 70 % train / 30 % validation;
2. per fold, ``N`` training, ``round(N/8)`` validation and ``round(N/8)`` test triplets are drawn
   uniformly at random, unique, with 3 distinct concepts inside the respective concept subset and
   excluding every triplet of the human dataset (compared after sorting);
3. each triplet gets one answer drawn from ``Categorical(softmax([s_jk, s_ik, s_ij] / T_g))``.

Every random draw has its own seed derived with :func:`job_seed` from (generator, N, s, fold,
split), so the same ``(g, N, s)`` always gives identical data, independent of which other jobs run
and in which order. The same synthetic dataset serves all candidates of the job.

Reproducible everywhere, computed in chunks
-------------------------------------------
The study stores the *recipe* of a job's data (seeds, sizes, checksums), not its rows, and
regenerates the rows where they are used; so the answers must come out bit for bit the same on
every machine, BLAS and thread count. :class:`GeneratorLogits` defines the generator's logits by a
fixed sequence of IEEE-754 float64 operations (its *reference*), and :func:`draw_answers` decides
every answer exactly as the reference logits would, while computing almost every row with a fast
BLAS similarity matrix: a rigorous error bound tells the rows whose answer the fast logits cannot
change (all but about one in a million) from the rest, which are recomputed with the reference. The
triplet sampler uses integer arithmetic only. Everything is done in chunks of rows
(:data:`CHUNK`), so no (N, p) array is ever formed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from recovery_assets.core.triplets import concept_folds, sample_unique_triplets

__all__ = [
    "CHUNK",
    "SPLITS",
    "AnswerStats",
    "GeneratorLogits",
    "array_sha256",
    "draw_answers",
    "iter_synthetic_job",
    "job_seed",
    "sample_answers",
    "synthetic_job",
]

SPLITS = ("train", "val", "test")
CHUNK = 1 << 18  # triplets per chunk of logits / answers (a few MB of float64 per chunk)

_UNIT_ROUNDOFF = 2.0**-53
# Absolute slack on a cumulative probability: rounding inside the softmax and the difference
# between numpy's exp and the reference exp (a few units in 1e-16) are far below it.
_CDF_SLACK = 1e-12


def job_seed(*parts: object) -> int:
    """Stable integer seed in ``[0, 2**63)`` derived from ``parts`` with SHA-256.

    Typical parts are ``(generator name, n_train, simulation, fold, split name[, purpose])``. Each
    part is converted with ``str`` (so ``3`` and ``np.int64(3)`` agree, ``3`` and ``"3"`` too) and
    the parts are joined with a unit separator before hashing. Unlike Python's built-in ``hash``
    this does not change between processes (no hash randomisation) or platforms.
    """
    if not parts:
        raise ValueError("job_seed needs at least one part")
    text = "\x1f".join(str(p) for p in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def array_sha256(array: np.ndarray, dtype: np.dtype | str | None = None) -> str:
    """SHA-256 (hex) of an array's values: ``sha256(header + data)``.

    ``data`` are the C-order bytes of the array as little-endian ``dtype`` (default: its own
    dtype) and ``header`` is ``"<dtype.str>:<shape>\\0"``, e.g. ``b"<i8:(100, 3)\\0"``, so arrays
    with the same bytes but another shape or type differ. Triplets are hashed as int64 and answers
    as int8: ``array_sha256(triplets, "<i8")``, ``array_sha256(answers, "i1")``.
    """
    a = np.asarray(array)
    dt = np.dtype(dtype if dtype is not None else a.dtype).newbyteorder("<")
    data = np.ascontiguousarray(a, dtype=dt)
    h = hashlib.sha256(f"{dt.str}:{tuple(data.shape)}\0".encode())
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return t


def _check_logits(logits: np.ndarray) -> np.ndarray:
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"logits must have shape (m, 3), got {arr.shape}")
    if arr.shape[1] > 127:
        raise ValueError("at most 127 options fit int8 answers")
    if not np.all(np.isfinite(arr)):
        raise ValueError("logits must be finite")
    return arr


def sample_answers(
    logits: np.ndarray, temperature: float, seed: int | np.random.Generator
) -> np.ndarray:
    """Draw one answer position per row from ``Categorical(softmax(logits / T))``.

    Vectorised inverse-CDF sampling: with ``u ~ U[0, 1)`` from ``np.random.default_rng(seed)`` (one
    draw per row, in row order) the answer is the number of cumulative probabilities
    ``P_0, P_0 + P_1, ...`` (excluding the last, which is 1 up to rounding) that are ``<= u``, so
    ``P(answer = c) = P_c`` exactly. The softmax is computed in float64 after subtracting the row
    maximum. Deterministic for a given seed. :func:`draw_answers` gives the same answers for a
    plain logits function, in chunks of rows.

    Parameters
    ----------
    logits : (m, C) logits at ``T = 1`` (C = 3 for triplets: ``[s_jk, s_ik, s_ij]``).
    temperature : ``T > 0`` (the generator's calibrated temperature).
    seed : seed for ``np.random.default_rng`` or a Generator.

    Returns
    -------
    (m,) int8 answer positions.
    """
    arr = _check_logits(logits)
    t = _check_temperature(temperature)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    cdf = np.cumsum(softmax(arr / t, axis=1), axis=1)
    u = rng.random(arr.shape[0])
    return (cdf[:, :-1] <= u[:, None]).sum(axis=1).astype(np.int8)


# exp on [-1000, 0] from IEEE-754 operations only (Cody-Waite reduction, Taylor polynomial):
# unlike np.exp (SIMD code chosen per CPU, libm) its bits are the same on every machine.
_LN2_HI = 6.93147180369123816490e-01  # 21 trailing zero bits: k * _LN2_HI is exact for |k| < 2**21
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(14))  # |r| <= ln2/2: error < 1e-17


def _reference_exp(x: np.ndarray) -> np.ndarray:
    """exp(x) for x <= 0 (relative error a few 1e-16; exp(-1000) = 0 in float64 as well)."""
    x = np.maximum(x, -1000.0)
    k = np.rint(x * _INV_LN2)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = np.full_like(r, _EXP_TAYLOR[-1])
    for c in reversed(_EXP_TAYLOR[:-1]):
        p = p * r + c
    return np.ldexp(p, k.astype(np.int32))


def _reference_answers(logits: np.ndarray, temperature: float, u: np.ndarray) -> np.ndarray:
    """The answers of (m, 3) logits for uniforms u, from IEEE-754 float64 operations in a fixed
    order (the reference of :func:`draw_answers`): z = l / T; e = exp(z - max z) (reference exp);
    P_c = e_c / ((e_0 + e_1) + e_2); answer = [P_0 <= u] + [P_0 + P_1 <= u]."""
    z = logits / temperature
    z0, z1, z2 = z[:, 0], z[:, 1], z[:, 2]
    zmax = np.maximum(np.maximum(z0, z1), z2)
    e0, e1, e2 = (_reference_exp(v - zmax) for v in (z0, z1, z2))
    total = (e0 + e1) + e2
    p0, p1 = e0 / total, e1 / total
    return ((p0 <= u).astype(np.int8) + ((p0 + p1) <= u).astype(np.int8)).astype(np.int8)


@dataclass
class AnswerStats:
    """Sums over the rows of one drawn split, for the generator's self-agreement check.

    ``hits``: answers equal to the generator's argmax; ``expected``: sum of max_c P_c (expected
    hits); ``variance``: sum of max_c P_c (1 - max_c P_c); ``n_exact``: rows whose answer was
    decided with the reference logits (the fast logits were too close to a decision boundary).
    """

    n: int = 0
    hits: float = 0.0
    expected: float = 0.0
    variance: float = 0.0
    n_exact: int = 0

    def add(self, other: AnswerStats) -> AnswerStats:
        return AnswerStats(
            self.n + other.n,
            self.hits + other.hits,
            self.expected + other.expected,
            self.variance + other.variance,
            self.n_exact + other.n_exact,
        )


class GeneratorLogits:
    """The logits ``[s_jk, s_ik, s_ij]`` (T = 1) of a generator probe, one reference everywhere.

    With features ``X`` (n x p, float64: ``features_for(spec, X)``) and the probe's transform
    ``W`` (q x p), ``s_ab = z_a . z_b`` with ``Z = X W^T``.

    **Reference** (the definition the study's data follow): ``z_cr = sum_d x_cd w_rd`` and
    ``s_ab = sum_r z_ar z_br``, each sum accumulated from a zero in ascending index, every product
    and every sum rounded to float64 separately (IEEE-754; no fused multiply-add, no reordering).
    numpy's element-wise ufuncs do exactly this, so the reference has the same bits on every
    machine, whatever its BLAS, SIMD width or thread count. It is slow (n p q + n^2 q element
    operations in Python-level loops), so it is only evaluated for the rare rows that need it.

    **Fast path** (calling the object): ``S = Z Z^T`` with BLAS (``Z = X @ W.T`` unless ``Z`` is
    given), the logits gathered from the n x n matrix ``S`` for any number of triplets without
    forming an (m, p) array. BLAS may sum in any order, so its entries differ from the reference,
    but by at most ``bound_ab = 4 (q + 2p + 1) u (A A^T)_ab`` with ``A = |X| |W|^T`` and
    ``u = 2^-53``: any summation order of a length-k dot product has error at most
    ``gamma_k |x|.|y|`` (``gamma_k = k u / (1 - k u)``; Higham, Accuracy and Stability, §3.1),
    applied to Z and then to S, which bounds the error of every computation by ``(q + 2p) u A A^T``
    up to terms in u^2, and the difference of two computations by twice that; ``bound`` doubles
    it again. :func:`draw_answers` uses ``bound`` to find the rows whose answer the difference
    could change and decides those with :meth:`reference`.

    Parameters
    ----------
    features : (n, p) features the transform acts on (``features_for(spec, X)``).
    W : (q, p) transform.
    Z : optional (n, q) ``X W^T`` computed in any order (tests; another BLAS); default ``X @ W.T``.
    """

    def __init__(self, features: np.ndarray, W: np.ndarray, Z: np.ndarray | None = None):
        X = np.ascontiguousarray(features, dtype=np.float64)
        W64 = np.ascontiguousarray(W, dtype=np.float64)
        if X.ndim != 2 or W64.ndim != 2 or W64.shape[1] != X.shape[1]:
            raise ValueError(f"features {X.shape} and W {W64.shape} do not fit (Z = X W^T)")
        if not (np.isfinite(X).all() and np.isfinite(W64).all()):
            raise ValueError("features and W must be finite")
        self.n, self.p = X.shape
        self.q = W64.shape[0]
        self._X = X
        self._WT = np.ascontiguousarray(W64.T)  # (p, q): row d holds w_rd for every r
        Z = X @ W64.T if Z is None else np.asarray(Z, dtype=np.float64)
        if Z.shape != (self.n, self.q):
            raise ValueError(f"Z must have shape {(self.n, self.q)}, got {Z.shape}")
        self.similarity = Z @ Z.T  # fast S
        A = np.abs(X) @ np.abs(self._WT)
        self.bound = (A @ A.T) * (4.0 * (self.q + 2 * self.p + 1) * _UNIT_ROUNDOFF)
        # reference z rows, computed per concept on demand, stored transposed (q, n)
        self._zref = np.zeros((self.q, self.n), dtype=np.float64)
        self._have = np.zeros(self.n, dtype=bool)

    @staticmethod
    def _pairs(triplets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(triplets, dtype=np.int64)
        a = np.stack([t[:, 1], t[:, 0], t[:, 0]], axis=1)  # s_jk, s_ik, s_ij
        b = np.stack([t[:, 2], t[:, 2], t[:, 1]], axis=1)
        return a, b

    def __call__(self, triplets: np.ndarray) -> np.ndarray:
        """(m, 3) fast logits (BLAS similarity, gathered)."""
        a, b = self._pairs(triplets)
        return self.similarity.ravel()[a * self.n + b]

    def tolerance(self, triplets: np.ndarray) -> np.ndarray:
        """(m,) bound on |fast - reference| over the row's three logits."""
        a, b = self._pairs(triplets)
        return self.bound.ravel()[a * self.n + b].max(axis=1)

    def _reference_z(self, concepts: np.ndarray) -> None:
        need = concepts[~self._have[concepts]]
        if need.size == 0:
            return
        zc = np.zeros((need.size, self.q), dtype=np.float64)
        prod = np.empty_like(zc)
        Xc = self._X[need]
        for d in range(self.p):  # ascending d: z_cr = (...((0 + x_c0 w_r0) + x_c1 w_r1) ...)
            np.multiply(Xc[:, d, None], self._WT[d][None, :], out=prod)
            np.add(zc, prod, out=zc)
        self._zref[:, need] = zc.T
        self._have[need] = True

    def reference(self, triplets: np.ndarray) -> np.ndarray:
        """(m, 3) reference logits (fixed-order float64; identical bits on every machine)."""
        a, b = self._pairs(triplets)
        self._reference_z(np.unique(np.concatenate([a.ravel(), b.ravel()])))
        a, b = a.ravel(), b.ravel()
        acc = np.zeros(a.size, dtype=np.float64)
        for r in range(self.q):  # ascending r: s_ab = (...((0 + z_a0 z_b0) + z_a1 z_b1) ...)
            zr = self._zref[r]
            acc = acc + zr[a] * zr[b]
        return acc.reshape(-1, 3)


def draw_answers(
    triplets: np.ndarray,
    logits_fn: Callable[[np.ndarray], np.ndarray],
    temperature: float,
    seed: int | np.random.Generator,
    chunk: int = CHUNK,
) -> tuple[np.ndarray, AnswerStats]:
    """Answers of ``triplets`` drawn from the generator, in chunks of ``chunk`` rows.

    The uniforms come from one ``np.random.default_rng(seed)`` in row order (``rng.random`` per
    chunk gives the same numbers as one call for all rows), so for a plain ``logits_fn`` the
    answers are those of ``sample_answers(logits_fn(triplets), temperature, seed)``, whatever
    ``chunk``; only one chunk's logits exist at a time.

    For a :class:`GeneratorLogits` the answers are those of its *reference* logits with the
    reference softmax (``_reference_answers``; fixed-order IEEE-754 float64, an exp built from
    +, *, rint and ldexp): identical on every machine. Each chunk is first decided with the fast
    logits; a row's answer can differ from the reference only if a cumulative probability lies
    within ``tolerance / T + 1e-12`` of ``u`` (the softmax's cumulative probabilities are
    ``1/(2T)``-Lipschitz in the max-norm of the logits; ``1e-12`` covers rounding and exp), and
    those rows (about one in a million: 1 or 2 of 4.2M with n = 1,854, p = 1,024 or 2,048) are
    recomputed with the reference.

    Returns
    -------
    (m,) int8 answers and the :class:`AnswerStats` of the rows (from the fast logits).
    """
    t = np.asarray(triplets)
    m = int(t.shape[0])
    temp = _check_temperature(temperature)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    exact = isinstance(logits_fn, GeneratorLogits)
    chunk = max(1, int(chunk))
    answers = np.empty(m, dtype=np.int8)
    stats = AnswerStats()
    for start in range(0, m, chunk):
        rows = t[start : start + chunk]
        logits = np.asarray(logits_fn(rows), dtype=np.float64)
        if logits.shape != (rows.shape[0], 3):
            raise ValueError(
                f"logits_fn returned shape {logits.shape}, expected ({rows.shape[0]}, 3)"
            )
        if not np.all(np.isfinite(logits)):
            raise ValueError("logits_fn returned non-finite logits")
        u = rng.random(rows.shape[0])
        z = logits / temp
        p = softmax(z, axis=1)
        cdf = np.cumsum(p, axis=1)[:, :-1]
        ans = (cdf <= u[:, None]).sum(axis=1).astype(np.int8)
        n_exact = 0
        if exact:
            gap = np.abs(cdf - u[:, None]).min(axis=1)
            close = np.flatnonzero(gap <= logits_fn.tolerance(rows) / temp + _CDF_SLACK)
            if close.size:
                ref = logits_fn.reference(rows[close])
                ans[close] = _reference_answers(ref, temp, u[close])
                n_exact = int(close.size)
        answers[start : start + rows.shape[0]] = ans
        pmax = p.max(axis=1)
        stats = stats.add(
            AnswerStats(
                n=int(rows.shape[0]),
                hits=float((ans == z.argmax(axis=1)).sum()),
                expected=float(pmax.sum()),
                variance=float((pmax * (1.0 - pmax)).sum()),
                n_exact=n_exact,
            )
        )
    return answers, stats


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


def iter_synthetic_job(
    n_concepts: int,
    n_train: int,
    simulation: int,
    logits_fn: Callable[[np.ndarray], np.ndarray],
    temperature: float,
    exclude_keys: np.ndarray | None = None,
    val_fraction: float = 1 / 8,
    *,
    generator: str = "generator",
    n_folds: int = 3,
    concept_val_fraction: float = 0.3,
    chunk: int = CHUNK,
) -> Iterator[dict]:
    """The folds of :func:`synthetic_job`, one at a time (so a caller holds one fold's rows).

    Each split's dict also holds ``"stats"``, the :class:`AnswerStats` of its answers.
    """
    n_train = int(n_train)
    n_eval = round(n_train * val_fraction)
    if n_train < 1 or n_eval < 1:
        raise ValueError(
            f"n_train={n_train} with val_fraction={val_fraction} gives an empty split "
            f"({n_train} train, {n_eval} validation/test triplets)"
        )
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    if exclude_keys is not None:
        # Sort and deduplicate once for all 9 draws (sort-based: faster than np.unique here).
        keys = np.asarray(exclude_keys, dtype=np.int64).ravel()
        if np.any(keys[1:] <= keys[:-1]):
            keys = np.sort(keys)
            keys = keys[np.r_[True, keys[1:] != keys[:-1]]]
        exclude_keys = keys if keys.size else None
    folds = concept_folds(
        n_concepts, seed=simulation, n_folds=n_folds, val_fraction=concept_val_fraction
    )
    for split in folds:
        fold = split.fold
        record: dict = {
            "fold": fold,
            "seed": int(simulation),
            "concepts": split.as_dict(),
        }
        for name in SPLITS:
            parts = (generator, n_train, simulation, fold, name)
            try:
                triplets = sample_unique_triplets(
                    split.as_dict()[name],
                    sizes[name],
                    job_seed(*parts, "triplets"),
                    exclude_keys=exclude_keys,
                    n_concepts=n_concepts,
                )
            except ValueError as err:
                raise ValueError(
                    f"generator {generator!r}, N={n_train}, simulation {simulation}, fold {fold}, "
                    f"{name} split: {err}"
                ) from err
            answers, stats = draw_answers(
                triplets, logits_fn, temperature, job_seed(*parts, "answers"), chunk
            )
            record[name] = {"triplets": triplets, "answers": answers, "stats": stats}
        yield record


def synthetic_job(
    n_concepts: int,
    n_train: int,
    simulation: int,
    logits_fn: Callable[[np.ndarray], np.ndarray],
    temperature: float,
    exclude_keys: np.ndarray | None = None,
    val_fraction: float = 1 / 8,
    *,
    generator: str = "generator",
    n_folds: int = 3,
    concept_val_fraction: float = 0.3,
    chunk: int = CHUNK,
) -> list[dict]:
    """Synthetic train / validation / test data of one recovery job (docs/method.md §6).

    Parameters
    ----------
    n_concepts : number of concepts (1,854 for THINGS).
    n_train : ``N``, the number of training triplets per fold.
    simulation : ``s``; seeds the concept folds (``concept_folds(seed=s)``) and, with the other
        parts, every triplet and answer draw.
    logits_fn : callable mapping an (m, 3) int64 triplet array to the generator's (m, 3) logits
        ``[s_jk, s_ik, s_ij]`` at ``T = 1``; a :class:`GeneratorLogits` (the generator's fitted W
        on its own features) makes the answers identical on every machine (:func:`draw_answers`).
        It is called on chunks of at most ``chunk`` rows.
    temperature : the generator's calibrated temperature ``T_g``.
    exclude_keys : keys (``triplet_keys(human_rows, n_concepts)``) of human triplets never to draw.
    val_fraction : size of the validation and of the test set relative to ``N``; each gets
        ``round(N * val_fraction)`` triplets (``round(N/8)``; Python's ``round``, i.e. halves to
        even: N = 100 gives 12).
    generator : the generator's name, part of every seed (same (g, N, s) -> same data).
    n_folds, concept_val_fraction : concept split parameters (3 folds; 30 % validation concepts).
    chunk : rows per chunk of logits and answers (does not change the data).

    Returns
    -------
    list with one dict per fold::

        {"fold": f, "seed": int,
         "concepts": {"train": ..., "val": ..., "test": ...},   # sorted int64 concept indices
         "train": {"triplets": (N, 3) int64, "answers": (N,) int8, "stats": AnswerStats},
         "val":   {...},
         "test":  {...}}

    Seeds: triplets of (fold, split) use ``job_seed(generator, N, s, fold, split, "triplets")`` and
    answers ``job_seed(generator, N, s, fold, split, "answers")``.

    Raises
    ------
    ValueError
        If a concept subset cannot hold the requested number of unique non-excluded triplets, a
        split would be empty, or ``logits_fn`` returns the wrong shape.
    """
    return list(
        iter_synthetic_job(
            n_concepts,
            n_train,
            simulation,
            logits_fn,
            temperature,
            exclude_keys,
            val_fraction,
            generator=generator,
            n_folds=n_folds,
            concept_val_fraction=concept_val_fraction,
            chunk=chunk,
        )
    )
