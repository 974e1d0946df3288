{{/*
Named templates. Those an application chart includes in sidecar mode (pass `.Subcharts.headwater`):
  headwater.sidecar.container       the agent container (a list item)
  headwater.sidecar.volumes         its volumes (list items)
  headwater.sidecar.checksum        the config checksum, for a pod annotation (pods roll on change)
*/}}

{{- define "headwater.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "headwater.fullname" -}}
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

{{/* The mode, checked: every template starts from it, so a bad value fails the whole render. */}}
{{- define "headwater.mode" -}}
{{- $mode := toString (.Values.mode | default "") -}}
{{- if not (has $mode (list "daemonset" "deployment" "sidecar" "gateway")) -}}
{{- fail (printf "\n\nheadwater: `mode` is required and must be daemonset (an agent on every node), deployment (a central gateway), sidecar (templates for your app's pods) or gateway (the tier agents forward to with forward.to: gateway); got %q.\nSet it with --set mode=daemonset or in your values file." $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{- define "headwater.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headwater.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "headwater.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "headwater.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ include "headwater.mode" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "headwater.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "headwater.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespace of the gateway release the agents forward to. */}}
{{- define "headwater.gatewayNamespace" -}}
{{- .Values.forward.gatewayNamespace | default .Release.Namespace -}}
{{- end -}}

{{/* "true" when the agents find the gateways by watching EndpointSlices (forward.resolver k8s): the
     pods need the ServiceAccount token and the Role / RoleBinding of rbac.yaml. */}}
{{- define "headwater.watchesEndpointSlices" -}}
{{- and (eq (toString .Values.forward.to) "gateway") (eq (toString .Values.forward.resolver) "k8s") (has (include "headwater.mode" .) (list "daemonset" "deployment")) -}}
{{- end -}}

{{- define "headwater.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* A size such as 512Mi, 2Gi, 1G or 100M, in MiB (rounded down). */}}
{{- define "headwater.sizeMiB" -}}
{{- $s := toString . -}}
{{- $m := regexFind "^[0-9]+" $s -}}
{{- if not $m -}}{{- fail (printf "headwater: queue.sizeLimit %q is not a size like 2Gi or 512Mi" $s) -}}{{- end -}}
{{- $n := int64 $m -}}
{{- $unit := trimPrefix $m $s -}}
{{- $units := dict "Ki" 0.0009765625 "Mi" 1.0 "Gi" 1024.0 "Ti" 1048576.0 "k" 0.00095367431640625 "M" 0.95367431640625 "G" 953.67431640625 "T" 953674.31640625 -}}
{{- if not (hasKey $units $unit) -}}{{- fail (printf "headwater: queue.sizeLimit %q: use one of the units Ki, Mi, Gi, Ti, k, M, G, T" $s) -}}{{- end -}}
{{- mulf $n (get $units $unit) | floor | int64 -}}
{{- end -}}

{{/* host:port → port, or "" when the port is not a literal number (e.g. ${env:PORT}). */}}
{{- define "headwater.portOf" -}}
{{- $s := toString . -}}
{{- if regexMatch ":[0-9]+$" $s -}}{{- regexFind "[0-9]+$" $s -}}{{- end -}}
{{- end -}}

{{/*
The agent's config, as a YAML document: what the mode and the presets generate, `config` deep-merged
over it, then the pipelines (unless given) and the disk-queue sizes derived.
*/}}
{{- define "headwater.agentConfig" -}}
{{- $mode := include "headwater.mode" . -}}
{{- $bind := ternary "127.0.0.1" "0.0.0.0" (eq $mode "sidecar") -}}
{{- $p := .Values.presets -}}
{{- $receivers := dict -}}
{{- $exporters := dict -}}
{{- /* probes (kubelet) and Prometheus reach these from outside the pod: never 127.0.0.1 */ -}}
{{- $telemetry := dict "endpoint" (printf "0.0.0.0:%d" (int .Values.telemetry.port)) "log_level" .Values.telemetry.logLevel -}}
{{- /* Beyond loopback the agent requires a token for the tap, /status and /api/*: from the Secret,
     unless the user's config brings its own auth. */ -}}
{{- if not (dig "service" "telemetry" "auth" nil (.Values.config | default dict)) -}}
{{- $_ := set $telemetry "auth" (dict "bearer_token" "${env:HEADWATER_TELEMETRY_TOKEN}") -}}
{{- end -}}
{{- $diskQueue := dict "storage" "disk" "directory" "/var/lib/headwater/queue" -}}
{{- $gateway := eq $mode "gateway" -}}
{{- $fwd := .Values.forward -}}
{{- $forwarding := eq (toString $fwd.to) "gateway" -}}
{{- /* A gateway takes OTLP from the agents' loadbalancing exporter only: no StatsD preset there. */ -}}
{{- if and $p.statsd.enabled (not $gateway) -}}
{{- $s := dict "flush_interval" $p.statsd.flushInterval -}}
{{- if $p.statsd.udp }}{{ $_ := set $s "udp" (printf "%s:%d" $bind (int $p.statsd.port)) }}{{ end -}}
{{- if $p.statsd.tcp }}{{ $_ := set $s "tcp" (printf "%s:%d" $bind (int $p.statsd.port)) }}{{ end -}}
{{- if $p.statsd.unixgram }}{{ $_ := set $s "unixgram" "/var/run/headwater/dsd.socket" }}{{ end -}}
{{- if not (or $p.statsd.udp $p.statsd.tcp $p.statsd.unixgram) -}}
{{- fail "headwater: presets.statsd is enabled with no transport: enable udp, tcp or unixgram" -}}
{{- end -}}
{{- $_ := set $receivers "statsd" $s -}}
{{- end -}}
{{- if or $p.otlp.enabled $gateway -}}
{{- if and $gateway (not (or $p.otlp.grpc $p.otlp.http)) -}}{{- fail "headwater: gateway mode takes OTLP: enable presets.otlp.grpc (what the agents' loadbalancing exporter sends) or presets.otlp.http" -}}{{- end -}}
{{- $o := dict -}}
{{- $_ := set $o "grpc" (ternary (printf "%s:%d" $bind (int $p.otlp.grpcPort)) nil (eq (toString $p.otlp.grpc) "true")) -}}
{{- $_ := set $o "http" (ternary (printf "%s:%d" $bind (int $p.otlp.httpPort)) nil (eq (toString $p.otlp.http) "true")) -}}
{{- $_ := set $receivers "otlp" $o -}}
{{- end -}}
{{- if $forwarding -}}
{{- if $gateway -}}{{- fail "headwater: forward.to: gateway is for the agents (daemonset, deployment or sidecar mode); a gateway exports to the backends itself" -}}{{- end -}}
{{- if not $fwd.gatewayService -}}{{- fail "headwater: forward.to is gateway but forward.gatewayService is empty: set it to the gateway release's headless Service (<its fullname>-headless)" -}}{{- end -}}
{{- range $name := list "remoteWrite" "signoz" -}}
{{- if (get $p $name).enabled -}}{{- fail (printf "headwater: presets.%s is enabled but forward.to is gateway: the agents send everything to the gateways, which export to the backends; enable presets.%s in the gateway release and disable it here" $name $name) -}}{{- end -}}
{{- end -}}
{{- /* In-cluster plaintext to the gateways (their receiver has no TLS); the agent pod's own K8S_POD_*
     are not where the data comes from. `forward.otlp` goes over these. */ -}}
{{- $otlp := dict "tls" (dict "insecure" true) "resource_from_environment" false -}}
{{- if .Values.queue.enabled }}{{ $_ := set $otlp "sending_queue" (deepCopy $diskQueue) }}{{ end -}}
{{- $otlp = mustMergeOverwrite $otlp (deepCopy ($fwd.otlp | default dict)) -}}
{{- $resolver := dict -}}
{{- if eq (toString $fwd.resolver) "k8s" -}}
{{- if eq $mode "sidecar" -}}{{- fail "headwater: forward.resolver k8s needs the chart's ServiceAccount and its RoleBinding, which sidecar mode does not render (the application's pods have their own): use forward.resolver dns" -}}{{- end -}}
{{- if contains "." $fwd.gatewayService -}}{{- fail (printf "headwater: forward.resolver k8s watches a Service by name: forward.gatewayService must be its name, not the DNS name %q (its namespace goes in forward.gatewayNamespace)" $fwd.gatewayService) -}}{{- end -}}
{{- $_ := set $resolver "k8s" (dict "service" (printf "%s.%s" $fwd.gatewayService (include "headwater.gatewayNamespace" .)) "ports" (list (int $fwd.port)) "timeout" $fwd.resolverTimeout) -}}
{{- else -}}
{{- $host := $fwd.gatewayService -}}
{{- if not (contains "." $host) -}}
{{- $host = printf "%s.%s.svc.%s" $host (include "headwater.gatewayNamespace" .) $fwd.clusterDomain -}}
{{- end -}}
{{- $_ := set $resolver "dns" (dict "hostname" $host "port" (int $fwd.port) "interval" $fwd.resolverInterval "timeout" $fwd.resolverTimeout) -}}
{{- end -}}
{{- $_ := set $exporters "loadbalancing" (dict "routing_key" $fwd.routingKey "protocol" (dict "otlp" $otlp) "resolver" $resolver) -}}
{{- end -}}
{{- if and $p.prometheus.enabled (not $forwarding) -}}
{{- $_ := set $exporters "prometheus" (dict "endpoint" (printf "0.0.0.0:%d" (int $p.prometheus.port)) "metric_expiration" $p.prometheus.metricExpiration) -}}
{{- end -}}
{{- if $p.signoz.enabled -}}
{{- if not $p.signoz.endpoint -}}{{- fail "headwater: presets.signoz.endpoint is required (ingest.<region>.signoz.cloud:443 or your SignOz collector's host:port)" -}}{{- end -}}
{{- $e := dict "endpoint" $p.signoz.endpoint "temporality" $p.signoz.temporality "histograms" $p.signoz.histograms "tls" (dict "insecure" $p.signoz.insecure) -}}
{{- if $p.signoz.ingestionKey.existingSecret -}}
{{- $_ := set $e "headers" (dict "signoz-ingestion-key" "${env:SIGNOZ_INGESTION_KEY}") -}}
{{- else if contains "signoz.cloud" $p.signoz.endpoint -}}
{{- fail "headwater: SignOz Cloud needs an ingestion key: create a Secret with it and set presets.signoz.ingestionKey.existingSecret (and .key)" -}}
{{- end -}}
{{- if $p.signoz.deploymentEnvironment }}{{ $_ := set $e "deployment_environment" $p.signoz.deploymentEnvironment }}{{ end -}}
{{- if ne $mode "sidecar" -}}
{{- /* The agent's own pod is not where the data comes from: no K8S_POD_*, only node and cluster. */ -}}
{{- $res := dict -}}
{{- if eq $mode "daemonset" }}{{ $_ := set $res "k8s.node.name" "${env:K8S_NODE_NAME}" }}{{ end -}}
{{- if .Values.k8s.clusterName }}{{ $_ := set $res "k8s.cluster.name" .Values.k8s.clusterName }}{{ end -}}
{{- $_ := set $e "resource_from_environment" false -}}
{{- if $res }}{{ $_ := set $e "resource" $res }}{{ end -}}
{{- end -}}
{{- if .Values.queue.enabled }}{{ $_ := set $e "sending_queue" (deepCopy $diskQueue) }}{{ end -}}
{{- $_ := set $exporters "otlp/signoz" $e -}}
{{- end -}}
{{- if $p.remoteWrite.enabled -}}
{{- if not $p.remoteWrite.targets -}}{{- fail "headwater: presets.remoteWrite is enabled with no targets (each: name, url)" -}}{{- end -}}
{{- range $t := $p.remoteWrite.targets -}}
{{- if not (and $t.name $t.url) -}}{{- fail "headwater: every presets.remoteWrite.targets item needs a name and a url" -}}{{- end -}}
{{- $e := dict "endpoint" $t.url -}}
{{- if $t.headers }}{{ $_ := set $e "headers" $t.headers }}{{ end -}}
{{- if $t.externalLabels }}{{ $_ := set $e "external_labels" $t.externalLabels }}{{ end -}}
{{- if $t.tenant }}{{ $_ := set $e "tenant" $t.tenant }}{{ end -}}
{{- if $t.sendNativeHistograms }}{{ $_ := set $e "send_native_histograms" true }}{{ end -}}
{{- if and $t.bearerToken $t.bearerToken.existingSecret -}}
{{- $_ := set $e "auth" (dict "bearer_token" (printf "${env:%s}" (include "headwater.tokenEnv" $t.name))) -}}
{{- end -}}
{{- if $.Values.queue.enabled }}{{ $_ := set $e "sending_queue" (deepCopy $diskQueue) }}{{ end -}}
{{- $_ := set $exporters (printf "prometheus_remote_write/%s" $t.name) $e -}}
{{- end -}}
{{- end -}}
{{- $cfg := dict "receivers" $receivers "exporters" $exporters "service" (dict "telemetry" $telemetry) -}}
{{- $ml := $p.memoryLimiter -}}
{{- $procs := dict -}}
{{- if $ml.enabled -}}
{{- $_ := set $procs "memory_limiter" (dict "limit_percentage" (int $ml.limitPercentage) "spike_limit_percentage" (int $ml.spikeLimitPercentage)) -}}
{{- end -}}
{{- /* gateway mode: the stateful processors, in a fixed order (threshold sees the raw points). */ -}}
{{- $stateful := list -}}
{{- if $gateway -}}
{{- range $name := list "threshold" "percentiles" "aggregate" -}}
{{- $gp := get $.Values.gateway.processors $name -}}
{{- if $gp.enabled -}}
{{- $pc := deepCopy ($gp.config | default dict) -}}
{{- if and (ne $name "percentiles") (not (get $pc "rules")) -}}
{{- fail (printf "headwater: gateway.processors.%s is enabled without rules: it would do nothing; give gateway.processors.%s.config.rules (see `headwater components`) or disable it" $name $name) -}}
{{- end -}}
{{- $_ := set $procs $name $pc -}}
{{- $stateful = append $stateful $name -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $procs }}{{ $_ := set $cfg "processors" $procs }}{{ end -}}
{{- if .Values.config -}}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy .Values.config) -}}
{{- end -}}
{{- if not $cfg.receivers }}{{ fail "headwater: the agent has no receiver: enable a preset (presets.statsd, presets.otlp) or add one under config.receivers" }}{{ end -}}
{{- if not $cfg.exporters }}{{ fail "headwater: the agent has no exporter: enable a preset (prometheus, signoz, remoteWrite) or add one under config.exporters" }}{{ end -}}
{{- if not (hasKey $cfg.service "pipelines") -}}
{{- $mr := keys $cfg.receivers | sortAlpha -}}
{{- $me := keys $cfg.exporters | sortAlpha -}}
{{- $pipes := dict "metrics" (dict "receivers" $mr "exporters" $me) -}}
{{- if $stateful }}{{ $_ := set $pipes.metrics "processors" $stateful }}{{ end -}}
{{- $tr := list -}}{{- $lr := list -}}{{- $oe := list -}}
{{- range $id := $mr -}}
{{- $type := first (splitList "/" $id) -}}
{{- if eq $type "otlp" }}{{ $tr = append $tr $id }}{{ $lr = append $lr $id }}{{ end -}}
{{- if eq $type "statsd" }}{{ $lr = append $lr $id }}{{ end -}}
{{- end -}}
{{- range $id := $me -}}
{{- $type := first (splitList "/" $id) -}}
{{- if has $type (list "otlp" "otlp_http" "debug" "loadbalancing") }}{{ $oe = append $oe $id }}{{ end -}}
{{- end -}}
{{- if and $tr $oe $p.signoz.traces }}{{ $_ := set $pipes "traces" (dict "receivers" $tr "exporters" $oe) }}{{ end -}}
{{- if and $lr $oe $p.signoz.logs }}{{ $_ := set $pipes "logs" (dict "receivers" $lr "exporters" $oe) }}{{ end -}}
{{- $_ := set $cfg.service "pipelines" $pipes -}}
{{- end -}}
{{- /* The memory limiter goes first in every pipeline, the generated ones and the user's. */ -}}
{{- if $ml.enabled -}}
{{- range $id, $pl := $cfg.service.pipelines -}}
{{- $procs := get $pl "processors" | default list -}}
{{- if not (has "memory_limiter" $procs) }}{{ $_ := set $pl "processors" (prepend $procs "memory_limiter") }}{{ end -}}
{{- end -}}
{{- end -}}
{{- /* Disk queues share the queue volume: split its budget between them. The loadbalancing exporter's
     queue (all its gateways' partitions) is under protocol.otlp, as in the Collector. */ -}}
{{- $disk := list -}}
{{- $queues := dict -}}
{{- range $id, $e := $cfg.exporters -}}
{{- if kindIs "map" $e -}}
{{- $q := get $e "sending_queue" -}}
{{- if eq (first (splitList "/" $id)) "loadbalancing" -}}
{{- $q = dig "protocol" "otlp" "sending_queue" nil $e -}}
{{- end -}}
{{- if and (kindIs "map" $q) (eq (toString (get $q "storage")) "disk") }}{{ $disk = append $disk $id }}{{ $_ := set $queues $id $q }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if $disk -}}
{{- if not .Values.queue.enabled -}}{{- fail (printf "headwater: exporters %s use a disk queue but queue.enabled is false (no volume at /var/lib/headwater/queue)" (join ", " $disk)) -}}{{- end -}}
{{- $limit := include "headwater.sizeMiB" .Values.queue.sizeLimit | int64 -}}
{{- $each := div (mul $limit (int64 .Values.queue.maxBytesPercent)) (mul 100 (len $disk)) -}}
{{- if lt $each 16 -}}{{- fail (printf "headwater: queue.sizeLimit %s leaves %d MiB per disk queue (%d queues); give at least 16 MiB each" .Values.queue.sizeLimit $each (len $disk)) -}}{{- end -}}
{{- range $id := $disk -}}
{{- $q := get $queues $id -}}
{{- if not (hasKey $q "directory") }}{{ $_ := set $q "directory" "/var/lib/headwater/queue" }}{{ end -}}
{{- $size := $each -}}
{{- /* max_bytes applies to each gateway's own partition: the share is split forward.maxGateways ways. */ -}}
{{- if eq (first (splitList "/" $id)) "loadbalancing" -}}
{{- $size = div $each (int64 $.Values.forward.maxGateways) -}}
{{- if and (lt $size 16) (not (hasKey $q "max_bytes")) -}}{{- fail (printf "headwater: queue.sizeLimit %s leaves %d MiB per gateway's disk queue (forward.maxGateways %d); give at least 16 MiB each" $.Values.queue.sizeLimit $size (int $.Values.forward.maxGateways)) -}}{{- end -}}
{{- end -}}
{{- if not (hasKey $q "max_bytes") }}{{ $_ := set $q "max_bytes" (printf "%dMiB" $size) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- /* Strings in `config` and the presets may hold templates ("{{ .Release.Namespace }}"). */ -}}
{{- $out := tpl (toYaml $cfg) . -}}
{{- if hasKey (fromYaml $out) "Error" }}{{ fail (printf "headwater: the agent config is not valid YAML after tpl: %s" (fromYaml $out).Error) }}{{ end -}}
{{- $out -}}
{{- end -}}

{{/* A duration of the agent's config (500ms, 30s, 1.5m, 1h, or a number of seconds), in seconds. */}}
{{- define "headwater.durationSeconds" -}}
{{- $s := toString . | trim -}}
{{- $units := dict "ns" 0.000000001 "us" 0.000001 "µs" 0.000001 "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- if regexMatch "^[0-9]+(\\.[0-9]+)?$" $s -}}
{{- float64 $s -}}
{{- else if regexMatch "^[0-9]+(\\.[0-9]+)?\\s*(ns|us|µs|ms|s|m|h|d)$" $s -}}
{{- $n := regexFind "^[0-9]+(\\.[0-9]+)?" $s -}}
{{- $unit := trim (trimPrefix $n $s) -}}
{{- mulf (float64 $n) (get $units $unit) -}}
{{- else -}}
{{- fail (printf "headwater: %q is not a duration like 30s or 1m" $s) -}}
{{- end -}}
{{- end -}}

{{/*
Checks that need the whole picture, run by the ConfigMap (rendered in every mode): a failing one
stops the render with what to change.
*/}}
{{- define "headwater.checks" -}}
{{- $mode := include "headwater.mode" . -}}
{{- $cfg := include "headwater.agentConfig" . | fromYaml -}}
{{- $ports := (include "headwater.ports" . | fromYaml).ports -}}
{{- $names := list -}}
{{- $hostPorts := list -}}
{{- range $ports }}{{ $names = append $names .name }}{{ if .hostPort }}{{ $hostPorts = append $hostPorts .name }}{{ end }}{{ end -}}
{{- /* The kubelet probes the pod IP: the telemetry endpoint must listen there, on a known port. */ -}}
{{- $probed := false -}}
{{- range $probe := list .Values.livenessProbe .Values.readinessProbe .Values.startupProbe -}}
{{- if and $probe $probe.httpGet (eq (toString $probe.httpGet.port) "hw-telemetry") }}{{ $probed = true }}{{ end -}}
{{- end -}}
{{- if $probed -}}
{{- $endpoint := toString ((($cfg.service | default dict).telemetry | default dict).endpoint | default "") -}}
{{- if not (has "hw-telemetry" $names) -}}
{{- fail (printf "headwater: the probes use port hw-telemetry, but service.telemetry.endpoint %q has no literal port: set one (0.0.0.0:8888) or declare ports.hw-telemetry.containerPort" $endpoint) -}}
{{- end -}}
{{- if regexMatch "^(127\\.[0-9.]+|localhost|\\[::1\\]|::1):" $endpoint -}}
{{- fail (printf "headwater: service.telemetry.endpoint %q listens on loopback only, where the kubelet's probes (and Prometheus) cannot reach it: bind 0.0.0.0" $endpoint) -}}
{{- end -}}
{{- end -}}
{{- /* Every ${env:VAR} without a default must be set in the container, or the agent refuses to start. */ -}}
{{- if not .Values.envFrom -}}
{{- $declared := list -}}
{{- range (include "headwater.env" . | fromYamlArray) }}{{ $declared = append $declared .name }}{{ end -}}
{{- $missing := list -}}
{{- range $ref := regexFindAll "\\$\\{env:[A-Za-z_][A-Za-z0-9_]*\\}" (include "headwater.agentConfig" .) -1 -}}
{{- $name := trimSuffix "}" (trimPrefix "${env:" $ref) -}}
{{- if not (or (has $name $declared) (has $name $missing)) }}{{ $missing = append $missing $name }}{{ end -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "headwater: the agent config uses ${env:%s} but the container does not set it: add it under `env` (or `envFrom`), or write ${env:NAME:-default}" (join "}, ${env:" $missing)) -}}
{{- end -}}
{{- end -}}
{{- /* SIGTERM → receivers flush, exporters drain for up to service.shutdown_timeout → exit 0. */ -}}
{{- $drain := include "headwater.durationSeconds" ((($cfg.service | default dict).shutdown_timeout) | default "30s") | float64 -}}
{{- $preStop := 0 -}}
{{- if and (eq $mode "sidecar") (not .Values.sidecar.native) }}{{ $preStop = int .Values.sidecar.preStopSleepSeconds }}{{ end -}}
{{- $need := addf $drain $preStop 5 | ceil | int -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) $need -}}
{{- fail (printf "headwater: terminationGracePeriodSeconds %d is too short: the agent drains for up to service.shutdown_timeout (%gs)%s, plus 5s to flush and exit; give at least %d" (int .Values.terminationGracePeriodSeconds) $drain (ternary (printf " after the %ds preStop sleep" $preStop) "" (gt $preStop 0)) $need) -}}
{{- end -}}
{{- /*
DaemonSet: a surge pod would start beside the old one on the same node. A hostPath queue is locked
by one agent at a time (the new agent cannot start while the old one runs: it would crash-loop, and
the old pod is only removed once the new one is ready), and a hostPort cannot be bound twice.
*/ -}}
{{- if eq $mode "daemonset" -}}
{{- $surge := toString ((.Values.updateStrategy.rollingUpdate | default dict).maxSurge | default 0) -}}
{{- $hostPathQueue := and .Values.queue.enabled (eq .Values.queue.daemonsetVolume "hostPath") -}}
{{- if and (not (has $surge (list "0" "0%"))) (or $hostPathQueue $hostPorts) -}}
{{- fail (printf "headwater: updateStrategy.rollingUpdate.maxSurge %s would start a second agent on a node while the first still runs, but %s: use maxSurge 0 (replace, then start)" $surge (ternary "its hostPath disk queue can be locked by one agent only" (printf "hostPorts (%s) can be bound once per node" (join ", " $hostPorts)) $hostPathQueue)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the telemetry token: the user's, or the one the chart keeps. */}}
{{- define "headwater.telemetrySecret" -}}
{{- .Values.telemetry.auth.existingSecret | default (printf "%s-telemetry" (include "headwater.fullname" .)) -}}
{{- end -}}

{{- define "headwater.tokenEnv" -}}
{{- printf "HEADWATER_RW_%s_TOKEN" (regexReplaceAll "[^A-Za-z0-9]" (upper .) "_") -}}
{{- end -}}

{{- define "headwater.configChecksum" -}}
{{- include "headwater.agentConfig" . | sha256sum -}}
{{- end -}}

{{/*
Ports as a YAML list of {name, containerPort, protocol, hostPort?, service}: derived from the agent's
config, then `ports` applied (override, disable, or declare new ones).
*/}}
{{- define "headwater.ports" -}}
{{- $mode := include "headwater.mode" . -}}
{{- $cfg := include "headwater.agentConfig" . | fromYaml -}}
{{- $derived := dict -}}
{{- $r := $cfg.receivers | default dict -}}
{{- $e := $cfg.exporters | default dict -}}
{{- $add := list -}}
{{- with $r.statsd -}}
{{- $add = append $add (list "statsd-udp" (include "headwater.portOf" .udp) "UDP") -}}
{{- $add = append $add (list "statsd-tcp" (include "headwater.portOf" .tcp) "TCP") -}}
{{- end -}}
{{- with $r.otlp -}}
{{- $add = append $add (list "otlp-grpc" (include "headwater.portOf" .grpc) "TCP") -}}
{{- $add = append $add (list "otlp-http" (include "headwater.portOf" .http) "TCP") -}}
{{- end -}}
{{- with $r.http -}}
{{- $add = append $add (list "hw-http" (include "headwater.portOf" .endpoint) "TCP") -}}
{{- end -}}
{{- with $e.prometheus -}}
{{- $add = append $add (list "hw-metrics" (include "headwater.portOf" .endpoint) "TCP") -}}
{{- end -}}
{{- $add = append $add (list "hw-telemetry" (include "headwater.portOf" $cfg.service.telemetry.endpoint) "TCP") -}}
{{- range $a := $add -}}
{{- if index $a 1 -}}
{{- $_ := set $derived (index $a 0) (dict "containerPort" (int (index $a 1)) "protocol" (index $a 2)) -}}
{{- end -}}
{{- end -}}
{{- $all := mustMergeOverwrite $derived (deepCopy (.Values.ports | default dict)) -}}
{{- $out := list -}}
{{- range $name := keys $all | sortAlpha -}}
{{- $port := get $all $name -}}
{{- if ne (toString (get $port "enabled")) "false" -}}
{{- if not (get $port "containerPort") -}}{{- fail (printf "headwater: ports.%s needs a containerPort (the chart could not derive one from the config)" $name) -}}{{- end -}}
{{- if and (get $port "hostPort") (ne $mode "daemonset") -}}{{- fail (printf "headwater: ports.%s.hostPort is only allowed in daemonset mode (this is %s mode)" $name $mode) -}}{{- end -}}
{{- $item := dict "name" $name "containerPort" (int (get $port "containerPort")) "protocol" (get $port "protocol" | default "TCP") "service" (ne (toString (get $port "service")) "false") -}}
{{- if get $port "hostPort" }}{{ $_ := set $item "hostPort" (int (get $port "hostPort")) }}{{ end -}}
{{- $out = append $out $item -}}
{{- end -}}
{{- end -}}
{{- toYaml (dict "ports" $out) -}}
{{- end -}}

{{/* The Downward API and secret environment of the agent container. */}}
{{- define "headwater.env" -}}
- name: K8S_NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: K8S_NODE_IP
  valueFrom: {fieldRef: {fieldPath: status.hostIP}}
- name: K8S_POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: K8S_NAMESPACE_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: K8S_POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: K8S_POD_UID
  valueFrom: {fieldRef: {fieldPath: metadata.uid}}
{{- if not (dig "service" "telemetry" "auth" nil (.Values.config | default dict)) }}
- name: HEADWATER_TELEMETRY_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "headwater.telemetrySecret" . | quote }}, key: {{ ternary .Values.telemetry.auth.key "token" (ne .Values.telemetry.auth.existingSecret "") | quote }}}
{{- end }}
{{- if .Values.k8s.clusterName }}
- name: K8S_CLUSTER_NAME
  value: {{ .Values.k8s.clusterName | quote }}
{{- end }}
{{- with .Values.presets.signoz }}
{{- if and .enabled .ingestionKey.existingSecret }}
- name: SIGNOZ_INGESTION_KEY
  valueFrom:
    secretKeyRef: {name: {{ .ingestionKey.existingSecret | quote }}, key: {{ .ingestionKey.key | quote }}}
{{- end }}
{{- end }}
{{- if .Values.presets.remoteWrite.enabled }}
{{- range $t := .Values.presets.remoteWrite.targets }}
{{- if and $t.bearerToken $t.bearerToken.existingSecret }}
- name: {{ include "headwater.tokenEnv" $t.name }}
  valueFrom:
    secretKeyRef: {name: {{ $t.bearerToken.existingSecret | quote }}, key: {{ $t.bearerToken.key | default "token" | quote }}}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The agent container, as a list item; used by the DaemonSet, the Deployment and sidecar mode. */}}
{{- define "headwater.container" -}}
{{- $mode := include "headwater.mode" . -}}
{{- $ports := (include "headwater.ports" . | fromYaml).ports -}}
- name: headwater
  image: {{ include "headwater.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "-c", "/etc/headwater/config.yaml"]
  {{- if and (eq $mode "sidecar") .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  ports:
    {{- range $ports }}
    - name: {{ .name }}
      containerPort: {{ .containerPort }}
      protocol: {{ .protocol }}
      {{- if and .hostPort (eq $mode "daemonset") }}
      hostPort: {{ .hostPort }}
      {{- end }}
    {{- end }}
  env:
    {{- include "headwater.env" . | nindent 4 }}
  {{- with .Values.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  startupProbe:
    {{- toYaml .Values.startupProbe | nindent 4 }}
  livenessProbe:
    {{- toYaml .Values.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- toYaml .Values.readinessProbe | nindent 4 }}
  {{- if and (eq $mode "sidecar") (not .Values.sidecar.native) .Values.sidecar.preStopSleepSeconds }}
  lifecycle:
    preStop:
      exec: {command: ["sleep", "{{ int .Values.sidecar.preStopSleepSeconds }}"]}
  {{- end }}
  volumeMounts:
    - {name: headwater-config, mountPath: /etc/headwater, readOnly: true}
    - {name: headwater-queue, mountPath: /var/lib/headwater/queue}
    - {name: headwater-sockets, mountPath: /var/run/headwater}
    - {name: headwater-tmp, mountPath: /tmp}
{{- end -}}

{{/* The pod's volumes, as list items. */}}
{{- define "headwater.volumes" -}}
{{- $mode := include "headwater.mode" . -}}
- name: headwater-config
  configMap:
    name: {{ include "headwater.fullname" . }}
{{- if not (and (eq $mode "gateway") .Values.gateway.persistence.enabled) }}
- name: headwater-queue
{{- if and (eq $mode "daemonset") .Values.queue.enabled (eq .Values.queue.daemonsetVolume "hostPath") }}
  hostPath:
    path: {{ printf "%s/%s/%s" (trimSuffix "/" .Values.queue.hostPathRoot) .Release.Namespace .Release.Name }}
    type: DirectoryOrCreate
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.queue.sizeLimit }}
{{- end }}
{{- end }}
- name: headwater-sockets
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
- name: headwater-tmp
  emptyDir: {sizeLimit: 64Mi}
{{- end -}}

{{/* Pod-level settings shared by the DaemonSet and the Deployment. */}}
{{- define "headwater.podSpec" -}}
{{- $mode := include "headwater.mode" . -}}
serviceAccountName: {{ include "headwater.serviceAccountName" . }}
{{- /* The token is mounted only for the k8s resolver (it reads EndpointSlices); nothing else uses the API. */}}
automountServiceAccountToken: {{ include "headwater.watchesEndpointSlices" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- if and (eq $mode "daemonset") .Values.queue.enabled (eq .Values.queue.daemonsetVolume "hostPath") }}
initContainers:
  # hostPath directories are created root-owned; hand this release's queue directory to the agent.
  - name: queue-permissions
    image: {{ include "headwater.image" . | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    # chown only: CAP_CHOWN changes the owner of any file, but chmod of a file root does not own
    # (the directory after the first start) would need CAP_FOWNER, and fail every later start.
    command: ["chown", "{{ int .Values.securityContext.runAsUser }}:{{ int .Values.securityContext.runAsGroup }}", "/var/lib/headwater/queue"]
    securityContext:
      runAsUser: 0
      runAsGroup: 0
      runAsNonRoot: false
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      privileged: false
      capabilities: {drop: [ALL], add: [CHOWN]}
      seccompProfile: {type: RuntimeDefault}
    resources:
      requests: {cpu: 10m, memory: 16Mi}
      limits: {memory: 32Mi}
    volumeMounts:
      - {name: headwater-queue, mountPath: /var/lib/headwater/queue}
{{- end }}
containers:
  {{- include "headwater.container" . | nindent 2 }}
volumes:
  {{- include "headwater.volumes" . | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "headwater.podAnnotations" -}}
checksum/config: {{ include "headwater.configChecksum" . }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* For application charts (sidecar mode): `include "headwater.sidecar.container" .Subcharts.headwater`. */}}
{{- define "headwater.sidecar.container" -}}
{{- include "headwater.container" . -}}
{{- end -}}

{{- define "headwater.sidecar.volumes" -}}
{{- include "headwater.volumes" . -}}
{{- end -}}

{{- define "headwater.sidecar.checksum" -}}
{{- include "headwater.configChecksum" . -}}
{{- end -}}
