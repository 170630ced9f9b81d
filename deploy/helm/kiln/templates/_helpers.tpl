{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kiln.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- /* The endpoint picker's own labels, so kiln's Service, ServiceMonitor and InferencePool never select it. */ -}}
{{- define "kiln.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" . }}-epp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kiln.eppLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kiln.eppSelectorLabels" . }}
app.kubernetes.io/component: endpoint-picker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kiln.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiln.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kiln.apiKeySecretName" -}}
{{- default (include "kiln.fullname" .) .Values.apiKey.existingSecret }}
{{- end }}

{{- define "kiln.engineDir" -}}
{{- printf "%s/%s" (.Values.engine.mountPath | trimSuffix "/") .Values.engine.name }}
{{- end }}

{{- define "kiln.engineClaimName" -}}
{{- default (printf "%s-engines" (include "kiln.fullname" .)) .Values.engine.storage.existingClaim }}
{{- end }}

{{- /* The engine volume is shared by every pod (one claim for the Deployment, or the Job's volume). */ -}}
{{- define "kiln.engineShared" -}}
{{- if and (ne .Values.engine.storage.kind "emptyDir") (not (and (eq .Values.workload.kind "StatefulSet") (eq .Values.engine.storage.kind "pvc"))) }}true{{ end }}
{{- end }}

{{- define "kiln.autoscaled" -}}
{{- if or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}true{{ end }}
{{- end }}

{{- /*
kiln's own grace period: KILN_GRACEFUL_SHUTDOWN_TIMEOUT (kiln's default, 30, when unset).
*/ -}}
{{- define "kiln.shutdownSeconds" -}}
{{- $value := index .Values.settings "KILN_GRACEFUL_SHUTDOWN_TIMEOUT" | default "30" | toString }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?$" $value) }}
{{- fail (printf "settings.KILN_GRACEFUL_SHUTDOWN_TIMEOUT must be a number of seconds, got %q" $value) }}
{{- end }}
{{- $value | float64 | ceil | int }}
{{- end }}

{{- /*
terminationGracePeriodSeconds: the preStop sleep, then kiln's grace period, then time to exit. A value given
must leave kiln its whole grace period after the preStop sleep, or SIGKILL cuts requests kiln would finish.
*/ -}}
{{- define "kiln.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.preStopSeconds) (include "kiln.shutdownSeconds" . | int) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed 10 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds=%d is too short: the pod sleeps preStopSeconds=%d before SIGTERM and kiln then gives in-flight requests KILN_GRACEFUL_SHUTDOWN_TIMEOUT=%s s, so it must be above %d (leave it empty to compute it)" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSeconds) (include "kiln.shutdownSeconds" .) $needed) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{- /* Settings combinations that cannot work; rendered once from workload.yaml. */ -}}
{{- define "kiln.validate" -}}
{{- if not (has .Values.workload.kind (list "Deployment" "StatefulSet")) }}
{{- fail (printf "workload.kind must be Deployment or StatefulSet, got %q" .Values.workload.kind) }}
{{- end }}
{{- if not (has .Values.engine.buildMode (list "initContainer" "job")) }}
{{- fail (printf "engine.buildMode must be initContainer or job, got %q" .Values.engine.buildMode) }}
{{- end }}
{{- if not (has .Values.engine.storage.kind (list "emptyDir" "pvc" "existingClaim")) }}
{{- fail (printf "engine.storage.kind must be emptyDir, pvc or existingClaim, got %q" .Values.engine.storage.kind) }}
{{- end }}
{{- if and (eq .Values.engine.storage.kind "existingClaim") (not .Values.engine.storage.existingClaim) }}
{{- fail "engine.storage.kind=existingClaim needs engine.storage.existingClaim (the claim's name)" }}
{{- end }}
{{- if not (has .Values.model.storage (list "none" "hostPath" "existingClaim")) }}
{{- fail (printf "model.storage must be none, hostPath or existingClaim, got %q" .Values.model.storage) }}
{{- end }}
{{- if and .Values.engine.build (eq .Values.engine.buildMode "job") }}
{{- if not (include "kiln.engineShared" .) }}
{{- fail "engine.buildMode=job builds once into a volume every pod mounts: set engine.storage.kind to pvc (with a Deployment) or existingClaim, with accessModes [ReadWriteMany] when replicas may land on several nodes" }}
{{- end }}
{{- end }}
{{- if and .Values.engine.build (eq .Values.engine.buildMode "initContainer") (include "kiln.engineShared" .) (or (gt (int .Values.replicaCount) 1) (include "kiln.autoscaled" .)) }}
{{- fail "several replicas with engine.buildMode=initContainer on one shared engine volume would run `kiln build` into the same folder at once (a build replaces the folder): use engine.buildMode=job, or workload.kind=StatefulSet with engine.storage.kind=pvc (one volume per replica)" }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "enable autoscaling.hpa or autoscaling.keda, not both (KEDA creates its own HPA for the same workload)" }}
{{- end }}
{{- if and .Values.apiKey.value .Values.apiKey.existingSecret }}
{{- fail "give apiKey.value or apiKey.existingSecret, not both" }}
{{- end }}
{{- end }}

