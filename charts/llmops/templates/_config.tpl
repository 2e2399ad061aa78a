{{/*
Data of the settings ConfigMaps (configmap.yaml), one define each, so that a workload's
checksum/config annotation hashes only the ConfigMaps it reads: a training-only change restarts
training, not every GPU serving pod.
*/}}

{{/* LLMOPS_* settings every service reads. */}}
{{- define "llmops.commonConfigData" -}}
{{- $root := . }}
{{- $common := dict
  "LLMOPS_LOG_LEVEL" .Values.settings.logLevel
  "LLMOPS_LOG_FORMAT" .Values.settings.logFormat
  "LLMOPS_GRACE_SECONDS" (toString .Values.settings.graceSeconds)
  "LLMOPS_MAX_MESSAGE_BYTES" (.Values.settings.maxMessageBytes | int64 | toString)
  "LLMOPS_DATA_DIR" "/var/lib/llmops" }}
{{- range $c := list "registry" "training" "quantization" "cache" }}
{{- if (index $root.Values $c).enabled }}
{{- $_ := set $common (printf "LLMOPS_%s_ADDRESS" (upper $c)) (include "llmops.address" (dict "root" $root "component" $c)) }}
{{- end }}
{{- end }}
{{- if eq (include "llmops.servingDeployments" .) "true" }}
{{- $_ := set $common "LLMOPS_SERVING_ADDRESS" (include "llmops.servingAddress" .) }}
{{- end }}
{{- if and (or .Values.redis.enabled (not .Values.redis.external.existingSecret)) (not (include "llmops.redisPasswordSecret" .)) }}
{{- with (include "llmops.redisUrl" .) }}{{ $_ := set $common "LLMOPS_REDIS_URL" . }}{{ end }}
{{- end }}
{{- with (include "llmops.mlflowTrackingUri" .) }}{{ $_ := set $common "LLMOPS_MLFLOW_TRACKING_URI" . }}{{ end }}
{{- if .Values.auth.existingSecret }}
{{- $_ := set $common "LLMOPS_API_KEYS_FILE" (printf "/etc/llmops/auth/%s" .Values.auth.secretKey) }}
{{- $_ := set $common "LLMOPS_RATE_LIMIT_FAIL_OPEN" (toString .Values.auth.rateLimitFailOpen) }}
{{- end }}
{{- if .Values.tls.existingSecret }}
{{- $_ := set $common "LLMOPS_TLS_CERT_FILE" "/etc/llmops/tls/tls.crt" }}
{{- $_ := set $common "LLMOPS_TLS_KEY_FILE" "/etc/llmops/tls/tls.key" }}
{{- $_ := set $common "LLMOPS_TLS_CA_FILE" "/etc/llmops/tls/ca.crt" }}
{{- if .Values.tls.mutual }}{{ $_ := set $common "LLMOPS_TLS_CLIENT_CA_FILE" "/etc/llmops/tls/ca.crt" }}{{ end }}
{{- end }}
{{- range $name, $value := .Values.settings.extraEnv }}{{ $_ := set $common $name (toString $value) }}{{ end }}
{{- toYaml $common }}
{{- end }}

{{/*
Seconds a serving pod drains in: its termination grace less the preStop pause (endpoints go
first) and 15 s for the process to exit after draining.
*/}}
{{- define "llmops.servingGraceSeconds" -}}
{{- $s := .Values.serving }}
{{- max 1 (sub (sub (int $s.terminationGracePeriodSeconds) (int $s.preStopSeconds)) 15) }}
{{- end }}

{{/*
The claim holding MLflow's artifacts that serving pods mount read-only (mlflow.artifacts.sharedClaim);
empty when there is none (S3 artifacts, the MLflow pod's own volume, or serving as RayServices).
*/}}
{{- define "llmops.artifactsClaim" -}}
{{- $m := .Values.mlflow }}
{{- $shared := $m.artifacts.sharedClaim | default dict }}
{{- if and $m.enabled $shared.enabled (not (hasPrefix "s3://" $m.artifacts.destination)) }}
{{- $shared.existingClaim | default (printf "%s-artifacts" (include "llmops.componentName" (dict "root" . "component" "mlflow"))) }}
{{- end }}
{{- end }}

{{/* Where the MLflow server keeps artifacts on its filesystem (its --artifacts-destination). */}}
{{- define "llmops.mlflowArtifactsPath" -}}
{{- default "/var/lib/mlflow/artifacts" .Values.mlflow.artifacts.destination }}
{{- end }}

{{/* Where serving pods mount the shared artifacts claim (read-only). */}}
{{- define "llmops.sharedWeightsMount" -}}/mnt/mlflow-artifacts{{- end }}

{{/* Where serving pods read weights: serving.weightsSource, else `store` when S3 or the shared claim is set. */}}
{{- define "llmops.weightsSource" -}}
{{- $s3 := and .Values.mlflow.enabled (hasPrefix "s3://" .Values.mlflow.artifacts.destination) }}
{{- $shared := and (include "llmops.artifactsClaim" .) (eq (include "llmops.servingDeployments" .) "true") }}
{{- .Values.serving.weightsSource | default (ternary "store" "registry" (or $s3 (not (empty $shared)))) }}
{{- end }}

