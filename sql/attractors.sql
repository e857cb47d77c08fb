-- Attractors: candidates that win other generators' data, and how often, per training size.
SELECT n_train,
       winner AS candidate,
       sum(count) AS wrong_wins,
       count(DISTINCT generator) AS generators_taken,
       string_agg(generator || ' x' || count, ', ' ORDER BY count DESC) AS taken_from
FROM recovery_confusion
WHERE criterion = 'accuracy' AND winner <> generator AND count > 0
GROUP BY n_train, winner
ORDER BY n_train, wrong_wins DESC, candidate;
