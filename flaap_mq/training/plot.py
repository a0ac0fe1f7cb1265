"""`OUT/accuracy.png`: test and train accuracy per round, and who took part.

Drawn with matplotlib's Agg backend (no display needed), imported only when a
plot is drawn: the rest of `flaap-mq train` does not pay for it.
"""

from __future__ import annotations

from pathlib import Path

from flaap_mq.training.records import TARGET_ACCURACY, TrainingResult


def _count(field: str) -> int:
    return len(field.split(";")) if field else 0


def plot_accuracy(result: TrainingResult, path: Path, *, title: str | None = None) -> Path:
    """Test and train accuracy per round, with the 0.90 target.

    When a round ran without some silo (`--min-silos`), a second panel below
    shows, per round, how many silos took part and how many were dropped.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r.round for r in result.records]
    trained_rounds = [r for r in result.records if r.round > 0]
    show_participation = any(r.dropped for r in trained_rounds)
    if show_participation:
        figure, (axis, lower) = plt.subplots(
            2, 1, figsize=(7, 5.6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
    else:
        figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        axis.plot(rounds, [r.test_accuracy for r in result.records], "o-", label="test (held out)")
        trained = [r for r in result.records if r.train_accuracy is not None]
        axis.plot(
            [r.round for r in trained],
            [r.train_accuracy for r in trained],
            "s--",
            alpha=0.7,
            label="train (silos, during the round)",
        )
        axis.axhline(TARGET_ACCURACY, color="grey", linestyle=":", label=f"{TARGET_ACCURACY:.2f}")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.0)
        axis.set_xlim(0, max(rounds) if rounds else 1)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
        axis.set_title(
            title
            or f"FedAvg on silo-resident digits: {result.final_accuracy:.3f} after "
            f"{rounds[-1]} rounds"
        )
        bottom = axis
        if show_participation:
            took = [_count(r.silos) for r in trained_rounds]
            lost = [_count(r.dropped) for r in trained_rounds]
            x = [r.round for r in trained_rounds]
            lower.bar(x, took, color="tab:green", label="took part")
            lower.bar(x, lost, bottom=took, color="tab:red", label="dropped")
            lower.set_ylabel("silos")
            lower.yaxis.set_major_locator(MaxNLocator(integer=True))
            lower.legend(loc="lower right", fontsize="small")
            lower.grid(alpha=0.3, axis="y")
            bottom = lower
        bottom.set_xlabel("round")
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