{{/* LLMOPS_* settings of one service: (dict "root" $ "component" "training"). */}}
{{- define "llmops.componentConfigData" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $values := index $root.Values $c }}
{{- $data := dict }}
{{- if has $c (list "training" "quantization") }}
{{- with (include "llmops.rayAddress" $root) }}{{ $_ := set $data "LLMOPS_RAY_ADDRESS" . }}{{ end }}
{{- end }}
{{- if eq $c "training" }}
{{- with $values.checkpointStorage }}{{ $_ := set $data "LLMOPS_TRAINING_CHECKPOINT_STORAGE" . }}{{ end }}
{{- $_ := set $data "LLMOPS_TRAINING_MAX_WORKER_FAILURES" (toString $values.maxWorkerFailures) }}
{{- end }}
{{- $s3 := and $root.Values.mlflow.enabled (hasPrefix "s3://" $root.Values.mlflow.artifacts.destination) }}
{{- if and (eq $c "registry") $s3 }}
{{- /* Where mlflow-artifacts: URIs really are, so the registry can presign them for serving pods. */}}
{{- $_ := set $data "LLMOPS_REGISTRY_ARTIFACTS_DESTINATION" $root.Values.mlflow.artifacts.destination }}
{{- with $root.Values.mlflow.artifacts.s3EndpointUrl }}{{ $_ := set $data "LLMOPS_REGISTRY_S3_ENDPOINT_URL" . }}{{ end }}
{{- end }}
{{- $sharedClaim := include "llmops.artifactsClaim" $root }}
{{- if and (eq $c "registry") $sharedClaim }}
{{- /* The path mlflow-artifacts: URIs resolve under: serving pods map it to their own mount of the claim. */}}
{{- $_ := set $data "LLMOPS_REGISTRY_ARTIFACTS_DESTINATION" (include "llmops.mlflowArtifactsPath" $root) }}
{{- end }}
{{- if eq $c "serving" }}
{{- $_ := set $data "LLMOPS_SERVING_WEIGHTS__SOURCE" (include "llmops.weightsSource" $root) }}
{{- if and $sharedClaim (eq (include "llmops.servingDeployments" $root) "true") }}
{{- $_ := set $data "LLMOPS_SERVING_WEIGHTS__SHARED_MOUNT" (include "llmops.sharedWeightsMount" $root) }}
{{- end }}
{{- $_ := set $data "LLMOPS_SERVING_ENGINE" $values.engine }}
{{- $_ := set $data "LLMOPS_SERVING_MAX_WAITING" (toString $values.maxWaiting) }}
{{- /* `llmops serve` has no --http-port: the OpenAI HTTP port is a setting. */}}
{{- $_ := set $data "LLMOPS_SERVING_HTTP_PORT" (toString $root.Values.ports.http) }}
{{- $_ := set $data "LLMOPS_MODEL_CACHE_DIR" $values.modelCache.mountPath }}
{{- $_ := set $data "LLMOPS_SERVING_WEIGHTS__CACHE_MAX_BYTES" (int64 $values.modelCache.maxBytes | toString) }}
{{- $_ := set $data "LLMOPS_GRACE_SECONDS" (include "llmops.servingGraceSeconds" $root) }}
{{- end }}
{{- range $name, $value := $values.env }}{{ $_ := set $data $name (toString $value) }}{{ end }}
{{- toYaml $data }}
{{- end }}

{{/*
Engine options of one served model: its `engineOptions`, with vLLM's tensor_parallel_size set to
the pod's GPU count when that is above 1 and the entry sets none (vLLM would otherwise load the
model on one GPU). (dict "root" $ "model" $model) -> JSON object.
*/}}
{{- define "llmops.engineOptions" -}}
{{- $serving := .root.Values.serving }}
{{- $options := deepCopy (.model.engineOptions | default dict) }}
{{- $gpus := int (.model.gpus | default $serving.gpu.count) }}
{{- $engine := .model.engine | default $serving.engine }}
{{- if and $serving.gpu.enabled (gt $gpus 1) (eq $engine "vllm") (not (hasKey $options "tensor_parallel_size")) }}
{{- $_ := set $options "tensor_parallel_size" $gpus }}
{{- end }}
{{- toJson $options }}
{{- end }}

{{/* LLMOPS_* settings of one served model: (dict "root" $ "model" $model). */}}
{{- define "llmops.modelConfigData" -}}
{{- $model := .model }}
{{- $data := dict "LLMOPS_SERVING_MODEL" $model.model }}
{{- with $model.pool }}{{ $_ := set $data "LLMOPS_SERVING_POOL" . }}{{ end }}
{{- with $model.engine }}{{ $_ := set $data "LLMOPS_SERVING_ENGINE" . }}{{ end }}
{{- $options := include "llmops.engineOptions" . }}
{{- if ne $options "{}" }}{{ $_ := set $data "LLMOPS_SERVING_ENGINE_OPTIONS" $options }}{{ end }}
{{- range $name, $value := $model.env }}{{ $_ := set $data $name (toString $value) }}{{ end }}
{{- toYaml $data }}
{{- end }}

{{/*
checksum/config of a workload: the ConfigMaps it reads, no others. (dict "root" $ "component" c)
plus "model" for a served model.
*/}}
{{- define "llmops.configChecksum" -}}
{{- $parts := list (include "llmops.commonConfigData" .root) (include "llmops.componentConfigData" (dict "root" .root "component" .component)) }}
{{- with .model }}{{ $parts = append $parts (include "llmops.modelConfigData" (dict "root" $.root "model" .)) }}{{ end }}
{{- join "\n---\n" $parts | sha256sum }}
{{- end }}
