"""Text alignment at matched fidelity, on hand-made curves with known answers."""
import pytest

from research.toyworld.tradeoff import at_fidelity, matched, mean_curve, upper_envelope

POINTS = [(0.1, 0.9), (0.2, 0.95), (0.5, 0.5), (0.4, 0.4), (0.8, 0.1), (0.8, 0.2), (0.3, 0.95)]


def test_upper_envelope_is_the_pareto_front_by_ascending_fidelity():
    # (0.1, .9) and (0.2, .95) are beaten by (0.3, .95); (0.4, .4) by (0.5, .5); (0.8, .1) by (0.8, .2)
    assert upper_envelope(POINTS) == [(0.3, 0.95), (0.5, 0.5), (0.8, 0.2)]
    assert upper_envelope([]) == []
    assert upper_envelope([(0.5, 0.5)]) == [(0.5, 0.5)]


@pytest.mark.parametrize("level, expected", [
    (0.0, 0.95), (0.3, 0.95),                 # at or below the front's lowest fidelity: its best alignment
    (0.4, 0.725),                             # halfway from (0.3, .95) to (0.5, .5)
    (0.5, 0.5), (0.65, 0.35), (0.8, 0.2),     # on and between the next points
    (0.81, None), (1.0, None)])               # beyond the highest fidelity reached: not reached
def test_text_alignment_at_a_fidelity_level(level, expected):
    got = at_fidelity(upper_envelope(POINTS), level)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_matched_table_counts_runs_that_reach_each_level():
    a = [(0.2, 1.0), (0.6, 0.6)]
    b = [(0.2, 0.8), (0.4, 0.4)]
    table = matched({"m": [upper_envelope(a), upper_envelope(b)]}, [0.2, 0.4, 0.6])
    rows = table["m"]
    assert [r["n"] for r in rows] == [2, 2, 1] and all(r["of"] == 2 for r in rows)
    assert rows[0]["mean"] == pytest.approx(0.9) and rows[0]["sd"] == pytest.approx(0.1414213562)
    assert rows[1]["mean"] == pytest.approx((0.8 + 0.4) / 2)        # a at 0.4: 1.0 + (0.6 - 1.0) * 0.5 = 0.8
    assert rows[2]["mean"] == pytest.approx(0.6) and rows[2]["sd"] == 0.0
    assert matched({"none": [[]]}, [0.1])["none"][0]["mean"] is None


def test_mean_curve_stops_where_one_run_stops():
    envs = [upper_envelope([(0.2, 1.0), (0.6, 0.6)]), upper_envelope([(0.4, 0.4)])]
    assert mean_curve(envs, [0.2, 0.4, 0.5]) == [(0.2, pytest.approx(0.7)), (0.4, pytest.approx(0.6))]
