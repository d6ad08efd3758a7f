"""The 30-second soak inside ``make test`` (``make soak`` runs ten minutes): steady traffic through a real Envoy
and sidecar with the fast path on, streaming and not, config reloads every 3 s; no error, every completion
recorded exactly once, no growth of the sidecar's memory or descriptors, no state left, no ring drop."""

from __future__ import annotations

import pytest

from tests.support.soak import run

pytestmark = pytest.mark.envoy


def test_soak_30s_has_no_errors_no_losses_no_leaks() -> None:
    fig = run(seconds=30, rate=60, clients=4, reload_every=3)
    assert fig.ok > 30 * 60 * 0.5, fig  # the rate was kept, more or less (a shared 2-core machine)
    assert fig.reloads >= 8
    assert fig.records_by_source.get("ring", 0) >= fig.ok - 10  # the fast path carried the completions
    assert fig.budget_expected >= fig.ok  # every answer had tokens, checked by Envoy and charged to its user
    assert fig.problems() == [], fig
