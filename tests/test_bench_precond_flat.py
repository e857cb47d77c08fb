"""bench/precond_flat.py runs end to end (its tiny --quick job), compares the shipped flat part
with a constant on the same fits."""

import re

from conftest import run_bench

from recovery_assets.core.probe import objective


def test_precond_flat_bench_compares_the_rule_with_a_constant():
    out = run_bench("precond_flat.py", "--quick", "--constant", "7")
    rows = re.findall(r"^\| (\de[+-]\d\d) \| ([\d.e+]+) \| (\d+) \| (\d+) \| ([-+][\d.e+-]+) \|$",
                      out, re.M)  # fmt: skip
    assert len(rows) == 11, out  # one row per lambda, 1e-6 ... 1e4
    for lam, flat, it_rule, it_const, _ in rows:
        assert float(flat) == float(f"{objective.precond_flat(float(lam)):.3g}")
        assert int(it_rule) > 0 and int(it_const) > 0
    # the two runs really differ in their preconditioner: at lambda = 1e4 the rule's flat part
    # is 20,000 against the constant 7, and the fits take different paths
    assert any(r[2] != r[3] for r in rows), out
    total = re.search(r"^\| all \| \| (\d+) \| (\d+) \| \|$", out, re.M)
    assert total and int(total[1]) == sum(int(r[2]) for r in rows)
    assert re.search(r"^time: rule [\d.]+ s, constant [\d.]+ s: [\d.]+x$", out, re.M)
