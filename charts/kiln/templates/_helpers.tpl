{{- define "kiln.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "kiln.labels" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}


{{- /* The namespaces whose labelled Secrets hold API keys, comma-separated: apiKeys.namespaces, or the release
       namespace when that list is empty. Used for the Roles and the controller's --api-key-namespaces flag alike,
       so the two cannot disagree. */ -}}
{{- define "kiln.apiKeyNamespaces" -}}
{{- if .Values.apiKeys.namespaces -}}
{{- .Values.apiKeys.namespaces | uniq | join "," -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}
