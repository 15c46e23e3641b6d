{{- define "meshlet.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "meshlet.labels" -}}
app.kubernetes.io/part-of: meshlet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "meshlet.controlPlaneAddress" -}}
meshlet-controlplane.{{ .Release.Namespace }}.svc:{{ .Values.controlPlane.port }}
{{- end -}}
