-- Open-set recovery: with the generator not a candidate, does its nearest neighbour win its data?
-- Per training size and model (by accuracy; docs/analyses.md §2): its nearest neighbour in the
-- human-fitted geometry, how many of its jobs went there, and how many jobs of other generators
-- it attracts. open_set_recovery holds every job's open-set winner.
SELECT n_train, model, nearest, n_jobs, n_to_nearest, frac_to_nearest, attracts,
       attracts_generators
FROM open_set_summary
WHERE criterion = 'accuracy'
ORDER BY n_train, model;
