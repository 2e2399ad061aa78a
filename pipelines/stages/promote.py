"""Promote: move ``<model>@champion`` to the candidate only if it beats the current champion.

The candidate wins when the fine-tuned version's eval perplexity is below the champion's and its
INT8 quantization raised perplexity by at most ``promote.max_quantization_increase`` (relative). The
move is a compare-and-set on the champion seen at evaluation, so a concurrent move is not
overwritten. Writes ``reports/promote.json`` (promoted or not, and why).

    python -m stages.promote [--params params.yaml]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .common import load_params, parser, pipeline_path
from .services import call, read_json, report


def decide(evaluation: dict[str, Any], quantized: dict[str, Any], max_increase: float) -> tuple[bool, str]:
    candidate = float(evaluation["candidate"]["perplexity"])
    increase = quantized["perplexity_after"] / quantized["perplexity_before"] - 1.0
    if increase > max_increase:
        return False, f"INT8 raised perplexity by {increase:.2%} (limit {max_increase:.2%})"
    if "champion" not in evaluation:
        return True, "no champion yet"
    champion = float(evaluation["champion"]["perplexity"])
    if candidate < champion:
        return True, f"eval perplexity {candidate:.3f} < champion's {champion:.3f}"
    return False, f"eval perplexity {candidate:.3f} >= champion's {champion:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    from llmops.common.clients import RegistryClient
    from llmops.proto.registry.v1 import registry_service_pb2 as rpb

    args = parser(__doc__).parse_args(argv)
    params: dict[str, Any] = load_params(args.params)["promote"]
    evaluation = read_json(pipeline_path("reports/eval.json"))
    quantized = read_json(pipeline_path("reports/quantize.json"))
    name, version = quantized["version"]["name"], int(quantized["version"]["version"])
    promoted, reason = decide(evaluation, quantized, float(params["max_quantization_increase"]))
    previous = evaluation.get("champion", {}).get("model", "")
    if promoted:
        request = rpb.SetAliasRequest(model_name=name, alias="champion", version=version, reason=reason)
        request.expected_current_version = int(previous.rsplit(":", 1)[1]) if previous else 0
        call(RegistryClient, "registry", lambda client: client.unary(client.stub.SetAlias, request))
    report("promote", {"promoted": promoted, "reason": reason, "champion_before": previous,
                       "champion_after": f"{name}:{version}" if promoted else previous})  # fmt: skip
    print(f"promote: {'promoted' if promoted else 'kept the champion'} ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
