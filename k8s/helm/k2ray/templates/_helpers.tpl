{{/* Names and labels. */}}
{{- define "k2ray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "k2ray.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "k2ray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "k2ray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "k2ray.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "k2ray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "k2ray.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "k2ray.adminSecretName" -}}
{{- default (printf "%s-admin" (include "k2ray.fullname" .)) .Values.auth.adminTokenSecret.name -}}
{{- end -}}

{{- define "k2ray.ledgerSecretName" -}}
{{- default (printf "%s-ledger" (include "k2ray.fullname" .)) .Values.billing.ledger.serviceFileSecret.name -}}
{{- end -}}

{{/* Where the Secrets are mounted in every Ray container. */}}
{{- define "k2ray.adminTokenDir" -}}/etc/k2ray/admin{{- end -}}
{{- define "k2ray.ledgerDir" -}}/etc/k2ray/ledger{{- end -}}

{{- define "k2ray.adminTokenFile" -}}
{{- printf "%s/%s" (include "k2ray.adminTokenDir" .) .Values.auth.adminTokenSecret.key -}}
{{- end -}}

{{- define "k2ray.ledgerServiceFile" -}}
{{- printf "%s/%s" (include "k2ray.ledgerDir" .) .Values.billing.ledger.serviceFileSecret.key -}}
{{- end -}}

{{/* Values k2ray's ServeArgs cannot express yet fail the render instead of deploying a config it ignores. */}}
{{- define "k2ray.checkSupported" -}}
{{- $epSize := int .Values.epSize -}}
{{- range $pool := (.Values.disaggregated | ternary (list "prefill" "decode") (list "colocated")) -}}
{{- $gpus := int (index $.Values $pool).gpusPerWorker -}}
{{- if mod $gpus $epSize -}}
{{- fail (printf "%s.gpusPerWorker (%d) must be a multiple of epSize (%d): each EP rank has its own GPUs" $pool $gpus $epSize) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.auth.enabled (not .Values.billing.enabled) -}}
{{- fail "auth.enabled needs billing.enabled: API keys live in the billing ledger" -}}
{{- end -}}
{{- if and (eq .Values.search.provider "searxng") (not .Values.search.searxng.baseUrl) -}}
{{- fail "search.provider searxng needs search.searxng.baseUrl" -}}
{{- end -}}
{{- end -}}

{{/* The custom Ray resource a disaggregated pool's worker group offers and its replicas ask for. */}}
{{- define "k2ray.poolResource" -}}k2ray_{{ . }}{{- end -}}

{{/* ServeArgs (k2ray/serve/args.py) as a dict: the application's `args`. */}}
{{- define "k2ray.serveArgs" -}}
{{- $engine := deepCopy .Values.engine -}}
{{- $_ := set $engine "num_replicas" (int .Values.colocated.replicas) -}}
{{- $epSize := int .Values.epSize -}}
{{- $_ := set $engine "ep_size" $epSize -}}
{{/* ServeArgs' num_gpus is per EP rank: a worker pod's GPUs are shared out among its replica's ranks. */}}
{{- $_ := set $engine "num_gpus" (div (int .Values.colocated.gpusPerWorker) $epSize) -}}
{{- $args := dict "app_name" .Values.serve.appName "route_prefix" .Values.serve.routePrefix -}}
{{- $_ := set $args "host" "0.0.0.0" -}}
{{- $_ := set $args "port" (int .Values.serve.port) -}}
{{- $_ := set $args "log_level" .Values.serve.logLevel -}}
{{- if .Values.model.path -}}{{- $_ := set $args "model" .Values.model.path -}}{{- end -}}
{{- if .Values.model.servedModelName -}}{{- $_ := set $args "served_model_name" .Values.model.servedModelName -}}{{- end -}}
{{- with .Values.models -}}{{- $_ := set $args "models" . -}}{{- end -}}
{{- $_ := set $args "engine" $engine -}}
{{- if .Values.disaggregated -}}
{{- $_ := set $args "disaggregated" true -}}
{{- range $pool := list "prefill" "decode" -}}
{{- $values := index $.Values $pool -}}
{{- $section := dict "num_replicas" (int $values.replicas) "num_gpus" (div (int $values.gpusPerWorker) $epSize) -}}
{{- $_ := set $section "resources" (dict (include "k2ray.poolResource" $pool) 1) -}}
{{- $_ := set $args $pool $section -}}
{{- end -}}
{{- with .Values.pd -}}{{- $_ := set $args "pd" . -}}{{- end -}}
{{- end -}}
{{- $router := deepCopy .Values.router -}}
{{- $_ := set $router "auth" .Values.auth.enabled -}}
{{- if .Values.auth.enabled -}}{{- $_ := set $router "admin_token_file" (include "k2ray.adminTokenFile" .) -}}{{- end -}}
{{- $_ := set $args "router" $router -}}
{{- if .Values.billing.enabled -}}
{{- $billing := dict "ledger" (printf "postgresql:///?service=%s" .Values.billing.ledger.service) -}}
{{- with .Values.billing.defaultPlan -}}{{- $_ := set $billing "default_plan" . -}}{{- end -}}
{{- with .Values.billing.plans -}}{{- $_ := set $billing "plans" . -}}{{- end -}}
{{- $_ := set $args "billing" $billing -}}
{{- end -}}
{{- $search := dict "provider" .Values.search.provider "mode" .Values.search.mode -}}
{{- with .Values.search.searxng.baseUrl -}}{{- $_ := set $search "searxng" (dict "base_url" .) -}}{{- end -}}
{{- $_ := set $args "tools" (dict "web_search" $search) -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The Ray Serve config (ray.serve.schema.ServeDeploySchema) KubeRay PUTs to the dashboard. */}}
{{- define "k2ray.serveConfig" -}}
{{- $http := dict "host" "0.0.0.0" "port" (int .Values.serve.port) -}}
{{- $app := dict "name" .Values.serve.appName "route_prefix" .Values.serve.routePrefix "import_path" "k2ray.serve.app:build_app" -}}
{{- $_ := set $app "args" (include "k2ray.serveArgs" . | fromYaml) -}}
{{- $config := dict "proxy_location" .Values.serve.proxyLocation "http_options" $http "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Environment of every Ray container. */}}
{{- define "k2ray.rayEnv" -}}
{{- range $name, $value := .Values.rayEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- if .Values.billing.enabled }}
- name: PGSERVICEFILE
  value: {{ include "k2ray.ledgerServiceFile" . }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod template of one Ray group. Call with (dict "root" $ "group" <name> "pool" <values> "gpus" <n>
"ports" <list of name/port> "rayContainerName" <name>).
*/}}
{{- define "k2ray.podTemplate" -}}
{{- $root := .root -}}
{{- $pool := .pool -}}
metadata:
  labels:
    {{- include "k2ray.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .group }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .rayContainerName }}
      image: {{ include "k2ray.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      ports:
        {{- range .ports }}
        - name: {{ .name }}
          containerPort: {{ .port }}
          protocol: TCP
        {{- end }}
      env:
        {{- include "k2ray.rayEnv" $root | trim | nindent 8 }}
      resources:
        {{- $resources := deepCopy (default dict $pool.resources) -}}
        {{- if gt (int .gpus) 0 -}}
        {{- $requests := default dict $resources.requests -}}
        {{- $limits := default dict $resources.limits -}}
        {{- $_ := set $requests "nvidia.com/gpu" (int .gpus) -}}
        {{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
        {{- $_ := set $resources "requests" $requests -}}
        {{- $_ := set $resources "limits" $limits -}}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if $root.Values.model.pvc.claimName }}
        - name: model
          mountPath: {{ $root.Values.model.pvc.mountPath }}
          readOnly: true
        {{- end }}
        {{- if $root.Values.auth.enabled }}
        - name: admin-token
          mountPath: {{ include "k2ray.adminTokenDir" $root }}
          readOnly: true
        {{- end }}
        {{- if $root.Values.billing.enabled }}
        - name: ledger
          mountPath: {{ include "k2ray.ledgerDir" $root }}
          readOnly: true
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $pool.shmSize }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- if $root.Values.model.pvc.claimName }}
    - name: model
      persistentVolumeClaim:
        claimName: {{ $root.Values.model.pvc.claimName }}
        readOnly: true
    {{- end }}
    {{- if $root.Values.auth.enabled }}
    - name: admin-token
      secret:
        secretName: {{ include "k2ray.adminSecretName" $root }}
        items:
          - key: {{ $root.Values.auth.adminTokenSecret.key }}
            path: {{ $root.Values.auth.adminTokenSecret.key }}
    {{- end }}
    {{- if $root.Values.billing.enabled }}
    - name: ledger
      secret:
        secretName: {{ include "k2ray.ledgerSecretName" $root }}
        items:
          - key: {{ $root.Values.billing.ledger.serviceFileSecret.key }}
            path: {{ $root.Values.billing.ledger.serviceFileSecret.key }}
    {{- end }}
  {{- with $pool.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pool.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pool.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* rayStartParams: the chart's, then the pool's own (all strings, as the CRD requires). */}}
{{- define "k2ray.rayStartParams" -}}
{{- $params := merge (dict) .extra .base -}}
{{- range $key, $value := $params }}
{{ $key }}: {{ include "k2ray.plainNumber" $value | quote }}
{{- end }}
{{- end -}}

{{/* A value as text; whole numbers without an exponent (values arrive as float64: 1e+10 -> 10000000000). */}}
{{- define "k2ray.plainNumber" -}}
{{- if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}
