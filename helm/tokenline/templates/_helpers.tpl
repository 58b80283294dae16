{{/* Names, labels and the rendered Serve config of the tokenline chart. */}}

{{- define "tokenline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; RayService and Service names derive from it. */}}
{{- define "tokenline.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{/* 40 characters: KubeRay appends a suffix to the RayService name for its
     RayClusters, pods and services, which must stay within 63. */}}

{{- define "tokenline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokenline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tokenline.labels" -}}
helm.sh/chart: {{ include "tokenline.chart" . }}
{{ include "tokenline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of every Ray pod (head and workers, old and new cluster alike):
     the gRPC Service selects on them plus KubeRay's ray.io/serve label. */}}
{{- define "tokenline.rayPodLabels" -}}
{{ include "tokenline.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end -}}

{{- define "tokenline.redisName" -}}
{{- printf "%s-redis" (include "tokenline.fullname" .) -}}
{{- end -}}

{{- define "tokenline.redisSelectorLabels" -}}
{{ include "tokenline.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end -}}

{{/* rayStartParams as KubeRay wants them: a map of strings ({} when empty). */}}
{{- define "tokenline.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := . -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}

{{- define "tokenline.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Redis URL the application uses: the chart's Redis, or an external one. */}}
{{- define "tokenline.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc.%s:%d/0" (include "tokenline.redisName" .) .Release.Namespace .Values.clusterDomain (int .Values.redis.port) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The Serve config file (same schema as cluster/serve-config.yaml), as YAML. */}}
{{- define "tokenline.serveConfig" -}}
{{- $args := deepCopy .Values.serve.app -}}
{{- $_ := set $args "app_name" .Values.serve.appName -}}
{{- $_ := set $args "grpc_port" (int .Values.grpc.port) -}}
{{- $_ := set $args "redis_url" (include "tokenline.redisUrl" .) -}}
{{- $deployments := list -}}
{{- range $name := list "ingress" "tokenizer" "detokenizer" -}}
{{- $frontend := index $.Values.serve.frontend $name -}}
{{- $deployments = append $deployments (dict "name" $name "num_replicas" (int $frontend.replicas) "ray_actor_options" (dict "num_cpus" $frontend.cpus)) -}}
{{- end -}}
{{- $application := dict "name" .Values.serve.appName "import_path" "services.app:build_app" "route_prefix" "/" "args" $args "deployments" $deployments -}}
{{- $grpc := dict "port" (int .Values.grpc.port) "grpc_servicer_functions" (list "services.ingress.registration.add_generation_servicer") -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "grpc_options" $grpc "logging_config" (dict "encoding" "JSON" "log_level" .Values.serve.logLevel) "applications" (list $application) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Pod-level settings shared by the head and both worker groups. */}}
{{- define "tokenline.rayPodCommon" -}}
terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  - name: ray-logs
    emptyDir: {}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Container-level settings shared by every Ray container.
     RAY_SERVE_GRPC_MAX_MESSAGE_SIZE: Ray Serve's gRPC proxy (one per Ray pod) reads
     its message size limit from the environment only, never from the Serve config.
     It must match serve.app.grpc_max_message_bytes (AppConfig's default, 4 MiB, when
     unset), so it is taken from there; without it the proxy accepts up to 2 GiB. */}}
{{- define "tokenline.rayContainerCommon" -}}
image: {{ include "tokenline.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE
    value: {{ .Values.serve.app.grpc_max_message_bytes | default 4194304 | int | quote }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  - name: ray-logs
    mountPath: /tmp/ray
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
lifecycle:
  preStop:
    exec:
      command: ["/bin/sh", "-c", "sleep {{ int .Values.drainSeconds }}"]
{{- end -}}
