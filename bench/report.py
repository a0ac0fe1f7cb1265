"""Goals, verdicts and the printed tables of a benchmark run."""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.computations import CLIENT_WAIT_S
from bench.measure import DIRECT, MB, MQ

ROUND_GOAL = 1.5  # flaap-mq round over the most silos, as a multiple of one silo
TINY_GOAL = 1.5  # flaap-mq tiny invocation, as a multiple of TFF direct
MODEL_GOAL = 0.5  # flaap-mq model throughput, as a fraction of TFF direct


@dataclasses.dataclass(frozen=True)
class Verdict:
    row: str
    measured: str
    goal: str
    met: bool

    @property
    def word(self) -> str:
        return "goal met" if self.met else "goal missed"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "verdict": self.word}


def round_verdict(rounds: list[dict]) -> Verdict:
    base, top = rounds[0], rounds[-1]
    ratio = top[MQ]["median"] / base[MQ]["median"]
    return Verdict(
        row=f"1. round, {top['silos']} silos vs {base['silos']}",
        measured=f"{ratio:.2f}x (flaap-mq {top[MQ]['median']:.2f} s vs {base[MQ]['median']:.2f} s)",
        goal=f"<= {ROUND_GOAL}x",
        met=ratio <= ROUND_GOAL,
    )


def tiny_verdict(tiny: dict) -> Verdict:
    mq, direct = tiny[MQ]["median"], tiny[DIRECT]["median"]
    ratio = mq / direct
    return Verdict(
        row="2. tiny invocation vs TFF direct",
        measured=f"{ratio:.2f}x ({mq * 1000:.1f} ms vs {direct * 1000:.1f} ms)",
        goal=f"<= {TINY_GOAL}x",
        met=ratio <= TINY_GOAL,
    )


def model_verdict(model: dict) -> Verdict:
    mq, direct = model[MQ]["round_trip_mb_per_s"], model[DIRECT]["round_trip_mb_per_s"]
    ratio = mq / direct
    return Verdict(
        row=f"3. {model['model_bytes'] / 2**20:.0f} MiB model throughput vs TFF direct",
        measured=f"{ratio:.0%} ({mq:.1f} MB/s vs {direct:.1f} MB/s)",
        goal=f">= {MODEL_GOAL:.0%}",
        met=ratio >= MODEL_GOAL,
    )


def client_wait_check(rounds: list[dict]) -> str:
    """TFF's direct path runs silos one after another: >= 1 s per silo shows each client waits."""
    per_silo = min(r[DIRECT]["min"] / r["silos"] for r in rounds)
    verdict = "every client waits" if per_silo >= 0.95 * CLIENT_WAIT_S else "CLIENTS DO NOT WAIT"
    return (
        f"client wait check: TFF direct (silos in sequence) took >= {per_silo:.2f} s per silo: "
        f"{verdict} ~{CLIENT_WAIT_S:g} s"
    )


def format_rounds(rounds: list[dict], repeats: int) -> str:
    base = rounds[0]
    lines = [
        "Row 1: round time, 1 client per silo, each client waits 1 s "
        f"(seconds, median of {repeats})",
        f"  {'silos':>5}  {'flaap-mq':>9}  {'x base':>7}  {'TFF direct':>10}  {'x base':>7}"
        f"  {'requests mq | direct':>20}  {'CPU s mq | direct':>17}",
    ]
    for r in rounds:
        mq, direct = r[MQ], r[DIRECT]
        lines.append(
            f"  {r['silos']:>5}  {mq['median']:>9.2f}  {mq['median'] / base[MQ]['median']:>6.2f}x"
            f"  {direct['median']:>10.2f}  {direct['median'] / base[DIRECT]['median']:>6.2f}x"
            f"  {mq['requests']:>9.1f} | {direct['requests']:<8.1f}"
            f"  {sum(mq['cpu_s'].values()):>8.2f} | {sum(direct['cpu_s'].values()):<6.2f}"
        )
    return "\n".join(lines)


def _pair(label: str, mq: float, direct: float, fmt: str, ratio: bool = True) -> str:
    tail = f"  {mq / direct:>6.2f}x" if ratio and direct else ""
    return f"  {label:<34}{mq:>10{fmt}}  {direct:>10{fmt}}{tail}"


def _header(title: str) -> list[str]:
    return [title, f"  {'':<34}{'flaap-mq':>10}  {'TFF direct':>10}  {'ratio':>7}"]


def _cpu_lines(title: str, mq: dict[str, float], direct: dict[str, float], scale: float) -> list:
    """CPU per sample by process group, and the total, in `scale` units of seconds."""
    lines = [f"  {title}"]
    for group in mq:
        lines.append(_pair(f"  {group}", mq[group] * scale, direct[group] * scale, ".2f", False))
    lines.append(_pair("  total", sum(mq.values()) * scale, sum(direct.values()) * scale, ".2f"))
    return lines


def format_tiny(tiny: dict, calls: int) -> str:
    mq, direct = tiny[MQ], tiny[DIRECT]
    single_mq, single_direct = mq["single_request"], direct["single_request"]
    return "\n".join(
        [
            *_header(
                "Row 2: tiny computation, federated_mean of one float on 1 silo "
                f"(median of {calls})"
            ),
            _pair("per invocation (ms)", mq["median"] * 1000, direct["median"] * 1000, ".1f"),
            _pair("requests per invocation", mq["requests"], direct["requests"], ".1f", False),
            _pair(
                "per request (ms, invocation / n)",
                mq["per_request_s"] * 1000,
                direct["per_request_s"] * 1000,
                ".2f",
            ),
            _pair(
                f"one float to the silo and back (ms, n={len(single_mq['samples'])})",
                single_mq["median"] * 1000,
                single_direct["median"] * 1000,
                ".2f",
            ),
            *_cpu_lines("CPU ms per invocation, by process", mq["cpu_s"], direct["cpu_s"], 1000),
            *_cpu_lines(
                "CPU ms per float round trip",
                single_mq["cpu_s"],
                single_direct["cpu_s"],
                1000,
            ),
        ]
    )


def format_model(model: dict, repeats: int, *, in_computation: bool = False) -> str:
    mq, direct = model[MQ], model[DIRECT]
    size = model["model_bytes"]
    how = (
        "in a TFF computation (federated_map of an identity, 1 client; not the goal row)"
        if in_computation
        else "CreateValue and Compute"
    )
    return "\n".join(
        [
            *_header(
                f"Row 3: {size / 2**20:.0f} MiB float32 model to 1 silo and back, {how} "
                f"(median of {repeats})"
            ),
            _pair("per round trip (s)", mq["median"], direct["median"], ".2f"),
            _pair(
                f"MB/s (2 x {size / MB:.1f} MB / t)",
                mq["round_trip_mb_per_s"],
                direct["round_trip_mb_per_s"],
                ".1f",
            ),
            _pair(
                "wire MB per round trip",
                (mq["bytes_out"] + mq["bytes_in"]) / MB,
                (direct["bytes_out"] + direct["bytes_in"]) / MB,
                ".1f",
                False,
            ),
            _pair("wire MB/s", mq["wire_mb_per_s"], direct["wire_mb_per_s"], ".1f"),
            *_cpu_lines("CPU s per round trip, by process", mq["cpu_s"], direct["cpu_s"], 1),
        ]
    )


def format_verdicts(verdicts: list[Verdict]) -> str:
    width = max(len(v.row) for v in verdicts)
    lines = ["Goals"]
    for v in verdicts:
        lines.append(f"  {v.row:<{width}}  {v.measured:<44}  goal {v.goal:<7}  {v.word}")
    return "\n".join(lines)
