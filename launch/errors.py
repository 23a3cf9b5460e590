"""The driver's user-facing errors (no heavy imports: the command line catches them)."""


class RunStopped(RuntimeError):
    """The run cannot go on (a learner rank lost, an engine that does not come back, non-finite updates
    in a row); the message says what happened and how to continue."""


class PlanError(ValueError):
    """`calibrl plan`: the cluster cannot hold the run (or is not described); the message says why."""
