"""The delta channel: engine core -> router replica token deltas, one frame per engine step per router."""
