{{/*
Names. Kubernetes names and label values are at most 63 characters, so every name is cut there.
*/}}
{{- define "llmops.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmops.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if regexMatch "^[0-9]" .Release.Name }}
{{- /* Service and RayCluster names must start with a letter (DNS-1035) */}}
{{- printf "%s-%s" $name .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llmops.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one component's resources: (dict "root" $ "component" "registry"). */}}
{{- define "llmops.componentName" -}}
{{- $room := max 1 (sub 62 (len .component)) | int }}
{{- printf "%s-%s" (include "llmops.fullname" .root | trunc $room | trimSuffix "-") .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Name of one served model's resources: (dict "root" $ "model" $model). Cut to 54 characters so that
"-headless" still fits in 63.
*/}}
{{- define "llmops.servingName" -}}
{{- $suffix := printf "serving-%s" .model.name }}
{{- $room := max 1 (sub 53 (len $suffix)) | int }}
{{- printf "%s-%s" (include "llmops.fullname" .root | trunc $room | trimSuffix "-") $suffix | trunc 54 | trimSuffix "-" }}
{{- end }}

{{/* KubeRay derives "<name>-head-svc" and cuts names over 50 characters from the front: stay under. */}}
{{- define "llmops.rayClusterName" -}}
{{- printf "%s-ray" (include "llmops.fullname" . | trunc 37 | trimSuffix "-") }}
{{- end }}

{{/* RayService name of one model; KubeRay appends "-serve-svc" and "-head-svc". */}}
{{- define "llmops.rayServiceName" -}}
{{- $suffix := printf "serve-%s" .model.name }}
{{- $room := max 1 (sub 39 (len $suffix)) | int }}
{{- printf "%s-%s" (include "llmops.fullname" .root | trunc $room | trimSuffix "-") $suffix | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
Labels. selectorLabels never change after install (Deployments' selectors are immutable);
labels add the version and chart. Both take (dict "root" $ "component" "registry").
*/}}
{{- define "llmops.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmops.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name | trunc 63 | trimSuffix "-" }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "llmops.labels" -}}
helm.sh/chart: {{ include "llmops.chart" .root }}
{{ include "llmops.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: llmops
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one serving pool's pods: (dict "root" $ "model" $pool), a dict of llmops.servingPools. */}}
{{- define "llmops.servingSelectorLabels" -}}
{{ include "llmops.selectorLabels" (dict "root" .root "component" "serving") }}
{{ include "llmops.poolLabels" .model }}
{{- end }}

{{/* Images. */}}
{{- define "llmops.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "llmops.gpuImage" -}}
{{- printf "%s:%s" .Values.gpuImage.repository (default .Chart.AppVersion .Values.gpuImage.tag) }}
{{- end }}

{{/* The image serving pods run: the GPU image on GPU nodes, the CPU image otherwise. */}}
{{- define "llmops.servingImage" -}}
{{- if .Values.serving.gpu.enabled }}{{ include "llmops.gpuImage" . }}{{ else }}{{ include "llmops.image" . }}{{ end }}
{{- end }}

{{- define "llmops.servingImagePullPolicy" -}}
{{- if .Values.serving.gpu.enabled }}{{ .Values.gpuImage.pullPolicy }}{{ else }}{{ .Values.image.pullPolicy }}{{ end }}
{{- end }}

{{/* ServiceAccount of a workload: (dict "root" $ "component" "training"). */}}
{{- define "llmops.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create }}
{{- include "llmops.componentName" . }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/* grpc.health.v1 service name a component reports readiness under, e.g. llmops.registry.v1.RegistryService. */}}
{{- define "llmops.healthServiceName" -}}
{{- printf "llmops.%s.v1.%sService" . (title .) }}
{{- end }}

{{/* host:port clients use to reach a component's gRPC port: (dict "root" $ "component" "cache"). */}}
{{- define "llmops.address" -}}
{{- printf "%s:%v" (include "llmops.componentName" .) .root.Values.ports.grpc }}
{{- end }}

{{/* Address of serving: the first serving pool's Service. */}}
{{- define "llmops.servingAddress" -}}
{{- $model := first (include "llmops.servingPools" . | fromYaml).pools }}
{{- printf "%s:%v" (include "llmops.servingName" (dict "root" . "model" $model)) .Values.ports.grpc }}
{{- end }}

{{- define "llmops.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/0" (include "llmops.componentName" (dict "root" . "component" "redis")) }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* Secret with the in-release Redis's password, when it has one. */}}
{{- define "llmops.redisPasswordSecret" -}}
{{- if .Values.redis.enabled }}{{ .Values.redis.auth.existingSecret }}{{ end }}
{{- end }}

{{- define "llmops.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s:5000" (include "llmops.componentName" (dict "root" . "component" "mlflow")) }}
{{- else }}
{{- .Values.mlflow.external.trackingUri }}
{{- end }}
{{- end }}

{{- define "llmops.rayAddress" -}}
{{- if .Values.raycluster.enabled }}
{{- printf "ray://%s-head-svc:10001" (include "llmops.rayClusterName" .) }}
{{- else }}
{{- .Values.raycluster.externalAddress }}
{{- end }}
{{- end }}

{{/* Pod-level security context of llmops pods (and Ray pods, which run the same images). */}}
{{- define "llmops.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container security context of every container the chart runs: non-root, read-only root filesystem,
no privilege escalation, no capabilities. Writable paths are emptyDir or PVC mounts.
*/}}
{{- define "llmops.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Environment every llmops container gets besides its ConfigMaps. */}}
{{- define "llmops.commonEnv" -}}
- name: HOME
  value: /tmp
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with .Values.auth.serviceKey.existingSecret }}
- name: LLMOPS_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.auth.serviceKey.secretKey }}
{{- end }}
{{- with (include "llmops.redisPasswordSecret" .) }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.auth.secretKey }}
{{- /* Kubernetes puts the password in: $(VAR) of an earlier variable is expanded. */}}
- name: LLMOPS_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "llmops.componentName" (dict "root" $ "component" "redis")) | quote }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret }}
- name: LLMOPS_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.secretKey }}
{{- end }}
{{- end }}

{{/* ConfigMaps every llmops container reads: (dict "root" $ "component" "registry"). */}}
{{- define "llmops.envFrom" -}}
- configMapRef:
    name: {{ include "llmops.componentName" (dict "root" .root "component" "config") }}
- configMapRef:
    name: {{ include "llmops.componentName" (dict "root" .root "component" (printf "%s-config" .component)) }}
{{- end }}

{{/* Volumes of every llmops pod: /tmp, the data dir, and the API keys Secret when set. */}}
{{- define "llmops.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 2Gi
- name: data
  emptyDir:
    sizeLimit: {{ .sizeLimit }}
{{- with .root.Values.auth.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- with .root.Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "llmops.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /var/lib/llmops
{{- if .Values.auth.existingSecret }}
- name: api-keys
  mountPath: /etc/llmops/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: /etc/llmops/tls
  readOnly: true
{{- end }}
{{- end }}

{{/*
How a probe asks grpc.health.v1 about (dict "root" $ "service" NAME): Kubernetes' native gRPC probe,
or, when the servers speak TLS (which native probes cannot), `llmops probe` in the container.
*/}}
{{- define "llmops.probeAction" -}}
{{- if .root.Values.tls.existingSecret }}
exec:
  command: ["llmops", "probe", "--address", "localhost:{{ .root.Values.ports.grpc }}", "--service", {{ .service | quote }}]
{{- else }}
grpc:
  port: {{ .root.Values.ports.grpc }}
  service: {{ .service | quote }}
{{- end }}
{{- end }}

{{/* gRPC health probes: liveness on "" (the process), readiness on the service name (dependencies ready). */}}
{{- define "llmops.grpcProbes" -}}
startupProbe:
  {{- include "llmops.probeAction" (dict "root" .root "service" "") | nindent 2 }}
  periodSeconds: 2
  {{- /* Training and quantization start a Ray runtime in the pod (no RayCluster) or join the cluster's
  head, which may still be starting: 5 minutes; the others import and bind within 2. */}}
  failureThreshold: {{ ternary 150 60 (has .component (list "training" "quantization")) }}
livenessProbe:
  {{- include "llmops.probeAction" (dict "root" .root "service" "") | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
readinessProbe:
  {{- include "llmops.probeAction" (dict "root" .root "service" (include "llmops.healthServiceName" .component)) | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/* Services that are on, in a fixed order. */}}
{{- define "llmops.enabledServices" -}}
{{- $out := list }}
{{- range $c := list "registry" "training" "quantization" "serving" "cache" }}
{{- if (index $.Values $c).enabled }}{{ $out = append $out $c }}{{ end }}
{{- end }}
{{- join "," $out }}
{{- end }}

{{/* Whether a Deployment per served model exists (not in RayService mode). */}}
{{- define "llmops.servingDeployments" -}}
{{- if and .Values.serving.enabled (ne .Values.serving.autoscaling.mode "rayservice") }}true{{ end }}
{{- end }}

{{/*
Pod template of a Ray node (head or worker) running one of the llmops images. KubeRay replaces the
container command with `ray start`; the image supplies bash and wget for KubeRay's probes.
Takes (dict "root" $ "role" "head"|"worker" "group" "cpu" "image" ... "pullPolicy" ... "resources" ...
"nodeSelector" ... "tolerations" ... "labels" ... "envFromComponent" "training"|"serving").
*/}}
{{- define "llmops.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  annotations:
    {{- /* the settings the Ray processes read: a change makes KubeRay replace the pods */}}
    checksum/config: {{ include "llmops.configChecksum" (dict "root" $root "component" .envFromComponent) }}
  labels:
    {{- include "llmops.labels" (dict "root" $root "component" .component) | nindent 4 }}
    llmops.io/ray-node: {{ .group }}
    {{- with .model }}
    {{- include "llmops.poolLabels" . | nindent 4 }}
    {{- end }}
spec:
  {{- if ne .role "head" }}
  serviceAccountName: {{ include "llmops.serviceAccountName" (dict "root" $root "component" "ray-worker") }}
  automountServiceAccountToken: false
  {{- end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "llmops.podSecurityContext" $root | nindent 4 }}
  containers:
    - name: {{ printf "ray-%s" .role }}
      image: {{ .image }}
      imagePullPolicy: {{ .pullPolicy }}
      ports:
        {{- if eq .role "head" }}
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        - name: dashboard-agent
          containerPort: 52365
          protocol: TCP
        {{- end }}
        - name: ray-metrics
          containerPort: 8080
          protocol: TCP
        {{- if .serve }}
        - name: serve
          containerPort: 8000
          protocol: TCP
        - name: serve-grpc
          containerPort: 9000
          protocol: TCP
        {{- if ne .role "head" }}
        - name: metrics
          containerPort: {{ $root.Values.ports.metrics }}
          protocol: TCP
        {{- end }}
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "llmops.componentName" (dict "root" $root "component" "config") }}
        - configMapRef:
            name: {{ include "llmops.componentName" (dict "root" $root "component" (printf "%s-config" .envFromComponent)) }}
            optional: true
      env:
        {{- include "llmops.commonEnv" $root | nindent 8 }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- include "llmops.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: dshm
          mountPath: /dev/shm
        {{- if and (include "llmops.trainingClaim" $root) (eq .envFromComponent "training") }}
        {{- include "llmops.trainingMount" $root | nindent 8 }}
        {{- end }}
  volumes:
    {{- if and (include "llmops.trainingClaim" $root) (eq .envFromComponent "training") }}
    {{- include "llmops.trainingVolume" $root | nindent 4 }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 20Gi
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.raycluster.shmSizeLimit }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* In-tree Ray autoscaler options: the sidecar gets the same hardened container settings. */}}
{{- define "llmops.rayAutoscalerOptions" -}}
upscalingMode: {{ .Values.raycluster.autoscaler.upscalingMode }}
idleTimeoutSeconds: {{ .Values.raycluster.autoscaler.idleTimeoutSeconds }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
resources:
  {{- toYaml .Values.raycluster.autoscaler.resources | nindent 2 }}
env:
  - name: HOME
    value: /tmp/ray
securityContext:
  {{- include "llmops.containerSecurityContext" . | nindent 2 }}
{{- end }}

{{/* Resources with GPUs added to requests and limits: (dict "resources" $r "name" "nvidia.com/gpu" "count" 1). */}}
{{- define "llmops.withGpus" -}}
{{- $resources := deepCopy .resources }}
{{- $requests := $resources.requests | default dict }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $requests .name .count }}
{{- $_ := set $limits .name .count }}
{{- $_ := set $resources "requests" $requests }}
{{- $_ := set $resources "limits" $limits }}
{{- toYaml $resources }}
{{- end }}

{{/* Resources with an ephemeral-storage request when they name none: (dict "resources" $r "size" "10Gi"). */}}
{{- define "llmops.withEphemeralStorage" -}}
{{- $resources := deepCopy .resources }}
{{- $requests := $resources.requests | default dict }}
{{- if not (hasKey $requests "ephemeral-storage") }}{{ $_ := set $requests "ephemeral-storage" .size }}{{ end }}
{{- $_ := set $resources "requests" $requests }}
{{- toYaml $resources }}
{{- end }}

{{/* The training jobs' shared claim, when there is one: its name. */}}
{{- define "llmops.trainingClaim" -}}
{{- $storage := .Values.training.sharedStorage -}}
{{- if and .Values.training.enabled $storage.enabled -}}
{{- default (include "llmops.componentName" (dict "root" . "component" "training-jobs")) $storage.existingClaim -}}
{{- end -}}
{{- end }}

{{/* Where the jobs' shared claim is mounted, in the training and quantization pods and the Ray pods
alike: each service's job folders (snapshots, checkpoints, sources, results) on its own subpath. */}}
{{- define "llmops.trainingMount" -}}
- name: training-jobs
  mountPath: /var/lib/llmops/training
  subPath: training
- name: training-jobs
  mountPath: /var/lib/llmops/quantization
  subPath: quantization
{{- end }}

{{- define "llmops.trainingVolume" -}}
- name: training-jobs
  persistentVolumeClaim:
    claimName: {{ include "llmops.trainingClaim" . }}
{{- end }}

{{/* Pod-level scheduling a user may add to a workload: (values of the component). */}}
{{- define "llmops.podScheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Serving pools: every entry of serving.models as one dict per pool, (include ... $ | fromYaml).pools.
An entry with `pools` gives one per pool, named "<entry>-<pool>", serving `<model>@<alias>` (alias
defaults to the pool's name) or `<model>:<version>`; the pool's fields override the entry's (maps
merged). An entry without `pools` is one unit named after the entry, serving its `model` reference
as it is, in no pool. Each dict: name (resource suffix), model (the reference), modelLabel
(llmops.io/model), pool (llmops.io/pool, LLMOPS_SERVING_POOL; absent without pools) and the sizes.
*/}}
{{- define "llmops.servingPools" -}}
{{- $out := list }}
{{- range $entry := .Values.serving.models }}
{{- if $entry.pools }}
{{- range $pool := $entry.pools }}
{{- $unit := merge (omit (deepCopy $pool) "alias" "version") (omit (deepCopy $entry) "pools" "model") }}
{{- $reference := printf "%s@%s" $entry.model ($pool.alias | default $pool.name) }}
{{- if and (hasKey $pool "version") (not (empty (toString $pool.version))) }}
{{- $reference = printf "%s:%v" $entry.model $pool.version }}
{{- end }}
{{- $_ := set $unit "name" (printf "%s-%s" $entry.name $pool.name) }}
{{- $_ = set $unit "model" $reference }}
{{- $_ = set $unit "modelLabel" $entry.name }}
{{- $_ = set $unit "pool" $pool.name }}
{{- $out = append $out $unit }}
{{- end }}
{{- else }}
{{- $out = append $out (merge (dict "modelLabel" $entry.name) (deepCopy $entry)) }}
{{- end }}
{{- end }}
{{- toYaml (dict "pools" $out) }}
{{- end }}

{{/* Labels naming a serving pool's model and pool: the pool dict of llmops.servingPools. */}}
{{- define "llmops.poolLabels" -}}
llmops.io/model: {{ .modelLabel | trunc 63 | trimSuffix "-" }}
{{- with .pool }}
llmops.io/pool: {{ . | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
