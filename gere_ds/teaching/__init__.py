"""The replay term's teacher: the base model's data on the replay set (the pass, its per-rank
cache, the identity under which it is reused) and the source a run reads it from."""
