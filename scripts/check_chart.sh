#!/usr/bin/env bash
# Checks the Helm chart, the Prometheus rules and the Dockerfiles with the real tools:
#   1. helm lint --strict on the defaults and on every charts/llmops/ci/*.yaml
#   2. helm template ... | kubernetes-validate --strict against Kubernetes 1.29 and 1.32; custom
#      resources (ServiceMonitor, PrometheusRule, RayCluster, RayService, ScaledObject) have no
#      bundled schema and are checked structurally by tests/charts instead. Any other kind without
#      a schema (say a misspelt apiVersion) fails.
#   3. promtool check rules and promtool test rules on infra/prometheus/
#   4. hadolint on docker/Dockerfile and docker/Dockerfile.gpu
# The rendered-object invariants (HPA target, GPU scheduling, probes, security, dashboards, PromQL,
# metric names) are pytest tests: tests/charts/.
# Tools: tools/bin/{helm,hadolint} (scripts/install_tools.sh), promtool (Debian's prometheus
# package), kubernetes-validate ($KUBERNETES_VALIDATE, else .venv/bin/, else PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CHART=charts/llmops
HELM="${HELM:-$ROOT/tools/bin/helm}"
HADOLINT="${HADOLINT:-$ROOT/tools/bin/hadolint}"
PROMTOOL="${PROMTOOL:-promtool}"
if [ -z "${KUBERNETES_VALIDATE:-}" ]; then
  if [ -x "$ROOT/.venv/bin/kubernetes-validate" ]; then
    KUBERNETES_VALIDATE="$ROOT/.venv/bin/kubernetes-validate"
  else
    KUBERNETES_VALIDATE=kubernetes-validate
  fi
fi
KUBE_VERSIONS=(1.29.0 1.32.0)
API_VERSIONS=(--api-versions monitoring.coreos.com/v1 --api-versions ray.io/v1 --api-versions keda.sh/v1alpha1)
CRD_KINDS='ServiceMonitor|PrometheusRule|RayCluster|RayService|ScaledObject'

for tool in "$HELM" "$HADOLINT" "$PROMTOOL" "$KUBERNETES_VALIDATE"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "check_chart: $tool not found (run scripts/install_tools.sh and scripts/install_sysdeps.sh)" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

values_sets=("")
for f in "$CHART"/ci/*.yaml; do values_sets+=("$f"); done

echo "== helm lint --strict"
for values in "${values_sets[@]}"; do
  args=()
  [ -n "$values" ] && args=(-f "$values")
  for kube in "${KUBE_VERSIONS[@]}"; do
    if ! "$HELM" lint --strict --quiet --kube-version "$kube" "$CHART" "${args[@]}" >"$work/lint.txt" 2>&1; then
      cat "$work/lint.txt" >&2
      echo "check_chart: helm lint failed for ${values:-defaults} on Kubernetes $kube" >&2
      exit 1
    fi
  done
  echo "ok  ${values:-defaults}"
done

echo "== helm template | kubernetes-validate --strict (${KUBE_VERSIONS[*]})"
rendered=()
for kube in "${KUBE_VERSIONS[@]}"; do
  for values in "${values_sets[@]}"; do
    args=()
    [ -n "$values" ] && args=(-f "$values")
    name="$(basename "${values:-defaults.yaml}" .yaml)"
    out="$work/$kube-$name.yaml"
    "$HELM" template llmops "$CHART" --namespace llmops --kube-version "$kube" "${API_VERSIONS[@]}" "${args[@]}" >"$out"
    rendered+=("$out")
  done
done
report="$work/validate.txt"
status=0
for kube in "${KUBE_VERSIONS[@]}"; do
  "$KUBERNETES_VALIDATE" --strict --quiet -k "$kube" "$work/$kube"-*.yaml >>"$report" 2>&1 || status=1
done
if grep -v -E "^WARN .*Couldn't find schema for kind ($CRD_KINDS) with api version" "$report" | grep -q .; then
  grep -v -E "^WARN .*Couldn't find schema for kind ($CRD_KINDS) with api version" "$report" >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "check_chart: kubernetes-validate failed" >&2
  exit 1
fi
echo "ok  ${#rendered[@]} renders (custom resources left to tests/charts)"

echo "== promtool"
"$PROMTOOL" check rules infra/prometheus/rules.yaml
"$PROMTOOL" test rules infra/prometheus/rules_test.yaml

echo "== hadolint"
"$HADOLINT" --config docker/hadolint.yaml docker/Dockerfile docker/Dockerfile.gpu
echo "ok  docker/Dockerfile docker/Dockerfile.gpu"

echo "chart checks passed"
