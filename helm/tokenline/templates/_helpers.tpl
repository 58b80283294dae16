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

{{/* Labels of the bootstrap-key Job's pod: the NetworkPolicy admits it to Redis. */}}
{{- define "tokenline.bootstrapKeyPodLabels" -}}
{{ include "tokenline.selectorLabels" . }}
app.kubernetes.io/component: bootstrap-key
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

{{- define "tokenline.redisHost" -}}
{{- printf "%s.%s.svc.%s" (include "tokenline.redisName" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{/* The Secret holding the Redis password: the chart's own, or redis.auth.existingSecret.
     Empty when there is none (an external Redis given without existingSecret). */}}
{{- define "tokenline.redisSecretName" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if .Values.redis.enabled -}}
{{- printf "%s-redis-auth" (include "tokenline.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Environment variable that carries the Redis password into every container that
     connects to Redis; the application fills it into ${...} of its Redis URL. */}}
{{- define "tokenline.redisPasswordEnv" -}}
{{- with include "tokenline.redisSecretName" . -}}
- name: TOKENLINE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.auth.existingSecretPasswordKey }}
{{- end -}}
{{- end -}}

{{/* The Redis URL the application uses: the chart's Redis, or an external one. For the
     chart's Redis the password stays a reference, ${TOKENLINE_REDIS_PASSWORD}, which the
     application fills in from its environment (set from the Secret), so it never appears in
     the RayService or its Serve config. */}}
{{- define "tokenline.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://:${TOKENLINE_REDIS_PASSWORD}@%s:%d/0" (include "tokenline.redisHost" .) (int .Values.redis.port) -}}
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* The CA of an external Redis that serves TLS (redis.tls.caSecret), mounted where
     `?ssl_ca_certs=` in redis.externalUrl names it: a volume and its mount. */}}
{{- define "tokenline.redisCaVolume" -}}
{{- if .Values.redis.tls.caSecret -}}
{{- if .Values.redis.enabled -}}
{{- fail "redis.tls.caSecret needs redis.enabled false and a rediss:// redis.externalUrl (the chart's Redis serves plaintext inside the cluster)" -}}
{{- end -}}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    items:
      - key: {{ .Values.redis.tls.caSecretKey }}
        path: ca.crt
{{- end -}}
{{- end -}}

{{- define "tokenline.redisCaMount" -}}
{{- if .Values.redis.tls.caSecret -}}
- name: redis-ca
  mountPath: /etc/tokenline/redis-ca
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The Secret holding the bootstrap API key. */}}
{{- define "tokenline.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "tokenline.fullname" .)) .Values.bootstrapKey.existingSecret -}}
{{- end -}}

{{/* An init container that waits until the chart's Redis answers PING (authenticated). */}}
{{- define "tokenline.waitForRedis" -}}
- name: wait-for-redis
  image: "{{ .Values.redis.image.repository }}:{{ .Values.redis.image.tag }}"
  imagePullPolicy: {{ .Values.redis.image.pullPolicy }}
  env:
    - name: REDISCLI_AUTH
      valueFrom:
        secretKeyRef:
          name: {{ include "tokenline.redisSecretName" . }}
          key: {{ .Values.redis.auth.existingSecretPasswordKey }}
  command:
    - /bin/sh
    - -c
    - until redis-cli -h {{ include "tokenline.redisName" . }} -p {{ int .Values.redis.port }} ping | grep -q PONG; do echo waiting for redis; sleep 2; done
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
{{- $grpc := dict "port" (int .Values.grpc.port) "grpc_servicer_functions" (list "services.ingress.registration.add_generation_servicer" "services.ingress.registration.add_health_servicer") -}}
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
  {{- with include "tokenline.redisCaVolume" . }}
  {{- . | nindent 2 }}
  {{- end }}
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
  {{- include "tokenline.ingressEnv" . | nindent 2 }}
  {{- with include "tokenline.redisPasswordEnv" . }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
volumeMounts:
  - name: ray-logs
    mountPath: /tmp/ray
  {{- with include "tokenline.redisCaMount" . }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
lifecycle:
  preStop:
    exec:
      command: ["/bin/sh", "-c", "sleep {{ int .Values.drainSeconds }}"]
{{- end -}}


{{/* How gRPC calls reach the ingress replicas (AppConfig.grpc_ingress; the same variables
     services.server.ingress_environment sets for `tokenline serve`). "haproxy" (default):
     every ingress replica serves gRPC itself from grpc.port+1 on, and HAProxy, which Serve
     starts in every Ray pod, listens on grpc.port. "proxy": Serve's Python gRPC proxy. */}}
{{- define "tokenline.ingressEnv" -}}
{{- $mode := .Values.serve.app.grpc_ingress | default "haproxy" -}}
{{- $port := int .Values.grpc.port -}}
{{- if eq $mode "proxy" }}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: "0"
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "0"
{{- else }}
{{- $first := ternary (add $port 1) $port (eq $mode "haproxy") | int }}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: "1"
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: {{ ternary "1" "0" (eq $mode "haproxy") | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT
  value: {{ $first | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT
  value: {{ add $first 100 | quote }}
- name: RAY_SERVE_PORT_QUARANTINE_S
  value: {{ ternary "0" "60" (eq $mode "direct") | quote }}
- name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH
  value: {{ .Values.serve.app.grpc_max_message_bytes | default 4194304 | int | quote }}
- name: RAY_SERVE_HAPROXY_METRICS_PORT
  value: {{ add $first 101 | quote }}
- name: RAY_SERVE_HAPROXY_STATS_PORT
  value: {{ add $first 102 | quote }}
{{- end }}
{{- end -}}
