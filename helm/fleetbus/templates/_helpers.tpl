{{- define "fleetbus.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleetbus.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleetbus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fleetbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleetbus
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
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fleetbus.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}
