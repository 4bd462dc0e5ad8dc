"""A viewer's side of a run folder: the tail source, the snapshot of the journal, and its prefetch."""
