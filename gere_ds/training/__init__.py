"""One run's assembly around the continual loop (gere_ds.trainer): the parts a launch builds
(``assembly``), what a checkpoint records of the run and how it is loaded back (``run_state``),
the listeners on steps and task ends (``listeners``: step log, export, evaluation rows, the
closing lines), the lr schedule, the bad-step rule and the step guard."""
