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

{{/* How gRPC calls reach the ingress replicas (AppConfig.grpc_ingress). The chart writes it
     into the app args as well, so that the app and the Ray environment never disagree
     (AppConfig's own default is "replica", the chart's "haproxy"). */}}
{{- define "tokenline.grpcIngress" -}}
{{- .Values.serve.app.grpc_ingress | default "haproxy" -}}
{{- end -}}

{{/* Where grpc.tls.secretName is mounted in every Ray container. */}}
{{- define "tokenline.grpcTlsDir" -}}
/etc/tokenline/grpc-tls
{{- end -}}

{{/* "true" when the gRPC port serves TLS (grpc.tls.secretName, or tls set in serve.app with
     files mounted some other way); fails on TLS with a mode whose gRPC server has none. */}}
{{- define "tokenline.grpcTlsOn" -}}
{{- if and .Values.grpc.tls.secretName .Values.serve.app.tls -}}
{{- fail "set grpc.tls.secretName or serve.app.tls, not both (the chart fills serve.app.tls from the Secret)" -}}
{{- end -}}
{{- if or .Values.grpc.tls.secretName .Values.serve.app.tls -}}
{{- $mode := include "tokenline.grpcIngress" . -}}
{{- if ne $mode "replica" -}}
{{- fail (printf "TLS (grpc.tls.secretName or serve.app.tls) needs serve.app.grpc_ingress replica, got %q: with the other modes Ray Serve's gRPC servers (HAProxy, its proxy, direct ingress) face the clients, and they have no TLS" $mode) -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* The app's tls setting for grpc.tls.secretName: the files where the Secret is mounted. */}}
{{- define "tokenline.grpcTlsArgs" -}}
{{- $dir := include "tokenline.grpcTlsDir" . -}}
{{- $tls := dict "cert_file" (printf "%s/tls.crt" $dir) "key_file" (printf "%s/tls.key" $dir) -}}
{{- if .Values.grpc.tls.clientCaKey -}}
{{- $_ := set $tls "client_ca_file" (printf "%s/client-ca.crt" $dir) -}}
{{- end -}}
{{- toYaml $tls -}}
{{- end -}}

{{- define "tokenline.grpcTlsVolume" -}}
{{- if and .Values.grpc.tls.secretName (include "tokenline.grpcTlsOn" .) -}}
- name: grpc-tls
  secret:
    secretName: {{ .Values.grpc.tls.secretName }}
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      {{- with .Values.grpc.tls.clientCaKey }}
      - key: {{ . }}
        path: client-ca.crt
      {{- end }}
{{- end -}}
{{- end -}}

{{- define "tokenline.grpcTlsMount" -}}
{{- if .Values.grpc.tls.secretName -}}
- name: grpc-tls
  mountPath: {{ include "tokenline.grpcTlsDir" . }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* Number of worker pods (both groups): with grpc_ingress replica, one ingress replica each. */}}
{{- define "tokenline.workerPods" -}}
{{- add (int .Values.cpuWorkers.replicas) (int .Values.gpuWorkers.replicas) -}}
{{- end -}}

{{/* The Serve config file (same schema as cluster/serve-config.yaml), as YAML.
     grpc_ingress replica: Serve runs no proxy (proxy_location Disabled) and gets no
     grpc_options (its gRPC listeners would share grpc.port with the ingress replicas'
     servers); the ingress deployment runs one replica on every worker pod, so that every
     worker pod answers on grpc.port: num_replicas = worker pods, max_replicas_per_node 1
     (Ray Serve's per-deployment limit of replicas per node). Ingress replicas need CPUs to
     stay off the head, which advertises none (head.rayStartParams num-cpus "0"). */}}
{{- define "tokenline.serveConfig" -}}
{{- $mode := include "tokenline.grpcIngress" . -}}
{{- $args := deepCopy .Values.serve.app -}}
{{- $_ := set $args "app_name" .Values.serve.appName -}}
{{- $_ := set $args "grpc_port" (int .Values.grpc.port) -}}
{{- $_ := set $args "grpc_ingress" $mode -}}
{{- $_ := set $args "redis_url" (include "tokenline.redisUrl" .) -}}
{{- if and (include "tokenline.grpcTlsOn" .) .Values.grpc.tls.secretName -}}
{{- $_ := set $args "tls" (include "tokenline.grpcTlsArgs" . | fromYaml) -}}
{{- else if not $args.tls -}}
{{- $_ := unset $args "tls" -}}
{{- end -}}
{{- $deployments := list -}}
{{- range $name := list "ingress" "tokenizer" "detokenizer" -}}
{{- $frontend := index $.Values.serve.frontend $name -}}
{{- $deployment := dict "name" $name "num_replicas" (int $frontend.replicas) "ray_actor_options" (dict "num_cpus" $frontend.cpus) -}}
{{- if and (eq $name "ingress") (eq $mode "replica") -}}
{{- $pods := include "tokenline.workerPods" $ | int -}}
{{- if lt $pods 1 -}}
{{- fail "serve.app.grpc_ingress replica runs one ingress replica per worker pod: cpuWorkers.replicas + gpuWorkers.replicas must be at least 1" -}}
{{- end -}}
{{- if le (float64 $frontend.cpus) 0.0 -}}
{{- fail "serve.frontend.ingress.cpus must be above 0 with serve.app.grpc_ingress replica: it keeps the ingress replicas off the head (num-cpus 0), one on every worker pod" -}}
{{- end -}}
{{- $_ := set $deployment "num_replicas" $pods -}}
{{- $_ := set $deployment "max_replicas_per_node" 1 -}}
{{- end -}}
{{- $deployments = append $deployments $deployment -}}
{{- end -}}
{{- $application := dict "name" .Values.serve.appName "import_path" "services.app:build_app" "route_prefix" "/" "args" $args "deployments" $deployments -}}
{{- $logging := dict "encoding" "JSON" "log_level" .Values.serve.logLevel -}}
{{- $config := dict "logging_config" $logging "applications" (list $application) -}}
{{- if eq $mode "replica" -}}
{{- $_ := set $config "proxy_location" "Disabled" -}}
{{- else -}}
{{- $grpc := dict "port" (int .Values.grpc.port) "grpc_servicer_functions" (list "services.ingress.registration.add_generation_servicer" "services.ingress.registration.add_health_servicer") -}}
{{- $_ := set $config "proxy_location" "EveryNode" -}}
{{- $_ := set $config "http_options" (dict "host" "0.0.0.0" "port" 8000) -}}
{{- $_ := set $config "grpc_options" $grpc -}}
{{- end -}}
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
  {{- with include "tokenline.grpcTlsVolume" . }}
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
  {{- with include "tokenline.grpcTlsMount" . }}
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
     services.server.serve_environment sets for `tokenline serve`). "haproxy" (default):
     every ingress replica serves gRPC itself from grpc.port+1 on, and HAProxy, which Serve
     starts in every Ray pod, listens on grpc.port. "proxy": Serve's Python gRPC proxy.
     "replica": the ingress replicas' own servers on grpc.port; Serve's direct ingress and
     HAProxy stay off. The first three are Serve's request path between deployments, in every
     mode (services.server.SERVE_REQUEST_PATH_ENV); the fourth keeps one copy of each replica
     log line, in Serve's files under /tmp/ray (services.server.SERVE_LOG_ENV); the next two let
     Ray's log monitor list the log directory every 2 s instead of every 0.1 s
     (services.server.RAY_LOG_MONITOR_ENV); the two after slow Serve's controller loop from 0.1
     to 0.5 s and its own metrics flush from 0.1 to 1 s (services.server.SERVE_BACKGROUND_ENV). */}}
{{- define "tokenline.ingressEnv" -}}
{{- $mode := include "tokenline.grpcIngress" . -}}
{{- $port := int .Values.grpc.port -}}
- name: RAY_SERVE_USE_GRPC_BY_DEFAULT
  value: "1"
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: "0"
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: "0"
- name: RAY_SERVE_LOG_TO_STDERR
  value: "0"
- name: RAY_LOG_MONITOR_MANY_FILES_THRESHOLD
  value: "0"
- name: LOG_NAME_UPDATE_INTERVAL_S
  value: "2"
- name: RAY_SERVE_CONTROL_LOOP_INTERVAL_S
  value: "0.5"
- name: RAY_SERVE_METRICS_EXPORT_INTERVAL_MS
  value: "1000"
{{- if or (eq $mode "proxy") (eq $mode "replica") }}
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
