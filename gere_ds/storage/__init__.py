"""Files on disk, written and identified one way: atomic writes, whole-file hashing, digests of
big files kept between launches, and temporary names that carry their owner."""
