{{/* The pool's name: inferencePool.name, else the release name. */}}
{{- define "epp.poolName" -}}
{{- default .Release.Name .Values.inferencePool.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name of the Deployment, Service, ServiceAccount and Role: <pool>-epp. */}}
{{- define "epp.name" -}}
{{- include "epp.poolName" . | trunc 59 | trimSuffix "-" -}}-epp
{{- end -}}

{{/* Name of cluster-scoped objects (ClusterRole/Binding): unique per release and namespace. */}}
{{- define "epp.clusterName" -}}
{{- printf "%s-%s" (include "epp.name" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* API group of the pool, from inferencePool.apiVersion (checked here). */}}
{{- define "epp.poolGroup" -}}
{{- $v := .Values.inferencePool.apiVersion -}}
{{- if not (has $v (list "inference.networking.k8s.io/v1" "inference.networking.x-k8s.io/v1alpha2")) -}}
{{- fail (printf "inferencePool.apiVersion must be inference.networking.k8s.io/v1 or inference.networking.x-k8s.io/v1alpha2, got %q" $v) -}}
{{- end -}}
{{- (split "/" $v)._0 -}}
{{- end -}}

{{/* "true" when the chart creates an InferencePool object: inferencePool.create (ours) when set,
else the reference's inferenceExtension.endpointsServer.createInferencePool (default true). */}}
{{- define "epp.createPool" -}}
{{- $create := .Values.inferencePool.create -}}
{{- if kindIs "invalid" $create -}}
{{- $es := .Values.inferenceExtension.endpointsServer | default dict -}}
{{- $create = ternary true $es.createInferencePool (kindIs "invalid" $es.createInferencePool) -}}
{{- end -}}
{{- if $create }}true{{ end -}}
{{- end -}}

{{/* "true" when Envoy runs in the picker's pod (the built-in one, or a sidecar given in full). */}}
{{- define "epp.envoyInPod" -}}
{{- if .Values.inferenceExtension.sidecar.enabled }}true{{ end -}}
{{- end -}}

{{/* Checks the reference chart also makes, with its messages. */}}
{{- define "epp.validate" -}}
{{- $pool := .Values.inferencePool -}}
{{- $es := .Values.inferenceExtension.endpointsServer | default dict -}}
{{- if include "epp.createPool" . -}}
{{- if or (empty $pool.modelServers) (not $pool.modelServers.matchLabels) -}}
{{- fail ".Values.inferencePool.modelServers.matchLabels is required" -}}
{{- end -}}
{{- else if not (include "epp.selectorFlag" .) -}}
{{- fail "inferenceExtension.endpointsServer.endpointSelector (or inferencePool.modelServers.matchLabels) is required when no InferencePool is created" -}}
{{- end -}}
{{- if and (include "epp.envoyInPod" .) (not .Values.inferenceExtension.sidecar.image) (ne (int .Values.inferenceExtension.extProcPort) 9002) -}}
{{- fail "inferenceExtension.extProcPort must be 9002 with the built-in Envoy sidecar (its config calls 127.0.0.1:9002)" -}}
{{- end -}}
{{- if not (has (include "epp.serverType" .) (list "vllm" "sglang" "triton-tensorrt-llm" "trtllm-serve")) -}}
{{- fail (printf "inferencePool.modelServerType must be vllm, sglang, trtllm-serve or triton-tensorrt-llm, got %q" (include "epp.serverType" .)) -}}
{{- end -}}
{{- if not (has $pool.modelServerProtocol (list "http" "grpc")) -}}
{{- fail (printf "inferencePool.modelServerProtocol must be http or grpc, got %q" $pool.modelServerProtocol) -}}
{{- end -}}
{{- if and (not (include "epp.envoyInPod" .)) .Values.inferenceExtension.networkPolicy.enabled (empty .Values.inferenceExtension.networkPolicy.gatewayPeers) -}}
{{- fail "inferenceExtension.networkPolicy.gatewayPeers must name the proxy's pods when no Envoy runs in the picker's pod (else nothing may call ext_proc)" -}}
{{- end -}}
{{- end -}}

{{/* "true" when leader election is on: more than one replica, as the reference (not with haMode active-active). */}}
{{- define "epp.leaderElection" -}}
{{- $aa := eq (default "leader" .Values.inferenceExtension.haMode) "active-active" -}}
{{- if and (gt (int .Values.inferenceExtension.replicas) 1) (not $aa) -}}true{{- end -}}
{{- end -}}

{{/* The probes' gRPC health services: the reference asks `inference-extension` unless leader election is on. */}}
{{- define "epp.livenessService" -}}
{{- if include "epp.leaderElection" . }}liveness{{ else }}inference-extension{{ end -}}
{{- end -}}
{{- define "epp.readinessService" -}}
{{- if include "epp.leaderElection" . }}readiness{{ else }}inference-extension{{ end -}}
{{- end -}}

{{/* FailOpen | FailClose: inferencePool.failureMode (older key) over inferenceExtension.failureMode. */}}
{{- define "epp.failureMode" -}}
{{- $m := default .Values.inferenceExtension.failureMode .Values.inferencePool.failureMode -}}
{{- if not (has $m (list "FailOpen" "FailClose")) -}}
{{- fail (printf "failureMode must be FailOpen or FailClose, got %q" $m) -}}
{{- end -}}
{{- $m -}}
{{- end -}}

{{/* The pool's appProtocol: inferencePool.appProtocol, else from modelServerProtocol. */}}
{{- define "epp.appProtocol" -}}
{{- $p := .Values.inferencePool -}}
{{- if $p.appProtocol -}}{{ $p.appProtocol }}{{- else if eq $p.modelServerProtocol "grpc" -}}kubernetes.io/h2c{{- else -}}http{{- end -}}
{{- end -}}

{{/* Request parser plugin type: vllm over gRPC needs vllmgrpc-parser; else inferencePool.parser (may be empty). */}}
{{- define "epp.parserType" -}}
{{- $p := .Values.inferencePool -}}
{{- if and (eq (include "epp.serverType" .) "vllm") (eq $p.modelServerProtocol "grpc") -}}vllmgrpc-parser{{- else -}}{{ $p.parser }}{{- end -}}
{{- end -}}

{{/* The model servers' engine: vllm | sglang | triton-tensorrt-llm | trtllm-serve. */}}
{{- define "epp.serverType" -}}
{{- $es := .Values.inferenceExtension.endpointsServer | default dict -}}
{{- if and (not (include "epp.createPool" .)) $es.modelServerType -}}
{{- $es.modelServerType -}}
{{- else -}}
{{- .Values.inferencePool.modelServerType -}}
{{- end -}}
{{- end -}}

{{- define "epp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "epp.labels" -}}
{{ include "epp.selectorLabels" . }}
app.kubernetes.io/component: standalone-gateway
app.kubernetes.io/part-of: {{ include "epp.poolName" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* registry/repository:tag (hub/name: older spellings); tag defaults to the chart's appVersion. */}}
{{- define "epp.image" -}}
{{- $img := .Values.inferenceExtension.image -}}
{{- $registry := default $img.hub $img.registry -}}
{{- $repository := default $img.name $img.repository -}}
{{- $tag := default .Chart.AppVersion $img.tag -}}
{{- if $registry -}}{{ $registry }}/{{ end -}}{{ required "inferenceExtension.image.repository is required" $repository }}:{{ $tag }}
{{- end -}}

{{/* Secret holding the picker's serving certificate ("" = self-signed). */}}
{{- define "epp.tlsSecret" -}}
{{- $tls := .Values.inferenceExtension.tls -}}
{{- if $tls.secretName -}}{{ $tls.secretName }}{{- else if $tls.certManager.enabled -}}{{ include "epp.name" . }}-tls{{- end -}}
{{- end -}}

{{/*
The default EndpointPickerConfig, shaped as the reference chart's default-plugins.yaml: the three
scorers of the default profile (the max-score picker is implied), the metrics data source with
metricsDataSource's values, the core metrics extractor told the pool's engine, and a parser when
modelServerProtocol / inferencePool.parser asks for one.
*/}}
{{- define "epp.defaultPluginsConfig" -}}
{{- $ds := .Values.inferenceExtension.metricsDataSource -}}
{{- $type := include "epp.serverType" . -}}
{{- $parser := include "epp.parserType" . -}}
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: prefix-cache-scorer
  - type: metrics-data-source
    parameters:
      scheme: {{ $ds.scheme | quote }}
      path: {{ $ds.path | quote }}
      insecureSkipVerify: {{ $ds.insecureSkipVerify }}
  - type: core-metrics-extractor
    {{- if ne $type "vllm" }}
    parameters:
      defaultEngine: {{ $type | quote }}
    {{- end }}
  {{- if $parser }}
  - type: {{ $parser }}
  {{- end }}
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 2
      - pluginRef: kv-cache-utilization-scorer
        weight: 2
      - pluginRef: prefix-cache-scorer
        weight: 3
{{- if $parser }}
parser:
  pluginRef: {{ $parser }}
{{- end }}
{{- end -}}

{{/*
Metric-name flags per modelServerType, as the reference chart renders them (without its literal
quote characters). --cache-info-metric is left out: the picker's engine table already reads each
engine's block size / count (including gauges the reference's names miss).
*/}}
{{- define "epp.metricFlags" -}}
{{- $t := include "epp.serverType" . -}}
{{- if eq $t "sglang" }}
- --total-queued-requests-metric=sglang:num_queue_reqs
- --total-running-requests-metric=sglang:num_running_reqs
- --kv-cache-usage-percentage-metric=sglang:token_usage
{{- else if eq $t "triton-tensorrt-llm" }}
- --total-queued-requests-metric
- nv_trt_llm_request_metrics{request_type=waiting}
- --total-running-requests-metric
- nv_trt_llm_request_metrics{request_type=scheduled}
- --kv-cache-usage-percentage-metric
- nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}
- --lora-info-metric
- ""
{{- else if eq $t "trtllm-serve" }}
- --total-queued-requests-metric=trtllm_num_requests_waiting
- --total-running-requests-metric=trtllm_num_requests_running
- --kv-cache-usage-percentage-metric=trtllm_kv_cache_utilization
- --model-server-metrics-path=/prometheus/metrics
- --lora-info-metric
- ""
{{- end }}
{{- end -}}

{{/* Picker flags from values: each name: value becomes --name=value (a list of {name, value} too). */}}
{{- define "epp.extraFlags" -}}
{{- $flags := .Values.inferenceExtension.flags -}}
{{- if kindIs "map" $flags -}}
{{- range $k, $v := $flags }}
- {{ printf "--%s=%v" $k $v | quote }}
{{- end -}}
{{- else -}}
{{- range $flags }}
- {{ printf "--%s=%v" .name .value | quote }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The args after the pool's identity, in the reference chart's order: metric flags, log encoder,
config file, leader election, values flags, tracing, metrics auth; then this chart's own (ports,
serving TLS).
*/}}
{{- define "epp.commonArgs" -}}
{{- $ext := .Values.inferenceExtension -}}
{{- include "epp.metricFlags" . }}
- --zap-encoder
- json
- --config-file
- {{ printf "/config/%s" $ext.pluginsConfigFile | quote }}
{{- if include "epp.leaderElection" . }}
- --ha-enable-leader-election
{{- end }}
{{- if eq (default "leader" $ext.haMode) "active-active" }}
- --ha-mode
- active-active
{{- end }}
{{- with $ext.peers }}{{- if .enabled }}
{{- if ne (default "leader" $ext.haMode) "active-active" }}
{{- fail "inferenceExtension.peers needs haMode: active-active" }}
{{- end }}
{{- if not (include "epp.sessionKeySecret" $) }}
{{- fail "inferenceExtension.peers needs sessionKey.enabled (the replicas sign their messages with it)" }}
{{- end }}
- --ha-peers
- {{ printf "%s-peers.%s.svc:%d" (include "epp.name" $) $.Release.Namespace (int (default 9005 .port)) | quote }}
- --ha-peer-port
- {{ default 9005 .port | int | quote }}
{{- end }}{{- end }}
{{- $workers := toString (default "" $ext.workers) }}
{{- if ne $workers "" }}
{{- if and (ne $workers "1") (include "epp.leaderElection" .) }}
{{- fail "inferenceExtension.workers above 1 needs haMode: active-active or one replica (leader election runs one Lease per process)" }}
{{- end }}
- --workers
- {{ $workers | quote }}
{{- end }}
{{- include "epp.extraFlags" . }}
- --tracing={{ if $ext.tracing.enabled }}true{{ else }}false{{ end }}
{{- if not $ext.monitoring.prometheus.auth.enabled }}
- --metrics-endpoint-auth=false
{{- end }}
{{- end -}}

{{/* The OpenTelemetry environment the reference sets when tracing is on. */}}
{{- define "epp.tracingEnv" -}}
{{- $tr := .Values.inferenceExtension.tracing -}}
{{- if $tr.enabled }}
- name: OTEL_SERVICE_NAME
  value: gateway-api-inference-extension/epp
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $tr.otelExporterEndpoint | quote }}
- name: OTEL_TRACES_EXPORTER
  value: otlp
