{{/* The pool's name: inferencePool.name, else the release name. */}}
{{- define "epp.poolName" -}}
{{- default .Release.Name .Values.inferencePool.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The picker's name (Deployment, Service, ServiceAccount, Role): <pool>-epp. */}}
{{- define "epp.name" -}}
{{- include "epp.poolName" . | trunc 59 | trimSuffix "-" -}}-epp
{{- end -}}

{{/* API group of the pool, from inferencePool.apiVersion (checked here). */}}
{{- define "epp.poolGroup" -}}
{{- $v := .Values.inferencePool.apiVersion -}}
{{- if not (has $v (list "inference.networking.k8s.io/v1" "inference.networking.x-k8s.io/v1alpha2")) -}}
{{- fail (printf "inferencePool.apiVersion must be inference.networking.k8s.io/v1 or inference.networking.x-k8s.io/v1alpha2, got %q" $v) -}}
{{- end -}}
{{- (split "/" $v)._0 -}}
{{- end -}}

{{/* "true" when leader election is on: asked for, or more than one replica. */}}
{{- define "epp.leaderElection" -}}
{{- if or .Values.inferenceExtension.enableLeaderElection (gt (int .Values.inferenceExtension.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{- define "epp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "epp.labels" -}}
{{ include "epp.selectorLabels" . }}
app.kubernetes.io/component: endpoint-picker
app.kubernetes.io/part-of: {{ include "epp.poolName" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "epp.image" -}}
{{- $img := .Values.inferenceExtension.image -}}
{{- $tag := default .Chart.AppVersion $img.tag -}}
{{- if $img.hub -}}{{ $img.hub }}/{{ end -}}{{ $img.name }}:{{ $tag }}
{{- end -}}

{{/*
Metric names for model servers without an engine-type label. The picker reads vLLM names for such
pods; for another modelServerType the chart points the picker's default (vllm) entry at that
engine's names through the EndpointPickerConfig `engineMetrics` section. tests/deploy checks these
against epp/metrics/engines.py.
*/}}
{{- define "epp.engineMetrics" -}}
{{- $t := .Values.inferencePool.modelServerType -}}
{{- if eq $t "sglang" -}}
waiting: "sglang:num_queue_reqs"
running: "sglang:num_running_reqs"
kvUsage: "sglang:token_usage"
blockSize: {name: "sglang:cache_config_info", label: page_size}
numBlocks: {name: "sglang:cache_config_info", label: num_pages}
lora: null
{{- else if eq $t "trtllm-serve" -}}
waiting: trtllm_num_requests_waiting
running: trtllm_num_requests_running
kvUsage: trtllm_kv_cache_utilization
blockSize: trtllm_kv_cache_tokens_per_block
numBlocks: trtllm_kv_cache_max_blocks
lora: null
{{- else if eq $t "triton-tensorrt-llm" -}}
waiting: {name: nv_trt_llm_request_metrics, labels: {request_type: waiting}}
running: {name: nv_trt_llm_request_metrics, labels: {request_type: scheduled}}
kvUsage: {name: nv_trt_llm_kv_cache_block_metrics, labels: {kv_cache_block_type: fraction}}
blockSize: {name: nv_trt_llm_kv_cache_block_metrics, labels: {kv_cache_block_type: tokens_per}}
numBlocks: {name: nv_trt_llm_kv_cache_block_metrics, labels: {kv_cache_block_type: max}}
lora: null
{{- else if ne $t "vllm" -}}
{{- fail (printf "inferencePool.modelServerType must be vllm, sglang, trtllm-serve or triton-tensorrt-llm, got %q" $t) -}}
{{- end -}}
{{- end -}}

{{/* The default EndpointPickerConfig: the reference's default profile. */}}
{{- define "epp.defaultPluginsConfig" -}}
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: prefix-cache-scorer
  - type: max-score-picker
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 2
      - pluginRef: kv-cache-utilization-scorer
        weight: 2
      - pluginRef: prefix-cache-scorer
        weight: 3
      - pluginRef: max-score-picker
{{- with include "epp.engineMetrics" . }}
engineMetrics:
  vllm:
{{ . | indent 4 }}
{{- end }}
{{- end -}}

{{/* Extra flags: a map (name: value) or a list of {name, value}. */}}
{{- define "epp.extraFlags" -}}
{{- $flags := .Values.inferenceExtension.flags -}}
{{- if kindIs "map" $flags -}}
{{- range $k, $v := $flags }}
- {{ if eq (toString $v) "true" }}{{ printf "--%s" $k | quote }}{{ else }}{{ printf "--%s=%v" $k $v | quote }}{{ end }}
{{- end -}}
{{- else -}}
{{- range $flags }}
- {{ printf "--%s=%v" .name .value | quote }}
{{- end -}}
{{- end -}}
{{- end -}}
