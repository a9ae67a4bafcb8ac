"""The series `prefopt compare` puts a run in says what the method is."""

from types import SimpleNamespace

import pytest

from prefopt.tracking.compare import method_of


def run(tags: dict, params: dict | None = None):
    return SimpleNamespace(data=SimpleNamespace(tags=tags, params=params or {}))


@pytest.mark.parametrize(("tags", "params", "method"), [
    ({"algorithm": "offline", "loss": "simpo"}, {}, "simpo"),
    ({"algorithm": "ppo"}, {"reward.source": "model"}, "ppo-rm"),
    ({"algorithm": "ppo"}, {"ppo.advantage": "rloo"}, "ppo-gt-rloo"),
    ({"algorithm": "rest", "loss": "sft"}, {}, "rest"),
    ({"algorithm": "rest", "loss": "dpo"}, {}, "rest-dpo"),
    ({"algorithm": "iterative_dpo", "loss": "dpo"}, {}, "iterative_dpo"),
    ({"algorithm": "iterative_dpo", "loss": "ipo"}, {}, "iterative_dpo-ipo"),
])
def test_each_method_is_named_by_what_it_trains(tags, params, method):
    assert method_of(run(tags, params)) == method
