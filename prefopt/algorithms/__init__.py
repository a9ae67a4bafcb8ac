"""Controllers, one file per algorithm, each a recipe on a Session (session.py) built from the
stages in stages.py; which controller and roles an algorithm has: prefopt.algorithm_spec."""

from __future__ import annotations


def train(cfg, console, *, resume: bool | None = None):
    """Run the controller of the algorithm `algorithm.name` belongs to."""
    from prefopt.algorithm_spec import spec_for

    return spec_for(cfg).train(cfg, console, resume=resume)
