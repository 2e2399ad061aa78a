#!/usr/bin/env bash
# Source this file: installs podman, runc and debootstrap from apt when missing, then points podman at
# the project's containers.conf (docker/containers.conf) through CONTAINERS_CONF.
#   source docker/podman_env.sh
# Idempotent: with everything installed it only exports the variable.
_llmops_docker_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_llmops_missing=()
command -v podman >/dev/null 2>&1 || _llmops_missing+=(podman)
command -v runc >/dev/null 2>&1 || _llmops_missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || _llmops_missing+=(debootstrap)
if [ ${#_llmops_missing[@]} -gt 0 ]; then
  _llmops_sudo=""
  if [ "$(id -u)" -ne 0 ]; then _llmops_sudo="sudo"; fi
  echo "installing from apt: ${_llmops_missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $_llmops_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $_llmops_sudo apt-get install -y -qq "${_llmops_missing[@]}" >/dev/null
fi
export CONTAINERS_CONF="$_llmops_docker_dir/containers.conf"
unset _llmops_docker_dir _llmops_missing _llmops_sudo
