"""Promote: move ``<model>@champion`` to the best variant of the candidate, if one beats the champion.

The variants are the full-precision fine-tune and its quantized children (``reports/eval.json``: each
one's completion perplexity on the same eval rows as the champion's; ``reports/speed.json``: each
one's decode tokens/s on the engine that would serve it). A variant qualifies when:

* its numbers are finite (a NaN or infinite perplexity or speed is refused, never compared);
* its eval perplexity is below the champion's by at least ``promote.min_improvement`` (relative;
  0: any improvement; a tie keeps the champion);
* for a quantized variant: quantization raised eval perplexity over its parent by at most
  ``promote.max_quantization_increase`` (relative), and it decodes faster than its parent on their
  serving engines. Quantization exists to make serving cheaper; a slower child never wins.

Of the qualified variants the fastest decoder wins (ties: the lower perplexity). That is the
evaluation gate. Then the load gate (:mod:`stages.gates`, ``promote.load_gate``): Locust on the
chosen variant alone, judged on error ratio, TTFT p95 and tokens/s; a breach stops the promotion.
Then the move: with ``promote.rollout.enabled`` a rollout is started (the registry's
RolloutService; its controller steps the traffic and moves ``champion`` only if every step meets its
SLOs), otherwise a compare-and-set on the champion seen at evaluation, so a concurrent move is not
overwritten. Each gate's verdict and numbers go into the report, the candidate's MLflow run and
the registry's alias history. Writes ``reports/promote.json``: promoted or not, the version and the
engine that serves the champion, why, each variant's verdict and each gate's.

    python -m stages.promote [--params params.yaml]
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .common import load_params, parser, pipeline_path
from .gates import GateVerdict, load_gate, record_in_mlflow
from .services import call, read_json, ref, report, settings


@dataclasses.dataclass(frozen=True)
class Decision:
    promoted: bool
    #: The chosen variant (``name:version``); empty when the champion stays.
    version: str
    #: The engine that serves the chosen variant; empty when the champion stays.
    engine: str
    reason: str
    #: Each variant's verdict: why it was chosen, qualified, or not.
    verdicts: dict[str, str] = dataclasses.field(default_factory=dict)


def _finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, NaN or infinite)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _shown(value: Any) -> str:
    return "missing" if value is None else str(value)


def decide(
    evaluation: Mapping[str, Any],
    speed: Mapping[str, Any],
    *,
    max_quantization_increase: float,
    min_improvement: float = 0.0,
) -> Decision:
    """Which variant (if any) becomes the champion, and why.

    Args:
        evaluation: ``reports/eval.json``: ``variants`` (each with ``model``, ``perplexity`` and
            ``quantized_from``: the variant it was quantized from, empty for the full-precision one)
            and, when there is one, ``champion`` (``model``, ``perplexity``).
        speed: ``reports/speed.json``: ``variants``, by model: ``engine`` and
            ``decode_tokens_per_second``.
        max_quantization_increase: Largest relative eval-perplexity increase of a quantized variant
            over its parent.
        min_improvement: Smallest relative eval-perplexity improvement over the champion.
    """
    champion = evaluation.get("champion")
    champion_perplexity: float | None = None
    if champion is not None:
        champion_perplexity = _finite(champion.get("perplexity"))
        if champion_perplexity is None:
            return Decision(
                False, "", "",
                f"the champion {champion.get('model')}'s eval perplexity is {_shown(champion.get('perplexity'))}: "
                "not a finite number, so nothing can be compared with it",
            )  # fmt: skip
    variants = {str(v["model"]): v for v in evaluation.get("variants", [])}
    speeds: Mapping[str, Any] = speed.get("variants", {})
    if not variants:
        return Decision(False, "", "", "no candidate variant was evaluated")

    def measured(model: str) -> tuple[float | None, float | None, str]:
        rate = speeds.get(model, {})
        return (
            _finite(variants[model].get("perplexity")),
            _finite(rate.get("decode_tokens_per_second")),
            str(rate.get("engine", "?")),
        )

    verdicts: dict[str, str] = {}
    qualified: list[tuple[str, float, float, str]] = []  # model, perplexity, tokens/s, engine
    for model, variant in variants.items():
        perplexity, rate, engine = measured(model)
        if perplexity is None:
            verdicts[model] = f"eval perplexity is {_shown(variant.get('perplexity'))}: refused (not finite)"
            continue
        if rate is None or rate <= 0:
            shown = speeds.get(model, {}).get("decode_tokens_per_second")
            verdicts[model] = f"decode tokens/s on {engine} is {_shown(shown)}: refused (not a finite speed)"
            continue
        parts = [f"eval perplexity {perplexity:.3f}"]
        if champion is not None:
            assert champion_perplexity is not None
            bar = champion_perplexity * (1.0 - min_improvement)
            if not perplexity < bar:
                needed = f" by {min_improvement:.1%}" if min_improvement else ""
                verdicts[model] = (
                    f"eval perplexity {perplexity:.3f} does not beat the champion {champion['model']}'s "
                    f"{champion_perplexity:.3f}{needed}"
                )
                continue
            parts[0] += f" < champion {champion['model']}'s {champion_perplexity:.3f}"
        parent = str(variant.get("quantized_from") or "")
        if parent:
            if parent not in variants:
                verdicts[model] = f"its parent {parent} was not evaluated"
                continue
            parent_perplexity, parent_rate, parent_engine = measured(parent)
            if parent_perplexity is None or parent_rate is None or parent_rate <= 0:
                verdicts[model] = f"its parent {parent}'s numbers are not finite: nothing to weigh it against"
                continue
            increase = perplexity / parent_perplexity - 1.0
            if increase > max_quantization_increase:
                verdicts[model] = (
                    f"quantization raised eval perplexity by {increase:.2%} over {parent} "
                    f"(limit {max_quantization_increase:.2%})"
                )
                continue
            ratio = rate / parent_rate
            if rate <= parent_rate:
                verdicts[model] = (
                    f"decodes at {ratio:.2f}x its parent's speed ({rate:.1f} tok/s on {engine} vs "
                    f"{parent_rate:.1f} for {parent} on {parent_engine}): a quantized variant must serve faster"
                )
                continue
            parts.append(f"{increase:+.2%} perplexity over {parent} (limit {max_quantization_increase:.2%})")
            parts.append(
                f"decodes {rate:.1f} tok/s on {engine}, {ratio:.2f}x {parent}'s {parent_rate:.1f} on {parent_engine}"
            )
        else:
            parts.append(f"decodes {rate:.1f} tok/s on {engine}")
        verdicts[model] = "qualifies: " + ", ".join(parts)
        qualified.append((model, perplexity, rate, engine))

    if not qualified:
        why = "; ".join(f"{model}: {verdict}" for model, verdict in verdicts.items())
        return Decision(False, "", "", f"no variant qualifies ({why})", verdicts)
    model, _, _, engine = max(qualified, key=lambda q: (q[2], -q[1]))
    chosen = verdicts[model].removeprefix("qualifies: ")
    verdicts[model] = "chosen: " + chosen
    others = [f"{other}: {verdict}" for other, verdict in verdicts.items() if other != model]
    reason = f"{model} on {engine}: {chosen}" + ("" if champion is not None else " (no champion yet)")
    if others:
        reason += "; not chosen: " + "; ".join(others)
    return Decision(True, model, engine, reason, verdicts)


def _move_champion(name: str, version: int, previous: str, reason: str) -> None:
    """``champion`` -> ``name:version``, compare-and-set on the champion seen at evaluation."""
    from llmops.common.clients import RegistryClient
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb

    request = rpb.SetAliasRequest(
        model_name=name,
        alias="champion",
        version=version,
        reason=reason.encode()[:1024].decode(errors="ignore"),
    )
    request.expected_current_version = int(previous.rsplit(":", 1)[1]) if previous else 0
    call(RegistryClient, "registry", lambda client: client.unary(client.stub.SetAlias, request))


def _start_rollout(name: str, version: int, params: Mapping[str, Any], reason: str) -> GateVerdict:
    """A rollout of ``name:version`` from the champion, handed to the rollout controller."""
    from llmops.common.errors import LLMOpsError
    from llmops.common.rollout_client import RolloutClient
    from llmops.common.rollouts import RolloutSpec, SloBound, Slos

    slos = params.get("slos") or {}

    def bound(key: str) -> SloBound:
        found = slos.get(key) or {}
        return SloBound(float(found.get("max_value", 0)), float(found.get("max_ratio", 0)))

    spec = RolloutSpec(
        model_name=name,
        to_version=version,
        steps=tuple(int(step) for step in params.get("steps", [])),
        step_min_seconds=float(params.get("step_min_seconds", 0)),
        step_min_requests=int(params.get("step_min_requests", 0)),
        slos=Slos(bound("ttft_p95_seconds"), bound("inter_token_p95_seconds"), bound("error_ratio"))
        if slos
        else None,
        reason=reason.encode()[:1024].decode(errors="ignore"),
    )
    try:
        rollout = call(RolloutClient, "registry", lambda client: client.start(spec))
    except LLMOpsError as exc:
        return GateVerdict("rollout", False, f"the rollout of {name}:{version} did not start: {exc.message}")
    steps = ", ".join(f"{step}%" for step in rollout.spec.steps)
    return GateVerdict(
        "rollout",
        True,
        f"rollout {rollout.id} started ({steps}); the controller moves champion",
        {"id": rollout.id},
    )


def _record(model: str, verdicts: list[GateVerdict]) -> list[str]:
    """The verdicts onto the candidate's MLflow run and into the registry's alias history."""
    from llmops.common.clients import RegistryClient
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb

    name, version = model.rsplit(":", 1)
    reason = "gates: " + " | ".join(v.line() for v in verdicts)

    async def work(client: Any) -> str:
        found = await client.unary(
            client.stub.GetVersion, rpb.GetVersionRequest(model=ref(name, version=int(version)))
        )
        await client.unary(
            client.stub.SetAlias,
            rpb.SetAliasRequest(
                model_name=name, alias="challenger", version=int(version),
                reason=reason.encode()[:1024].decode(errors="ignore"),
            ),
        )  # fmt: skip
        return str(found.version.lineage.mlflow_run_id)

    run_id = call(RegistryClient, "registry", work)
    tracking_uri = settings().mlflow_locations()[0]
    return [f"registry: the verdicts are the reason of {name}@challenger -> {version} (alias history)",
            record_in_mlflow(tracking_uri, run_id, verdicts)]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    params: dict[str, Any] = load_params(args.params)["promote"]
    evaluation = read_json(pipeline_path("reports/eval.json"))
    speed = read_json(pipeline_path("reports/speed.json"))
    decision = decide(
        evaluation,
        speed,
        max_quantization_increase=float(params["max_quantization_increase"]),
        min_improvement=float(params.get("min_improvement", 0.0)),
    )
    champion = evaluation.get("champion") or {}
    previous = str(champion.get("model", ""))
    promoted, reason = decision.promoted, decision.reason
    gates = [GateVerdict("evaluation", decision.promoted, decision.reason)]
    notes: list[str] = []
    load_params_ = params.get("load_gate") or {}
    if promoted and load_params_.get("enabled", True):
        engine = str(load_params_.get("engine") or decision.engine)
        options = (speed.get("engine_options") or {}).get(engine, {})
        print(f"promote: load gate: Locust on {decision.version} alone ({engine})", flush=True)
        gates.append(load_gate(settings().serving.address, decision.version, engine, options, load_params_))
        if not gates[-1].passed:
            promoted, reason = False, f"stopped at the load gate: {gates[-1].reason}"
    rollout_params = params.get("rollout") or {}
    started_rollout = False
    if promoted:
        name, version = decision.version.rsplit(":", 1)
        lines = " | ".join(g.line() for g in gates)
        if rollout_params.get("enabled", False):
            gates.append(_start_rollout(name, int(version), rollout_params, lines))
            started_rollout = gates[-1].passed
            if not started_rollout:
                promoted, reason = False, f"stopped at the rollout: {gates[-1].reason}"
        else:
            _move_champion(name, int(version), previous, lines)
            gates.append(
                GateVerdict("rollout", True, "not asked for (promote.rollout.enabled): champion moved")
            )
    if decision.promoted:  # a candidate got past evaluation: its run and alias history hold every verdict
        notes = _record(decision.version, gates)
    moved = promoted and not started_rollout
    report(
        "promote",
        {
            "promoted": moved,
            "reason": reason,
            "verdicts": decision.verdicts,
            "gates": [dataclasses.asdict(g) for g in gates],
            "rollout": gates[-1].numbers.get("id") if started_rollout else None,
            "recorded": notes,
            "champion_before": previous,
            "champion_after": decision.version if moved else previous,
            # how the champion is served: the chosen variant's engine, or the kept champion's
            "engine": decision.engine if moved else str(champion.get("engine", "")),
            "engine_options": speed.get("engine_options", {}),
        },
    )
    for gate in gates:
        print(f"promote: {gate.line()}")
    if started_rollout:
        print(f"promote: {decision.version} is rolling out; `llmops rollout status` follows it")
    else:
        print(f"promote: {'promoted ' + decision.version if moved else 'kept the champion'}")
    print(f"promote: why: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
