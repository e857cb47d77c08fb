-- The misidentification regression's data (largest N): one row per simulation, generator and
-- candidate != generator, with the raw and z-scored accuracy difference and the z-scored
-- predictors of both models; then the fitted coefficients.
SELECT * FROM regression_frame ORDER BY simulation, generator, candidate;
