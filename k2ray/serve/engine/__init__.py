"""The engine pool: the engine replica, its engine core process, and the router's clients of the pool."""
