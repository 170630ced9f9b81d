{{- /*
The EPP's EndpointPickerConfig with an engine mapping for kiln. Format: llm-d/llm-d-router (commit
ebab687927f5331c1b39defcb579a07951bce56c) pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go
(engineConfigParams: queuedRequestsSpec, runningRequestsSpec, kvUsageSpec, cacheInfoSpec and its label
names; built-in mappings for vllm, sglang, trtllm-serve, triton*) and README.md beside it; the plugin list
and profile weights are config/charts/routerlib/templates/_config.yaml's default. kiln's metrics have vLLM's
meaning under the kiln: prefix (server/metrics.py); kiln has no LoRA, so loraSpec stays empty. Pods carry
llm-d.ai/engine-type: kiln, and kiln is also the default for unlabeled pods of the pool.
*/}}
{{- define "kiln.eppConfig" -}}
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: queue-scorer
  - type: kv-cache-utilization-scorer
  - type: prefix-cache-scorer
  - type: metrics-data-source
    parameters:
      scheme: http
      path: /metrics
  - type: core-metrics-extractor
    parameters:
      engineLabelKey: llm-d.ai/engine-type
      defaultEngine: {{ .Values.engineTypeLabel }}
      engineConfigs:
        - name: {{ .Values.engineTypeLabel }}
          queuedRequestsSpec: "kiln:num_requests_waiting"
          runningRequestsSpec: "kiln:num_requests_running"
          kvUsageSpec: "kiln:kv_cache_usage_perc"
          loraSpec: ""
          cacheInfoSpec: "kiln:cache_config_info"
          cacheBlockSizeLabelName: block_size
          cacheNumBlocksLabelName: num_gpu_blocks
schedulingProfiles:
  - name: default
    plugins:
      - pluginRef: queue-scorer
        weight: 2
      - pluginRef: kv-cache-utilization-scorer
        weight: 2
      - pluginRef: prefix-cache-scorer
        weight: 3
{{- end }}
