"""The test seed: fixed by default, replayable, fresh on request."""

import pytest
from helpers import DEFAULT_SEED, SEED, session_seed


def test_default_seed_is_fixed():
    assert session_seed(None) == session_seed("") == DEFAULT_SEED == 20261128


def test_integer_replays_and_random_draws():
    assert session_seed("12345") == 12345
    draws = {session_seed("random") for _ in range(4)}
    assert len(draws) > 1 and all(0 <= d < 2**32 for d in draws)


def test_bad_value_is_refused():
    with pytest.raises(pytest.UsageError, match="MAMBA_CACHE_SEED must be an integer or 'random', got 'abc'"):
        session_seed("abc")


def test_rng_fixture_uses_the_session_seed(rng):
    import numpy as np

    assert rng.integers(2**62) == np.random.default_rng(SEED).integers(2**62)
