{{/*
Names and labels.
*/}}
{{- define "sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name: the release name, with the chart name appended unless it has it. */}}
{{- define "sidecar.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := include "sidecar.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component; call with (list $ "web"). */}}
{{- define "sidecar.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "sidecar.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/*
A comma list of ports and port ranges from a list value, each checked to lie in 1-65535 (the
schema has already checked the shape). Call with (list "sidecar.exclusions.outboundPorts" $ports).
*/}}
{{- define "sidecar.portList" -}}
{{- $what := index . 0 -}}
{{- $items := list -}}
{{- range index . 1 -}}
{{- $item := toString . -}}
{{- $ends := splitList "-" $item -}}
{{- range $ends -}}
{{- $port := atoi . -}}
{{- if or (lt $port 1) (gt $port 65535) -}}
{{- fail (printf "%s: %q is not a port or port range within 1-65535" $what $item) -}}
{{- end -}}
{{- end -}}
{{- if and (eq (len $ends) 2) (gt (atoi (first $ends)) (atoi (last $ends))) -}}
{{- fail (printf "%s: %q is not a port range: it ends before it starts" $what $item) -}}
{{- end -}}
{{- $items = append $items $item -}}
{{- end -}}
{{- join "," $items -}}
{{- end }}

{{/* The sidecar's trace sampler: the value, or parentbased_traceidratio when only a ratio is given. */}}
{{- define "sidecar.sampler" -}}
{{- $s := .Values.sidecar.sampling -}}
{{- $ratioSet := not (kindIs "invalid" $s.ratio) -}}
{{- if $s.sampler -}}
{{- if and $ratioSet (not (hasSuffix "traceidratio" $s.sampler)) -}}
{{- fail (printf "sidecar.sampling.ratio is only used by the traceidratio samplers, not by sidecar.sampling.sampler %q" $s.sampler) -}}
{{- end -}}
{{- $s.sampler -}}
{{- else if $ratioSet -}}
parentbased_traceidratio
{{- end -}}
{{- end }}

{{/*
The sidecar container: with default values exactly the initContainer of
sidecar/src/inject/template.yaml (tests/tests/deploy_manifests.rs compares them).
*/}}
{{- define "sidecar.container" -}}
{{- $sc := .Values.sidecar -}}
- name: sidecar
  image: {{ printf "%s:%s" $sc.image.repository (default .Chart.AppVersion $sc.image.tag) | quote }}
  imagePullPolicy: {{ $sc.image.pullPolicy }}
  # A native sidecar (Kubernetes 1.29+): starts before the application containers, runs
  # alongside them, stops after them.
  restartPolicy: Always
  # The pod's cgroup is found by searching the host's cgroup2 tree, mounted below.
  args: ["run", "--host-cgroup-root", "/host/sys/fs/cgroup"]
  env:
    # Downward API: the k8s.* resource attributes of every span and metric.
    - name: K8S_POD_NAME
      valueFrom: { fieldRef: { fieldPath: metadata.name } }
    - name: K8S_NAMESPACE_NAME
      valueFrom: { fieldRef: { fieldPath: metadata.namespace } }
    - name: K8S_POD_UID
      valueFrom: { fieldRef: { fieldPath: metadata.uid } }
    - name: K8S_NODE_NAME
      valueFrom: { fieldRef: { fieldPath: spec.nodeName } }
    {{- with $sc.collector.endpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- with $sc.collector.protocol }}
    - name: OTEL_EXPORTER_OTLP_PROTOCOL
      value: {{ . | quote }}
    {{- end }}
    {{- with $sc.exclusions.outboundPorts }}
    - name: SIDECAR_EXCLUDE_OUTBOUND_PORTS
      value: {{ include "sidecar.portList" (list "sidecar.exclusions.outboundPorts" .) | quote }}
    {{- end }}
    {{- with $sc.exclusions.outboundCidrs }}
    - name: SIDECAR_EXCLUDE_OUTBOUND_CIDRS
      value: {{ join "," . | quote }}
    {{- end }}
    {{- with $sc.exclusions.inboundPorts }}
    - name: SIDECAR_EXCLUDE_INBOUND_PORTS
      value: {{ include "sidecar.portList" (list "sidecar.exclusions.inboundPorts" .) | quote }}
    {{- end }}
    {{- with include "sidecar.sampler" . }}
    - name: OTEL_TRACES_SAMPLER
      value: {{ . | quote }}
    {{- end }}
    {{- if not (kindIs "invalid" $sc.sampling.ratio) }}
    - name: OTEL_TRACES_SAMPLER_ARG
      value: {{ toString $sc.sampling.ratio | quote }}
    {{- end }}
    {{- with $sc.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    # Admin server: /healthz, /readyz, /metrics (Prometheus), /stats (`sidecar top`).
    - name: sidecar-admin
      containerPort: 15020
      protocol: TCP
  # Holds back the application containers until the sidecar intercepts the pod's connections.
  startupProbe:
    httpGet: { path: /readyz, port: 15020 }
    periodSeconds: 1
    failureThreshold: 60
  readinessProbe:
    httpGet: { path: /readyz, port: 15020 }
    periodSeconds: 5
  livenessProbe:
    httpGet: { path: /healthz, port: 15020 }
    periodSeconds: 10
    failureThreshold: 3
  resources:
    {{- toYaml $sc.resources | nindent 4 }}
  securityContext:
    {{- if $sc.privileged }}
    # FALLBACK (sidecar.privileged): every capability, no seccomp/AppArmor confinement.
    privileged: true
    runAsUser: 0
    runAsNonRoot: false
    readOnlyRootFilesystem: true
    {{- else }}
    # Root with only these capabilities (Kubernetes makes added capabilities effective for
    # root only). The only writable path is the /tmp emptyDir.
    runAsUser: 0
    runAsNonRoot: false
    # No setuid or file-capability gains after start (no_new_privs).
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
      # BPF: maps and programs. PERFMON: the sock_ops and tracepoint programs. NET_ADMIN:
      # attach to the pod's cgroup and network namespace. SYS_RESOURCE: raise RLIMIT_MEMLOCK,
      # needed only before Linux 5.11. No SYS_ADMIN (see docs/kubernetes.md).
      add: [BPF, PERFMON, NET_ADMIN, SYS_RESOURCE]
    {{- end }}
  volumeMounts:
    # The host's cgroup2 tree, read-only, to find the pod's cgroup.
    - { name: sidecar-host-cgroup, mountPath: /host/sys/fs/cgroup, readOnly: true }
    # The host's tracefs, read-only: the tcp:tcp_receive_reset tracepoint is attached
    # through it (resets and refused connects are told apart); a container has no
    # tracefs and mounting one would need CAP_SYS_ADMIN.
    - { name: sidecar-tracefs, mountPath: /sys/kernel/tracing, readOnly: true }
    # The pod's labels and annotations (Downward API): resource attributes and per-pod
    # interception settings.
    - { name: sidecar-podinfo, mountPath: /etc/podinfo, readOnly: true }
    # Scratch space; the root filesystem is read-only.
    - { name: sidecar-tmp, mountPath: /tmp }
{{- end }}

{{/* The sidecar's volumes, as in sidecar/src/inject/template.yaml. */}}
{{- define "sidecar.volumes" -}}
# The node's cgroup2 tree (mounted read-only by the sidecar only).
- name: sidecar-host-cgroup
  hostPath: { path: /sys/fs/cgroup, type: Directory }
# The node's tracefs (mounted read-only by the sidecar only).
- name: sidecar-tracefs
  hostPath: { path: /sys/kernel/tracing, type: Directory }
# Downward API files, `key="value"` per line, kept current by the kubelet.
- name: sidecar-podinfo
  downwardAPI:
    items:
      - { path: labels, fieldRef: { fieldPath: metadata.labels } }
      - { path: annotations, fieldRef: { fieldPath: metadata.annotations } }
- name: sidecar-tmp
  emptyDir: { medium: Memory, sizeLimit: 16Mi }
{{- end }}

{{/* The pod annotations of template.yaml, with the user's podAnnotations over them. */}}
{{- define "sidecar.podAnnotations" -}}
{{- $injected := dict "sidecar.dev/status" "injected" "prometheus.io/scrape" "true" "prometheus.io/port" "15020" "prometheus.io/path" "/metrics" -}}
{{- toYaml (mergeOverwrite $injected (deepCopy .Values.podAnnotations)) }}
{{- end }}

{{/* What the example's pods share: the API token not mounted, the grace period, placement. */}}
{{- define "sidecar.podCommon" -}}
# The sidecar never calls the Kubernetes API.
automountServiceAccountToken: false
# Longer than the sidecar's drain (5 s) plus its span flush (OTEL_BSP_EXPORT_TIMEOUT, 30 s).
terminationGracePeriodSeconds: 45
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
