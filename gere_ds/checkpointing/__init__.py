"""A run's checkpoints and its folder: saving with per-rank completion markers, the order of
checkpoints and rollback forks, which checkpoint a relaunch resumes from, and the lock that
keeps one job per output_dir."""
