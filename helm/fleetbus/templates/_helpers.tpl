{{- define "fleetbus.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetbus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "fleetbus.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fleetbus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "fleetbus.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "fleetbus.kmeImage" -}}
{{ .Values.kme.image.repository | default .Values.image.repository }}:{{ .Values.kme.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fleetbus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fleetbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetbus
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "fleetbus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleetbus.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fleetbus.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fleetbus.keysSecret" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-keys" (include "fleetbus.fullname" .)) -}}
{{- end -}}

{{- define "fleetbus.pkiSecret" -}}
{{- .Values.secrets.existingPkiSecret | default (printf "%s-pki" (include "fleetbus.fullname" .)) -}}
{{- end -}}

{{- define "fleetbus.kafkaTlsSecret" -}}
{{- .Values.kafkaTls.existingSecret | default (printf "%s-kafka-tls" (include "fleetbus.fullname" .)) -}}
{{- end -}}

{{- define "fleetbus.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{/* Settings the chart itself sets (from volumes, ports, kafkaTls): refused in .Values.settings by
values.schema.json too; checked here so that a schema-less install cannot duplicate a key. */}}
{{- define "fleetbus.validateValues" -}}
{{- range $name := list "keys_dir" "data_dir" "policy_dir" "metrics_port" "metrics_bind" "qkd_ca_file" "qkd_cert_file" "qkd_key_file" "kafka_security_protocol" "kafka_ssl_cafile" "kafka_ssl_certfile" "kafka_ssl_keyfile" -}}
{{- if hasKey $.Values.settings $name -}}
{{- fail (printf "settings.%s is set by the chart itself (see values.yaml); remove it" $name) -}}
{{- end -}}
{{- end -}}
{{- with .Values.worker.autoscaling -}}
{{- if .enabled -}}
{{- if gt (int .minReplicas) (int .maxReplicas) -}}
{{- fail (printf "worker.autoscaling.minReplicas (%d) > maxReplicas (%d)" (int .minReplicas) (int .maxReplicas)) -}}
{{- end -}}
{{- $partitions := int ($.Values.settings.partitions | default 4) -}}
{{- if gt (int .maxReplicas) $partitions -}}
{{- fail (printf "worker.autoscaling.maxReplicas (%d) > settings.partitions (%d): workers beyond the partition count get no partition and sit idle" (int .maxReplicas) $partitions) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fleetbus.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "fleetbus.kmePkiSecret" -}}
{{- .Values.kme.existingPkiSecret | default (printf "%s-kme-pki" (include "fleetbus.fullname" .)) -}}
{{- end -}}

{{/*
Fail the render when the chart is to create a Secret without the files its pod needs: an empty
key Secret once gave a worker that ran no pipeline and passed every probe. Existing Secrets are
not read here (no cluster access at render time); the worker's /readyz covers them.
*/}}
{{- define "fleetbus.requireFiles" -}}
{{- $missing := list -}}
{{- range .files -}}
{{- if not (hasKey $.given .) -}}{{- $missing = append $missing . -}}{{- end -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "%s lacks %s (or set %s to a Secret you created)" .values (join ", " $missing) .existing) -}}
{{- end -}}
{{- end -}}

{{- define "fleetbus.validateSecrets" -}}
{{- if not .Values.secrets.existingSecret -}}
{{- $sealer := printf "%s.key" (.Values.settings.sealer_principal | default "bus-sealer") -}}
{{- include "fleetbus.requireFiles" (dict "given" .Values.secrets.keys "files" (list "root.pub" "directory.cbor" $sealer) "values" "secrets.keys" "existing" "secrets.existingSecret") -}}
{{- end -}}
{{- if and .Values.settings.qkd_sae_id (not .Values.secrets.existingPkiSecret) -}}
{{- $sae := .Values.settings.qkd_sae_id -}}
{{- include "fleetbus.requireFiles" (dict "given" .Values.secrets.pki "files" (list "ca.pem" (printf "%s.pem" $sae) (printf "%s.key" $sae)) "values" "secrets.pki" "existing" "secrets.existingPkiSecret") -}}
{{- end -}}
{{- if and .Values.kafkaTls.enabled (not .Values.kafkaTls.existingSecret) -}}
{{- include "fleetbus.requireFiles" (dict "given" .Values.kafkaTls.files "files" (list "ca.pem" "tls.crt" "tls.key") "values" "kafkaTls.files" "existing" "kafkaTls.existingSecret") -}}
{{- end -}}
{{- if and .Values.kme.enabled (not .Values.kme.existingPkiSecret) -}}
{{- include "fleetbus.requireFiles" (dict "given" .Values.kme.pki "files" (list "ca.pem" "kme-a.pem" "kme-a.key" "kme-b.pem" "kme-b.key") "values" "kme.pki" "existing" "kme.existingPkiSecret") -}}
{{- end -}}
{{- end -}}
