"""What a person watches during a run: train.log, the per-step JSONL, TensorBoard, W&B and the
progress bar (rank 0 only)."""
