"""Pure domain of subledger: canonical facts, the lifecycle fold, Segment rendering.

Nothing in this package reads a clock, a database or the network; `now` is always an argument.
"""
