"""Expert host service: holds routed experts within a memory budget and answers expert calls."""
