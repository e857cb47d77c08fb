"""bench/probe_speed.py's job line runs end to end (its --quick configuration): the fitter's job
timed before and after the reference, the speed-up taken against their mean."""

import re

from conftest import run_bench


def test_probe_speed_job_line_times_the_fitter_around_the_reference():
    out = run_bench(
        "probe_speed.py", "--quick", "--skip-single", "--rules", "optimum",
        "--reference-folds", "1", "--reference-lambdas", "1e-2",
    )  # fmt: skip
    runs = re.findall(r"job under the optimum rule \((before|after) the reference\): ([\d.]+) s, "
                      r"(\d+) iterations", out)  # fmt: skip
    assert [w for w, _, _ in runs] == ["before", "after"], out
    assert runs[0][2] == runs[1][2]  # the same fits both times
    line = re.search(
        r"ours +([\d.]+) s \(mean of ([\d.]+) s before and ([\d.]+) s after the reference\) \| "
        r"reference +([\d.]+) s, reference timed on 4 of 132 fits and scaled x33 \| speed-up +"
        r"([\d.]+)x .* worst objective ours - ref ([-+][\d.e+-]+)",
        out,
    )
    assert line, out
    mean, before, after, ref, ratio, gap = (float(v) for v in line.groups())
    assert (before, after) == (float(runs[0][1]), float(runs[1][1]))
    assert abs(mean - (before + after) / 2) <= 0.051
    assert abs(ratio - ref / mean) <= 0.05 * ref / mean + 0.05
    assert gap <= 1e-4  # never above the reference's objective
