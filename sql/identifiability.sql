-- What a win means: P(true model | winner) with 95% intervals per training size (by accuracy).
-- One row per winner and generator (docs/analyses.md §1); the posteriors of a winner sum to 1.
-- A model that never won has no rows here: it is listed in never_won.
SELECT n_train, winner, generator, n_wins, posterior, ci_low, ci_high
FROM identifiability
WHERE criterion = 'accuracy'
ORDER BY n_train, winner, posterior DESC, generator;
