-- The recovery matrix in long form: how often each generator's data crowned each winner.
SELECT n_train, generator, winner, count
FROM recovery_confusion
WHERE criterion = 'accuracy' AND count > 0
ORDER BY n_train, generator, count DESC, winner;