{{- /* The writable volumes kiln needs with a read-only root filesystem, and where they go. */ -}}
{{- define "kiln.cacheEnv" -}}
- name: KILN_CACHE_DIR
  value: {{ printf "%s/kiln" .Values.cache.mountPath | quote }}
- name: TORCH_EXTENSIONS_DIR
  value: {{ printf "%s/torch_extensions" .Values.cache.mountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.cache.mountPath | quote }}
# HOME inside the cache volume rather than a volume on the image's HOME, which would hide what the image
# keeps there (the trtllm image's converted default model, linked by the seed)
- name: HOME
  value: {{ printf "%s/home" .Values.cache.mountPath | quote }}
{{- end }}

{{- define "kiln.cacheMounts" -}}
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "kiln.modelMount" -}}
{{- if ne .Values.model.storage "none" }}
- name: models
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "kiln.commonVolumes" -}}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
{{- if eq .Values.model.storage "hostPath" }}
- name: models
  hostPath:
    path: {{ required "model.storage=hostPath needs model.hostPath" .Values.model.hostPath }}
    type: Directory
{{- else if eq .Values.model.storage "existingClaim" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "model.storage=existingClaim needs model.existingClaim" .Values.model.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- /*
Seeds the cache volume from the image: compiled kernels are copied (torch writes a lock file beside them),
converted models are linked (read-only is enough, and they are large). Idempotent on a persistent volume.
*/ -}}
{{- define "kiln.cacheInitContainer" -}}
- name: seed-cache
  image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [sh, -c]
  args:
    - |
      set -eu
      src={{ .Values.image.cacheSeedDir }}
      dst={{ .Values.cache.mountPath }}
      mkdir -p "$dst/kiln/gguf" "$dst/torch_extensions" "$dst/huggingface" "$dst/home"
      if [ -d "$src/torch_extensions" ]; then cp -a "$src/torch_extensions/." "$dst/torch_extensions/"; fi
      for model in "$src"/kiln/gguf/*; do
        if [ -d "$model" ] && [ ! -e "$dst/kiln/gguf/${model##*/}" ]; then ln -s "$model" "$dst/kiln/gguf/"; fi
      done
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: cache
      mountPath: {{ .Values.cache.mountPath }}
{{- end }}

{{- /* `kiln build` into the engine volume, for the init container and the Job. */ -}}
{{- define "kiln.buildContainer" -}}
- name: build-engine
  image: {{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - build
    - --output
    - {{ include "kiln.engineDir" . }}
    {{- range .Values.engine.buildArgs }}
    - {{ . | quote }}
    {{- end }}
  # Set here rather than from a ConfigMap: the Job is a pre-install hook and runs before the release's
  # ConfigMaps exist.
  env:
    {{- with .Values.model.source }}
    - name: KILN_MODEL
      value: {{ . | quote }}
    {{- end }}
    {{- range $name, $value := .Values.engine.buildSettings }}
    - name: {{ $name }}
      value: {{ $value | toString | quote }}
    {{- end }}
    {{- include "kiln.cacheEnv" . | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  {{- with (.Values.engine.buildResources | default .Values.resources) }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: engines
      mountPath: {{ .Values.engine.mountPath }}
    {{- include "kiln.cacheMounts" . | nindent 4 }}
    {{- with (include "kiln.modelMount" .) }}{{ . | trim | nindent 4 }}{{ end }}
    {{- if .Values.shm.enabled }}
    - name: shm
      mountPath: /dev/shm
    {{- end }}
{{- end }}

{{- define "kiln.schedulingFields" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
