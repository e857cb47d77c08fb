-- Coefficients of the misidentification regression with bootstrap CIs, Bonferroni p and VIFs.
SELECT term, coef, ci_low, ci_high, p_boot, p_bonferroni, significant, vif
FROM misidentification_regression
ORDER BY abs(coef) DESC;
