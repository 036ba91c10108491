"""The side-by-side benchmark's summary: ratios paired by round, the error over pairs."""

from benchmarks.served_ab import ratio_summary, round_ratios


def runs_of(speeds: dict[int, list[tuple[float, float]]]) -> list[dict]:
    """Runs of vanilla and amphista per pair, round by round, (vanilla, amphista) tokens/s."""
    return [{"method": method, "pair": pair, "round": round_, "tokens_per_s": speed}
            for pair, rounds in speeds.items() for round_, both in enumerate(rounds)
            for method, speed in zip(("vanilla", "amphista"), both, strict=True)]


def test_ratios_pair_the_runs_of_each_round():
    runs = runs_of({0: [(100.0, 110.0), (200.0, 180.0)]})
    assert round_ratios(runs, ["vanilla", "amphista"]) == [1.1, 0.9]


def test_error_is_over_the_pairs_means_when_there_are_several():
    # Rounds within a pair agree closely, the pairs do not: the error over rounds would
    # be ~3x smaller than the pairs' spread allows.
    runs = runs_of({0: [(100.0, 90.0), (100.0, 91.0)], 1: [(100.0, 110.0), (100.0, 111.0)]})
    summary = ratio_summary(runs, ["vanilla", "amphista"])
    assert "pair by pair: 0.905 1.105" in summary
    assert summary.endswith("mean 1.005, standard error 0.100 (over pairs)")


def test_one_pair_takes_the_error_over_its_rounds():
    summary = ratio_summary(runs_of({0: [(100.0, 90.0), (100.0, 110.0)]}),
                            ["vanilla", "amphista"])
    assert "pair by pair" not in summary
    assert summary.endswith("mean 1.000, standard error 0.100 (over rounds)")