- name: OTEL_RESOURCE_ATTRIBUTES_NODE_NAME
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: spec.nodeName
- name: OTEL_RESOURCE_ATTRIBUTES_POD_NAME
  valueFrom:
    fieldRef:
      apiVersion: v1
      fieldPath: metadata.name
- name: OTEL_RESOURCE_ATTRIBUTES
  value: k8s.namespace.name=$(NAMESPACE),k8s.node.name=$(OTEL_RESOURCE_ATTRIBUTES_NODE_NAME),k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME)
- name: OTEL_TRACES_SAMPLER
  value: {{ $tr.sampling.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $tr.sampling.samplerArg | quote }}
{{- end }}
{{- end -}}

{{/* A sidecar container given in full in values (the reference's inferenceExtension.sidecar). */}}
{{- define "epp.sidecarContainer" -}}
{{- $sc := .Values.inferenceExtension.sidecar -}}
- name: {{ required "inferenceExtension.sidecar.name is required" $sc.name }}
  image: {{ required "inferenceExtension.sidecar.image is required" $sc.image }}
  imagePullPolicy: {{ default "IfNotPresent" $sc.imagePullPolicy }}
  {{- with $sc.command }}
  command: [{{ . | quote }}]
  {{- end }}
  {{- with $sc.args }}
  args:
    {{- range . }}
    - {{ . | quote }}
    {{- end }}
  {{- end }}
  {{- with $sc.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.ports }}
  ports:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.securityContext | default .Values.inferenceExtension.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $sc.volumeMounts }}
  volumeMounts:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The built-in Envoy config from files/ (generated by generate.py from epp/envoyconf.py). */}}
{{- define "epp.envoyConfigFile" -}}
{{- $p := .Values.envoy.profile -}}
{{- if not (has $p (list "duplex" "buffered" "lean")) -}}
{{- fail (printf "envoy.profile must be duplex, buffered or lean, got %q" $p) -}}
{{- end -}}
{{- printf "files/envoy-%s-%s.yaml" $p (ternary "tls" "plain" .Values.envoy.pickerTLS) -}}
{{- end -}}

