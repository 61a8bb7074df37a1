{{- define "kubeforge.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubeforge.serviceAccountName" -}}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kubeforge.labels" -}}
app.kubernetes.io/name: kubeforge
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
