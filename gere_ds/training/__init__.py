"""Training: the continual loop and what it is built from.

``trainer`` (ContinualTrainer: the loop's order of events); ``assembly`` (the parts a launch
builds: RunParts), ``inputs`` (every input read and checked before the model loads), ``run_state``
(what a checkpoint records of the run and how it is loaded back), ``listeners`` (step log, export,
evaluation rows, the closing lines on steps, task ends and the run's end); one micro-step:
``step`` (TrainStep), ``batches`` (sampler rows to a MicroBatch), ``losses`` (per-row terms and
their reductions), ``batch_split`` (``train.micro_batch_size: auto``); ``progress`` (where a run
stands, the bad-step rule) and ``schedule`` (the lr schedule)."""