{{/* --endpoint-selector value: endpointsServer.endpointSelector, else k=v,... from modelServers.matchLabels (sorted). */}}
{{- define "epp.selectorFlag" -}}
{{- $es := .Values.inferenceExtension.endpointsServer | default dict -}}
{{- if $es.endpointSelector -}}
{{- $es.endpointSelector -}}
{{- else -}}
{{- $parts := list -}}
{{- range $k, $v := (.Values.inferencePool.modelServers | default dict).matchLabels -}}
{{- $parts = append $parts (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}
{{- end -}}

{{/* --endpoint-target-ports value: endpointsServer.targetPorts with endpointSelector, else inferencePool.targetPorts. */}}
{{- define "epp.portsFlag" -}}
{{- $es := .Values.inferenceExtension.endpointsServer | default dict -}}
{{- if and $es.endpointSelector $es.targetPorts -}}
{{- $es.targetPorts -}}
{{- else -}}
{{- $parts := list -}}
{{- range .Values.inferencePool.targetPorts -}}
{{- $parts = append $parts (printf "%d" (int .number)) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}
{{- end -}}

{{/* Does the picker speak TLS on ext_proc: the built-in Envoy's choice (envoy.pickerTLS), else secureServing. */}}
{{- define "epp.secureServing" -}}
{{- if and (include "epp.envoyInPod" .) (not .Values.inferenceExtension.sidecar.image) -}}
{{- if .Values.envoy.pickerTLS }}true{{ end -}}
{{- else -}}
{{- if .Values.inferenceExtension.secureServing }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* The value of picker flag `name` in inferenceExtension.flags (map or {name, value} list; the last
entry of a list wins, as on a command line); "" when not given. Call with (dict "ctx" . "name" N). */}}
{{- define "epp.flagValue" -}}
{{- $flags := .ctx.Values.inferenceExtension.flags -}}
{{- $v := "" -}}
{{- if kindIs "map" $flags -}}
{{- if hasKey $flags .name }}{{ $v = toString (index $flags .name) }}{{ end -}}
{{- else -}}
{{- range $flags }}{{ if eq (toString .name) $.name }}{{ $v = toString .value }}{{ end }}{{ end -}}
{{- end -}}
{{- $v -}}
{{- end -}}

{{/* Seconds in a duration as the picker's flags take it (250ms, 30s, 1m30s, or plain seconds); a
malformed one fails the render. Call with (dict "name" FLAG "text" VALUE). */}}
{{- define "epp.durationSeconds" -}}
{{- $t := trim .text -}}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 -}}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)?$" $t -}}
{{- float64 $t -}}
{{- else if regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$" $t -}}
{{- $total := 0.0 -}}
{{- range regexFindAll "[0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h)" $t -1 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" . -}}
{{- $total = addf $total (mulf (float64 $num) (get $units (trimPrefix $num .))) -}}
{{- end -}}
{{- $total -}}
{{- else -}}
{{- fail (printf "inferenceExtension.flags.%s: invalid duration %q (use e.g. 30s, 1m30s)" .name $t) -}}
{{- end -}}
{{- end -}}

{{/* The picker's drain + grace in seconds: --drain-timeout then --shutdown-grace (30 s each unless
inferenceExtension.flags sets them), as it spends them after SIGTERM. */}}
{{- define "epp.shutdownSeconds" -}}
{{- $drain := default "30s" (include "epp.flagValue" (dict "ctx" . "name" "drain-timeout")) -}}
{{- $grace := default "30s" (include "epp.flagValue" (dict "ctx" . "name" "shutdown-grace")) -}}
{{- addf (include "epp.durationSeconds" (dict "name" "drain-timeout" "text" $drain)) (include "epp.durationSeconds" (dict "name" "shutdown-grace" "text" $grace)) -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: the value when set, else drain + grace + 5 s, so the kubelet's
SIGKILL never comes before the picker has let its open streams finish. */}}
{{- define "epp.terminationGrace" -}}
{{- $set := .Values.inferenceExtension.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $set -}}
{{- add (max (int (ceil (include "epp.shutdownSeconds" .))) (int (include "epp.envoyPreStopSeconds" .))) 5 -}}
{{- else -}}
{{- int $set -}}
{{- end -}}
{{- end -}}

{{/* The ext_proc listener's address (--grpc-bind-address): inferenceExtension.extProcBindAddress, else
127.0.0.1 when Envoy runs in the pod and no proxy outside it is admitted (networkPolicy.gatewayPeers
empty), so nothing off the pod can open an ext_proc stream; "" = the picker's --bind-address. */}}
{{- define "epp.grpcBindAddress" -}}
{{- $ext := .Values.inferenceExtension -}}
{{- if $ext.extProcBindAddress -}}
{{- $ext.extProcBindAddress -}}
{{- else if and (include "epp.envoyInPod" .) (empty $ext.networkPolicy.gatewayPeers) -}}
127.0.0.1
{{- end -}}
{{- end -}}

{{/* Seconds the built-in Envoy waits in its preStop hook before it gets SIGTERM: envoy.preStopSleepSeconds,
else the picker's drain + grace (rounded up), with no hook (0) when no built-in Envoy runs. Envoy exits at
once on SIGTERM, cutting the streams it carries; held back, it keeps them (and late arrivals the picker
still routes while it drains) until the picker is done. */}}
{{- define "epp.envoyPreStopSeconds" -}}
{{- $set := .Values.envoy.preStopSleepSeconds -}}
{{- if not (and (include "epp.envoyInPod" .) (not .Values.inferenceExtension.sidecar.image)) -}}
0
{{- else if kindIs "invalid" $set -}}
{{- int (ceil (include "epp.shutdownSeconds" .)) -}}
{{- else -}}
{{- int $set -}}
{{- end -}}
{{- end -}}

{{/* (ours) The Secret holding the session-token key: sessionKey.secretName, else the chart's own
(<name>-session-key); "" when sessionKey.enabled is false (each process then makes a random key). */}}
{{- define "epp.sessionKeySecret" -}}
{{- $sk := .Values.inferenceExtension.sessionKey -}}
{{- if $sk.enabled -}}{{ default (printf "%s-session-key" (include "epp.name" .)) $sk.secretName }}{{- end -}}
{{- end -}}

{{/* (ours) The CA Secret the built-in Envoy checks the picker's certificate against
(envoy.verifyPicker.caSecretName, else the picker's serving Secret: cert-manager writes its ca.crt);
"" when envoy.verifyPicker.enabled is false. Fails where there is nothing to verify. */}}
{{- define "epp.pickerCASecret" -}}
{{- $v := .Values.envoy.verifyPicker | default dict -}}
{{- if $v.enabled -}}
{{- if not (and (include "epp.envoyInPod" .) (not .Values.inferenceExtension.sidecar.image)) -}}
{{- fail "envoy.verifyPicker applies to the built-in Envoy (inferenceExtension.sidecar.enabled without an image)" -}}
{{- end -}}
{{- if not .Values.envoy.pickerTLS -}}
{{- fail "envoy.verifyPicker needs envoy.pickerTLS (a plaintext picker has no certificate to check)" -}}
{{- end -}}
{{- if not (include "epp.tlsSecret" .) -}}
{{- fail "envoy.verifyPicker needs the picker to serve a CA-issued certificate: set inferenceExtension.tls.secretName or tls.certManager.enabled (its own certificate is self-signed)" -}}
{{- end -}}
{{- default (include "epp.tlsSecret" .) $v.caSecretName -}}
{{- else if $v.clientCertSecretName -}}
{{- fail "envoy.verifyPicker.clientCertSecretName needs envoy.verifyPicker.enabled (Envoy presents its certificate only to a picker it has verified)" -}}
{{- end -}}
{{- end -}}

{{/* (ours) The picker's client CA Secret (inferenceExtension.tls.clientCA.secretName: --client-ca-file), ""
when unset. With the built-in Envoy that Envoy must present a certificate: envoy.verifyPicker.clientCertSecretName. */}}
{{- define "epp.clientCASecret" -}}
{{- $ca := .Values.inferenceExtension.tls.clientCA | default dict -}}
{{- if $ca.secretName -}}
{{- if not (include "epp.secureServing" .) -}}
{{- fail "inferenceExtension.tls.clientCA needs TLS on ext_proc (envoy.pickerTLS / secureServing): mutual TLS is TLS" -}}
{{- end -}}
{{- $builtin := and (include "epp.envoyInPod" .) (not .Values.inferenceExtension.sidecar.image) -}}
{{- if and $builtin (not (.Values.envoy.verifyPicker | default dict).clientCertSecretName) -}}
{{- fail "inferenceExtension.tls.clientCA: the built-in Envoy needs a client certificate for the picker (envoy.verifyPicker.clientCertSecretName)" -}}
{{- end -}}
{{- $ca.secretName -}}
{{- end -}}
{{- end -}}

{{/* (ours) The built-in Envoy's config: the generated file as is, or, with envoy.verifyPicker or
envoy.allowClientHeaders, that file with the same changes envoyconf makes for --epp-ca-file/--epp-san
and --allow-client-header (tests/deploy/test_chart_security.py compares the two). */}}
{{- define "epp.envoyConfig" -}}
{{- $file := include "epp.envoyConfigFile" . -}}
{{- $text := .Files.Get $file -}}
{{- $allow := .Values.envoy.allowClientHeaders | default list -}}
{{- $caSecret := include "epp.pickerCASecret" . -}}
{{- if or $allow $caSecret -}}
{{- $cfg := $text | fromYaml -}}
{{- if $allow -}}
{{- $hcm := (index (index (index $cfg.static_resources.listeners 0).filter_chains 0).filters 0).typed_config -}}
{{- $mutation := (index $hcm.early_header_mutation_extensions 0).typed_config -}}
{{- $kept := list -}}
{{- range $mutation.mutations -}}
{{- if not (has .remove $allow) }}{{ $kept = append $kept . }}{{ end -}}
{{- end -}}
{{- $_ := set $mutation "mutations" $kept -}}
{{- end -}}
{{- if $caSecret -}}
{{- $sans := .Values.envoy.verifyPicker.sans | default (list (printf "%s.%s.svc" (include "epp.name" .) .Release.Namespace)) -}}
{{- $matchers := list -}}
{{- range $sans -}}
{{- $type := ternary "IP_ADDRESS" "DNS" (or (regexMatch "^[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+$" .) (contains ":" .)) -}}
{{- $matchers = append $matchers (dict "san_type" $type "matcher" (dict "exact" .)) -}}
{{- end -}}
{{- range $cfg.static_resources.clusters -}}
{{- if hasPrefix "epp." .name -}}
{{- $ctx := .transport_socket.typed_config.common_tls_context -}}
{{- $_ := set $ctx "validation_context" (dict "trusted_ca" (dict "filename" "/etc/envoy/picker-ca/ca.crt") "match_typed_subject_alt_names" $matchers) -}}
{{- if $.Values.envoy.verifyPicker.clientCertSecretName -}}
{{- $_ := set $ctx "tls_certificates" (list (dict "certificate_chain" (dict "filename" "/etc/envoy/picker-client/tls.crt") "private_key" (dict "filename" "/etc/envoy/picker-client/tls.key"))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- printf "# From %s (generated by generate.py from epp/envoyconf.py), with envoy.verifyPicker / envoy.allowClientHeaders applied by the chart.\n" $file -}}
{{- toYaml $cfg -}}
{{- else -}}
{{- $text -}}
{{- end -}}
{{- end -}}

{{/* (ours) The peers' headless Service (inferenceExtension.peers): every replica's address, ready or not. */}}
{{- define "epp.peersService" -}}
{{- $ext := .Values.inferenceExtension -}}
{{- if and $ext.peers $ext.peers.enabled }}
---
# (ours) active-active replicas find each other through this name (--ha-peers): one address per pod
apiVersion: v1
kind: Service
metadata:
  name: {{ include "epp.name" . }}-peers
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "epp.labels" . | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "epp.selectorLabels" . | nindent 4 }}
  ports:
    - name: peers
      port: {{ int (default 9005 $ext.peers.port) }}
      targetPort: peers
      protocol: TCP
{{- end }}
{{- end -}}
