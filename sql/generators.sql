-- Generator probes: chosen lambda, calibrated temperature, fit to the human data.
SELECT model, lam, temperature, target, calibrated_mean_max_probability,
       human_test_accuracy, human_test_nll, human_val_accuracy
FROM generator_probes
ORDER BY human_test_accuracy DESC;
