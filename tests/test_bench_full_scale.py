"""bench/full_scale.py runs end to end at a small N (THINGS-sized human exclusion set, the real
features and fitter, three iterations per fit) and prints its stage table, its per-iteration
times and both targets."""

import re

from conftest import run_bench


def test_full_scale_bench_runs_every_stage_and_reports_its_targets():
    out = run_bench(
        "full_scale.py", "--n-train", "4000", "--max-iter", "3", "--threads", "1",
        "--memory-budget", "4",
    )  # fmt: skip
    assert "human exclusion: 4,743,000 judgements" in out
    for stage in ("setup", "human exclusion", "sample + answer", "checksums", "fit", "score"):
        assert re.search(rf"^{re.escape(stage)}\s+[\d.]+\s+[\d.]+$", out, re.M), (stage, out)
    # 2 candidates x 2 lambdas x 3 folds, at most 3 iterations each
    fits = re.search(r"^fits: (\d+), iterations (\d+)-(\d+) .*? stopped at max_iter 3", out, re.M)
    assert fits, out
    assert int(fits[1]) == 12 and 1 <= int(fits[2]) <= int(fits[3]) <= 3
    # the fitter's per-iteration reports reached the clock (they did not before the progress
    # reporter counted finished fits: the run failed at its first iteration)
    assert re.search(r"^fit: seconds per L-BFGS iteration of a batch .* median [\d.]+", out, re.M)
    sample = r"^target: sample \+ answer 3 folds <= 60 s: [\d.]+ s, (met|NOT met)$"
    assert re.search(sample, out, re.M)
    assert re.search(r"^target: peak RSS <= 8 GB: [\d.]+ GB, (met|NOT met)$", out, re.M)
    assert re.search(r"^winner: [AB] ", out, re.M)
