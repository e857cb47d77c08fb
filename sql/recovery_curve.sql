-- Recovery accuracy with its exact 95% CI per training size (model selected by test accuracy).
SELECT n_train, accuracy, ci_low, ci_high, chance, n_correct, n_total, mean_true_rank, mrr
FROM recovery_summary
WHERE criterion = 'accuracy'
ORDER BY n_train;
