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

{{- /* The ledger's raft group: ID=HOST:PORT for every controller replica, comma-separated. Replica i of the
       StatefulSet is raft id i+1, reached by its stable name under the headless peers Service. */ -}}
{{- define "kiln.ledgerPeers" -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.controller.replicas) -}}
{{- $peers = append $peers (printf "%d=%s-controller-%d.%s-controller-peers.%s.svc:%d" (add $i 1) $.Release.Name $i $.Release.Name $.Release.Namespace (int $.Values.controller.ledger.port)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}
